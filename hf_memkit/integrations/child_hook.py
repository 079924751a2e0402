"""The recipe in processes that a launcher starts (``memkit run trl sft ...``, ``accelerate launch``,
``deepspeed``, ``torchrun``).

``memkit run`` cannot patch a Trainer that lives in another process, so it hands the recipe down through the
environment: ``HF_MEMKIT_RECIPE`` (an absolute recipe path, a bundled name or the YAML itself),
``HF_MEMKIT_KEEP_ARGS`` (the flags given on the command line, which win over the recipe's ``training_args``),
``HF_MEMKIT_MARKERS`` (a temp folder) and ``child_boot/`` first on ``PYTHONPATH``, whose ``sitecustomize`` calls
:func:`install` when the child builds its first Trainer. Every Trainer built with the recipe leaves a marker
file, which ``memkit run`` reads after the launcher exits: a run in which no process applied the recipe is
reported as such instead of passing for a memkit run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

ENV_RECIPE = "HF_MEMKIT_RECIPE"
ENV_KEEP_ARGS = "HF_MEMKIT_KEEP_ARGS"
ENV_MARKERS = "HF_MEMKIT_MARKERS"
BOOT_DIR = Path(__file__).resolve().with_name("child_boot")

_active: contextlib.ExitStack | None = None


def child_env(recipe: str, keep_args: set[str], markers: str, base: Mapping[str, str] | None = None) -> dict:
    """The environment for the launcher: ``base`` (default ``os.environ``) plus the variables above."""
    env = dict(os.environ if base is None else base)
    env[ENV_RECIPE] = recipe
    env[ENV_KEEP_ARGS] = json.dumps(sorted(keep_args))
    env[ENV_MARKERS] = markers
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOT_DIR), env.get("PYTHONPATH")]))
    return env


def install() -> None:
    """In a child: every Trainer built from now on applies the recipe named by the environment (idempotent)."""
    global _active
    if _active is not None:
        return
    from ..recipe import load_recipe
    from .launcher import _close_process_group, logging_to_stderr, recipe_installed

    _excepthook_for_memkit_errors()
    recipe = load_recipe(os.environ[ENV_RECIPE])  # validated by `memkit run` already; fails loudly if edited since
    keep = set(json.loads(os.environ.get(ENV_KEEP_ARGS) or "[]"))
    stack = contextlib.ExitStack()
    stack.enter_context(logging_to_stderr())
    stack.enter_context(recipe_installed(recipe, keep_args=keep, on_applied=write_marker))
    _active = stack  # active for the life of the process: the launcher's script has no scope we could wrap
    # a process group left to the interpreter's teardown can abort a finished rank (see launcher.py)
    atexit.register(_close_process_group)


def write_marker(trainer: Any) -> None:
    """Record that ``trainer`` was built with the recipe, for ``memkit run`` to read after the launcher exits."""
    folder = os.environ.get(ENV_MARKERS)
    if not folder or not os.path.isdir(folder):
        return
    runtime = getattr(trainer, "memkit", None)
    recipe = getattr(runtime, "recipe", None)
    data = {
        "pid": os.getpid(),
        "rank": os.environ.get("RANK"),
        "local_rank": os.environ.get("LOCAL_RANK"),
        "world_size": os.environ.get("WORLD_SIZE"),
        "trainer": type(trainer).__name__,
        "techniques": list(recipe.names()) if recipe is not None else [],
    }
    path = Path(folder) / f"{os.getpid()}-{id(trainer)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)  # the parent never sees half a marker


def read_markers(folder: str | Path) -> list[dict]:
    """The markers the children left in ``folder`` (unreadable ones are skipped)."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found


def _excepthook_for_memkit_errors() -> None:
    """An hf_memkit error ending a child prints its one paragraph (problem and fix), not a traceback through the
    launcher's script and the Trainer — as ``memkit run SCRIPT.py`` does in its own process."""
    from ..errors import MemkitError
    from .launcher import stopped_message

    previous = sys.excepthook

    def hook(kind: type, exc: BaseException, tb: Any) -> None:
        if isinstance(exc, MemkitError):
            print(stopped_message(sys.argv[0] if sys.argv else "python", exc), file=sys.stderr)
        else:
            previous(kind, exc, tb)

    sys.excepthook = hook
