"""Host RAM of ZeRO CPU/NVMe offload: the per-rank terms, and DeepSpeed's buffers sized to a budget."""

from __future__ import annotations

import pytest

from hf_memkit import estimate_memory, load_recipe
from hf_memkit.errors import RecipeError
from hf_memkit.memory.host import DEEPSPEED_DEFAULTS, ENGINE_RUNTIME, GiB, host_terms, size_to_budget

P = 10_000_000


def _offload(device="cpu", pin=True, **zero):
    return {"zero_optimization": {"stage": 3, "offload_param": {"device": device, "pin_memory": pin},
                                  "offload_optimizer": {"device": device, "pin_memory": pin}, **zero}}


def test_cpu_offload_terms_per_rank():
    t = host_terms(_offload(reduce_bucket_size=1000, stage3_prefetch_bucket_size=1000,
                            stage3_max_live_parameters=1000, sub_group_size=1000), P, world_size=2, dtype_bytes=2)
    part = P // 2
    assert t["host_params"] == 2 * 2 * part  # bf16 partitions + the flat CPU buffer they are copied into
    assert t["host_master"] == 4 * part and t["host_grads"] == 4 * part and t["host_optimizer"] == 8 * part
    assert t["host_gathered"] == 2000 * 2 and t["host_reduce"] == 2 * 1000 * 4  # CPU: the device is the host
    assert t["host_runtime"] == ENGINE_RUNTIME
    assert "host_swap" not in t
    on_gpu = host_terms(_offload(), P, world_size=2, dtype_bytes=2, cuda=True)
    assert "host_gathered" not in on_gpu and "host_reduce" not in on_gpu
    assert host_terms({"zero_optimization": {"stage": 2}}, P) == {}  # no offload, no host terms


def test_pinned_buffers_round_up_to_powers_of_two_on_cuda():
    cuda = host_terms(_offload(), 3_000_000, world_size=1, dtype_bytes=4, cuda=True)
    cpu = host_terms(_offload(), 3_000_000, world_size=1, dtype_bytes=4, cuda=False)
    assert cuda["host_params"] == 12_000_000 + 16 * 2**20 and cpu["host_params"] == 2 * 12_000_000
    assert cuda["host_optimizer"] == cpu["host_optimizer"]  # moments are not pinned


def test_nvme_keeps_only_swap_buffers_on_the_host():
    cfg = _offload("nvme")
    cfg["aio"] = {"block_size": 1048576, "queue_depth": 8, "thread_count": 1}
    t = host_terms(cfg, P, world_size=2)
    assert "host_optimizer" not in t and "host_params" not in t and t["host_swap"] > 8 * 2**20


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_buffers_sized_to_the_budget_fit_it_and_replace_the_defaults(device):
    budget = 4 * GiB
    sized = size_to_budget(_offload(device), budget, 300_000_000, world_size=2, dtype_bytes=2, hidden_size=1024)
    zero = sized["zero_optimization"]
    assert sum(host_terms(sized, 300_000_000, 2, 2, 1024).values()) <= budget
    changed = [k for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                           "sub_group_size") if zero[k] != DEEPSPEED_DEFAULTS[k]]
    assert changed, zero
    big = size_to_budget(_offload(device), 64 * GiB, 300_000_000, world_size=2, dtype_bytes=2, hidden_size=1024)
    assert big["zero_optimization"]["reduce_bucket_size"] >= zero["reduce_bucket_size"]


def test_a_budget_below_the_partitions_is_refused():
    with pytest.raises(ValueError, match="below what the offloaded partitions alone need"):
        size_to_budget(_offload(), GiB // 10, 300_000_000, world_size=2, dtype_bytes=2)


def test_estimate_reports_host_offload_and_refuses_a_too_small_budget():
    est = estimate_memory("tiny", {"distributed": {"deepspeed": {"preset": "zero3_offload", "host_memory_gb": 1}}},
                          world_size=2, batch_size=2, seq_len=32)
    d = est.to_dict()
    assert d["inputs"]["zero_stage"] == 3 and d["host_offload"]["total_bytes"] > 0
    n = sum(p.numel for p in est.params.values())
    assert d["host_offload"]["host_optimizer"] == 8 * -(-n // 2)
    with pytest.raises(RecipeError, match="host_memory_gb"):
        estimate_memory("smollm2", {"distributed": {"deepspeed": {"preset": "zero3_offload",
                                                                  "host_memory_gb": 0.1}}}, world_size=2)


def test_presets_resolve_with_overrides(monkeypatch):
    from hf_memkit.distributed.deepspeed.technique import DeepSpeedTechnique

    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_recipe({"distributed": {"deepspeed": {"preset": "zero3_nvme", "nvme_path": "/x",
                                                        "overrides": {"zero_optimization": {"overlap_comm": True}}}}})
    tech = recipe.build()[0]
    assert isinstance(tech, DeepSpeedTechnique)
    args = tech.training_args()
    zero = args["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["offload_param"]["nvme_path"] == "/x"
    assert "train_batch_size" not in args["deepspeed"]  # computed by DeepSpeed: see DeepSpeedConfig
    import torch

    if not torch.cuda.is_available():
        assert args["use_cpu"] is True and args["ddp_backend"] == "gloo"


def test_fsdp_fills_the_trainers_own_arguments(monkeypatch, tiny_model):
    from hf_memkit.distributed.fsdp.technique import FSDPTechnique
    from hf_memkit.distributed.fsdp.config import FSDPConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = FSDPTechnique(FSDPConfig(sharding="shard_grad_op", offload=True)).training_args(tiny_model.config)
    assert args["fsdp"] == "shard_grad_op auto_wrap offload"
    assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
