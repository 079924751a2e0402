"""Memory estimate of the LoRC adapter: codes (1 byte each) + scales replace each targeted weight, the factors
train, and each branch keeps its input and the rank-r intermediate for the backward."""

from __future__ import annotations

from typing import Any


def estimate_lorc(mem: Any, cfg: Any) -> None:
    from ...integrations.anatomy import peft_matches
    from ...compress.grid import QuantSpec

    mem.freeze_all()
    d = mem.dtype_bytes
    tokens = mem.batch_size * mem.seq_len
    spec = QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric)
    branch = 0
    skip = ["lm_head"] if cfg.target_modules == "all-linear" else []
    for p in mem.params_of_linears(skip=skip):
        module = p.name.removesuffix(".weight")
        if cfg.target_modules != "all-linear" and not peft_matches(cfg.target_modules, module):
            continue
        out, fan_in = p.shape
        groups = spec.for_width(fan_in).num_groups(fan_in)
        mem.set_storage(p.name, out * fan_in + out * groups * (d + 1), note=f"lorc w{cfg.bits} codes (uint8)")
        r = min(cfg.rank, out, fan_in)
        mem.add_param(module + ".lorc_A.weight", (r, fan_in), trainable=True, category="adapter_weights")
        mem.add_param(module + ".lorc_B.weight", (out, r), trainable=True, category="adapter_weights")
        if cfg.lora_dropout > 0:
            branch += 2 * d * fan_in
        else:
            mem.needs_input.add(module)
        branch += d * r
    if not mem.gradient_checkpointing:
        mem.add("activations", branch * tokens, "lorc", "branch inputs and rank-r intermediates")
