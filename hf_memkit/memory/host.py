"""Host RAM of DeepSpeed ZeRO CPU/NVMe offload, per rank, and the sizing of DeepSpeed's buffers to a budget.

What a ZeRO-3 offload rank keeps in host RAM (P parameters, W ranks, d bytes per compute-dtype element):

* ``host_params``      the rank's parameter partition in the compute dtype, d·P/W (``offload_param: cpu``)
* ``host_master``      the fp32 master partition, 4·P/W (``offload_optimizer``; absent when d = 4: the
                       partition is already fp32)
* ``host_grads``       the fp32 gradient partition the CPU optimizer reads, 4·P/W
* ``host_optimizer``   AdamW's two fp32 moments, 8·P/W (on NVMe: only the swap buffers below)
* ``host_staging``     transient buffers: the gradient reduce bucket, the prefetch bucket and the live
                       gathered parameters (bounded by the model), and one optimizer sub-group's fp32 scratch
* ``host_swap``        NVMe only: the parameter swap buffers (``buffer_count × buffer_size``) and the
                       optimizer swap buffers (``buffer_count × sub_group``), plus the aio queue
                       (``block_size × queue_depth × thread_count``)

Pinned (page-locked) buffers come from PyTorch's caching host allocator, which rounds every block up to a
power of two (MemAscend's fragmentation point): with ``pin_memory`` and a CUDA device the pinned terms are
counted at their rounded size. On a CPU-only machine nothing is pinned (DeepSpeed's CPU accelerator ignores
``pin_memory``) and nothing is rounded.

:func:`size_to_budget` replaces DeepSpeed's defaults by sizes derived from ``host_memory_gb``; the defaults it
replaces are :data:`DEEPSPEED_DEFAULTS`.
"""

from __future__ import annotations

import copy
from typing import Any

GiB = 2**30

#: the DeepSpeed defaults (elements, or counts) :func:`size_to_budget` replaces
DEEPSPEED_DEFAULTS: dict[str, float] = {
    "reduce_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "sub_group_size": 1e9,
    "offload_param.buffer_count": 5,
    "offload_param.buffer_size": 1e8,
    "offload_param.max_in_cpu": 1e9,
    "offload_optimizer.buffer_count": 4,
    "aio.block_size": 1048576,
    "aio.queue_depth": 8,
}

#: budget shares of the transient buffers (what is left after the partitions)
_SHARES = {"reduce_bucket_size": 0.25, "stage3_prefetch_bucket_size": 0.25, "stage3_max_live_parameters": 0.25,
           "sub_group_size": 0.25}
#: never size a bucket below this many elements (DeepSpeed slows to a crawl with tiny buckets)
MIN_BUCKET = 100_000


def _num(v: Any, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float(default)


def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def host_terms(ds_config: dict, num_params: int, world_size: int = 1, dtype_bytes: int = 4,
               hidden_size: int = 0, largest_param: int = 0, cuda: bool = False) -> dict[str, int]:
    """Host bytes per rank of ZeRO offload under ``ds_config`` (categories of the module docstring)."""
    zero = ds_config.get("zero_optimization") or {}
    op = zero.get("offload_param") or {}
    oo = zero.get("offload_optimizer") or {}
    p_dev, o_dev = op.get("device", "none"), oo.get("device", "none")
    if p_dev in (None, "none") and o_dev in (None, "none"):
        return {}
    part = -(-num_params // max(world_size, 1))
    pinned = cuda

    def pin(n: int, flag: Any) -> int:
        return _pow2(n) if pinned and flag else int(n)

    out: dict[str, int] = {}
    if p_dev == "cpu":
        out["host_params"] = pin(part * dtype_bytes, op.get("pin_memory"))
    if o_dev in ("cpu", "nvme"):
        if dtype_bytes < 4:
            out["host_master"] = pin(part * 4, oo.get("pin_memory"))
        out["host_grads"] = pin(part * 4, oo.get("pin_memory"))
        if o_dev == "cpu":
            out["host_optimizer"] = part * 8
    hidden_sq = hidden_size * hidden_size
    reduce = _num(zero.get("reduce_bucket_size"), hidden_sq or DEEPSPEED_DEFAULTS["reduce_bucket_size"])
    prefetch = _num(zero.get("stage3_prefetch_bucket_size"), 0.9 * hidden_sq or 5e7)
    live = _num(zero.get("stage3_max_live_parameters"), 1e9)
    sub = _num(zero.get("sub_group_size"), 1e9)
    staging = min(reduce, num_params) * dtype_bytes
    # gathered parameters: the live limit, but never more than the whole model nor less than one parameter
    staging += max(min(live + prefetch, num_params), largest_param) * dtype_bytes
    staging += min(sub, part) * 4  # one sub-group's fp32 scratch in the CPU optimizer step
    out["host_staging"] = int(staging)
    swap = 0
    if p_dev == "nvme":
        swap += int(_num(op.get("buffer_count"), 5) * min(_num(op.get("buffer_size"), 1e8), num_params)
                    * dtype_bytes)
    if o_dev == "nvme":
        swap += int(_num(oo.get("buffer_count"), 4) * min(sub, part) * 4)
    if swap:
        aio = ds_config.get("aio") or {}
        swap += int(_num(aio.get("block_size"), 1048576) * _num(aio.get("queue_depth"), 8)
                    * _num(aio.get("thread_count"), 1))
        out["host_swap"] = swap
    return out


def size_to_budget(ds_config: dict, budget_bytes: int, num_params: int, world_size: int = 1,
                   dtype_bytes: int = 4, hidden_size: int = 0) -> dict:
    """A copy of ``ds_config`` whose buckets, live-parameter limit, sub-group and swap buffers fit in
    ``budget_bytes`` of host RAM per rank (what the partitions leave, split by :data:`_SHARES`).

    Raises ``ValueError`` (turned into a RecipeError by the caller) when the partitions alone do not fit."""
    cfg = copy.deepcopy(ds_config)
    zero = cfg.setdefault("zero_optimization", {})
    fixed_cfg = copy.deepcopy(cfg)
    fz = fixed_cfg["zero_optimization"]
    for k in _SHARES:
        fz[k] = 0
    fixed = host_terms(fixed_cfg, num_params, world_size, dtype_bytes, hidden_size)
    fixed.pop("host_staging", None)
    fixed.pop("host_swap", None)
    need = sum(fixed.values())
    floor = need + 4 * MIN_BUCKET * 4
    if budget_bytes < floor:
        raise ValueError(
            f"host_memory_gb={budget_bytes / GiB:.3g} is below what the offloaded partitions alone need per rank "
            f"({floor / GiB:.3g} GiB for {num_params:,} parameters over {world_size} rank(s))")
    left = budget_bytes - need
    nvme_p = (zero.get("offload_param") or {}).get("device") == "nvme"
    nvme_o = (zero.get("offload_optimizer") or {}).get("device") == "nvme"
    if nvme_p or nvme_o:
        left //= 2  # half of the slack to the swap buffers
    for key, share in _SHARES.items():
        per_elem = 4 if key == "sub_group_size" else dtype_bytes
        n = int(left * share / per_elem)
        zero[key] = int(max(MIN_BUCKET, min(n, DEEPSPEED_DEFAULTS[key])))
    zero["stage3_max_reuse_distance"] = zero["stage3_max_live_parameters"]
    if nvme_p:
        op = zero["offload_param"]
        count = int(_num(op.get("buffer_count"), 5))
        op["buffer_size"] = int(max(MIN_BUCKET, min(left * 0.5 / count / dtype_bytes, 1e8)))
        op["max_in_cpu"] = int(max(MIN_BUCKET, min(left * 0.25 / dtype_bytes, 1e9)))
    if nvme_o:
        oo = zero["offload_optimizer"]
        count = int(_num(oo.get("buffer_count"), 4))
        zero["sub_group_size"] = int(max(MIN_BUCKET, min(left * 0.5 / count / 4, zero["sub_group_size"])))
    return cfg
