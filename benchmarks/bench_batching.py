"""Token-budget batching against fixed-size batches, on the embedded corpus split by paragraphs (mixed lengths,
cut at ``--max-len``):

    python benchmarks/bench_batching.py [--model tiny|smollm2] [--max-len 256] [--batch-size 8] [--budget N]
                                        [--steps 40] [--warmup 3] [--json]

Rows (one fresh copy of the model each, the same seed; a plain PyTorch loop of AdamW steps, no evaluation):

* ``fixed``: the stock way, random batches of ``--batch-size`` paragraphs padded to the batch's longest
  (``PaddedCollator``); its worst case is ``batch-size x max-len`` slots.
* ``budget-padded``: ``TokenBudgetBatchSampler(mode="padded", max_tokens=--budget)`` + ``PaddedCollator``.
* ``budget-packed``: ``TokenBudgetBatchSampler(mode="packed")`` + ``PackedCollator`` (transformers'
  ``DataCollatorWithFlattening``; no attention across sequences, see tests/data/test_token_batching.py).

``--budget`` defaults to ``batch-size x max-len``: every row has the same worst case.

Columns, over the ``--steps`` measured steps (after ``--warmup`` untimed ones):

* ``padding``: padded slots / all slots computed.
* ``real tok/step``: mean non-padding tokens per step.
* ``tokens/s``: non-padding tokens per second of wall time for forward, backward and optimizer step.
* ``saved MiB median/max`` and ``flatness`` (max/median): the bytes autograd saved for backward in each step's
  forward (``hf_memkit.memory.profiler.SavedTensorMeter``: activations and logits). That is the part of a step's
  peak that depends on the batch (weights, gradients and optimizer state are the same at every step). It is a
  measurement of tensor bytes, not of RSS: on CPU the allocator keeps freed memory, so RSS hides per-step changes.
  The acceptance asks for flatness <= 1.15 with token budgets where fixed-size batches spike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 2**20
ROWS = ("fixed", "budget-padded", "budget-packed")


def batches_of(row: str, lengths: list[int], n: int, batch_size: int, budget: int, seed: int) -> list[list[int]]:
    """The first ``n`` batches (dataset indices) of ``row``."""
    from hf_memkit.data.token_batching import TokenBudgetBatchSampler

    if row == "fixed":
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        out = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    else:
        mode = row.split("-", 1)[1]
        out = list(TokenBudgetBatchSampler(lengths, budget, mode=mode, seed=seed))
    if len(out) < n:
        raise SystemExit(f"the corpus gives only {len(out)} batches for {row}; lower --steps")
    return out[:n]


def run_row(row: str, model_name: str, ds, batch_size: int, budget: int, steps: int, warmup: int,
            seed: int) -> dict:
    import torch

    from hf_memkit.data.models import load_model_and_tokenizer
    from hf_memkit.data.token_batching import BatchStats, make_collator
    from hf_memkit.memory.profiler import SavedTensorMeter

    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(model_name)
    model.train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collate = make_collator("packed" if row == "budget-packed" else "padded", tok.pad_token_id or tok.eos_token_id)
    lengths = ds["length"]
    meter = SavedTensorMeter(model, getattr(model.config, "vocab_size", None))
    stats = BatchStats()
    saved: list[int] = []
    for k, idx in enumerate(batches_of(row, lengths, warmup + steps, batch_size, budget, seed)):
        batch = collate([ds[i] for i in idx])
        t0 = time.perf_counter()
        with meter.measure():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if k >= warmup:
            stats.add_batch(batch)
            stats.seconds += seconds
            saved.append(sum(meter.bytes.values()))
    med = statistics.median(saved)
    return {"row": row, "steps": steps, "padding_fraction": stats.padding_fraction,
            "real_tokens_per_step": stats.real_tokens / steps, "tokens_per_second": stats.tokens_per_second,
            "saved_mib_median": med / MiB, "saved_mib_max": max(saved) / MiB, "flatness": max(saved) / med}


def table(results: list[dict]) -> str:
    head = (f"{'batches':<14} {'padding':>8} {'real tok/step':>14} {'tokens/s':>10} {'saved MiB med':>14} "
            f"{'saved MiB max':>14} {'flatness':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['row']:<14} {100 * r['padding_fraction']:>7.1f}% {r['real_tokens_per_step']:>14.0f} "
                     f"{r['tokens_per_second']:>10.0f} {r['saved_mib_median']:>14.2f} {r['saved_mib_max']:>14.2f} "
                     f"{r['flatness']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--max-len", type=int, default=256, help="paragraphs are cut at this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per fixed-size batch")
    p.add_argument("--budget", type=int, default=None, help="token budget (default: batch-size x max-len)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    budget = a.budget or a.batch_size * a.max_len

    from hf_memkit.data.corpus import paragraph_dataset, split_topics
    from hf_memkit.data.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(a.model)
    train, _ = split_topics()
    ds = paragraph_dataset(train, tok, a.max_len)
    lengths = ds["length"]
    results = [run_row(r, a.model, ds, a.batch_size, budget, a.steps, a.warmup, a.seed) for r in a.rows]
    if a.json:
        print(json.dumps({"model": a.model, "max_len": a.max_len, "batch_size": a.batch_size, "budget": budget,
                          "paragraphs": len(lengths), "results": results}, indent=2))
        return 0
    print(f"model {a.model}; {len(lengths)} paragraphs of {min(lengths)}..{max(lengths)} tokens (median "
          f"{statistics.median(lengths):.0f}, cut at {a.max_len}); fixed batches of {a.batch_size}, token budget "
          f"{budget}; {a.steps} measured steps after {a.warmup} warm-up steps")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
