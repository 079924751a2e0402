"""``memkit run LAUNCHER ...``: a recipe for programs that start training in child processes.

``trl sft``, ``accelerate launch``, ``deepspeed`` and ``torchrun`` run the training script in new Python processes
(``trl`` through accelerate), which a patch made in this process never reaches. Here the recipe is validated,
``--memkit_recipe`` is removed from the command line (stock parsers reject it), and the launcher runs with the
environment of :mod:`.child_hook`, so every Python child applies the recipe to its Trainers. Nothing is written
to the user's folders: the children's markers go to a temp folder, removed on exit, errors included. The run
counts as a memkit run only if at least one process built a Trainer with the recipe.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any
from pathlib import Path

# programs known to re-launch themselves or their script: never run in this process, even given as a file path
RELAUNCHERS = frozenset({"trl", "accelerate", "deepspeed", "torchrun"})
PYTHONS = ("python", "python3")


def is_python(program: str) -> bool:
    """``python``, ``python3``, ``python3.11`` or this interpreter's own path."""
    base = os.path.basename(program)
    return base in PYTHONS or (base.startswith("python3.") and base[8:].isdigit()) or program == sys.executable


def resolve_program(name: str) -> str | None:
    """The executable ``name`` runs: a path as given; a bare name beside this interpreter first (a venv's own
    ``trl`` wins over another on PATH), else on PATH."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _flag_value(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        key = a.split("=", 1)[0]
        if key in names:
            return a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def hints(program: str, args: list[str]) -> list[str]:
    """Warnings about a launcher command that will not do what it says on this machine (printed, not fatal)."""
    base = os.path.basename(program)
    is_accelerate = (base == "accelerate" and args[:1] == ["launch"]) or base == "trl"
    if not is_accelerate:
        return []
    n = _flag_value(args, "--num_processes", "--num-processes")
    if n is None or not n.isdigit() or int(n) < 2:
        return []
    chosen = {a.split("=", 1)[0].replace("-", "_") for a in args}
    if chosen & {"__multi_gpu", "__use_deepspeed", "__use_fsdp", "__config_file", "__accelerate_config"}:
        return []
    if _has_cuda():
        return []
    return [f"memkit run: hint: accelerate starts one process on a machine without GPUs, whatever "
            f"--num_processes says; add --multi_gpu{' (and drop --cpu)' if '__cpu' in chosen else ''} to the "
            f"launcher's flags and --use_cpu to the script's for {n} CPU ranks (gloo), e.g. `memkit run accelerate "
            f"launch --multi_gpu --num_processes {n} script.py --use_cpu ...`"]


def refusal(program: str, args: list[str]) -> str | None:
    """Why this command cannot apply the recipe, with what to run instead; None when it can."""
    if "hf_memkit.run" in args:
        return ("memkit run: the launcher is told to start `-m hf_memkit.run`, but memkit run already applies the "
                "recipe to every process the launcher starts; drop `-m hf_memkit.run` and launch the script itself")
    return None


def recipe_reference(given: str) -> str:
    """What the children load: an absolute path for a file (they may change directory), a bundled recipe's
    path, else the text as given (a YAML string)."""
    if os.path.isfile(given):
        return os.path.abspath(given)
    from ..data.recipes import bundled_recipe_path

    bundled = bundled_recipe_path(given)
    return str(bundled) if bundled is not None else given


def run_launcher(program: str, args: list[str]) -> int:
    """``memkit run PROGRAM ARGS...`` with the recipe in every Python process PROGRAM starts; the exit status."""
    from ..errors import RecipeError
    from ..recipe import load_recipe
    from .launcher import FLAG, explicit_flags, extract_memkit_flags, extract_recipe_flag

    exe = resolve_program(program)
    if exe is None:
        print(f"memkit run: {program!r} is neither a script file nor a program on PATH; give the training "
              f"script (memkit run train.py ...) or an installed launcher (trl, accelerate, deepspeed, torchrun)",
              file=sys.stderr)
        return 2
    try:
        given, rest = extract_recipe_flag(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        flags, rest = extract_memkit_flags(rest)  # technique flags win over the recipe, as in a script run
        if given is None and not flags:
            print(f"memkit run: no {FLAG} given; pass {FLAG} FILE (or technique flags such as --memkit_optimizer "
                  f"adamw_8bit) among {os.path.basename(program)}'s arguments", file=sys.stderr)
            return 2
        recipe = flags.apply(load_recipe(given) if given is not None else None)
    except RecipeError as exc:
        print(f"memkit run: the recipe is invalid, nothing was run.\n{exc}", file=sys.stderr)
        return 2
    reason = refusal(program, rest)
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    for line in hints(program, rest):
        print(line, file=sys.stderr)
    name = " ".join([os.path.basename(program), *rest[:1]])
    print(f"hf_memkit: recipe {recipe.source} ({', '.join(recipe.names()) or 'no techniques'}) applies to every "
          f"Trainer in every Python process that `{name}` starts", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="memkit-run-") as markers:
        from .child_hook import child_env, read_markers

        reference = recipe_reference(given) if given is not None and not flags else _resolved(recipe, markers)
        code = _call([exe, *rest], child_env(reference, explicit_flags(rest), markers))
        applied = read_markers(markers)
    return verdict(name, code, applied)


def _resolved(recipe: Any, folder: str) -> str:
    """The recipe with the command line's technique flags applied, as a file the children load."""
    from ..atomic import write_text

    path = os.path.join(folder, "recipe.yaml")
    write_text(path, recipe.to_yaml())
    return path


def _call(cmd: list[str], env: dict) -> int:
    """Run the launcher and wait for it, so the temp folder goes only after the children stopped writing into
    it. SIGTERM is passed on; Ctrl-C already reaches the launcher (same foreground process group), and a second
    SIGINT from here would cut its own shutdown of the ranks short, so memkit run just keeps waiting."""
    proc = subprocess.Popen(cmd, env=env)
    saved = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum)),
             signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        return proc.wait()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def verdict(name: str, code: int, applied: list[dict]) -> int:
    """The exit status of ``memkit run``: the launcher's own when it failed; 1 when it succeeded but no process
    built a Trainer with the recipe (a plain run must not pass for a memkit run)."""
    if code != 0:
        if code < 0:  # killed by a signal: the shell convention
            code = 128 - code
        print(f"memkit run: `{name}` exited with status {code}", file=sys.stderr)
        return code
    if not applied:
        print(f"memkit run: warning: `{name}` finished, but no process it started built a transformers Trainer "
              f"with the recipe, so the recipe did NOT apply (the program may not use transformers.Trainer, or "
              f"may start Python with -E/-I or a cleared environment); exit status 1", file=sys.stderr)
        return 1
    n = len({m.get("pid") for m in applied})
    ranks = sorted({str(m["rank"]) for m in applied if m.get("rank") is not None}, key=lambda r: (len(r), r))
    where = f"ranks {', '.join(ranks)}; " if len(ranks) > 1 else (f"rank {ranks[0]}; " if ranks else "")
    trainers = ", ".join(sorted({m.get("trainer", "?") for m in applied}))
    print(f"hf_memkit: the recipe applied in {n} process{'es' if n > 1 else ''} ({where}{trainers})",
          file=sys.stderr)
    return 0
