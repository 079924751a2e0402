"""Host RAM of DeepSpeed ZeRO-3 CPU/NVMe offload, per rank, and the sizing of DeepSpeed's buffers to a budget.

What a ZeRO-3 offload rank keeps in host RAM (P parameters, W ranks, part = P/W, d bytes per compute element;
read from ``deepspeed/runtime/zero/stage3.py`` and checked against the ranks' peak RSS in
``tests/distributed/test_host_rss.py``):

* ``host_params``      ``offload_param: cpu``: the per-parameter partitions and the flat CPU buffer DeepSpeed
                       copies them into, 2·d·part
* ``host_master``      ``offload_optimizer``: the fp32 master partition, 4·part — a separate clone even when
                       the model is fp32
* ``host_grads``       ``offload_optimizer``: the fp32 gradient partition buffer, 4·part
* ``host_optimizer``   AdamW's two fp32 moments, 8·part (``offload_optimizer: cpu``; on NVMe only swap buffers)
* ``host_swap``        NVMe only: parameter swap buffers (``buffer_count × buffer_size``), optimizer swap
                       buffers (``buffer_count × sub_group``) and the aio queue (``block_size × queue_depth``)
* ``host_runtime``     DeepSpeed's engine runtime per rank (communication buffers, bookkeeping, the step's
                       temporaries): a constant, :data:`ENGINE_RUNTIME`, measured on the CPU stack
* on a machine without CUDA the "device" is host RAM too, so these also land there:
  ``host_gathered`` (parameters gathered for compute: ``stage3_max_live_parameters`` + prefetch bucket, at
  most the whole model, d bytes each) and ``host_reduce`` (the contiguous gradient bucket plus the gradients
  waiting to fill it, 2 × ``reduce_bucket_size`` fp32, at most 2 × the model)

Pinned (page-locked) buffers come from PyTorch's caching host allocator, which rounds every block up to a
power of two (MemAscend's fragmentation point): with ``pin_memory`` and a CUDA device the pinned terms are
counted at their rounded size. On a CPU-only machine nothing is pinned (DeepSpeed's CPU accelerator ignores
``pin_memory``). A second fragmentation source the measurement exposed: glibc's *dynamic* mmap threshold keeps
freed large blocks (the unpartitioned model, per-step gradients) in the heap, so peak RSS grew to 778 MiB where
the live peak is 552 MiB (wide test model, 2 ranks); ``MALLOC_MMAP_THRESHOLD_=65536`` in the ranks'
environment fixes the threshold and RSS then follows the live bytes this module counts.

:func:`size_to_budget` replaces DeepSpeed's defaults by sizes derived from ``host_memory_gb``; the defaults it
replaces are :data:`DEEPSPEED_DEFAULTS`.

Measured (2 CPU ranks, zero3_offload, fp32, batch 2 × 32 tokens, peak RSS growth per rank vs estimate incl. the
compute terms): tiny 27.8 vs 28.2 MiB; 22M-parameter wide model 551.9 vs 545.5 MiB; SmolLM2-135M with
``host_memory_gb: 4`` 2754 vs 2701 MiB (−1.9%), its buffers sized to reduce_bucket_size 66.4M (default 5e8),
stage3_max_live_parameters and stage3_max_reuse_distance 134.5M (1e9), sub_group_size 67.3M (1e9).
"""

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

#: DeepSpeed's engine runtime per rank beyond the sized terms: a measured constant (CPU ranks, DeepSpeed 0.19,
#: torch 2.13): the tiny model's ranks grow by 27.8 MiB of which its sized terms are 4 MiB; the wide test model's
#: leave 15-30 MiB beside them. It is the one calibrated number here; everything else follows from the config
ENGINE_RUNTIME = 24 * 2**20

#: budget shares of the transient buffers (what is left after the partitions); the reduce bucket counts twice
#: (the bucket and the gradients that fill it)
_SHARES = {"reduce_bucket_size": 0.2, "stage3_prefetch_bucket_size": 0.2, "stage3_max_live_parameters": 0.4,
           "sub_group_size": 0.2}
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

    def pin(n: int, flag: Any) -> int:
        return _pow2(n) if cuda and flag else int(n)

    out: dict[str, int] = {}
    if p_dev == "cpu":
        out["host_params"] = part * dtype_bytes + pin(part * dtype_bytes, op.get("pin_memory"))
    if o_dev in ("cpu", "nvme"):
        out["host_master"] = pin(part * 4, oo.get("pin_memory")) if o_dev == "cpu" else 0
        out["host_grads"] = pin(part * 4, oo.get("pin_memory"))
        if o_dev == "cpu":
            out["host_optimizer"] = part * 8
    hidden_sq = hidden_size * hidden_size
    reduce = _num(zero.get("reduce_bucket_size"), hidden_sq or DEEPSPEED_DEFAULTS["reduce_bucket_size"])
    prefetch = _num(zero.get("stage3_prefetch_bucket_size"), 0.9 * hidden_sq or 5e7)
    live = _num(zero.get("stage3_max_live_parameters"), 1e9)
    sub = _num(zero.get("sub_group_size"), 1e9)
    if not cuda:  # the compute device is the host
        out["host_gathered"] = int(max(min(live + prefetch, num_params), largest_param) * dtype_bytes)
        out["host_reduce"] = int(2 * min(reduce, num_params) * 4)
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
    out["host_runtime"] = ENGINE_RUNTIME
    return {k: v for k, v in out.items() if v}


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
    for k in ("host_gathered", "host_reduce", "host_swap"):
        fixed.pop(k, None)
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
        per_elem = {"sub_group_size": 4, "reduce_bucket_size": 8}.get(key, dtype_bytes)
        n = int(left * share / per_elem)
        cap = -(-num_params // max(world_size, 1)) if key == "sub_group_size" else num_params
        zero[key] = int(max(MIN_BUCKET, min(n, DEEPSPEED_DEFAULTS[key], cap)))  # never beyond the model
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
