"""Typed errors. Every message names the problem and the fix; each class is also a builtin error type so that
callers who catch ``ValueError``/``TypeError`` keep working."""

from __future__ import annotations


class MemkitError(Exception):
    """Base class of every error hf_memkit raises on purpose."""


class RecipeError(MemkitError, ValueError):
    """A recipe is invalid. ``path`` is the recipe file (or ``<dict>``), ``key`` the dotted key path."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None, fix: str | None = None):
        self.path = path
        self.key = key
        self.fix = fix
        self.problem = message
        where = path or "<recipe>"
        if key:
            where += f": at '{key}'"
        text = f"{where}: {message}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class RegistryError(MemkitError, ValueError):
    """A technique could not be registered (duplicate name, bad slot, missing config class)."""


class IncompatibleModelError(MemkitError, TypeError):
    """A technique cannot patch this model (unsupported architecture, missing module)."""


class CheckpointError(MemkitError, ValueError):
    """A checkpoint's memkit state is missing, corrupt or from a different recipe."""


class ModelSourceError(MemkitError, ValueError):
    """A model could not be found locally (hf_memkit never downloads at run time)."""
