"""Run on each rank (torchrun): train a few steps under a zero3_offload recipe and write the rank's peak RSS
above its pre-model baseline next to the analytic host-memory estimate. Used by test_host_rss.py."""

import json
import os
import sys


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main(out, model_kind, budget_gb, steps):
    import importlib

    for mod in ("deepspeed", "deepspeed.runtime.zero.stage3", "deepspeed.runtime.engine"):
        importlib.import_module(mod)  # libraries belong to the baseline, not to the measured growth
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_memkit import MemkitTrainer, estimate_memory
    from hf_memkit.data.corpus import block_dataset, split_topics
    from hf_memkit.data.models import tiny_dir
    from tests.conftest import make_args

    tok = AutoTokenizer.from_pretrained(tiny_dir())
    train, _ = split_topics()
    ds = block_dataset(train, tok, 32, max_blocks=64)
    config = AutoConfig.from_pretrained(tiny_dir())
    if model_kind == "wide":
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1536, 4
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 8, 64
        config.vocab_size = 8192
    if model_kind == "smollm2":
        from hf_memkit.data.models import resolve_config

        config = resolve_config("smollm2")
        config.dtype = torch.float32  # trained in fp32 on CPU, as the estimate assumes
    recipe = {"distributed": {"deepspeed": {"preset": "zero3_offload", "host_memory_gb": budget_gb}}}
    est = estimate_memory(config, recipe, world_size=int(os.environ["WORLD_SIZE"]), batch_size=2, seq_len=32)
    d = est.to_dict()
    args = make_args(out, max_steps=steps, per_device_train_batch_size=2)
    baseline = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: peak RSS from here on
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    from transformers import TrainerCallback

    marks = {"model": rss("VmRSS") - baseline}

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["engine"] = rss("VmRSS") - baseline
            marks["engine_hwm"] = rss("VmHWM") - baseline

        def on_step_end(self, args, state, *a, **k):
            marks[f"step{state.global_step}"] = rss("VmRSS") - baseline
            marks[f"step{state.global_step}_hwm"] = rss("VmHWM") - baseline

    trainer = MemkitTrainer(model=model, args=args, train_dataset=ds, recipe=recipe, callbacks=[Marks()])
    trainer.train()
    peak = rss("VmHWM")
    rank = int(os.environ["RANK"])
    result = {"rank": rank, "baseline": baseline, "peak": peak, "growth": peak - baseline,
              "host_offload": d["host_offload"],
              "compute": sum(d.get(k, 0) for k in ("activations", "logits", "loss_buffers")),
              "params": sum(p.numel for p in est.params.values()), "marks": marks,
              "zero": trainer.args.hf_deepspeed_config.config["zero_optimization"]}
    with open(os.path.join(out, f"rss_rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    from hf_memkit.run import exit_rank

    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    exit_rank(0)  # launched by torchrun directly, not through `memkit run`: the same teardown abort applies
