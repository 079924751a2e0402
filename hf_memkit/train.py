"""``memkit train``: fine-tune a model (default: the embedded SmolLM2-135M-Instruct) on the embedded corpus
with a recipe (default: ``recipes/default.yaml``), reporting eval perplexity before and after, tokens/s and
peak memory. Precedence of TrainingArguments: memkit's defaults < the recipe's training_args < flags given
on the command line.
"""

from __future__ import annotations

import dataclasses
import json
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


@dataclasses.dataclass
class TrainOptions:
    model: str = "smollm2"
    recipe: str = "default"
    max_steps: int | None = None
    max_seq_len: int | None = None
    output_dir: str = "runs/memkit-train"
    eval_before: bool = True
    extra: list[str] = dataclasses.field(default_factory=list)  # TrainingArguments flags


def build_training_args(opts: TrainOptions, recipe: Any, defaults: dict[str, Any]):
    from transformers import HfArgumentParser, TrainingArguments

    from .integrations.launcher import explicit_flags
    from .integrations.trainer import apply_training_args

    parser = HfArgumentParser(TrainingArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=[*opts.extra, "--output_dir", opts.output_dir])
    except SystemExit as exc:  # argparse already printed what is wrong
        raise MemkitError(f"invalid TrainingArguments flags: {' '.join(opts.extra)}") from exc
    explicit = explicit_flags(opts.extra)
    base = {**COMMON_ARGS, **defaults["args"], "max_steps": opts.max_steps or defaults["max_steps"]}
    base = {k: v for k, v in base.items() if k not in explicit and k not in recipe.training_args}
    args = dataclasses.replace(args, **base)
    return apply_training_args(args, recipe.training_args, keep=explicit, source=recipe.source), explicit


def perplexity(trainer: Any) -> float:
    loss = trainer.evaluate()["eval_loss"]
    return math.exp(loss) if loss < 50 else float("inf")


def train(opts: TrainOptions) -> dict[str, Any]:
    from .recipe import load_recipe

    recipe = load_recipe(opts.recipe)  # a bad recipe stops here, before any model loads
    kind = opts.model if opts.model in ("tiny", "smollm2") else "path"
    defaults = MODEL_DEFAULTS[kind]
    seq_len = opts.max_seq_len or defaults["max_seq_len"]

    from .data.models import resolve_model_path

    path = resolve_model_path(opts.model)  # clear error for a hub id or missing package, before heavy work

    import torch
    from transformers import default_data_collator

    from .data.corpus import block_dataset, split_topics
    from .data.models import load_model_and_tokenizer
    from .integrations.memkit_trainer import MemkitTrainer
    from .memory.estimate import estimate_memory
    from .memory.profiler import MemoryReportCallback, peak_rss_bytes

    args, _ = build_training_args(opts, recipe, defaults)
    torch.manual_seed(args.seed)
    print(f"hf_memkit: model {opts.model} ({path}), recipe {recipe.source} "
          f"[{', '.join(recipe.names()) or 'stock Trainer'}], {args.max_steps} steps x "
          f"{args.per_device_train_batch_size} x {seq_len} tokens", flush=True)
    model, tok = load_model_and_tokenizer(str(path))
    train_texts, eval_texts = split_topics()
    tokens_needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    train_ds = block_dataset(train_texts, tok, seq_len, max_blocks=max(tokens_needed, 1))
    eval_ds = block_dataset(eval_texts, tok, seq_len, max_blocks=defaults["eval_blocks"])
    estimate = estimate_memory(model.config, recipe, batch_size=args.per_device_train_batch_size, seq_len=seq_len)
    profiler = MemoryReportCallback()
    trainer = MemkitTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=default_data_collator, processing_class=tok, callbacks=[profiler],
                            recipe=recipe)
    ppl_before = perplexity(trainer) if opts.eval_before else None
    if ppl_before is not None:
        print(f"hf_memkit: eval perplexity before training: {ppl_before:.3f}", flush=True)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    ppl_after = perplexity(trainer)
    steps = result.global_step
    tokens = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * seq_len
    trainer.save_model(args.output_dir)
    summary = {
        "model": opts.model, "recipe": recipe.source, "techniques": recipe.names(), "steps": steps,
        "seq_len": seq_len, "train_tokens": tokens, "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "eval_tokens": len(eval_ds) * seq_len,
        "perplexity_before": round(ppl_before, 4) if ppl_before is not None else None,
        "perplexity_after": round(ppl_after, 4),
        "mean_train_loss": round(result.training_loss, 4),
        "last_logged_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "peak_rss_bytes": peak_rss_bytes(),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    report = {"estimate": estimate.to_dict(), "measured": profiler.report()}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "memory_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.output_dir, "train_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    from .memory.report import plot_report

    plot_report(report, os.path.join(args.output_dir, "memory_report.png"))
    print_summary(summary, report)
    return summary


def print_summary(summary: dict[str, Any], report: dict[str, Any]) -> None:
    from .memory.report import summary_lines

    before = summary["perplexity_before"]
    ppl = f"{before:.3f} -> {summary['perplexity_after']:.3f}" if before is not None else (
        f"{summary['perplexity_after']:.3f}")
    rows = [
        ("perplexity (eval)", ppl),
        ("train time", f"{summary['train_seconds']:.1f} s for {summary['steps']} steps"),
        ("throughput", f"{summary['tokens_per_second']} tokens/s"),
        ("trainable parameters", f"{summary['trainable_parameters']:,}"),
        ("peak RSS", f"{summary['peak_rss_bytes'] / 2**20:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    print("\n".join(summary_lines(report)), flush=True)
