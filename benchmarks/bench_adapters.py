"""MixLoRA and LoRC adapters, side by side.

1. LoRC quality: eval perplexity (embedded corpus) of the full-precision model, the int4 RTN base without
   compensation, and LoRC rank 8 / 16, before and after a short fine-tune of the factors only.
2. MixLoRA speed: forward+backward time of one MoE-LoRA FFN (shared frozen projections, experts add deltas on
   their own tokens) against the naive reference that runs E full LoRA FFNs (hf_memkit.adapters.mixlora.reference).

    python benchmarks/bench_adapters.py --model smollm2 --steps 40
    python benchmarks/bench_adapters.py --model tiny --steps 2        # smoke test
"""

from __future__ import annotations

import argparse
import copy
import time


def lorc_rows(model_name: str, steps: int, ranks: list[int], group_size: int) -> list[tuple[str, float, float]]:
    import torch
    from peft import get_peft_model

    import hf_memkit
    from hf_memkit.data.corpus import block_dataset, split_topics
    from hf_memkit.data.models import load_model_and_tokenizer
    from hf_memkit.quant.evaluate import corpus_perplexity

    base, tok = load_model_and_tokenizer(model_name)
    base.eval()
    rows = [("full precision", corpus_perplexity(base, tok), float("nan"))]
    train, _ = split_topics()
    data = block_dataset(train, tok, 128, max_blocks=max(8, steps * 4))
    for rank in [0, *ranks]:
        pm = get_peft_model(copy.deepcopy(base), hf_memkit.LorcConfig(task_type="CAUSAL_LM", r=max(rank, 1), bits=4,
                                                                       group_size=group_size))
        if rank == 0:  # the plain int4 base: switch the branch off
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if ".lorc_B." in n:
                        p.zero_()
        pm.eval()
        before = corpus_perplexity(pm, tok)
        after = float("nan")
        if rank:
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
            pm.train()
            for s in range(steps):
                ids = torch.tensor([data[(s * 4 + i) % len(data)]["input_ids"] for i in range(4)])
                loss = pm(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            pm.eval()
            after = corpus_perplexity(pm, tok)
        rows.append((f"int4 g{group_size} RTN" + (f" + LoRC r{rank}" if rank else ""), before, after))
    return rows


def mixlora_timing(hidden: int, inter: int, tokens: int, experts: list[int], top_k: int, r: int, reps: int):
    import torch

    from hf_memkit.adapters.mixlora.ffn import FFN_KINDS, mixture_forward
    from hf_memkit.adapters.mixlora.reference import reference_forward

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
            self.act_fn = torch.nn.SiLU()

    ffn = MLP().requires_grad_(False)
    kind = FFN_KINDS[0]
    rows = []
    for E in experts:
        facs = {p: (torch.randn(E, r, i, requires_grad=True), torch.randn(E, o, r, requires_grad=True))
                for p, (i, o) in (("gate_proj", (hidden, inter)), ("up_proj", (hidden, inter)),
                                  ("down_proj", (inter, hidden)))}
        x = torch.randn(tokens, hidden, requires_grad=True)
        logits = torch.randn(tokens, E)

        def timed(fn):
            fn().square().mean().backward()  # warm-up: the first run pays for allocator growth and thread pools
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn().square().mean().backward()
                best = min(best, time.perf_counter() - t0)
            return best

        mix = timed(lambda: mixture_forward(ffn, kind, x, logits, top_k, facs, 2.0, torch.nn.Identity()))
        ref = timed(lambda: reference_forward(ffn, kind, x, logits, top_k, facs, 2.0))
        rows.append((E, mix * 1e3, ref * 1e3))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"LoRC adapter on {args.model} (eval perplexity, embedded corpus; fine-tune {args.steps} steps)")
    print(f"  {'model':<34}{'before':>10}{'after':>10}")
    for name, before, after in lorc_rows(args.model, args.steps, args.ranks, args.group_size):
        print(f"  {name:<34}{before:>10.3f}{after:>10.3f}")
    hidden, inter = (64, 128) if args.model == "tiny" else (576, 1536)
    print(f"\nMixLoRA FFN fwd+bwd, {args.tokens} tokens, d={hidden}, ffn={inter}, top-2, r=8 (ms, best of {args.reps})")
    print(f"  {'experts':>8}{'mixlora':>10}{'E LoRA FFNs':>13}{'speed-up':>10}")
    for E, mix, ref in mixlora_timing(hidden, inter, args.tokens, args.experts, 2, 8, args.reps):
        print(f"  {E:>8}{mix:>10.2f}{ref:>13.2f}{ref / mix:>9.2f}x")


if __name__ == "__main__":
    main()
