"""2:4 sparsity and structured pruning on SmolLM2-135M: eval perplexity, ours against the one-shot baselines.

Rows: dense; one-shot magnitude 2:4 and Wanda 2:4 (no training); AST and CAST after the same short training
budget (``--steps`` x ``--batch`` x ``--seq-len`` tokens of the embedded corpus's train split, ending in an exact
2:4 projection; CAST gets its own lr/decay: its forward stays dense, so the decay must drive the pruned weights to
zero within the budget — at AST's lr 1e-4 / decay 1e-4 over 60 steps they barely move and the final projection
costs ppl 433, at 1e-3 / 1e-3 it is 30.3 on SmolLM2); 20% structured pruning after COMP (ours) vs the
L1-magnitude baseline, at the same parameter budget. Perplexity: the eval split of the embedded corpus (24 blocks x 256 tokens, topic-disjoint
from the training and calibration text), computed on the final model in memory. Every 2:4 row is checked to have
exactly 2 nonzeros in every group of 4 of each pruned Linear.

    python benchmarks/bench_sparsity.py                                      # full table (SmolLM2-135M)
    python benchmarks/bench_sparsity.py --model tiny --steps 2 --calib-samples 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

ROWS = ("dense", "magnitude_24", "wanda_24", "ast", "cast", "comp_20", "l1_20")


def _is_24(model) -> bool:
    import torch

    from hf_memkit.prune.masks import nm_counts

    return all(bool((nm_counts(m.weight) <= 2).all()) for n, m in model.named_modules()
               if type(m) is torch.nn.Linear and n != "lm_head")


def _train(path, tok, name, args):
    from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator

    from hf_memkit import MemkitTrainer
    from hf_memkit.data.corpus import block_dataset, split_topics

    train, _ = split_topics()
    data = block_dataset(train, tok, args.seq_len, max_blocks=args.steps * args.batch)
    cfg = {"mask_interval": args.mask_interval, "decay": args.cast_decay if name == "cast" else args.decay}
    lr = args.cast_lr if name == "cast" else args.lr
    with tempfile.TemporaryDirectory(prefix="bench-sparsity-") as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05,
                                  report_to=[], save_strategy="no", logging_steps=max(args.steps // 5, 1),
                                  seed=0, disable_tqdm=True, dataloader_pin_memory=False)
        trainer = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=targs, train_dataset=data,
                                data_collator=default_data_collator, processing_class=tok,
                                recipe={"optimizer": {name: cfg}})
        trainer.train()
    return trainer.model


def run_row(row, path, tok, args):
    from transformers import AutoModelForCausalLM

    from hf_memkit.prune.pipeline import default_config, prune_model_
    from hf_memkit.compress.calibration import from_corpus

    calib = from_corpus(tok, args.calib_samples, args.calib_seq_len)
    if row in ("ast", "cast"):
        return _train(path, tok, row, args), {}
    model = AutoModelForCausalLM.from_pretrained(path)
    if row == "dense":
        return model, {}
    name = {"comp_20": "comp", "l1_20": "l1_structured"}.get(row, row)
    cfg = default_config(name)
    if hasattr(cfg, "ratio"):
        cfg = cfg.model_copy(update={"ratio": args.ratio})
    report = prune_model_(model, name, cfg, calibration=calib if name in ("wanda_24", "comp") else None)
    return model, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=200, help="training steps of the AST and CAST rows")
    p.add_argument("--batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the AST row")
    p.add_argument("--decay", type=float, default=1e-4, help="λ of the AST row")
    p.add_argument("--cast-lr", type=float, default=1e-3, help="learning rate of the CAST row")
    p.add_argument("--cast-decay", type=float, default=1e-3, help="λ of the CAST row")
    p.add_argument("--mask-interval", type=int, default=10, help="mask refresh period (steps)")
    p.add_argument("--ratio", type=float, default=0.2, help="structured pruning ratio")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (Wanda, COMP)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)

    from hf_memkit.data.models import load_model_and_tokenizer, resolve_model_path
    from hf_memkit.quant.evaluate import corpus_perplexity

    path = str(resolve_model_path(args.model))
    _, tok = load_model_and_tokenizer(path)
    rows = []
    for row in [r for r in args.rows.split(",") if r]:
        if row not in ROWS:
            p.error(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
        t0 = time.perf_counter()
        model, report = run_row(row, path, tok, args)
        ppl = corpus_perplexity(model, tok)
        params = sum(x.numel() for x in model.parameters())
        rows.append({"row": row, "perplexity": round(ppl, 3), "params": params,
                     "exact_24": _is_24(model) if row in ("magnitude_24", "wanda_24", "ast", "cast") else None,
                     "layers": model.config.num_hidden_layers, "intermediate": model.config.intermediate_size,
                     "seconds": round(time.perf_counter() - t0, 1)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'row':<14}{'ppl':>10}{'params':>12}{'2:4':>6}{'layers':>8}{'inter':>7}{'s':>8}")
    for r in rows:
        print(f"{r['row']:<14}{r['perplexity']:>10.3f}{r['params']:>12,}{str(r['exact_24'] or '-'):>6}"
              f"{r['layers']:>8}{r['intermediate']:>7}{r['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
