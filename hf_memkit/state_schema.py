"""Typed reads of a technique's checkpoint state.

``load_state_dict`` receives whatever ``memkit_state/`` held: a hand-edited or truncated checkpoint must not resume
into silently different training (a negative LISA layer index is a valid Python index) nor end in an
AttributeError. Each technique reads its state through a :class:`StateReader`, which checks types, ranges and
tensor shapes and raises :class:`~hf_memkit.errors.CheckpointError` naming the key (as ``state.json`` spells it:
``techniques.<name>.<key>``), a short repr of the bad value and the fix.
"""

from __future__ import annotations

from typing import Any, Iterable

from . import errors
from .errors import CheckpointError

#: the fix shared by every corrupt-state error: the state cannot be repaired from inside the run
DEFAULT_FIX = ("resume from another checkpoint written by this recipe (or start without resume_from_checkpoint); "
               "a checkpoint's memkit_state/ is only valid for the recipe and model it was written with")


def short_repr(value: Any, limit: int = 60) -> str:
    """A tensor as its dtype and shape, anything else as :func:`hf_memkit.errors.short_repr` gives it (bounded
    however large the value read from the file is)."""
    if type(value).__name__ in ("Tensor", "Parameter") and hasattr(value, "shape"):
        return f"tensor(dtype={value.dtype}, shape={tuple(value.shape)})"
    return errors.short_repr(value, limit)


#: "read the value from the state" (a value of None is itself checked, as a bad value)
_READ: Any = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StateReader:
    """``r = StateReader(state, "lisa")``; ``r.int_list("active_layers", lo=0, hi=n)``; every failure is a
    CheckpointError."""

    def __init__(self, state: Any, technique: str, fix: str = DEFAULT_FIX):
        self.technique = technique
        self.fix = fix
        if not isinstance(state, dict):
            raise self.error("", state, "is not a mapping of keys to values")
        self.state = state

    def error(self, key: str, value: Any, problem: str) -> CheckpointError:
        where = f"techniques.{self.technique}" + (f".{key}" if key else "")
        return CheckpointError(f"the saved state {where} = {short_repr(value)} {problem}; fix: {self.fix}")

    def missing(self, key: str) -> CheckpointError:
        return CheckpointError(f"the saved state techniques.{self.technique} has no {key!r} entry (the checkpoint "
                               f"is incomplete or from another version); fix: {self.fix}")

    def get(self, key: str) -> Any:
        if key not in self.state:
            raise self.missing(key)
        return self.state[key]

    # scalars --------------------------------------------------------------------------------------------------
    def int(self, key: str, lo: int | None = None, hi: int | None = None, value: Any = _READ) -> int:
        """An int in ``[lo, hi]`` (both inclusive, either open when None)."""
        v = self.get(key) if value is _READ else value
        if not _is_int(v):
            raise self.error(key, v, "is not an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.error(key, v, f"is outside [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        return v

    def int_list(self, key: str, lo: int | None = None, hi: int | None = None, *, length: int | None = None,
                 unique: bool = True, value: Any = _READ) -> list[int]:
        """A list of ints, each in ``[lo, hi)`` (``hi`` exclusive: an index bound)."""
        v = self.get(key) if value is _READ else value
        if not isinstance(v, list):
            raise self.error(key, v, "is not a list of integers")
        bad = [i for i in v if not _is_int(i) or (lo is not None and i < lo) or (hi is not None and i >= hi)]
        if bad:
            bounds = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'})"
            raise self.error(key, v, f"holds {short_repr(bad[0])}, not an integer{bounds}")
        if length is not None and len(v) != length:
            raise self.error(key, v, f"has {len(v)} entries where this run needs {length}")
        if unique and len(set(v)) != len(v):
            raise self.error(key, v, "repeats an entry")
        return list(v)

    def str_list(self, key: str, allowed: Iterable[str] | None = None, value: Any = _READ) -> list[str]:
        v = self.get(key) if value is _READ else value
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise self.error(key, v, "is not a list of names")
        if allowed is not None:
            allowed = set(allowed)
            unknown = [s for s in v if s not in allowed]
            if unknown:
                raise self.error(key, v, f"names {unknown[0]!r}, which this model does not have")
        return list(v)

    def mapping(self, key: str, value: Any = _READ) -> dict:
        v = self.get(key) if value is _READ else value
        if not isinstance(v, dict):
            raise self.error(key, v, "is not a mapping")
        return v

    # tensors --------------------------------------------------------------------------------------------------
    def tensor(self, key: str, *, dtype: Any = None, shape: tuple[int, ...] | None = None, ndim: int | None = None,
               floating: bool = False, finite: bool = False, value: Any = _READ) -> Any:
        import torch

        v = self.get(key) if value is _READ else value
        if not isinstance(v, torch.Tensor):
            raise self.error(key, v, "is not a tensor")
        if dtype is not None and v.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
            raise self.error(key, v, f"has dtype {v.dtype} where this run needs {dtype}")
        if floating and not v.is_floating_point():
            raise self.error(key, v, "is not a floating-point tensor")
        if ndim is not None and v.dim() != ndim:
            raise self.error(key, v, f"has {v.dim()} dimensions where this run needs {ndim}")
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise self.error(key, v, f"has shape {tuple(v.shape)} where this run needs {tuple(shape)}")
        if finite and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise self.error(key, v, "holds NaN or infinite values")
        return v

    def unknown_keys(self, known: Iterable[str]) -> None:
        """Keys this technique never writes: the state belongs to another model or recipe."""
        extra = sorted(set(self.state) - set(known))
        if extra:
            raise self.error(extra[0], self.state[extra[0]], "is a key this run does not have (the checkpoint was "
                             "written for another model or recipe)")
