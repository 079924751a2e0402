"""``memkit train``: fine-tune a model (default: the embedded SmolLM2-135M-Instruct) on the embedded corpus
with a recipe (default: ``recipes/default.yaml``), reporting eval perplexity before and after, tokens/s and
peak memory. Precedence of TrainingArguments: memkit's defaults < the recipe's training_args < flags given
on the command line. ``--token-budget N`` (and ``--packing``) trains on the corpus's paragraphs (mixed lengths,
cut at ``--max-seq-len``) in batches of at most N tokens instead of fixed blocks
(:mod:`hf_memkit.integrations.token_budget`); both reach :func:`train` among the flags the command-line parser
passes on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

from .errors import MemkitError

#: memkit's defaults per model: small enough for 2 CPU cores, real enough to move perplexity
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"max_steps": 40, "max_seq_len": 128, "eval_blocks": 16,
             "args": {"per_device_train_batch_size": 8, "learning_rate": 3e-3}},
    "smollm2": {"max_steps": 40, "max_seq_len": 256, "eval_blocks": 24,
                "args": {"per_device_train_batch_size": 4, "learning_rate": 5e-4}},
    "path": {"max_steps": 60, "max_seq_len": 256, "eval_blocks": 24,
             "args": {"per_device_train_batch_size": 4, "learning_rate": 2e-4}},
}
COMMON_ARGS = {"logging_steps": 10, "save_strategy": "no", "report_to": [], "warmup_steps": 0,
               "lr_scheduler_type": "cosine", "per_device_eval_batch_size": 8, "seed": 0,
               "dataloader_pin_memory": False}


DEFAULT_OUTPUT_DIR = "runs/memkit-train"


@dataclasses.dataclass
class TrainOptions:
    model: str = "smollm2"
    recipe: str = "default"
    max_steps: int | None = None
    max_seq_len: int | None = None
    output_dir: str | None = None  # None: the recipe's training_args.output_dir, else DEFAULT_OUTPUT_DIR
    eval_before: bool = True
    extra: list[str] = dataclasses.field(default_factory=list)  # TrainingArguments flags
    divergence_guard: bool = True  # add guard: [{divergence_guard: {}}] unless the recipe has a guard
    overwrite: bool = False  # start over in an output folder that holds an earlier run's checkpoints
    allocator: str | None = None  # host_memory.CHOICES; None: $HF_MEMKIT_ALLOCATOR, else auto
    token_budget: int | None = None  # batches of at most N tokens over the corpus's paragraphs (--token-budget N)
    packing: bool = False  # with token_budget: pack each batch into one row instead of padding (--packing)
    country: str = "USA"  # the grid whose CO2 intensity converts the measured energy (--country, ISO 3166 alpha-3)


def split_batching_flags(extra: list[str]) -> tuple[int | None, bool, list[str]]:
    """``--token-budget N`` (or ``=N``) and ``--packing`` taken out of the flags ``memkit train`` passes on (the
    command-line parser hands every flag it does not know to :func:`train`); returns (budget, packing, the rest)."""
    budget, packing, rest = None, False, []
    i = 0
    while i < len(extra):
        name, eq, value = extra[i].partition("=")
        if name in ("--token-budget", "--token_budget"):
            if not eq:
                if i + 1 >= len(extra):
                    raise MemkitError("--token-budget needs a number of tokens\n  fix: e.g. --token-budget 2048")
                i += 1
                value = extra[i]
            try:
                budget = int(value)
            except ValueError:
                raise MemkitError(f"--token-budget {value!r} is not an integer\n  fix: e.g. --token-budget 2048") \
                    from None
            if budget < 1:
                raise MemkitError(f"--token-budget must be at least 1, got {budget}\n  fix: e.g. --token-budget 2048")
        elif extra[i] == "--packing":
            packing = True
        else:
            rest.append(extra[i])
        i += 1
    return budget, packing, rest


def _resolve_batching(opts: TrainOptions) -> TrainOptions:
    """The options with the token-budget flags moved out of ``extra``; ``--packing`` alone is an error."""
    budget, packing, rest = split_batching_flags(opts.extra)
    opts = dataclasses.replace(opts, extra=rest, token_budget=budget or opts.token_budget,
                               packing=packing or opts.packing)
    if opts.packing and not opts.token_budget:
        raise MemkitError("--packing packs token-budget batches, but no --token-budget was given\n"
                          "  fix: add --token-budget N (N tokens per packed row), or drop --packing")
    return opts


def _parse_flags(extra: list[str], output_dir: str) -> Any:
    """TrainingArguments from the command-line flags; an unknown or malformed flag is a MemkitError that says
    which and what the flags are (argparse's own exit is caught, its one-line reason kept)."""
    import contextlib
    import difflib
    import io

    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, rest = parser.parse_args_into_dataclasses(args=[*extra, "--output_dir", output_dir],
                                                            return_remaining_strings=True)
    except SystemExit:
        reason = next((ln for ln in reversed(err.getvalue().splitlines()) if ln.strip()), "invalid flags")
        raise MemkitError(f"invalid TrainingArguments flag: {reason.split('error: ', 1)[-1]}\n"
                          "  fix: see `memkit train --help` and `python -c 'import transformers; "
                          "help(transformers.TrainingArguments)'`") from None
    except ValueError as exc:  # TrainingArguments' own checks of a combination of flags
        cpu_bf16 = "bf16" in str(exc) and "use_cpu" in str(exc)
        raise MemkitError(f"TrainingArguments refuses these flags: {exc}\n  fix: "
                          + ("on a machine without a GPU add --use_cpu to --bf16 (bf16 autocast on the CPU)"
                             if cpu_bf16 else "change the flags it names (see `memkit train --help`)")) from None
    flags = [a for a in rest if a.startswith("-")]
    if flags or rest:
        bad = (flags or rest)[0]
        name = bad.split("=", 1)[0].lstrip("-").replace("-", "_")
        close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(TrainingArguments)], 1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise MemkitError(f"unknown argument {bad!r}: neither a memkit train option nor a TrainingArguments field\n"
                          f"  fix: {hint}see `memkit train --help`")
    return args


def build_training_args(opts: TrainOptions, recipe: Any, defaults: dict[str, Any]):
    """Precedence: memkit's defaults < the recipe's training_args < the command line (memkit's own
    ``--max-steps``/``--output-dir`` and every TrainingArguments flag)."""
    from .errors import RecipeError
    from .integrations.launcher import explicit_flags
    from .integrations.trainer import apply_training_args
    from .recipe import check_training_arg_ranges

    output_dir = opts.output_dir or recipe.training_args.get("output_dir") or DEFAULT_OUTPUT_DIR
    args = _parse_flags(opts.extra, output_dir)
    explicit = explicit_flags(opts.extra) | ({"output_dir"} if opts.output_dir else set())
    if opts.max_steps:
        explicit.add("max_steps")
    try:
        check_training_arg_ranges({k: getattr(args, k) for k in explicit_flags(opts.extra) if hasattr(args, k)},
                                  "command line", prefix="")
    except RecipeError as exc:
        raise MemkitError(f"--{exc.key}: {exc.problem}\n  fix: {exc.fix}") from None
    base = {**COMMON_ARGS, **defaults["args"], "max_steps": opts.max_steps or defaults["max_steps"]}
    base = {k: v for k, v in base.items() if k not in explicit_flags(opts.extra) and k not in recipe.training_args}
    if opts.max_steps:
        base["max_steps"] = opts.max_steps
    args = dataclasses.replace(args, **base)
    return apply_training_args(args, recipe.training_args, keep=explicit, source=recipe.source), explicit


def check_output_dir(output_dir: str, resume: Any, overwrite: bool) -> None:
    """Before any model loads: the output folder must be a writable folder (or creatable), and an earlier run's
    checkpoints there are either resumed or explicitly started over."""
    from pathlib import Path

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise MemkitError(f"the output directory {output_dir} is a file\n  fix: pass --output-dir with a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MemkitError(f"the output directory {output_dir} is not writable ({probe} refuses writes)\n"
                          "  fix: pass --output-dir with a folder you can write to")
    earlier = sorted(p.name for p in path.glob("checkpoint-*")) if path.is_dir() else []
    if earlier and not resume and not overwrite:
        raise MemkitError(f"{output_dir} holds checkpoints of an earlier run ({', '.join(earlier[-3:])}); this run "
                          "would mix its checkpoints with them\n  fix: --resume_from_checkpoint true to continue "
                          "it, --overwrite-output-dir to start over there, or another --output-dir")
    if earlier and overwrite and not resume:
        import shutil

        for name in earlier:
            shutil.rmtree(path / name)


def resolve_resume(value: Any, output_dir: str) -> "str | bool | None":
    """``--resume_from_checkpoint``: a checkpoint folder, or true/last for the newest complete one in the
    output directory; checked before any model loads, with the wiring's own completeness rules."""
    from .integrations.checkpoints import incomplete_reason, last_complete_checkpoint

    if value in (None, "", False):
        return None
    text = str(value)
    if text.lower() in ("true", "last", "latest", "1"):
        if last_complete_checkpoint(output_dir, stateful=False) is None:
            raise MemkitError(f"--resume_from_checkpoint {text}: {output_dir} holds no checkpoint-* folder that "
                              "can be resumed\n  fix: train without it, or pass the checkpoint folder itself")
        return True
    reason = incomplete_reason(text, stateful=False)
    if reason is not None:
        raise MemkitError(f"--resume_from_checkpoint {text}: not a checkpoint folder ({reason})\n"
                          "  fix: pass a checkpoint-N folder written by a run with --save_strategy steps")
    return text


def perplexity(trainer: Any) -> float:
    loss = trainer.evaluate()["eval_loss"]
    return math.exp(loss) if loss < 50 else float("inf")


def verdict(before: float | None, after: float | None, vocab_size: int | None,
            last_grad_norm: float | None = None) -> str:
    """What the eval perplexity says of the run: never call a collapse an improvement. A collapsed model predicts
    one distribution whatever the input: its perplexity sits near the vocabulary size (a random model starts
    there too, so that alone proves nothing) and its gradients are exactly zero; a run that rises into the
    near-uniform band from below has collapsed as well."""
    if after is None or not math.isfinite(after):
        return "diverged"
    if vocab_size:
        near_uniform = abs(after - vocab_size) <= 0.05 * vocab_size
        if (near_uniform and last_grad_norm == 0.0) or (
                after >= 0.9 * vocab_size and before is not None and before < 0.9 * vocab_size):
            return "collapsed"
    if before is None or not math.isfinite(before):
        return "trained"
    return "improved" if after < before else "not improved"


def _with_guard(recipe: Any, enabled: bool) -> Any:
    if not enabled or recipe.slot("guard"):
        return recipe
    from .guards.divergence.config import DivergenceGuardConfig
    from .recipe import TechniqueSpec

    return dataclasses.replace(recipe, techniques=[*recipe.techniques,
                                                   TechniqueSpec("divergence_guard", "guard", DivergenceGuardConfig())])


def train(opts: TrainOptions) -> dict[str, Any]:
    from .recipe import load_recipe

    opts = _resolve_batching(opts)  # --token-budget/--packing are memkit's, not TrainingArguments flags
    recipe = _with_guard(load_recipe(opts.recipe), opts.divergence_guard)  # a bad recipe stops here
    kind = opts.model if opts.model in ("tiny", "smollm2") else "path"
    defaults = MODEL_DEFAULTS[kind]
    seq_len = opts.max_seq_len or defaults["max_seq_len"]
    if opts.token_budget and opts.token_budget < seq_len:
        raise MemkitError(f"--token-budget {opts.token_budget} is smaller than the longest training sequence "
                          f"(--max-seq-len {seq_len}): such a sequence would fit no batch\n"
                          f"  fix: --token-budget {seq_len} or more, or --max-seq-len {opts.token_budget} or less")

    from .data.models import resolve_model_path

    path = resolve_model_path(opts.model)  # clear error for a hub id or missing package, before heavy work
    args, explicit = build_training_args(opts, recipe, defaults)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args.output_dir, resume, opts.overwrite)

    from .memory import host_memory

    try:
        host_memory.release_host_memory(opts.allocator)  # glibc in-process; mimalloc was preloaded by the CLI
    except host_memory.AllocatorError as exc:
        raise MemkitError(f"{exc}") from None

    import torch
    from transformers import default_data_collator

    from .data.corpus import block_dataset, split_topics
    from .data.models import load_model_and_tokenizer
    from .errors import DivergenceError
    from .integrations.memkit_trainer import MemkitTrainer
    from .memory.estimate import estimate_memory
    from .memory.profiler import MemoryReportCallback, peak_rss_bytes

    torch.manual_seed(args.seed)
    print(f"hf_memkit: model {opts.model} ({path}), recipe {recipe.source} "
          f"[{', '.join(recipe.names()) or 'stock Trainer'}], {args.max_steps} steps x "
          + (f"{args.per_device_train_batch_size} x {seq_len} tokens" if not opts.token_budget else
             f"a budget of {opts.token_budget} tokens ({'packed' if opts.packing else 'padded'}; paragraphs of up "
             f"to {seq_len} tokens)")
          + (f", resuming from {resume if resume is not True else 'the last checkpoint'}" if resume else ""),
          flush=True)
    from .memory import process
    from .precision.bf16.loading import load_dtype

    host_memory.page_out_libraries()  # what the imports touched and training never runs again
    process.mark("load")  # the RSS here is the run's runtime (interpreter, libraries, nothing of the model)
    # a recipe that stores weights in 16 bits loads them so (no fp32 copy; the named SmolLM2 from its 16-bit file)
    model, tok = load_model_and_tokenizer(opts.model if opts.model in ("tiny", "smollm2") else str(path),
                                          dtype=load_dtype(recipe))
    process.mark("build")
    train_texts, eval_texts = split_topics()
    est_batch, est_len = args.per_device_train_batch_size, seq_len
    if opts.token_budget:  # one example per paragraph (mixed lengths), enough real tokens for max_steps batches
        from .data.corpus import paragraph_dataset

        real_needed = args.max_steps * args.gradient_accumulation_steps * max(1, args.world_size) * opts.token_budget
        train_ds = paragraph_dataset(train_texts, tok, seq_len, max_total_tokens=real_needed)
        # the largest batch the budget allows: one row of the budget, or budget // seq_len rows of seq_len
        est_batch, est_len = (1, opts.token_budget) if opts.packing else (max(1, opts.token_budget // seq_len),
                                                                            seq_len)
    else:
        blocks_needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        train_ds = block_dataset(train_texts, tok, seq_len, max_blocks=max(blocks_needed, 1))
    eval_ds = block_dataset(eval_texts, tok, seq_len, max_blocks=defaults["eval_blocks"])
    estimate = estimate_memory(model.config, recipe, batch_size=est_batch, seq_len=est_len)
    estimate.predict_peak(runtime_bytes=process.baseline_rss(), allocator=process.allocator_kind())
    profiler = MemoryReportCallback()
    trainer = MemkitTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=default_data_collator, processing_class=tok, callbacks=[profiler],
                            recipe=recipe, keep_args=explicit)
    budget_run = None
    if opts.token_budget:
        from .integrations.token_budget import enable_token_budget

        try:
            budget_run = enable_token_budget(trainer, opts.token_budget, packing=opts.packing)
        except ValueError as exc:
            raise MemkitError(str(exc)) from None
    ppl_before = perplexity(trainer) if opts.eval_before else None
    if ppl_before is not None:
        print(f"hf_memkit: eval perplexity before training: {ppl_before:.3f}", flush=True)
    host_memory.page_out_libraries()  # library pages the imports touched and training does not need
    base = {"model": opts.model, "recipe": recipe.source, "techniques": recipe.names(), "seq_len": seq_len,
            "perplexity_before": round(ppl_before, 4) if ppl_before is not None else None}
    from .energy import EnergyMeter

    meter = EnergyMeter(opts.country).start()
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except DivergenceError as exc:
        _write_reports(args.output_dir, {**base, "status": "diverged", "verdict": "diverged", "error": str(exc),
                                         "steps": trainer.state.global_step, "peak_rss_bytes": peak_rss_bytes(),
                                         "energy": meter.stop()},
                       {"estimate": estimate.to_dict(), "measured": profiler.report()})
        raise
    seconds = time.perf_counter() - t0
    ppl_after = perplexity(trainer)
    steps = result.global_step
    tokens = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * seq_len
    if budget_run is not None:  # the tokens of the examples, padding not counted
        tokens = budget_run.stats.real_tokens
        base["batching"] = {"token_budget": opts.token_budget, "mode": budget_run.mode,
                            "padding_fraction": round(budget_run.stats.padding_fraction, 4),
                            "token_slots": budget_run.stats.slots, "batches": budget_run.stats.batches}
    energy = meter.stop(tokens)
    process.mark("save")
    trainer.memkit.writes_card = False  # the card below says more than a script's save_model card can
    trainer.save_model(args.output_dir)
    summary = {
        **base, "status": "finished", "steps": steps, "train_tokens": tokens, "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "eval_tokens": len(eval_ds) * seq_len,
        "perplexity_after": round(ppl_after, 4),
        "verdict": verdict(ppl_before, ppl_after, getattr(model.config, "vocab_size", None),
                           next((h["grad_norm"] for h in reversed(trainer.state.log_history) if "grad_norm" in h),
                                None)),
        "mean_train_loss": round(result.training_loss, 4),
        "last_logged_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "peak_rss_bytes": peak_rss_bytes(),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "host_memory": host_memory.describe(),
        "energy": energy,
    }
    report = {"estimate": estimate.to_dict(), "measured": profiler.report()}
    _write_reports(args.output_dir, summary, report)
    from .export.card import base_model_id, training_info, write_training_card

    write_training_card(args.output_dir, {
        **training_info(trainer.model, recipe, metrics=summary, energy=energy,
                        base_model=base_model_id(name_or_path=str(path)),
                        data="hf_memkit's embedded corpus (Python's pydoc_data.topics)"),
        "written_by": "`memkit train`"})
    from .memory.report import plot_report

    plot_report(report, os.path.join(args.output_dir, "memory_report.png"))
    print_summary(summary, report)
    return summary


def _write_reports(output_dir: str, summary: dict[str, Any], report: dict[str, Any]) -> None:
    """Strict JSON (an infinite perplexity is written as null), each file complete or absent."""
    from .atomic import write_json

    write_json(os.path.join(output_dir, "memory_report.json"), report)
    write_json(os.path.join(output_dir, "train_summary.json"), summary)


def _energy_line(energy: dict[str, Any] | None) -> str:
    from .energy import describe

    return describe(energy).removeprefix("energy: ")


def _allocator_line(host: dict[str, Any]) -> str:
    name = host.get("allocator", "unknown")
    line = {"mimalloc": "mimalloc (freed memory returns to the OS)",
            "glibc": "glibc malloc" + (" (fixed mmap threshold: freed blocks return to the OS)"
                                       if host.get("settings", {}).get("mmap_threshold") else
                                       " (stock: freed memory stays in the process; see --allocator)")}.get(name, name)
    released = host.get("library_pages_released_bytes", 0)
    return line + (f"; {released / 2**20:.0f} MiB of library pages released" if released else "")


def print_summary(summary: dict[str, Any], report: dict[str, Any]) -> None:
    from .memory.report import summary_lines

    before = summary["perplexity_before"]
    ppl = f"{before:.3f} -> {summary['perplexity_after']:.3f}" if before is not None else (
        f"{summary['perplexity_after']:.3f}")
    ppl += {"improved": " (improved)", "not improved": " (NOT improved)",
            "collapsed": " (COLLAPSED: a near-uniform guess over the vocabulary, not an improvement)",
            "diverged": " (DIVERGED: not finite)"}.get(summary.get("verdict", ""), "")
    rows = [
        ("perplexity (eval)", ppl),
        ("train time", f"{summary['train_seconds']:.1f} s for {summary['steps']} steps"),
        ("throughput", f"{summary['tokens_per_second']} tokens/s"),
        ("trainable parameters", f"{summary['trainable_parameters']:,}"),
        ("peak RSS", f"{summary['peak_rss_bytes'] / 2**20:.0f} MiB"),
        ("allocator", _allocator_line(summary.get("host_memory") or {})),
        ("energy", _energy_line(summary.get("energy"))),
    ]
    batching = summary.get("batching")
    if batching:
        rows.insert(3, ("batches", f"token budget {batching['token_budget']} ({batching['mode']}), padding "
                                   f"{100 * batching['padding_fraction']:.1f}% of {batching['token_slots']:,} slots"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    print("\n".join(summary_lines(report)), flush=True)
