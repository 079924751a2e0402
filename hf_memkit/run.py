"""``python -m hf_memkit.run [--nproc-per-node N] SCRIPT.py [script args incl. --memkit_recipe FILE]``, or
``python -m hf_memkit.run LAUNCHER [its args incl. --memkit_recipe FILE]`` for ``trl``, ``accelerate``,
``deepspeed``, ``torchrun`` (the recipe reaches the processes they start: integrations/relaunch.py)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="memkit run",
        description="Run an unmodified HF training script with an hf_memkit recipe applied to its Trainer.",
        epilog="Examples: memkit run run_clm.py --memkit_recipe recipes/lora.yaml --output_dir out --max_steps 10\n"
        "          memkit run trl sft --model_name_or_path M --dataset_name D --memkit_recipe lora ...\n"
        "          memkit run accelerate launch --multi_gpu --num_processes 2 run_clm.py --use_cpu "
        "--memkit_recipe lora ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes (torchrun) on this machine")
    parser.add_argument("script", help="the training script, or a launcher: trl, accelerate, deepspeed, torchrun")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    parser.add_argument("--allocator", default=None, choices=("auto", "mimalloc", "glibc", "system"),
                        help="how freed host memory goes back to the OS in the script and every process it starts "
                        "(default: $HF_MEMKIT_ALLOCATOR, else auto: mimalloc when installed)")
    ns = parser.parse_args(argv)
    from .memory.host_memory import AllocatorError, reexec_if_needed

    try:  # the script and every launcher rank inherit the allocator (LD_PRELOAD / MALLOC_* in the environment)
        reexec_if_needed(["-m", "hf_memkit.run", *argv], ns.allocator)
    except AllocatorError as exc:
        parser.error(str(exc))
    if ns.nproc_per_node < 1:
        parser.error("--nproc-per-node must be at least 1")
    from .integrations.relaunch import RELAUNCHERS, is_python, resolve_program, run_launcher

    if is_python(ns.script) and ns.script_args[:1] and os.path.isfile(ns.script_args[0]):
        ns.script, ns.script_args = ns.script_args[0], ns.script_args[1:]  # `memkit run python x.py` = `x.py`
    elif os.path.basename(ns.script) in RELAUNCHERS or (
            not os.path.isfile(ns.script) and not ns.script.endswith(".py") and resolve_program(ns.script)):
        if ns.nproc_per_node > 1:
            parser.error(f"--nproc-per-node starts a script on N ranks; {ns.script} has its own flag for that")
        return run_launcher(ns.script, ns.script_args)
    if ns.nproc_per_node > 1:
        from .errors import RecipeError
        from .integrations.launcher import FLAG, extract_recipe_flag
        from .recipe import load_recipe

        try:
            recipe, _ = extract_recipe_flag(ns.script_args)
        except SystemExit as exc:
            parser.error(str(exc))
        if recipe is None:
            parser.error(f"no {FLAG} given; pass {FLAG} FILE after the script name")
        try:
            load_recipe(recipe)  # fail before starting N processes
        except RecipeError as exc:
            print(f"memkit run: the recipe is invalid, nothing was run.\n{exc}", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ns.nproc_per_node}",
               "-m", "hf_memkit.run", ns.script, *ns.script_args]
        os.execv(sys.executable, cmd)
    from .integrations.launcher import run_script

    code = run_script(ns.script, ns.script_args)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # a rank started by torchrun
        exit_rank(code)
    return code


def exit_rank(code: int) -> None:
    """End a torchrun rank without the interpreter's teardown.

    The script has returned and the process group is destroyed; what remains is Python finalising module
    globals, which destroys C++ objects of torch.distributed/DeepSpeed in arbitrary order. One of them (a
    ``std::thread`` still joinable) occasionally aborts the rank with "terminate called without an active
    exception" after a successful run, and torchrun then reports the whole job failed. So: run the ``atexit``
    handlers (loggers, temp files, trackers keep their shutdown), flush, and leave with the script's status.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
