"""Typed errors. Every message names the problem and the fix; each class is also a builtin error type so that
callers who catch ``ValueError``/``TypeError`` keep working."""

from __future__ import annotations

import reprlib
from typing import Any

#: the longest str(RecipeError): a last line of defence, so that no user value (an expanded YAML alias bomb, a
#: huge string, a whole file) can make an error message grow without bound
MAX_MESSAGE_CHARS = 2000


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, the cut marked with ``...``."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


class _ShortRepr(reprlib.Repr):
    """reprlib walks at most a few items per level and a few levels deep, so the cost of rendering a value is
    bounded whatever its size. Its int and bytes renderings build the full repr first: those are replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = 4
        self.maxdeque = 4
        self.maxstring = self.maxother = 60
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() of a huge int is quadratic (and refused past 4300 digits)
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes


_SHORT = _ShortRepr()


def short_repr(value: Any, limit: int = 80) -> str:
    """A repr of ``value`` of at most ``limit`` characters, cheap to build for any value a recipe can hold
    (huge or deeply nested containers, huge ints, long strings). Use it wherever a user's value goes into a
    message."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # a user object whose __repr__ fails: the type is enough to point at it
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def short_str(value: Any, limit: int = 80) -> str:
    """Like str() for keys and names (a str as is, None as ``None``), bounded like :func:`short_repr`."""
    return clip(value, limit) if isinstance(value, str) else short_repr(value, limit)


class MemkitError(Exception):
    """Base class of every error hf_memkit raises on purpose."""


class RecipeError(MemkitError, ValueError):
    """A recipe is invalid. ``path`` is the recipe file (or ``<dict>``), ``key`` the dotted key path.

    Every part is clipped and the whole message is at most :data:`MAX_MESSAGE_CHARS` characters, whatever the
    caller put into it."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None, fix: str | None = None):
        self.path = None if path is None else clip(str(path), 300)
        self.key = None if key is None else clip(str(key), 200)
        self.fix = None if fix is None else clip(str(fix), 600)
        self.problem = clip(str(message), 800)
        where = self.path or "<recipe>"
        if self.key:
            where += f": at '{self.key}'"
        text = f"{where}: {self.problem}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        super().__init__(clip(text, MAX_MESSAGE_CHARS))


class RegistryError(MemkitError, ValueError):
    """A technique could not be registered (duplicate name, bad slot, missing config class)."""


class IncompatibleModelError(MemkitError, TypeError):
    """A technique cannot patch this model (unsupported architecture, missing module)."""


class CheckpointError(MemkitError, ValueError):
    """A checkpoint's memkit state is missing, corrupt or from a different recipe."""


class DivergenceError(MemkitError, RuntimeError):
    """Training diverged (non-finite or spiking loss, non-finite or vanished gradients); the message names the
    step, the rule that fired, the likely cause and the fix."""


class ModelSourceError(MemkitError, ValueError):
    """A model could not be found locally (hf_memkit never downloads at run time)."""
