"""Atomic writes: a user's output is either the old one, the complete new one, or absent; never half written.

Files are written to a temporary sibling, flushed to disk and renamed over the target (``os.replace`` is atomic on
POSIX within one file system). Folders are built in a temporary sibling (``.NAME.tmp-XXXX``) and renamed into
place at the end; an existing target is moved aside first and deleted only once the new one stands, so a crash
at any point leaves the old folder or the new one (plus, at worst, a hidden leftover that the next write removes).

JSON written here is strict: NaN and Infinity are refused (``allow_nan=False``); :func:`strict_json` turns them
into ``null`` first so a summary of a diverged run is still readable by strict JSON parsers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def _fsync_dir(path: "str | os.PathLike[str]") -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: "str | os.PathLike[str]", mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """``with atomic_file(p) as f: f.write(...)`` — ``p`` appears complete at exit, or not at all on error."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """``with atomic_path(p) as tmp: writer(tmp)`` — for writers that take a path (``safetensors.save_file``,
    ``torch.save``): ``p`` appears complete at exit, or not at all on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: "str | os.PathLike[str]", value: Any, **kwargs: Any) -> None:
    """Strict JSON (non-finite numbers become null), written atomically."""
    text = json.dumps(strict_json(value), allow_nan=False, **{"indent": 1, **kwargs})
    with atomic_file(path) as f:
        f.write(text + "\n")


def write_text(path: "str | os.PathLike[str]", text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def temp_sibling(target: "str | os.PathLike[str]") -> Path:
    """A fresh empty folder beside ``target`` (same file system, so the final rename is atomic)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))


def clean_leftovers(target: "str | os.PathLike[str]") -> None:
    """Remove temporary siblings an interrupted :func:`atomic_dir` / :func:`replace_dir` left beside ``target``."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():
        if p.name.startswith(f".{target.name}{TMP_MARK}") or p.name.startswith(f".{target.name}{OLD_MARK}"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def replace_dir(staged: "str | os.PathLike[str]", target: "str | os.PathLike[str]", *,
                pause: str | None = None) -> None:
    """Move the complete folder ``staged`` to ``target``; an existing ``target`` is replaced, never merged. When
    the second rename fails the old folder is put back at once, and a crash between the two renames is undone by
    :func:`recover_dir` on the next write. ``pause`` names a fault-test pause point between the renames."""
    staged, target = Path(staged), Path(target).absolute()
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        if pause is not None:
            pause_point(pause)
        os.replace(staged, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: "str | os.PathLike[str]", *, fault_points: bool = False) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: write into tmp`` — at exit ``out`` is replaced by the finished folder; on an
    error ``out`` is untouched and the temporary folder removed. A folder an earlier crash left moved aside is
    put back first (:func:`recover_dir`), other leftovers removed. ``fault_points`` adds the fault-test pause
    points ``staged`` (the folder is written) and ``publish`` (between the two renames)."""
    recover_dir(target)
    clean_leftovers(target)
    tmp = temp_sibling(target)
    try:
        yield tmp
        if fault_points:
            pause_point("staged")
        replace_dir(tmp, target, pause="publish" if fault_points else None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------------
# fault-test pause points, recovery after a crash

PAUSE_ENV = "HF_MEMKIT_TEST_PAUSE"


def pause_point(phase: str, step: int | None = None, env: str = PAUSE_ENV) -> None:
    """Fault tests: with ``<env>=<phase>`` (or ``<phase>@<min step>``) the process announces the phase (and step)
    on stderr and sleeps, so a test can kill it exactly there. Costs one environment lookup otherwise."""
    spec = os.environ.get(env)
    if not spec:
        return
    want, _, at = spec.partition("@")
    if want != phase or (at and step is not None and step < int(at)):
        return
    import sys
    import time

    sys.stderr.write(f"HF_MEMKIT_PAUSED {phase}" + (f" {step}" if step is not None else "") + "\n")
    sys.stderr.flush()
    time.sleep(3600)


def recover_dir(target: "str | os.PathLike[str]") -> bool:
    """Put back a folder that a crash left moved aside (``.NAME.old-*``) while its replacement was being renamed
    in: the target is absent and exactly one such sibling exists. True when something was put back."""
    target = Path(target).absolute()
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return False
    olds = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}{OLD_MARK}") and p.is_dir()]
    if len(olds) != 1:  # none, or ambiguous: leave them to clean_leftovers
        return False
    os.replace(olds[0], target)
    _fsync_dir(target.parent)
    return True
