from __future__ import annotations

import os

import pytest
import torch

from hf_memkit.adapters.qlora.config import QLoraConfig
from hf_memkit.adapters.qlora.technique import QLoraTechnique

# the 16 NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1]
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Plain PyTorch NF4 round trip: per-block absmax scaling, nearest NF4 level, rescale."""
    flat = w.reshape(-1, block)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    idx = ((flat / absmax).unsqueeze(-1) - NF4).abs().argmin(-1)
    return (NF4[idx] * absmax).reshape(w.shape)


def test_linears_become_4bit_and_match_the_nf4_reference(tiny_model):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    originals = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules()
                 if type(m) is torch.nn.Linear}
    handle = QLoraTechnique(QLoraConfig(double_quant=False)).patch_model(tiny_model)
    base = handle.model.base_model.model
    assert type(base.lm_head) is torch.nn.Linear  # skip_modules default keeps the head in full precision
    q = base.model.layers[0].mlp.down_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit)
    deq = F.dequantize_4bit(q.weight.data, q.weight.quant_state)
    ref = nf4_reference(originals["model.layers.0.mlp.down_proj"])
    torch.testing.assert_close(deq, ref, atol=1e-6, rtol=1e-5)


def test_storage_is_half_a_byte_per_weight_and_estimate_matches(tiny_model):
    from hf_memkit.memory.estimate import estimate_memory
    from hf_memkit.memory.profiler import parameter_bytes

    est = estimate_memory(tiny_model.config, {"adapter": {"qlora": {}}})
    n_linear = sum(m.weight.numel() for n, m in tiny_model.named_modules()
                   if type(m) is torch.nn.Linear and n != "lm_head")
    handle = QLoraTechnique().patch_model(tiny_model)
    packed = sum(m.weight.numel() for m in handle.model.modules() if type(m).__name__ == "Linear4bit")
    assert packed == n_linear // 2
    measured = parameter_bytes(handle.model)
    # within the few quant-state tensors bitsandbytes keeps outside parameters
    assert measured["weights"] == pytest.approx(est.categories()["weights"], rel=0.03)
    assert measured["adapter_weights"] == est.categories()["adapter_weights"]


def test_outputs_stay_close_to_full_precision(tiny_model):
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        ref = tiny_model(input_ids=x).logits
    handle = QLoraTechnique().patch_model(tiny_model)
    with torch.no_grad():
        out = handle.model(input_ids=x).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2


def test_remove_restores_weights_and_deletes_the_snapshot(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    t = QLoraTechnique()
    handle = t.patch_model(tiny_model)
    snapshots = [p for p in os.listdir(os.path.dirname(_snapshot_dir())) if p.startswith("memkit-qlora-")]
    assert snapshots
    restored = handle.remove()
    after = restored.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    left = [p for p in os.listdir(os.path.dirname(_snapshot_dir())) if p.startswith("memkit-qlora-")]
    assert len(left) == len(snapshots) - 1


def _snapshot_dir():
    import tempfile

    return os.path.join(tempfile.gettempdir(), "x")
