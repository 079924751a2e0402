"""``memkit run SCRIPT.py --memkit_recipe r.yaml ...``: apply a recipe to an *unmodified* HF training script.

Stock scripts parse ``sys.argv`` with ``HfArgumentParser`` and reject unknown flags, so the launcher removes
``--memkit_recipe`` from the arguments, validates the recipe (a bad one stops here, before any model loads),
and for the lifetime of the script patches ``transformers.Trainer.__init__`` so that every Trainer the script
builds — stock, subclass or TRL — gets the recipe: the model is patched before the Trainer's own ``__init__``
runs, then the optimizer/loss/checkpoint wiring is attached. Flags the user gave on the command line win over
the recipe's ``training_args``. The patch is undone when the script returns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import runpy
import sys
from typing import Any, Callable, Iterator

from ..recipe import Recipe

FLAG = "--memkit_recipe"


def extract_recipe_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--memkit_recipe FILE`` / ``--memkit_recipe=FILE`` (also with dashes) out of ``argv``."""
    out, recipe, i = [], None, 0
    names = (FLAG, FLAG.replace("_", "-"))
    while i < len(argv):
        a = argv[i]
        if a in names:
            if i + 1 >= len(argv):
                raise SystemExit(f"memkit run: {a} needs a value (a recipe file)")
            recipe, i = argv[i + 1], i + 2
            continue
        if a.split("=", 1)[0] in names and "=" in a:
            recipe = a.split("=", 1)[1]
            i += 1
            continue
        out.append(a)
        i += 1
    return recipe, out


def extract_memkit_flags(argv: list[str]) -> tuple[Any, list[str]]:
    """Split the technique flags (a :class:`~hf_memkit.recipe_flags.MemkitFlags`) out of ``argv``:
    ``--memkit_<slot> VALUE``, ``--memkit_set T.S=V ...`` and ``--memkit.T.S VALUE`` (see
    :mod:`hf_memkit.recipe_flags`). A stock script's parser would refuse them; a misspelt one close to a flag
    name is a RecipeError with a did-you-mean."""
    from ..recipe_flags import split_argv

    return split_argv(argv)


def explicit_flags(argv: list[str]) -> set[str]:
    """TrainingArguments-style field names the user set on the command line."""
    flags = set()
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name = a[2:].split("=", 1)[0].replace("-", "_")
            flags.add(name)
            if name.startswith("no_"):  # HfArgumentParser's complement of a bool field that defaults to True
                flags.add(name[3:])
    return flags


@contextlib.contextmanager
def logging_to_stderr() -> Iterator[None]:
    """Show the ``hf_memkit`` logger's INFO lines (which optimizer was built, which flag won) on stderr.

    A stock script configures only its own and transformers' loggers, so without this the wiring's INFO lines
    would be dropped (Python's last-resort handler prints WARNING and above only). Not propagated, so a script
    that configures the root logger does not print each line twice; undone when the script returns.
    """
    log = logging.getLogger("hf_memkit")
    saved = (log.level, log.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


@contextlib.contextmanager
def recipe_installed(recipe: Recipe, keep_args: set[str] = frozenset(),
                     on_applied: Callable[[Any], None] | None = None) -> Iterator[None]:
    """While active, every ``transformers.Trainer`` built in this process applies ``recipe``; ``on_applied`` is
    called with each such Trainer once it is fully built (``memkit run`` with a launcher records it there)."""
    import transformers

    from .memkit_trainer import MemkitTrainer
    from .trainer import attach, prepare

    original = transformers.Trainer.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(self, MemkitTrainer) or getattr(self, "_memkit_launching", False):
            return original(self, *args, **kwargs)
        bound = signature.bind_partial(self, *args, **kwargs)
        params = bound.arguments
        optimizers = params.get("optimizers", (None, None))
        has_opt = (optimizers or (None, None))[0] is not None or params.get("optimizer_cls_and_kwargs") is not None
        from .trl import check_adapter_host

        check_adapter_host(params.get("model"), recipe, params.get("peft_config"))
        model, targs, runtime = prepare(params.get("model"), params.get("args"), recipe,
                                        trainer_has_optimizer=has_opt, keep_args=keep_args)
        params["model"], params["args"] = model, targs
        self._memkit_launching = True
        try:
            original(*bound.args, **bound.kwargs)
        finally:
            del self._memkit_launching
        attach(self, runtime)
        if on_applied is not None:
            on_applied(self)

    transformers.Trainer.__init__ = __init__
    try:
        yield
    finally:
        transformers.Trainer.__init__ = original


def run_script(script: str, script_args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``script_args`` and the recipe given by ``--memkit_recipe``."""
    from ..errors import MemkitError, RecipeError
    from ..recipe import load_recipe

    try:
        recipe_path, rest = extract_recipe_flag(script_args)
    except SystemExit as exc:  # a flag without its value is a usage error (exit 2), like argparse's
        print(exc, file=sys.stderr)
        return 2
    try:
        flags, rest = extract_memkit_flags(rest)  # the technique flags win over the recipe, like training_args
        if recipe_path is None and not flags:
            print(f"memkit run: no {FLAG} given; pass {FLAG} FILE (or technique flags such as --memkit_optimizer "
                  "adamw_8bit) after the script name", file=sys.stderr)
            return 2
        recipe = flags.apply(load_recipe(recipe_path) if recipe_path is not None else None)
    except RecipeError as exc:
        print(f"memkit run: the recipe is invalid, nothing was run.\n{exc}", file=sys.stderr)
        return 2
    if not os.path.isfile(script):
        print(f"memkit run: script {script!r} not found", file=sys.stderr)
        return 2
    print(f"hf_memkit: recipe {recipe.source} ({', '.join(recipe.names()) or 'no techniques'}) "
          f"applies to every Trainer in {script}", file=sys.stderr)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with logging_to_stderr(), recipe_installed(recipe, keep_args=explicit_flags(rest)):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except MemkitError as exc:
        # our own errors already name the problem and the fix: a traceback through runpy and the Trainer adds
        # nothing for the user (the script's own errors keep theirs)
        print(stopped_message(script, exc), file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        _close_process_group()
    return 0


def stopped_message(script: str, exc: BaseException) -> str:
    """One paragraph for an hf_memkit error raised while the script ran: what stopped, the error's own text
    (problem and fix), and that nothing after it ran."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"memkit run: {os.path.basename(script)} stopped: {type(exc).__name__}: {text}"


def _close_process_group() -> None:
    """Tear down the ranks' process group (torchrun) before the interpreter exits: a group left to the
    interpreter's shutdown can abort the process (gloo/DeepSpeed threads still attached). Local, no barrier: a
    rank whose script failed must exit so that torchrun stops the others."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
