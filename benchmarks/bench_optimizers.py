"""Memory-lean optimizers side by side: optimizer-state bytes (measured) and eval loss after a fixed budget.

    python benchmarks/bench_optimizers.py [--scratch-steps 200] [--lrs 1e-3 3e-3 1e-2 3e-2] [--rank 32]
                                          [--finetune-steps 10] [--skip-finetune] [--threads 1] [--json out.json]
    python benchmarks/bench_optimizers.py --merge a.json b.json     # tables of runs split across processes

Three tables:

1. state bytes on the matrices each optimizer manages in one SmolLM2-135M decoder layer (576 hidden, 1536 FFN,
   192-wide k/v), rank 64, measured after one step and divided by AdamW's; whole-model figures beside them
   (``estimate_memory('smollm2', recipe)``, exact per the tests: embeddings/head/norms stay on AdamW);
2. a tiny Llama trained from scratch on the embedded corpus (512-token vocabulary, so the hidden matrices
   dominate), each optimizer at the best learning rate of ``--lrs`` (same steps, cosine schedule, clip 1.0);
3. SmolLM2-135M-Instruct briefly fine-tuned on the same corpus, one learning rate per optimizer.

Peers: torch AdamW, bitsandbytes 8-bit AdamW, GaLore (transformers' ``optim="galore_adamw"``, needs the
``galore-torch`` package; skipped when absent) and LoRA at the same rank. The state bytes of GaLore include
its projection matrices, which live inside projector objects in the optimizer state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMOLLM2_LAYER = {
    "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
    "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
}


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from an optimizer state (dicts, lists and plain objects such as
    GaLore's projector), each storage counted once."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), str(obj.device))
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def optimizer_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set = set()
    return sum(tensor_bytes(s, seen) for s in inner.state.values())


# --- table 1: state bytes -------------------------------------------------------------------------------------
def state_table(rank: int = 64) -> list[dict]:
    import torch
    from torch import nn

    from hf_memkit.memory.estimate import estimate_memory
    from hf_memkit.optim import SST, Cosmos, Fira
    from hf_memkit.optim.sst.layer import factorize_linears_

    def layer():
        torch.manual_seed(0)
        return nn.ModuleDict({k: nn.Linear(i, o, bias=False) for k, (o, i) in SMOLLM2_LAYER.items()})

    def step(module, opt):
        loss = sum((m(torch.randn(8, m.in_features)) ** 2).mean() for m in module.values())
        loss.backward()
        opt.step()
        return optimizer_bytes(opt)

    builders = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters()),
        "cosmos": lambda m: Cosmos([{"params": list(m.parameters()), "cosmos": True}], rank=rank),
        "fira": lambda m: Fira([{"params": list(m.parameters()), "fira": True}], rank=rank),
        "sst": lambda m: (factorize_linears_(m, "all-linear", rank), SST(m))[1],
    }
    try:
        import galore_torch

        builders["galore"] = lambda m: galore_torch.GaLoreAdamW(
            [{"params": list(m.parameters()), "rank": rank, "update_proj_gap": 200, "scale": 0.25,
              "proj_type": "std"}])
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        builders["adamw_8bit"] = lambda m: bnb.optim.AdamW8bit(m.parameters(), min_8bit_size=4096)
    except ImportError:
        pass
    recipes = {"adamw": {"adamw": {}}, "adamw_8bit": {"adamw_8bit": {}}, "cosmos": {"cosmos": {"rank": rank}},
               "fira": {"fira": {"rank": rank}}, "sst": {"sst": {"rank": rank}}}
    rows = []
    for name, build in builders.items():
        module = layer()
        opt = build(module)
        nbytes = step(module, opt)
        if name == "adamw":
            nbytes -= 4 * len(SMOLLM2_LAYER)  # torch's per-tensor step counters
        whole = None
        if name in recipes:
            whole = estimate_memory("smollm2", {"optimizer": recipes[name]}).categories()["optimizer_states"]
        rows.append({"optimizer": name, "layer_state_bytes": nbytes, "whole_model_state_bytes": whole})
    base = next(r for r in rows if r["optimizer"] == "adamw")
    for r in rows:
        r["layer_ratio"] = r["layer_state_bytes"] / base["layer_state_bytes"]
        if r["whole_model_state_bytes"] is not None:
            r["whole_ratio"] = r["whole_model_state_bytes"] / base["whole_model_state_bytes"]
    return rows


# --- tables 2 and 3: training -----------------------------------------------------------------------------------
class StateBytes:
    """A TrainerCallback measuring the optimizer state after every step (the maximum is kept)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def __init__(self):
                self.bytes = 0

            def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
                if optimizer is not None:
                    self.bytes = max(self.bytes, optimizer_bytes(optimizer))

        return _CB()


def method_setup(method: str, rank: int, proj_gap: int) -> tuple[dict | None, dict]:
    """(recipe or None, extra TrainingArguments) per method."""
    if method == "adamw":
        return {"optimizer": {"adamw": {}}}, {}
    if method == "adamw_8bit":
        return {"optimizer": {"adamw_8bit": {}}}, {}
    if method == "galore":
        return None, {"optim": "galore_adamw", "optim_target_modules": ["self_attn", "mlp"],
                      "optim_args": f"rank={rank}, update_proj_gap={proj_gap}, scale=0.25, proj_type=std"}
    if method == "cosmos":
        return {"optimizer": {"cosmos": {"rank": rank, "lr_ratio": 0.2, "betas": [0.95, 0.95]}}}, {}
    if method == "fira":
        return {"optimizer": {"fira": {"rank": rank, "update_proj_gap": proj_gap, "alpha": 0.25}}}, {}
    if method == "sst":
        return {"optimizer": {"sst": {"rank": rank}}}, {}
    if method == "lora":
        return {"adapter": {"lora": {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
                                     "target_modules": "all-linear"}}}, {}
    raise ValueError(method)


def train_once(model, tok, train_ds, eval_ds, method, lr, steps, batch, rank, proj_gap, sst_interval) -> dict:
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_memkit import MemkitTrainer

    recipe, extra = method_setup(method, rank, proj_gap)
    if method == "sst":
        recipe["optimizer"]["sst"]["interval"] = sst_interval
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_opt_"), max_steps=steps, per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0, max_grad_norm=1.0, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
        disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True, **extra)
    cb = StateBytes()
    kw = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
              data_collator=default_data_collator, callbacks=[cb])
    trainer = MemkitTrainer(recipe=recipe, **kw) if recipe is not None else Trainer(**kw)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    ev = trainer.evaluate()["eval_loss"]
    return {"method": method, "lr": lr, "eval_loss": ev, "train_loss": out.training_loss,
            "state_bytes": cb.bytes, "seconds": round(seconds, 1)}


def scratch_table(methods, lrs, steps, rank, batch=16, seq=64) -> list[dict]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_memkit.data.corpus import block_dataset, split_topics
    from hf_memkit.data.models import tiny_dir

    tok = AutoTokenizer.from_pretrained(tiny_dir())
    train, evals = split_topics()
    train_ds = block_dataset(train, tok, seq, max_blocks=steps * batch)
    eval_ds = block_dataset(evals, tok, seq, max_blocks=256)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    rows = []
    for method in methods:
        best = None
        for lr in lrs:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            try:
                row = train_once(model, tok, train_ds, eval_ds, method, lr, steps, batch, rank,
                                 proj_gap=max(1, steps // 3), sst_interval=max(1, steps // 6))
            except Exception as exc:  # a peer that fails (e.g. galore-torch missing) is reported, not fatal
                print(f"  scratch {method} lr={lr}: FAILED {type(exc).__name__}: {exc}", flush=True)
                break
            print(f"  scratch {method:<10} lr={lr:<8g} eval={row['eval_loss']:.4f} state={row['state_bytes']} "
                  f"({row['seconds']}s)", flush=True)
            if best is None or row["eval_loss"] < best["eval_loss"]:
                best = row
        if best is not None:
            rows.append(best)
    return rows


FINETUNE_LR = {"adamw": 1e-4, "adamw_8bit": 1e-4, "galore": 1e-3, "cosmos": 5e-4, "fira": 1e-3, "sst": 1e-3,
               "lora": 1e-3}


def finetune_table(methods, steps, rank, batch=2, seq=64) -> list[dict]:
    import torch

    from hf_memkit.data.corpus import block_dataset, split_topics
    from hf_memkit.data.models import load_model_and_tokenizer

    train, evals = split_topics()
    rows = []
    for method in methods:
        torch.manual_seed(0)
        model, tok = load_model_and_tokenizer("smollm2")
        train_ds = block_dataset(train, tok, seq, max_blocks=steps * batch)
        eval_ds = block_dataset(evals, tok, seq, max_blocks=16)
        try:
            row = train_once(model, tok, train_ds, eval_ds, method, FINETUNE_LR[method], steps, batch, rank,
                             proj_gap=200, sst_interval=max(1, steps // 2))
        except Exception as exc:
            print(f"  finetune {method}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"  finetune {method:<10} eval={row['eval_loss']:.4f} state={row['state_bytes']} "
              f"({row['seconds']}s)", flush=True)
        rows.append(row)
        del model
    return rows


def print_tables(state_rows, scratch_rows, finetune_rows, rank_scratch, rank_ft) -> None:
    mib = 2**20
    print("\n1) optimizer state, SmolLM2-135M shapes, rank 64 (measured; whole model = exact estimate)")
    print(f"  {'optimizer':<12}{'1 layer MiB':>12}{'x AdamW':>9}{'whole MiB':>11}{'x AdamW':>9}")
    for r in state_rows:
        whole = r.get("whole_model_state_bytes")
        ws = f"{whole / mib:>11.1f}{r['whole_ratio']:>9.3f}" if whole is not None else f"{'-':>11}{'-':>9}"
        print(f"  {r['optimizer']:<12}{r['layer_state_bytes'] / mib:>12.2f}{r['layer_ratio']:>9.3f}{ws}")
    for title, rows, rank in (("2) tiny Llama from scratch", scratch_rows, rank_scratch),
                              ("3) SmolLM2-135M fine-tune", finetune_rows, rank_ft)):
        if not rows:
            continue
        base = next((r for r in rows if r["method"] == "adamw"), None)
        print(f"\n{title}, rank {rank} (eval loss after the same steps; state measured)")
        print(f"  {'method':<12}{'lr':>9}{'eval loss':>11}{'vs AdamW':>10}{'state MiB':>11}{'seconds':>9}")
        for r in rows:
            rel = f"{(r['eval_loss'] / base['eval_loss'] - 1) * 100:+.1f}%" if base else "-"
            print(f"  {r['method']:<12}{r['lr']:>9g}{r['eval_loss']:>11.4f}{rel:>10}"
                  f"{r['state_bytes'] / mib:>11.2f}{r['seconds']:>9.1f}")


def merge(paths: list[str], rank: int, finetune_rank: int) -> int:
    runs = [json.load(open(p, encoding="utf-8")) for p in paths]
    state = next((r["state"] for r in runs if r.get("state")), [])
    best: dict[str, dict] = {}
    order: list[str] = []
    for r in runs:
        for row in r.get("scratch", []):
            if row["method"] not in best:
                order.append(row["method"])
            if row["method"] not in best or row["eval_loss"] < best[row["method"]]["eval_loss"]:
                best[row["method"]] = row
    finetune = [row for r in runs for row in r.get("finetune", [])]
    print_tables(state, [best[m] for m in order], finetune, rank, finetune_rank)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+",
                        default=["adamw", "adamw_8bit", "galore", "cosmos", "fira", "sst", "lora"])
    parser.add_argument("--scratch-steps", type=int, default=200)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--rank", type=int, default=32, help="rank of the from-scratch runs (hidden size 128)")
    parser.add_argument("--finetune-steps", type=int, default=10)
    parser.add_argument("--finetune-rank", type=int, default=64)
    parser.add_argument("--skip-scratch", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription on a shared machine)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="print the tables of earlier --json outputs (e.g. one per learning-rate subset run in "
                        "parallel), keeping each method's best learning rate, and exit")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.rank, args.finetune_rank)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    state_rows = state_table()
    scratch_rows = [] if args.skip_scratch else scratch_table(args.methods, args.lrs, args.scratch_steps, args.rank)
    finetune_rows = [] if args.skip_finetune else finetune_table(args.methods, args.finetune_steps,
                                                                  args.finetune_rank)
    print_tables(state_rows, scratch_rows, finetune_rows, args.rank, args.finetune_rank)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"state": state_rows, "scratch": scratch_rows, "finetune": finetune_rows}, f, indent=1)
    return 0 if all(math.isfinite(r["eval_loss"]) for r in scratch_rows + finetune_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
