"""The number users judge memory by: the process peak, with the stock Trainer and the peer in the same run.

    python benchmarks/bench_peak.py [--rows stock_adamw stock_lora_gc ...] [--steps 40] [--model smollm2]

SmolLM2-135M, 4 x 256 tokens, ``--steps`` optimizer steps, the embedded corpus, lr 5e-4 cosine (``memkit train``'s
defaults for SmolLM2), eval perplexity on 24 held-out blocks after training. One process per row, run one after
the other (never time two rows at once; check that the machine is idle first).

Rows:

* ``stock_adamw``    a stock ``transformers.Trainer``, full fine-tune, torch AdamW, fp32, no checkpointing
* ``stock_lora_gc``  a stock Trainer, PEFT LoRA r16 alpha32 on every Linear, gradient checkpointing, AdamW
* ``peer_adalomo``   a stock Trainer with ``optim="adalomo"`` (the ``lomo-optim`` package: fused update in
                     backward, factored second moment), full fine-tune, fp32. AdaLomo allocates its state with
                     ``.cuda()``; on a CPU-only machine the row maps ``Tensor.cuda`` to a no-op while it runs
* ``memkit_*``       ``memkit train`` as a user runs it (the process restarts on mimalloc, library pages are
                     released once the model is built): ``default`` (LoRA r16 + 8-bit AdamW + CCE + checkpointing +
                     bf16 base storage), ``default_fp32`` (the same with the fp32 base: the default until
                     this release), ``lora`` and ``qlora`` (the bundled recipes), ``full`` (``bf16_full``: bf16
                     weights with stochastic-rounding updates, gradient release, 8-bit AdamW, CCE, checkpointing)
                     and ``full_rn`` (the same with round-to-nearest updates: the known failure, lost updates)

Columns (MiB): peak RSS (``VmHWM``), the predicted peak (``memkit estimate``'s process peak; stock rows: the
estimate of the equivalent recipe), and the peak's breakdown from the run's memory report: runtime (RSS before
the model loads), tensors (weights, gradients, optimizer state, saved activations at the profiled step's peak),
transients (other live tensors at that peak), allocator slack, unaccounted; the median step time and the eval
perplexity after training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MiB = 2**20
SEQ, BATCH, LR, EVAL_BLOCKS = 256, 4, 5e-4, 24
STOCK = {"stock_adamw": "baseline", "stock_lora_gc": "lora_gc", "peer_adalomo": None}
MEMKIT = {"memkit_default": "default", "memkit_default_fp32": "default_fp32", "memkit_lora": "lora", "memkit_qlora": "qlora", "memkit_full": "bf16_full",
          "memkit_full_rn": "bf16_full_rn", "memkit_full_norelease": "bf16_full_norelease",
          "memkit_qlora_nocce": "qlora_nocce"}
ROWS = (*STOCK, *MEMKIT)


def _recipe_file(name: str, folder: str) -> str:
    """Bundled recipes by name; the two variants the benchmark needs are written next to the outputs."""
    variants = {
        "lora_gc": "memkit: 1\nadapter: {lora: {r: 16, lora_alpha: 32, lora_dropout: 0.0}}\n"
                   "optimizer: {adamw: {}}\ntraining_args: {gradient_checkpointing: true}\n",
        "default_fp32": "memkit: 1\noptimizer: {adamw_8bit: {}}\nadapter: {lora: {r: 16, lora_alpha: 32, lora_dropout: 0.0}}\n"
                        "loss: {cce: {}}\ntraining_args: {gradient_checkpointing: true}\n",
        "bf16_full_rn": "memkit: 1\nprecision: {bf16: {update: nearest}}\n"
                        "optimizer: {adamw_8bit: {gradient_release: true}}\nloss: {cce: {}}\n"
                        "training_args: {gradient_checkpointing: true}\n",
        # the planner's no-release family: under max_grad_norm (the Trainer's default 1.0) gradient release clips
        # per parameter, so it is not quality-neutral and needs its own row
        # the bundled qlora recipe without its fused loss: what the fused loss saves over a 4-bit base
        "qlora_nocce": "memkit: 1\noptimizer: {adamw_8bit: {}}\n"
                       "adapter: {qlora: {r: 16, lora_alpha: 32, quant_type: nf4, double_quant: true}}\n"
                       "training_args: {gradient_checkpointing: true}\n",
        "bf16_full_norelease": "memkit: 1\nprecision: {bf16: {update: stochastic}}\n"
                               "optimizer: {adamw_8bit: {}}\nloss: {cce: {}}\n"
                               "training_args: {gradient_checkpointing: true}\n",
    }
    if name not in variants:
        return name
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(variants[name])
    return path


def predicted_peak(recipe: str, model: str, runtime: int, allocator: str) -> int | None:
    """The estimate's predicted process peak for ``recipe`` with this row's measured runtime and allocator."""
    from hf_memkit.memory.estimate import estimate_memory

    est = estimate_memory(model, recipe, batch_size=BATCH, seq_len=SEQ)
    return est.predict_peak(runtime_bytes=runtime, allocator=allocator).get("peak_bytes")


def stock_row(row: str, model_name: str, steps: int, out: str) -> dict:
    """One stock-Trainer row in this process (the parent started it with the stock allocator)."""
    import math
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_memkit.data.corpus import block_dataset, split_topics
    from hf_memkit.data.models import load_model_and_tokenizer
    from hf_memkit.memory import process
    from hf_memkit.memory.profiler import MemoryReportCallback

    runtime = process.rss_bytes()
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_name)
    train_texts, eval_texts = split_topics()
    train_ds = block_dataset(train_texts, tok, SEQ, max_blocks=steps * BATCH)
    eval_ds = block_dataset(eval_texts, tok, SEQ, max_blocks=EVAL_BLOCKS)
    kw = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, per_device_eval_batch_size=8,
              learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=10, save_strategy="no",
              report_to=[], seed=0, dataloader_pin_memory=False, disable_tqdm=True)
    if row == "stock_lora_gc":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        kw["gradient_checkpointing"] = True
    if row == "peer_adalomo":
        kw["optim"] = "adalomo"
        torch.Tensor.cuda = lambda self, *a, **k: self  # AdaLomo builds its state with .cuda()
    cb = MemoryReportCallback()
    cb.set_runtime(runtime)
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=default_data_collator, callbacks=[cb])
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    report = cb.report()
    return {"row": row, "perplexity": math.exp(loss) if loss < 50 else float("inf"), "report": report,
            "peak_rss_bytes": process.peak_rss_bytes(),
            "predicted": predicted_peak(_recipe_file(STOCK[row], out), model_name, runtime, process.allocator_kind())
            if STOCK[row] else None}


def memkit_row(row: str, model_name: str, steps: int, out: str) -> dict:
    """``memkit train`` in its own process, as a user runs it; the reports it writes are the row."""
    recipe = _recipe_file(MEMKIT[row], out)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_MEMKIT_ALLOCATOR", "LD_PRELOAD")}
    cmd = [sys.executable, "-m", "hf_memkit.cli", "train", "--model", model_name, "--recipe", recipe,
           "--max-steps", str(steps), "--output-dir", out, "--no-eval-before", "--overwrite-output-dir"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"row": row, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    with open(os.path.join(out, "train_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "memory_report.json")) as f:
        report = json.load(f)
    return {"row": row, "perplexity": summary["perplexity_after"], "report": report["measured"],
            "peak_rss_bytes": summary["peak_rss_bytes"],
            "predicted": (report["estimate"].get("predicted_peak") or {}).get("peak_bytes"),
            "allocator": summary.get("host_memory", {}).get("allocator")}


def _cell(v: "int | float | None", scale: float = MiB, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v / scale, fmt)


def print_table(rows: list[dict], steps: int) -> None:
    head = ("row", "peak RSS", "predicted", "tensors", "runtime", "transients", "slack", "unaccounted",
            "s/step", "eval ppl", "allocator")
    print(f"\nprocess peak, SmolLM2-135M, {BATCH} x {SEQ} tokens, {steps} steps (MiB; one process per row)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | failed: {r['error']} |")
            continue
        b = (r["report"].get("process") or {}).get("breakdown") or {}
        tensors = sum(v for k, v in b.items() if k not in ("runtime", "transients", "slack", "unaccounted"))
        print("| " + " | ".join([
            r["row"], _cell(r["peak_rss_bytes"]), _cell(r.get("predicted")), _cell(tensors if b else None),
            _cell(b.get("runtime")), _cell(b.get("transients")), _cell(b.get("slack")), _cell(b.get("unaccounted")),
            _cell(r["report"].get("median_step_seconds"), 1, ".2f"), _cell(r.get("perplexity"), 1, ".3f"),
            r.get("allocator") or (r["report"].get("process") or {}).get("allocator", {}).get("allocator", "-"),
        ]) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.one:  # a stock row in this (fresh, stock-allocator) process
        print("ROW " + json.dumps(stock_row(ns.one, ns.model, ns.steps, ns.out)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_peak-") as tmp:
        for row in ns.rows:
            out = os.path.join(tmp, row)
            os.makedirs(out)
            print(f"running {row} ...", file=sys.stderr, flush=True)
            if row in STOCK:
                env = {**os.environ, "HF_MEMKIT_ALLOCATOR": "system"}
                env.pop("LD_PRELOAD", None)
                r = subprocess.run([sys.executable, __file__, "--one", row, "--model", ns.model, "--steps",
                                    str(ns.steps), "--out", out], env=env, capture_output=True, text=True)
                line = next((ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")), None)
                rows.append(json.loads(line[4:]) if line else
                            {"row": row, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(memkit_row(row, ns.model, ns.steps, out))
    print_table(rows, ns.steps)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
