"""LoRC adapter: the SVD residual identity, compensation lowers the layer error, INT8 factors, the PEFT adapter
(start = quantized + compensation, save/load with the codes, training), export as quantized base + LoRA."""

from __future__ import annotations

import json

import pytest
import torch

import hf_memkit
from hf_memkit import IncompatibleModelError, RecipeError, load_recipe
from hf_memkit.adapters.lorc.layers import LorcLinear
from hf_memkit.compress.grid import QuantSpec, rtn_quantize
from hf_memkit.quant.lorc.lorc import lorc_factors


def _layer(out=48, fan_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, fan_in, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rank", [1, 4, 8, 48])
def test_residual_equals_the_discarded_singular_energy(rank):
    W = _layer()
    W_hat = rtn_quantize(W, QuantSpec(4, 16)).dequantize()
    E = W - W_hat
    f = lorc_factors(W, W_hat, rank)
    S = torch.linalg.svdvals(E)
    lhs = torch.linalg.matrix_norm(E - f.A @ f.B) ** 2
    rhs = torch.linalg.matrix_norm(E) ** 2 - (S[:rank] ** 2).sum()
    assert abs(lhs - rhs) <= 1e-9 * torch.linalg.matrix_norm(E) ** 2


def test_compensation_lowers_the_layer_output_error_and_int8_factors_stay_close():
    W = _layer(64, 128, seed=1)
    X = torch.randn(256, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    W_hat = rtn_quantize(W, QuantSpec(4, 32)).dequantize()
    f = lorc_factors(W, W_hat, 8)
    f8 = lorc_factors(W, W_hat, 8, factor_bits=8)
    err = lambda Wc: torch.linalg.matrix_norm(X @ W.t() - X @ Wc.t())  # noqa: E731
    plain, comp, comp8 = err(W_hat), err(W_hat + f.A @ f.B), err(W_hat + f8.A @ f8.B)
    assert comp < plain
    assert abs(comp8 - comp) <= 1e-3 * comp


def _peft(model, **kw):
    from peft import get_peft_model

    kw = {"r": 8, "bits": 4, "group_size": 32, **kw}
    return get_peft_model(model, hf_memkit.LorcConfig(task_type="CAUSAL_LM", **kw))


def test_adapter_starts_at_the_compensated_quantized_model(tiny_model):
    from hf_memkit.quant.lorc.config import LorcCompensatorConfig
    from hf_memkit.quant.pipeline import quantize_model_
    from hf_memkit.quant.rtn.config import RTNConfig

    import copy

    ref = copy.deepcopy(tiny_model)
    quantize_model_(ref, "rtn", RTNConfig(bits=4, group_size=32), lorc=LorcCompensatorConfig(rank=8))
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full, want = tiny_model(input_ids=x).logits, ref(input_ids=x).logits
        pm = _peft(tiny_model)
        got = pm(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layers = [m for m in pm.modules() if isinstance(m, LorcLinear)]
    assert len(layers) == 14 and all(m.base_layer.weight.numel() == 0 for m in layers)  # fp weights released
    assert all(m.lorc_codes.dtype == torch.uint8 for m in layers)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lorc_A." in n or ".lorc_B." in n for n in trainable)
    # and it is closer to the full-precision model than the uncompensated one
    with torch.no_grad():
        for m in layers:
            m.lorc_B["default"].weight.zero_()
        plain = pm(input_ids=x).logits
    assert (got - full).norm() < (plain - full).norm()


def test_save_load_reproduces_the_trained_adapter(tiny_model, tiny_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = _peft(tiny_model, factor_bits=8)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    x = torch.randint(0, 100, (2, 10))
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "LORC"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "ad")
    a = {k: v for k, v in pm.state_dict().items() if ".lorc_" in k}
    b = {k: v for k, v in loaded.state_dict().items() if ".lorc_" in k}
    assert a.keys() == b.keys() and any(k.endswith("lorc_codes") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)


def test_training_steps_lower_the_loss_and_remove_restores_the_base(tiny_model, tiny_dataset, tmp_path):
    from hf_memkit import MemkitTrainer
    from tests.conftest import make_args

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    recipe = load_recipe({"adapter": {"lorc": {"bits": 4, "group_size": 32, "rank": 8}}})
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=10, learning_rate=1e-2),
                            train_dataset=tiny_dataset, recipe=recipe)
    batch = torch.tensor([tiny_dataset[i]["input_ids"] for i in range(16)])

    def fixed_loss():
        trainer.model.eval()
        with torch.no_grad():
            return trainer.model(input_ids=batch, labels=batch).loss.item()

    start = fixed_loss()
    trainer.train()
    assert fixed_loss() < start
    base = trainer.memkit.unpatch()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_export_as_quantized_base_plus_a_plain_lora_adapter(tiny_model, tmp_path):
    from peft import PeftModel

    from hf_memkit.adapters.lorc.export import export_lorc, to_quantized_model

    pm = _peft(tiny_model)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    x = torch.randint(0, 100, (1, 9))
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=x).logits
        q = to_quantized_model(pm)
        torch.testing.assert_close(q(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    out = export_lorc(pm, str(tmp_path / "export"))
    cfg = json.loads((tmp_path / "export" / "lorc_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == 8
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out)
    plain = PeftModel.from_pretrained(base, tmp_path / "export" / "lorc_adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


def test_bad_input_gives_typed_errors(tiny_model):
    with pytest.raises(RecipeError, match="bits"):
        hf_memkit.LorcConfig(bits=5)
    with pytest.raises(RecipeError, match="quantizer"):
        hf_memkit.LorcConfig(quantizer="awq")
    with pytest.raises(RecipeError):
        load_recipe({"adapter": {"lorc": {"factor_bits": 3}}})
    with pytest.raises(RecipeError, match="cannot be combined"):
        load_recipe({"adapter": {"lorc": {}}, "compress": [{"rtn": {}}]})
    with pytest.raises(IncompatibleModelError, match="no nn.Linear"):
        _peft(tiny_model, target_modules=["nothing_here"])
    with pytest.raises(IncompatibleModelError, match="group_size 48 does not divide"):
        _peft(tiny_model, group_size=48)
