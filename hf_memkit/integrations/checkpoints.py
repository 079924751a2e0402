"""Checkpoints that are complete or absent: the save and resume paths of the Trainer wiring.

Why: the stock ``Trainer._save_checkpoint`` writes ``checkpoint-N`` in place and applies ``save_total_limit``
(deleting older checkpoints) before our technique state could be added. A crash in between left a
``checkpoint-N`` without ``memkit_state/`` — the one ``get_last_checkpoint`` picks, and the one that cannot
resume — while the previous good checkpoint was already deleted.

Save (:func:`save_checkpoint`): the Trainer writes into a hidden staging folder ``run_dir/.checkpoint-N.tmp-memkit/
checkpoint-N`` (its ``_get_output_dir`` is redirected for the duration of the call, so its own rotation there sees
one checkpoint and deletes nothing); the main process adds ``memkit_state/``, renames the folder to
``run_dir/checkpoint-N`` (the commit point: the name ``get_last_checkpoint`` matches appears only now) and then
rotates. Multi-rank: every rank writes its shards/RNG file into the same staging folder (deterministic name; the
ranks share the file system as in stock transformers), and barriers make the main process rename only after all
ranks finished writing. Limitation: on several nodes *without* a shared file system and without
``save_on_each_node``, non-main nodes' RNG files stay in their hidden staging folder (stock transformers would have
left them in a node-local ``checkpoint-N``; resuming there only loses RNG exactness, as with a missing file).

Resume (:func:`last_complete_checkpoint`): the newest ``checkpoint-N`` that is complete (trainer_state.json, no
transformers "incomplete" sentinel, ``memkit_state/state.json`` when the recipe keeps state); incomplete ones
(crashes of older versions, a plain Trainer's partial write) are skipped with a warning.

Test hook: ``HF_MEMKIT_TEST_PAUSE_SAVE=<phase>[@<min step>]`` prints ``HF_MEMKIT_PAUSED <phase> <step>`` (stderr) and
sleeps at that phase of the save, so a fault test can SIGKILL the process exactly there. Phases, in order:
:data:`PAUSE_PHASES`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from typing import Any, Callable, Iterator

from .. import atomic
from ..atomic import TMP_MARK, replace_dir
from .memkit_state import STATE_DIR, STATE_JSON

logger = logging.getLogger("hf_memkit")

PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
STAGING_SUFFIX = f"{TMP_MARK}memkit"
_STAGING_RE = re.compile(rf"^\.{PREFIX}-\d+{re.escape(STAGING_SUFFIX)}$")
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")
#: transformers' JIT checkpoint writes this into checkpoint-N while the save is in progress
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"
TRAINER_STATE = "trainer_state.json"

PAUSE_ENV = "HF_MEMKIT_TEST_PAUSE_SAVE"
PAUSE_PHASES = ("model_written", "trainer_written", "state_written", "published", "rotated")


def pause_point(phase: str, step: int) -> None:
    """Test hook (see the module docstring); a no-op unless the environment variable names this phase."""
    atomic.pause_point(phase, step, env=PAUSE_ENV)


# ------------------------------------------------------------------------------------------------------------
# save


def staging_root(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f".{name}{STAGING_SUFFIX}")


def clean_staging(run_dir: str) -> None:
    """Remove staging folders a crashed save left (they never hold the only copy of anything)."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        if _STAGING_RE.match(entry):
            logger.info("hf_memkit: removing %s, left by an interrupted checkpoint save", entry)
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


@contextlib.contextmanager
def _redirected(trainer: Any, root: str, pushes: list[str], step: int) -> Iterator[None]:
    """While the stock save runs: its output folder is ``root`` and Hub pushes are deferred until the checkpoint
    has its final name (``upload_folder`` runs in the background and would read a folder about to be renamed)."""
    overrides: dict[str, Callable] = {
        "_get_output_dir": lambda trial=None: root,
        "_push_from_checkpoint": lambda folder: pushes.append(folder),
    }
    if os.environ.get(PAUSE_ENV, "").partition("@")[0] == "model_written":
        save_opt = trainer._save_optimizer_and_scheduler

        def paused_save_opt(output_dir):
            pause_point("model_written", step)
            return save_opt(output_dir)

        overrides["_save_optimizer_and_scheduler"] = paused_save_opt
    saved = {n: vars(trainer)[n] for n in overrides if n in vars(trainer)}
    for n, fn in overrides.items():
        setattr(trainer, n, fn)
    try:
        yield
    finally:
        for n in overrides:
            if n in saved:
                setattr(trainer, n, saved[n])
            else:
                delattr(trainer, n)


def _fix_best_model_checkpoint(trainer: Any, root: str, run_dir: str, staged: str) -> None:
    """The stock save recorded ``best_model_checkpoint`` against the redirected folder: point it at the final
    one, as the stock code would have (and rewrite trainer_state.json, which holds it)."""
    state = trainer.state
    best = state.best_model_checkpoint
    fixed = best
    if best and os.path.abspath(best).startswith(os.path.abspath(root) + os.sep):
        fixed = os.path.join(run_dir, os.path.basename(best))
    elif state.best_global_step and trainer.args.save_strategy in ("steps", "epoch", "best"):
        older = os.path.join(run_dir, f"{PREFIX}-{state.best_global_step}")
        if os.path.exists(older):
            fixed = older
    if fixed != best:
        state.best_model_checkpoint = fixed
        if os.path.isfile(os.path.join(staged, TRAINER_STATE)):
            state.save_to_json(os.path.join(staged, TRAINER_STATE))


def publish(staged: str, final: str) -> None:
    """Give the finished checkpoint its name. A folder already there (a subclass that wrote extra files straight
    into ``checkpoint-N``, transformers' JIT sentinel, an earlier save at the same step) is replaced, keeping the
    extra files the new one lacks (the sentinel excepted: the checkpoint is complete now)."""
    if os.path.isdir(final):
        for entry in os.listdir(final):
            if entry != INCOMPLETE_SENTINEL and not os.path.exists(os.path.join(staged, entry)):
                os.replace(os.path.join(final, entry), os.path.join(staged, entry))
    replace_dir(staged, final)


def _barrier(trainer: Any) -> None:
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()


def save_checkpoint(trainer: Any, runtime: Any, original: Callable, model: Any, trial: Any) -> None:
    """The wrapped ``_save_checkpoint`` (see the module docstring for the order and why)."""
    from transformers.trainer_utils import rotate_checkpoints

    args = trainer.args
    step = trainer.state.global_step
    name = f"{PREFIX}-{step}"
    run_dir = trainer._get_output_dir(trial=trial)
    root = staging_root(run_dir, name)
    staged, final = os.path.join(root, name), os.path.join(run_dir, name)
    if args.should_save:
        clean_staging(run_dir)
    _barrier(trainer)  # no rank writes into the staging folder before it is clean
    pushes: list[str] = []
    with _redirected(trainer, root, pushes, step):
        original(model, trial)
    pause_point("trainer_written", step)
    if args.should_save:
        _fix_best_model_checkpoint(trainer, root, run_dir, staged)
        runtime.save_state(staged)
        pause_point("state_written", step)
    _barrier(trainer)  # every rank's shards and RNG file are in the staging folder
    if args.should_save and os.path.isdir(staged):
        publish(staged, final)
        shutil.rmtree(root, ignore_errors=True)
        pause_point("published", step)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
        pause_point("rotated", step)
    _barrier(trainer)  # no rank goes on (or resumes a later save) before the checkpoint has its name
    for _ in pushes[-1:]:  # the stock save pushes at most once
        trainer._push_from_checkpoint(final)


# ------------------------------------------------------------------------------------------------------------
# resume


def incomplete_reason(path: str, stateful: bool) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it is complete."""
    if not os.path.isdir(path):
        return "it does not exist"
    if os.path.exists(os.path.join(path, INCOMPLETE_SENTINEL)):
        return f"transformers marked it incomplete ({INCOMPLETE_SENTINEL})"
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return f"it has no {TRAINER_STATE}"
    state_dir = os.path.join(path, STATE_DIR)
    if (stateful or os.path.isdir(state_dir)) and not os.path.isfile(os.path.join(state_dir, STATE_JSON)):
        return "it has no memkit_state/state.json (the save was interrupted before the technique state was written)"
    return None


def checkpoints_newest_first(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), e) for e in os.listdir(folder) if (m := _CHECKPOINT_RE.match(e))
             and os.path.isdir(os.path.join(folder, e))]
    return [os.path.join(folder, e) for _, e in sorted(found, reverse=True)]


def last_complete_checkpoint(folder: str, stateful: bool) -> str | None:
    """Our ``get_last_checkpoint``: the newest complete ``checkpoint-N`` in ``folder``; skipped ones are logged."""
    for path in checkpoints_newest_first(folder):
        reason = incomplete_reason(path, stateful)
        if reason is None:
            return path
        logger.warning("hf_memkit: skipping %s for resume_from_checkpoint=True: %s", path, reason)
    return None


def resolve_resume(resume: Any, output_dir: str, stateful: bool) -> Any:
    """``resume_from_checkpoint`` as the wiring passes it on: ``True`` becomes the newest complete checkpoint; an
    explicit path to an incomplete one is refused, naming the one to use instead."""
    from ..errors import CheckpointError

    if resume is True:
        found = last_complete_checkpoint(output_dir, stateful)
        if found is None:
            skipped = checkpoints_newest_first(output_dir)
            raise CheckpointError(
                f"resume_from_checkpoint=True but {output_dir} holds no "
                f"{'complete ' if skipped else ''}checkpoint-* folder"
                f"{f' ({len(skipped)} incomplete, see the warnings above)' if skipped else ''}; "
                "train without resuming or point to a checkpoint"
            )
        logger.info("hf_memkit: resuming from %s", found)
        return found
    if isinstance(resume, (str, os.PathLike)):
        path = os.fspath(resume)
        reason = incomplete_reason(path, stateful)
        if reason is not None:
            parent = os.path.dirname(os.path.abspath(path))
            other = last_complete_checkpoint(parent, stateful) if os.path.isdir(parent) else None
            fix = (f"resume from {other} (the newest complete checkpoint beside it)" if other else
                   "resume from a complete checkpoint, or start without resume_from_checkpoint")
            raise CheckpointError(f"cannot resume from {path}: {reason}; {fix}")
        return path
    return resume
