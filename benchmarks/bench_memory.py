"""Estimator accuracy: analytic estimate vs measured tensor accounting, per category, one process per cell.

    python benchmarks/bench_memory.py [--models tiny smollm2] [--recipes baseline adamw_gc ...]
                                      [--batch-size 2] [--seq-len 128]

Each (model, recipe) cell runs one training step in its own subprocess with MemoryReportCallback and prints
estimate / measured / error for every category, plus the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CATS = ("weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")
RECIPES = ["baseline", "adamw_gc", "adamw_8bit", "full_8bit", "lora", "qlora", "default"]


def one(model: str, recipe: str, batch_size: int, seq_len: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import TrainingArguments, default_data_collator

    from hf_memkit import MemkitTrainer, estimate_memory
    from hf_memkit.data.corpus import block_dataset, split_topics
    from hf_memkit.data.models import load_model_and_tokenizer
    from hf_memkit.memory.profiler import MemoryReportCallback

    m, tok = load_model_and_tokenizer(model)
    ds = block_dataset(split_topics()[0], tok, seq_len, max_blocks=2 * batch_size)
    cb = MemoryReportCallback()
    args = TrainingArguments(output_dir="/tmp/bench_memory", max_steps=1, per_device_train_batch_size=batch_size,
                             report_to=[], save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False)
    est = estimate_memory(m.config, recipe, batch_size=batch_size, seq_len=seq_len).to_dict()
    trainer = MemkitTrainer(model=m, args=args, train_dataset=ds, data_collator=default_data_collator,
                            callbacks=[cb], recipe=recipe)
    trainer.train()
    meas = cb.report()
    meas.pop("timeline")
    return {"model": model, "recipe": recipe, "estimate": {k: est.get(k, 0) for k in CATS},
            "measured": {k: meas.get(k, 0) for k in CATS}, "peak_rss_bytes": meas["peak_rss_bytes"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--one", nargs=2, metavar=("MODEL", "RECIPE"), help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.one:
        print(json.dumps(one(*ns.one, ns.batch_size, ns.seq_len)))
        return 0
    mib = 2**20
    print(f"estimate vs measured (MiB), batch {ns.batch_size} x {ns.seq_len} tokens, fp32, one step, "
          "one process per row")
    head = f"{'model':<8} {'recipe':<11} " + " ".join(f"{c[:14]:>22}" for c in CATS) + f" {'total err':>9} {'RSS':>6}"
    print(head)
    worst = 0.0
    for model in ns.models:
        for recipe in ns.recipes:
            out = subprocess.run([sys.executable, __file__, "--one", model, recipe, "--batch-size",
                                  str(ns.batch_size), "--seq-len", str(ns.seq_len)], capture_output=True, text=True)
            if out.returncode:
                print(f"{model:<8} {recipe:<11} FAILED: {out.stderr[-500:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cells = []
            for c in CATS:
                e, m = r["estimate"][c], r["measured"][c]
                err = (e - m) / m * 100 if m else 0.0
                if m:
                    worst = max(worst, abs(err))
                cells.append(f"{e / mib:8.2f}/{m / mib:8.2f} {err:+4.1f}%" if m or e else f"{'-':>22}")
            te, tm = sum(r["estimate"].values()), sum(r["measured"].values())
            print(f"{model:<8} {recipe:<11} " + " ".join(f"{c:>22}" for c in cells)
                  + f" {(te - tm) / tm * 100:+8.1f}% {r['peak_rss_bytes'] / mib:6.0f}")
    print(f"largest per-category error: {worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
