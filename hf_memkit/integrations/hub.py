"""Model cards and Hub uploads for exported checkpoints (through ``huggingface_hub``; nothing else here talks
to the network, and nothing at all does unless ``push_to_hub`` is called)."""

from __future__ import annotations

import json
import os
from typing import Any

CARD = "README.md"
EXPORT_INFO = "memkit_export.json"


def folder_bytes(folder: str, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            if f.endswith(suffixes):
                total += os.path.getsize(os.path.join(root, f))
    return total


def upload_plan(folder: str) -> list[str]:
    """The files ``push_to_hub`` uploads: everything in the folder except hidden files and caches."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            if not f.startswith("."):
                out.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(out)


def push_to_hub(folder: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, api: Any = None) -> dict[str, Any]:
    """Create ``repo_id`` if needed and upload the folder (the files of :func:`upload_plan`) in one commit."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    files = upload_plan(folder)
    repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), repo_type="model", folder_path=folder,
                               allow_patterns=files,
                               commit_message=commit_message or "Upload compressed checkpoint (hf_memkit)")
    return {"repo_id": getattr(repo, "repo_id", repo_id), "files": files,
            "commit": getattr(commit, "commit_url", None) or str(commit)}


def _mb(n: int | None) -> str:
    return f"{n / 2**20:.1f} MB" if n else "-"


def _ppl(x: float | None) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def model_card(info: dict[str, Any]) -> str:
    """A README.md for an exported folder, from the dict :func:`hf_memkit.integrations.export.export_model`
    gathers (recipe, techniques and versions, grids, measured perplexity and size)."""
    lines = ["---", "library_name: transformers", "tags:", "- hf_memkit"]
    if info.get("format") == "compressed-tensors":
        lines += ["- compressed-tensors", "- quantized"]
    lines += [f"- {t['name']}" for t in info.get("techniques", [])]
    lines += ["---", "", f"# {info.get('model_name') or 'model'} ({info.get('summary', info.get('format'))})", ""]
    lines.append(f"Written by hf_memkit {info.get('hf_memkit_version', '?')} in the `{info.get('format')}` format"
                 + (f" (compressed-tensors {info['compressed_tensors_version']})"
                    if info.get("compressed_tensors_version") else "") + ".")
    lines += ["", "## Techniques", "", "| technique | version | settings |", "|---|---|---|"]
    for t in info.get("techniques", []):
        settings = ", ".join(f"{k}={v}" for k, v in t.get("settings", {}).items())
        lines.append(f"| {t['name']} | {t.get('version', '?')} | {settings} |")
    m = info.get("metrics", {})
    lines += ["", "## Measured", "", "| | perplexity (embedded eval corpus) | weights on disk |", "|---|---|---|",
              f"| full precision | {_ppl(m.get('perplexity_full_precision'))} | "
              f"{_mb(m.get('bytes_full_precision'))} |",
              f"| this checkpoint | {_ppl(m.get('perplexity'))} | {_mb(m.get('bytes_on_disk'))} |"]
    if m.get("perplexity_note"):
        lines += ["", m["perplexity_note"]]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM",
              "", f"model = AutoModelForCausalLM.from_pretrained(\"{info.get('repo_id') or 'PATH'}\")"
              + ("  # pip install compressed-tensors" if info.get("format") == "compressed-tensors" else "")]
    if info.get("lorc"):
        lines += ["", "from peft import PeftModel  # add the LoRC compensation (a LoRA adapter, scaling 1)",
                  f"model = PeftModel.from_pretrained(model, \"{info.get('repo_id') or 'PATH'}\", "
                  f"subfolder=\"{info['lorc']['subfolder']}\")"]
    lines += ["```", ""]
    if info.get("recipe_yaml"):
        lines += ["## Recipe", "", "```yaml", info["recipe_yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(folder: str, info: dict[str, Any]) -> None:
    with open(os.path.join(folder, CARD), "w", encoding="utf-8") as f:
        f.write(model_card(info))
    with open(os.path.join(folder, EXPORT_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, default=str)


def read_export_info(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, EXPORT_INFO)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
