"""``checkpoint-N/memkit_state/``: the techniques' state beside the Trainer's own files.

Layout: ``tensors.safetensors`` (every tensor, keyed ``<technique>/<key>``) and ``state.json`` (``format``, the
recipe, and per technique its JSON values, a tensor standing as ``{"__tensor__": "<technique>/<key>"}``).
Both files are written atomically, ``state.json`` last, so its presence means the folder is complete.
Reading validates the structure before any technique sees it; each technique validates its own entries
(:mod:`hf_memkit.state_schema`); anything else a technique raises becomes a CheckpointError too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..atomic import atomic_file, atomic_path
from ..errors import CheckpointError, MemkitError
from ..state_schema import short_repr

STATE_DIR = "memkit_state"
STATE_JSON = "state.json"
STATE_TENSORS = "tensors.safetensors"
FORMAT = 1


def write_state(techniques: list[Any], recipe: Any, checkpoint_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    folder = os.path.join(checkpoint_dir, STATE_DIR)
    os.makedirs(folder, exist_ok=True)
    meta: dict[str, Any] = {"format": FORMAT, "recipe": recipe.to_dict(), "techniques": {}}
    tensors: dict[str, Any] = {}
    for t in techniques:
        entry: dict[str, Any] = {}
        for key, value in t.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"{t.name}/{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"__tensor__": f"{t.name}/{key}"}
            else:
                try:
                    json.dumps(value)
                except TypeError as exc:
                    raise TypeError(
                        f"technique {t.name!r}: state {key!r} is neither a tensor nor JSON-serialisable ({exc})"
                    ) from None
                entry[key] = value
        meta["techniques"][t.name] = entry
    with atomic_path(os.path.join(folder, STATE_TENSORS)) as tmp:
        save_file(tensors, str(tmp))
    with atomic_file(os.path.join(folder, STATE_JSON)) as f:  # last: it marks the folder complete
        json.dump(meta, f, indent=1, sort_keys=True)


def _corrupt(folder: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{folder}/{STATE_JSON}: {problem}; the checkpoint is corrupt or was not written by "
                           "hf_memkit: resume from another checkpoint, or start without resume_from_checkpoint")


def read_meta(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state.json, tensors)``, the structure checked: a known format and a mapping per technique."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, STATE_JSON), encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(folder, STATE_TENSORS))
    except Exception as exc:  # OSError, JSONDecodeError, safetensors' SafetensorError (no common base)
        raise CheckpointError(
            f"the memkit state in {folder} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); resume from an "
            "earlier checkpoint or delete this one"
        ) from None
    if not isinstance(meta, dict):
        raise _corrupt(folder, f"the top level is {short_repr(meta)}, not a mapping")
    if meta.get("format") != FORMAT:
        raise _corrupt(folder, f"format = {short_repr(meta.get('format'))}, but this version of hf_memkit reads "
                               f"format {FORMAT}")
    techniques = meta.get("techniques")
    if not isinstance(techniques, dict):
        raise _corrupt(folder, f"techniques = {short_repr(techniques)} is not a mapping of technique names")
    for name, entry in techniques.items():
        if not isinstance(entry, dict):
            raise _corrupt(folder, f"techniques.{name} = {short_repr(entry)} is not a mapping of state keys")
    return meta, tensors


def _resolve(folder: str, name: str, entry: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for k, v in entry.items():
        if isinstance(v, dict) and "__tensor__" in v:
            ref = v["__tensor__"]
            if not isinstance(ref, str) or ref not in tensors:
                raise CheckpointError(
                    f"{folder}: techniques.{name}.{k} refers to tensor {short_repr(ref)}, which "
                    f"{STATE_TENSORS} does not hold; the checkpoint is corrupt: resume from another checkpoint")
            v = tensors[ref]
        state[k] = v
    return state


def read_state(techniques: list[Any], checkpoint_dir: str) -> None:
    """Restore every technique's state from ``checkpoint_dir`` (see :func:`write_state`)."""
    folder = os.path.join(checkpoint_dir, STATE_DIR)
    meta, tensors = read_meta(folder)
    saved = set(meta["techniques"])
    current = {t.name for t in techniques}
    if saved != current:
        raise CheckpointError(
            f"{checkpoint_dir} was written with the techniques {sorted(saved)} but this run has "
            f"{sorted(current)}; resume with the checkpoint's recipe ({folder}/{STATE_JSON} holds it)"
        )
    for t in techniques:
        state = _resolve(folder, t.name, meta["techniques"][t.name], tensors)
        try:
            t.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{folder}: {exc}") from None
        except MemkitError:
            raise
        except Exception as exc:  # a check the technique lacks: still the checkpoint's fault, not a crash
            raise CheckpointError(
                f"{folder}: technique {t.name!r} cannot load its saved state ({type(exc).__name__}: "
                f"{str(exc)[:200]}); the checkpoint is corrupt or from another recipe/model: resume from another "
                "checkpoint written by this recipe, or start without resume_from_checkpoint"
            ) from None
