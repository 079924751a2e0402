"""The ``memkit`` command line. The shapes below are a contract (docs/DESIGN.md):

    memkit train    [--model tiny|smollm2|PATH] [--recipe FILE] [--max-steps N] [--max-seq-len N]
                    [--token-budget N [--packing]]
                    [--output-dir DIR] [any TrainingArguments flag, e.g. --per_device_train_batch_size 2]
    memkit run      [--nproc-per-node N] SCRIPT.py [the script's args, including --memkit_recipe FILE]
    memkit run      trl|accelerate|deepspeed|torchrun|python [their args, including --memkit_recipe FILE]
    memkit estimate --model M --recipe FILE --batch-size B --seq-len L [--world-size N [--zero-stage S]]
                    [--json] [--plot PNG]
    memkit plan     --budget 1GiB [--model M] [--seq-len L --batch-size B | --tokens-per-step T]
                    [--device cpu|cuda] [--full-finetune] [--verify] [-o recipe.yaml] [--json]
    memkit compare  RECIPE... [--model M] [--steps N] [--json] [--plot PNG]
    memkit compress MODEL --recipe FILE -o DIR        (MODEL: tiny | smollm2 | PATH)
    memkit export   DIR [--push-to-hub REPO]
    memkit recipes  list | explain FILE | validate FILE...
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MemkitError, RecipeError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _country(text: str) -> str:
    code = text.strip().upper()
    if len(code) != 3 or not code.isalpha():
        raise argparse.ArgumentTypeError(f"{text!r} is not a three-letter ISO 3166 country code (e.g. USA, FRA, DEU)")
    return code


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memkit",
        description="hf_memkit: memory-efficient training for the stock HF Trainer, chosen by a YAML recipe.",
        epilog=__doc__.split("\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model with a recipe (default: SmolLM2-135M + default recipe)",
                       description="Fine-tune on the embedded corpus; unknown --flags go to TrainingArguments.")
    t.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH to a local HF folder")
    t.add_argument("--recipe", default="default", help="recipe YAML file or bundled name (default: default)")
    t.add_argument("--max-steps", type=_positive, default=None, help="optimizer steps (default depends on the model)")
    t.add_argument("--max-seq-len", type=_positive, default=None, help="tokens per training block")
    t.add_argument("--output-dir", default=None,
                   help="where checkpoints and reports go (default: the recipe's, else runs/memkit-train)")
    t.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                   help="skip the perplexity evaluation before training")
    t.add_argument("--no-divergence-guard", dest="divergence_guard", action="store_false",
                   help="do not add the divergence guard (NaN/Inf or spiking loss, vanished gradients stop the run)")
    t.add_argument("--overwrite-output-dir", dest="overwrite", action="store_true",
                   help="start over in an output directory that holds an earlier run's checkpoints (deletes them)")
    t.add_argument("--token-budget", type=_positive, default=None, metavar="N",
                   help="batches of at most N tokens over the corpus's paragraphs (mixed lengths) instead of fixed "
                   "blocks; padding fraction and tokens/s are reported")
    t.add_argument("--packing", action="store_true",
                   help="with --token-budget: pack each batch into one row (position ids reset per sequence, no "
                   "attention across sequences) instead of padding")
    t.add_argument("--country", default="USA", type=_country, metavar="ISO3",
                   help="country whose grid CO2 intensity converts the measured energy (ISO 3166 alpha-3, default "
                   "USA); energy is measured with codecarbon, offline")
    t.add_argument("--allocator", default=None, choices=("auto", "mimalloc", "glibc", "system"),
                   help="how freed host memory goes back to the OS (default: $HF_MEMKIT_ALLOCATOR, else auto = "
                   "mimalloc when installed, else glibc with a fixed mmap threshold; system = leave malloc alone)")

    r = sub.add_parser("run", help="run an unmodified HF training script with --memkit_recipe applied",
                       add_help=False)
    r.add_argument("rest", nargs=argparse.REMAINDER)

    e = sub.add_parser("estimate", help="memory estimate before the run (no weights are built)")
    e.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    e.add_argument("--recipe", default=None, help="recipe YAML file or bundled name (default: stock Trainer)")
    e.add_argument("--batch-size", type=_positive, default=1)
    e.add_argument("--seq-len", type=_positive, default=512)
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--world-size", type=_positive, default=1, help="data-parallel ranks (per-rank memory is shown)")
    e.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage: partitions optimizer state (1), + gradients (2), + weights (3)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--plot", default=None, metavar="PNG", help="also write a stacked-bar chart")

    pl = sub.add_parser("plan", help="a memory budget in, the recipe expected to train best within it out",
                        description="Search the combinations of registered techniques the recipe loader accepts, "
                        "predict each one's peak with the estimator, rank those that fit by the project's measured "
                        "priors (hf_memkit/planner/priors.yaml) and print the pick with the candidates beside it.")
    pl.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    pl.add_argument("--budget", required=True, help="memory budget, e.g. 1GiB, 800MiB, 1.5GiB")
    pl.add_argument("--seq-len", type=_positive, default=256, help="tokens per sequence (default 256)")
    pl.add_argument("--batch-size", type=_positive, default=None, help="sequences per step (default 4)")
    pl.add_argument("--tokens-per-step", type=_positive, default=None,
                    help="tokens per optimizer step instead of --batch-size (the plan may split it into "
                    "micro-batches with gradient accumulation)")
    pl.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu: the budget is peak RSS; cuda: max_memory_allocated")
    mode = pl.add_mutually_exclusive_group()
    mode.add_argument("--full-finetune", action="store_true", help="only recipes that train every weight")
    mode.add_argument("--adapter-ok", action="store_true", help="adapters (LoRA, QLoRA) may be picked (default)")
    pl.add_argument("--verify", action="store_true", help="train the pick for --verify-steps steps and print the "
                    "measured peak beside the prediction")
    pl.add_argument("--verify-steps", type=_positive, default=4)
    pl.add_argument("-o", "--output", default=None, metavar="FILE", help="write the picked recipe here")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")

    c = sub.add_parser("compare", help="run recipes side by side (one process each) and tabulate memory")
    c.add_argument("recipes", nargs="+", help="recipe files or bundled names; the first is the reference")
    c.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    c.add_argument("--steps", type=_positive, default=5, help="optimizer steps per recipe")
    c.add_argument("--batch-size", type=_positive, default=None, help="per-device train batch size")
    c.add_argument("--seq-len", type=_positive, default=None, help="tokens per block")
    c.add_argument("--country", default="USA", type=_country, metavar="ISO3",
                   help="country whose grid CO2 intensity converts the measured energy (default USA)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--plot", default=None, metavar="PNG", help="also write a bar chart")
    c.add_argument("--workdir", default=None, help="keep each run's output here (default: a temp folder)")

    q = sub.add_parser("compress", help="run a recipe's compress: techniques without training and export the result",
                       description="Quantize MODEL with the recipe's compress: list (calibrating on the embedded "
                       "corpus) and write its export: (default compressed-tensors) into DIR, with a model card.")
    q.add_argument("model", metavar="MODEL", help="tiny | smollm2 | PATH to a local HF folder")
    q.add_argument("--recipe", required=True, help="recipe YAML file or bundled name with a compress: slot")
    q.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="folder that receives the export")
    q.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the perplexity evaluations before and after")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DIR entirely (it is never merged into; without this it is refused)")
    q.add_argument("--country", default="USA", type=_country, metavar="ISO3",
                   help="country whose grid CO2 intensity converts the measured energy (default USA)")

    x = sub.add_parser("export", help="check an exported folder, refresh its model card, optionally push it",
                       description="DIR is an export (memkit compress -o DIR) or a run's output directory holding "
                       "one in export/. Checks it, rewrites README.md, and uploads it with --push-to-hub.")
    x.add_argument("dir", metavar="DIR")
    x.add_argument("--push-to-hub", default=None, metavar="REPO", help="Hub repository id (user/name) to upload to")
    x.add_argument("--private", action="store_true", help="create the Hub repository as private")
    x.add_argument("--include-reports", action="store_true",
                   help="also upload the reports the export holds (compression_report.json); by default only the "
                   "files of the model that its memkit_export.json lists are uploaded")

    rc = sub.add_parser("recipes", help="list, explain or validate recipes")
    rsub = rc.add_subparsers(dest="recipes_command", metavar="ACTION")
    rsub.add_parser("list", help="registered techniques and bundled recipes")
    ex = rsub.add_parser("explain", help="print the resolved recipe with every default")
    ex.add_argument("file")
    va = rsub.add_parser("validate", help="validate recipes; exit 0 when all are valid, 1 otherwise")
    va.add_argument("files", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # everything after `run` belongs to the launcher and the script
        from .run import main as run_main

        return run_main(argv[1:])
    parser = _parser()
    ns, unknown = parser.parse_known_args(argv)
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    if unknown and ns.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if ns.command == "train":
            from .memory.host_memory import AllocatorError, reexec_if_needed

            try:  # before anything heavy is imported: the process restarts with mimalloc preloaded
                reexec_if_needed(["-m", "hf_memkit.cli", *argv], ns.allocator)
            except AllocatorError as exc:
                parser.error(str(exc))
            return _train(ns, unknown)
        if ns.command == "estimate":
            return _estimate(ns)
        if ns.command == "compare":
            return _compare(ns)
        if ns.command == "plan":
            return _plan(ns)
        if ns.command == "recipes":
            return _recipes(ns, parser)
        if ns.command == "compress":
            return _compress(ns)
        if ns.command == "export":
            return _export(ns)
    except RecipeError as exc:
        print(f"memkit: invalid recipe\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemkitError as exc:
        print(f"memkit: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("memkit: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return EXIT_USAGE


def _train(ns: argparse.Namespace, extra: list[str]) -> int:
    from .train import TrainOptions, train

    from .integrations.launcher import logging_to_stderr

    with logging_to_stderr():  # the start-of-training block and the techniques' own lines are INFO
        summary = train(TrainOptions(model=ns.model, recipe=ns.recipe, max_steps=ns.max_steps,
                                     max_seq_len=ns.max_seq_len, output_dir=ns.output_dir, extra=extra,
                                     eval_before=ns.eval_before, divergence_guard=ns.divergence_guard,
                                     overwrite=ns.overwrite, allocator=ns.allocator,
                                     token_budget=ns.token_budget, packing=ns.packing, country=ns.country))
    if summary.get("verdict") in ("collapsed", "diverged"):
        print(f"memkit: the trained model {summary['verdict']} (eval perplexity {summary['perplexity_after']})\n"
              "  fix: lower the learning rate or add warmup; see train_summary.json", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _output_error(exc: OSError, what: str) -> int:
    """A file-system error while writing an output is the user's to fix (permissions, space): one paragraph."""
    print(f"memkit: {what} failed: {exc.strerror or exc} ({exc.filename or ''}); nothing was replaced (the previous "
          "output, if any, is intact). Fix: check the folder's permissions and free space, or choose another "
          "folder", file=sys.stderr)
    return EXIT_FAIL


def _compress(ns: argparse.Namespace) -> int:
    from .quant.oneshot import compress

    try:
        s = compress(ns.model, ns.recipe, ns.output_dir, evaluate=ns.evaluate, overwrite=ns.overwrite,
                     country=ns.country)
    except OSError as exc:
        return _output_error(exc, f"memkit compress (output {ns.output_dir})")
    before, after = s["perplexity_before"], s["perplexity_after"]
    ppl = f"{before:.3f} -> {after:.3f}" if before is not None and after is not None else "(not measured)"
    print(f"memkit compress: {', '.join(s['techniques'])} -> {s['format']} in {s['output_dir']}")
    print(f"  perplexity (eval)  {ppl}")
    print(f"  size on disk       {s['bytes_on_disk'] / 2**20:.2f} MiB")
    print(f"  time               {s['seconds']:.1f} s")
    return EXIT_OK


def _export(ns: argparse.Namespace) -> int:
    from .export.checkpoint import check_export_dir
    from .export.hub import upload_plan

    try:
        folder, info = check_export_dir(ns.dir, repo_id=ns.push_to_hub)
    except OSError as exc:
        return _output_error(exc, f"memkit export {ns.dir}")
    print(f"memkit export: {folder} ({info['format']}, {info['bytes_on_disk'] / 2**20:.2f} MiB of weights)")
    if ns.push_to_hub:
        from .export.hub import push_to_hub

        files = upload_plan(folder, include_reports=ns.include_reports)  # a bad folder is a MemkitError, not this
        try:
            pushed = push_to_hub(folder, ns.push_to_hub, private=ns.private or None,
                                 include_reports=ns.include_reports)
        except Exception as exc:  # huggingface_hub raises many types (auth, HTTP, offline); all mean the same here
            print(f"memkit: pushing {folder} ({len(files)} files) to {ns.push_to_hub} failed: {type(exc).__name__}: "
                  f"{exc}\n  fix: log in with `huggingface-cli login` (or set HF_TOKEN), check the repo id, and unset "
                  "HF_HUB_OFFLINE", file=sys.stderr)
            return EXIT_FAIL
        print(f"  pushed {len(pushed['files'])} files to {pushed['repo_id']}: {pushed['commit']}")
    return EXIT_OK


def _compare(ns: argparse.Namespace) -> int:
    from .memory.compare import compare, table

    extra = []
    if ns.batch_size:
        extra += ["--per_device_train_batch_size", str(ns.batch_size)]
    if ns.seq_len:
        extra += ["--max-seq-len", str(ns.seq_len)]
    extra += ["--country", ns.country]
    rows = compare(ns.recipes, model=ns.model, steps=ns.steps, extra=extra, workdir=ns.workdir)
    if ns.plot:
        from .memory.report import plot_compare

        plot_compare(rows, ns.plot)
    if ns.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"memkit compare: model {ns.model}, {ns.steps} steps each, same data and seed")
        print(table(rows))
    return EXIT_OK


def _estimate(ns: argparse.Namespace) -> int:
    from .memory.estimate import estimate_memory

    mem = estimate_memory(ns.model, ns.recipe, batch_size=ns.batch_size, seq_len=ns.seq_len, dtype=ns.dtype,
                          world_size=ns.world_size, zero_stage=ns.zero_stage)
    peak = mem.predict_peak()  # runtime: this process's RSS with the Trainer imported (no model loaded here)
    data = mem.to_dict()
    if ns.plot:
        from .memory.report import plot_estimate

        plot_estimate(data, ns.plot)
    if ns.json:
        print(json.dumps(data, indent=1))
    else:
        print(f"memory estimate: model {ns.model}, recipe {ns.recipe or '(stock Trainer)'}, batch {ns.batch_size}"
              f" x {ns.seq_len} tokens, {ns.dtype}")
        print(mem.table())
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in peak["breakdown"].items() if v)
        print(f"predicted peak RSS of a training process: {peak['peak_bytes'] / 2**20:.0f} MiB ({parts}; tensors "
              f"peak in {peak['phase']}; slack for {peak['allocator']})")
    return EXIT_OK


def _plan(ns: argparse.Namespace) -> int:
    from .atomic import write_text
    from .planner import plan
    from .planner.verify import exec_verify

    p = plan(ns.model, ns.budget, seq_len=ns.seq_len, batch_size=ns.batch_size, tokens_per_step=ns.tokens_per_step,
             device=ns.device, full_finetune=ns.full_finetune)
    if ns.json:
        print(json.dumps(plan_json(p), indent=1))
    else:
        print(p.explain())
    if p.pick is None:
        return EXIT_FAIL
    if ns.output:
        write_text(ns.output, f"# memkit plan --budget {ns.budget} --model {ns.model}: "
                   f"{p.batch_size} x {p.seq_len} tokens per step; train with "
                   + " ".join(f"--{k} {v}" for k, v in p.training_args().items()) + "\n"
                   + p.recipe.to_yaml())
        if not ns.json:
            print(f"wrote {ns.output}")
    if ns.verify:  # measured from a process that maps no torch (see hf_memkit/planner/verify.py)
        exec_verify(p, ns.verify_steps)
    return EXIT_OK


def plan_json(p) -> dict:
    def row(s):
        return {"candidate": s.label, "predicted_peak_bytes": s.peak_bytes, "predicted_step_seconds": s.step_seconds,
                "expected_perplexity": s.perplexity, "prior_row": s.prior_row, "fits": s.fits,
                "recipe": s.candidate.recipe(), **p.training_args(s)}

    return {"model": p.model, "budget_bytes": p.budget_bytes, "device": p.device, "batch_size": p.batch_size,
            "seq_len": p.seq_len, "pick": row(p.pick) if p.pick else None, "training_args": p.training_args(),
            "fitting": [row(s) for s in p.fitting], "nearest_over": [row(s) for s in p.over[:3]],
            "unmeasured": p.unmeasured, "refused": len(p.refused), "suggestion": p.suggestion,
            "priors": p.priors.source}


def _recipes(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import registry
    from .recipe import load_recipe

    cmd = ns.recipes_command
    if cmd == "list":
        from .data.recipes import bundled_recipes

        entries = registry.entries()
        w = max(len(e.name) for e in entries)
        print("techniques:")
        for e in entries:
            origin = "" if e.origin == "builtin" else f"  [{e.origin}]"
            print(f"  {e.slot:<12} {e.name:<{w}}  {e.technique_cls.summary}{origin}")
        for name, why in registry.PLUGIN_FAILURES.items():
            print(f"  {'(broken)':<12} {name:<{w}}  plugin failed to import: {why}")
        print("bundled recipes:")
        for name, path in bundled_recipes().items():
            try:
                desc = load_recipe(path, check_training_args=False).description
            except RecipeError as exc:
                desc = f"INVALID: {exc.problem}"
            print(f"  {name:<16} {desc}")
        return EXIT_OK
    if cmd == "explain":
        recipe = load_recipe(ns.file)
        print(f"# resolved from {recipe.source}")
        print(recipe.to_yaml(), end="")
        return EXIT_OK
    if cmd == "validate":
        failed = 0
        for f in ns.files:
            try:
                recipe = load_recipe(f)
                print(f"ok      {f}  ({', '.join(recipe.names()) or 'no techniques'})")
            except RecipeError as exc:
                failed += 1
                print(f"INVALID {exc}")
        return EXIT_FAIL if failed else EXIT_OK
    parser.parse_args(["recipes", "--help"])
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
