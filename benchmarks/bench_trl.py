"""TRL's SFTTrainer with the default hf_memkit recipe vs TRL's own LoRA vs a stock full fine-tune, one process per row.

    python benchmarks/bench_trl.py [--model tiny|smollm2] [--configs memkit_default trl_peft full] [--steps 10]
                                   [--warmup 2] [--batch-size 4] [--seq-len 128]

Rows:

* ``memkit_default``: the bundled ``default`` recipe (LoRA r16 α32 on every Linear + 8-bit AdamW + Cut
  Cross-Entropy + gradient checkpointing), applied the way ``memkit run`` applies it (the launcher's
  ``recipe_installed``: the adapter exists before SFTTrainer's ``__init__``).
* ``trl_peft``: TRL's own ``peft_config`` with the same LoRA (r, α, dropout 0, every Linear) and gradient
  checkpointing, TRL's default optimizer (AdamW) and its own fused LM head.
* ``full``: a stock SFTTrainer full fine-tune (AdamW, SFTConfig's defaults otherwise).

Step time is the median of ``--steps`` optimizer steps after ``--warmup`` steps (wall clock between the Trainer's
step callbacks). "fwd/step" counts the backbone's forward passes per optimizer step (a forward pre-hook on the
base model; gradient checkpointing re-runs layers, not the backbone), which must be 1: TRL 1.16 recomputes the
logits with a second forward whenever its compute_loss is asked for outputs. Time nothing while other work runs
on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = ("memkit_default", "trl_peft", "full")


def _dataset(n: int, chars: int):
    from datasets import Dataset

    from hf_memkit.data.corpus import split_topics

    train, _ = split_topics()
    texts = [t[:chars] for t in train]
    return Dataset.from_dict({"text": (texts * (n // max(len(texts), 1) + 1))[:n]})


def _backbone(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def one(model_name: str, config: str, steps: int, warmup: int, batch_size: int, seq_len: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_memkit import load_recipe
    from hf_memkit.data.models import load_model_and_tokenizer
    from hf_memkit.integrations.launcher import recipe_installed

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_name)
    total = steps + warmup
    args = dict(output_dir="/tmp/bench_trl", max_steps=total, per_device_train_batch_size=batch_size, report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False,
                max_length=seq_len, bf16=False, learning_rate=2e-4, seed=0)
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    kw = dict(args=None, train_dataset=_dataset(total * batch_size, seq_len * 8), processing_class=tok,
              callbacks=[StepClock()])
    if config == "memkit_default":
        recipe = load_recipe("default")
        with recipe_installed(recipe):
            trainer = SFTTrainer(model=model, **{**kw, "args": SFTConfig(**args)})
    elif config == "trl_peft":
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, peft_config=lora, **{**kw, "args": SFTConfig(**args, gradient_checkpointing=True)})
    else:
        trainer = SFTTrainer(model=model, **{**kw, "args": SFTConfig(**args)})
    calls: list[int] = []
    handle = _backbone(trainer.model).register_forward_pre_hook(lambda *a: calls.append(1))
    out = trainer.train()
    handle.remove()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = list(trainer.model.parameters())
    return {"name": config, "steps": out.global_step, "step_s": statistics.median(times[warmup:] or times),
            "fwd_per_step": len(calls) / max(out.global_step, 1),
            "gc": bool(trainer.args.gradient_checkpointing),
            "trainable": sum(p.numel() for p in params if p.requires_grad), "params": sum(p.numel() for p in params),
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
            "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
            "entropy": logs[-1].get("entropy") if logs else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (default) or smollm2")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--one", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.one:
        print(json.dumps(one(ns.model, ns.one, ns.steps, ns.warmup, ns.batch_size, ns.seq_len)))
        return 0
    print(f"SFTTrainer on {ns.model}, batch {ns.batch_size} x {ns.seq_len}, median of {ns.steps} steps after "
          f"{ns.warmup} warm-up, one process per row")
    print(f"{'config':<15} {'gc':>3} {'optimizer':>10} {'trainable':>12} {'step s':>8} {'vs full':>8} "
          f"{'fwd/step':>8} {'loss first->last':>18} {'entropy':>8}")
    rows, failed = [], 0
    for name in ns.configs:
        cmd = [sys.executable, __file__, "--one", name, "--model", ns.model, "--steps", str(ns.steps),
               "--warmup", str(ns.warmup), "--batch-size", str(ns.batch_size), "--seq-len", str(ns.seq_len)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            failed += 1
            print(f"{name:<15} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full = next((r["step_s"] for r in rows if r["name"] == "full"), None)
    for r in rows:
        rel = f"{r['step_s'] / full:.2f}x" if full else "-"
        loss = f"{r['first_loss']:.3f}->{r['last_loss']:.3f}" if r["first_loss"] is not None else "-"
        ent = f"{r['entropy']:.3f}" if r["entropy"] is not None else "-"
        print(f"{r['name']:<15} {'yes' if r['gc'] else 'no':>3} {r['optimizer']:>10} {r['trainable']:>12,} "
              f"{r['step_s']:>8.3f} {rel:>8} {r['fwd_per_step']:>8.2f} {loss:>18} {ent:>8}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
