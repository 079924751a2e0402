"""The recipes shipped in the repository's ``recipes/`` folder, addressable by name (``default``)."""

from __future__ import annotations

from pathlib import Path


def recipes_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # hf_memkit/
    for cand in (here / "_recipes", here.parent / "recipes"):
        if cand.is_dir():
            return cand
    return here.parent / "recipes"


def bundled_recipes() -> dict[str, Path]:
    d = recipes_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def bundled_recipe_path(name: str) -> Path | None:
    return bundled_recipes().get(Path(name).stem if name.endswith((".yaml", ".yml")) and "/" not in name else name)


def configs_dir() -> Path:
    """The repository's ``configs/`` folder (DeepSpeed presets), found like ``recipes/``
    (:func:`hf_memkit.data.recipes.recipes_dir`): ``hf_memkit/_configs`` in a built wheel, else ``configs/`` beside
    the package."""
    here = Path(__file__).resolve().parent.parent  # hf_memkit/
    for cand in (here / "_configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    return here.parent / "configs"
