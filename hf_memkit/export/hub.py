"""Model cards, the export manifest and Hub uploads for exported checkpoints (through ``huggingface_hub``;
nothing else here talks to the network, and nothing at all does unless ``push_to_hub`` is called).

Every folder hf_memkit exports carries ``memkit_export.json``: the model card's data plus a manifest of the
files of the model (``files``: size and sha256 of each), the reports written beside them (``reports``), and the
hf_memkit version. It is what makes a folder hf_memkit's own: ``memkit export`` refuses folders without one,
rewrites README.md only inside its own folders, and uploads exactly the files the manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..atomic import write_json, write_text
from ..errors import MemkitError

CARD = "README.md"
EXPORT_INFO = "memkit_export.json"
MANIFEST_VERSION = 1
#: files an export may hold that are about the run, not part of the model (uploaded only when asked)
REPORT_FILES = ("compression_report.json",)
_MANIFEST_KEYS = ("memkit_manifest", "files", "reports")


class ForeignFolderError(MemkitError, ValueError):
    """A folder hf_memkit did not write (no ``memkit_export.json``), or whose manifest does not match it."""


def folder_bytes(folder: str, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            if f.endswith(suffixes):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _entry(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _walk(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        out += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                for f in files if not f.startswith(".")]
    return sorted(out)


def write_manifest(folder: str) -> dict[str, Any]:
    """Hash every file of ``folder`` into its ``memkit_export.json`` (keeping the card data already there).
    Called on the staged folder just before it is renamed into place, so the manifest lists exactly what the
    export wrote."""
    from .. import __version__

    data = read_export_info(folder) or {}
    files, reports = {}, {}
    for rel in _walk(folder):
        if rel != EXPORT_INFO:
            (reports if rel in REPORT_FILES else files)[rel] = _entry(os.path.join(folder, rel))
    data.update(memkit_manifest=MANIFEST_VERSION, files=files, reports=reports)
    data.setdefault("hf_memkit_version", __version__)
    write_json(os.path.join(folder, EXPORT_INFO), data, default=str)
    return data


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of ``folder``; None when it has none (hf_memkit did not write it)."""
    path = os.path.join(folder, EXPORT_INFO)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ForeignFolderError(f"{path} is unreadable ({exc}); export the model again") from None
    if not isinstance(data, dict):
        raise ForeignFolderError(f"{path} is not an hf_memkit manifest; export the model again")
    return data


def check_manifest(folder: str, *, hashes: bool = False) -> dict[str, Any]:
    """The manifest of an hf_memkit export, after checking that every file it lists is there with its size
    (and its sha256 when ``hashes``)."""
    data = read_manifest(folder)
    if data is None or not isinstance(data.get("files"), dict):
        raise ForeignFolderError(
            f"{folder} was not written by hf_memkit (no {EXPORT_INFO} manifest in it), so memkit will not change "
            "its README.md or upload it; export the model with `memkit compress MODEL --recipe R -o DIR` or a "
            "training recipe's `export:` section, and pass that folder"
        )
    for rel, want in {**data["files"], **(data.get("reports") or {})}.items():
        path = os.path.join(folder, rel)
        got = _entry(path) if hashes and os.path.isfile(path) else None
        if not os.path.isfile(path) or os.path.getsize(path) != want.get("bytes") or (
                got is not None and got["sha256"] != want.get("sha256")):
            raise ForeignFolderError(f"{folder}: {rel} is missing or differs from the manifest ({EXPORT_INFO}); "
                                     "export the model again")
    return data


def upload_plan(folder: str, *, include_reports: bool = False) -> list[str]:
    """The files ``push_to_hub`` uploads: the files of the model the manifest lists, the manifest itself, and
    the reports only when ``include_reports`` (never checkpoints, optimizer states or anything else the
    folder may hold)."""
    data = check_manifest(folder)
    files = set(data["files"]) | {EXPORT_INFO}
    if include_reports:
        files |= set(data.get("reports") or {})
    return sorted(files)


def push_to_hub(folder: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, api: Any = None, include_reports: bool = False) -> dict[str, Any]:
    """Create ``repo_id`` if needed and upload the files of :func:`upload_plan` in one commit."""
    files = upload_plan(folder, include_reports=include_reports)  # a foreign folder is refused before the network
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
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
    """A README.md for an exported folder, from the dict :func:`hf_memkit.export.checkpoint.export_model`
    gathers (recipe, techniques and versions, grids, measured perplexity and size)."""
    from .card import co2_metadata, front_matter

    tags = ["hf_memkit"] + (["compressed-tensors", "quantized"] if info.get("format") == "compressed-tensors" else [])
    tags += [t["name"] for t in info.get("techniques", [])]
    energy = (info.get("metrics") or {}).get("energy")
    lines = [front_matter(base_model=info.get("base_model"), library_name="transformers", tags=tags,
                          co2=co2_metadata(energy, "compression (post-training)")).rstrip("\n")]
    lines += ["", f"# {info.get('model_name') or 'model'} ({info.get('summary', info.get('format'))})", ""]
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
    if isinstance(energy, dict) and energy.get("measured"):
        lines += ["", f"Energy of the compression run: {energy['energy_j']:.0f} J, {energy['co2eq_g']:.4g} g CO2eq "
                      f"({energy['method']}; grid {energy['grid_g_per_kwh']} g/kWh, {energy['country_iso_code']})."]
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
    """Write README.md and the card data into the manifest, both atomically; a manifest that lists files
    gets README.md's new size and hash."""
    write_text(os.path.join(folder, CARD), model_card(info))
    old = read_manifest(folder) or {}
    data = {k: v for k, v in info.items() if k not in _MANIFEST_KEYS}
    data.update({k: old[k] for k in _MANIFEST_KEYS if k in old})
    if isinstance(data.get("files"), dict):
        data["files"][CARD] = _entry(os.path.join(folder, CARD))
    write_json(os.path.join(folder, EXPORT_INFO), data, default=str)


def read_export_info(folder: str) -> dict[str, Any] | None:
    """The card data of ``folder``'s manifest (without the file lists); None when there is none."""
    data = read_manifest(folder)
    return None if data is None else {k: v for k, v in data.items() if k not in _MANIFEST_KEYS}
