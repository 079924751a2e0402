"""MixLoRA: exact start at the base model, the mixture against the naive reference, the load-balance loss, PEFT
save/load (also in a fresh process), training, generation and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_memkit
from hf_memkit import IncompatibleModelError, RecipeError, load_recipe
from hf_memkit.adapters.mixlora.ffn import load_balance_loss, mixture_forward, require_ffn_kind
from hf_memkit.adapters.mixlora.layers import MixLoraFFN, router_loss
from hf_memkit.adapters.mixlora.reference import reference_forward

ROOT = Path(__file__).resolve().parents[3]


def _peft(model, **kw):
    from peft import get_peft_model

    kw.setdefault("lora_dropout", 0.0)
    return get_peft_model(model, hf_memkit.MixLoraConfig(task_type="CAUSAL_LM", r=4, num_experts=4, top_k=2, **kw))


def _randomize_(model, std=0.5):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mixlora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_b_zero_gives_the_base_output_exactly_for_any_router(arch, tiny_model):
    model = tiny_model if arch == "llama" else _gpt2()
    model.eval()
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        base = model(input_ids=x).logits
    pm = _peft(model)
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            for m in pm.modules():
                if isinstance(m, MixLoraFFN):
                    m.mixlora_router["default"].normal_(std=3.0)  # any router, strongly skewed
            for n, p in pm.named_parameters():
                if n.endswith("_A") or "mixlora_A" in n:
                    p.normal_()
            out = pm(input_ids=x).logits
        assert torch.equal(out, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixture_matches_the_naive_reference(arch, tiny_model):
    model = tiny_model if arch == "llama" else _gpt2()
    model.eval()
    pm = _peft(model).double()
    _randomize_(pm, 0.2)
    layer = next(m for m in pm.modules() if isinstance(m, MixLoraFFN))
    x = torch.randn(3, 7, layer.hidden, dtype=torch.float64)
    logits = torch.randn(21, 4, dtype=torch.float64)
    experts = layer.mixlora_experts["default"].factors()
    got = mixture_forward(layer.base_layer, layer.kind, x, logits, 2, experts, 2.0, torch.nn.Identity())
    want = reference_forward(layer.base_layer, layer.kind, x, logits, 2, experts, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the experts really change the output
    assert not torch.allclose(got, layer.base_layer(x))


def test_load_balance_loss_formula():
    E, k, coef, N = 8, 2, 0.01, 40
    uniform = torch.zeros(N, E)
    assert load_balance_loss([uniform, uniform], k, coef).item() == pytest.approx(coef * k, rel=1e-6)
    skewed = torch.zeros(N, E)
    skewed[:, 0] = 5.0
    assert load_balance_loss([skewed], k, coef).item() > coef * k
    # the formula by hand, with a mask that drops the padding
    logits = torch.randn(N, E)
    mask = torch.ones(N)
    mask[-7:] = 0
    probs = logits[:33].softmax(-1)
    f = torch.nn.functional.one_hot(probs.topk(k).indices, E).float().mean(0)
    want = coef * E * (f * probs.mean(0)).sum()
    torch.testing.assert_close(load_balance_loss([logits], k, coef, mask), want)


def test_router_loss_of_a_training_forward(tiny_model):
    pm = _peft(tiny_model, router_aux_loss_coef=0.5)
    pm.train()
    pm(input_ids=torch.randint(0, 100, (2, 8)))
    loss = router_loss(pm)
    assert loss is not None and loss.requires_grad and loss.item() >= 0.5 * 2 * 0.999
    assert router_loss(pm) is None  # consumed


def test_save_load_reproduces_every_tensor_and_output(tiny_model, tiny_path, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pm = _peft(tiny_model)
    _randomize_(pm, 0.1)
    pm.eval()
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        want = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert any(k.endswith("mlp.mixlora_router") for k in saved)
    assert any(k.endswith("mlp.mixlora_experts.gate_proj_A") for k in saved)
    import json

    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MIXLORA" and cfg["num_experts"] == 4 and cfg["top_k"] == 2

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "ad")
    mine = {k: v for k, v in pm.state_dict().items() if "mixlora_" in k}
    theirs = {k: v for k, v in loaded.state_dict().items() if "mixlora_" in k}
    assert mine.keys() == theirs.keys() and len(mine) == len(saved)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)
    # a fresh process with nothing but `import hf_memkit` before PEFT's Auto class
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = (
        "import sys, torch, hf_memkit\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"d = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'ad')!r}).eval()\n"
        "with torch.no_grad(): out = m(input_ids=d['x']).logits\n"
        "assert torch.equal(out, d['want']), (out - d['want']).abs().max()\n"
        "g = m.generate(input_ids=d['x'][:1, :4], max_new_tokens=5, do_sample=False)\n"
        "print('ok', g.shape[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "ok 9" in r.stdout, r.stderr[-3000:]


def test_a_few_training_steps_lower_the_loss(tiny_model, tiny_dataset, tmp_path):
    from hf_memkit import MemkitTrainer
    from tests.conftest import make_args

    recipe = load_recipe({"adapter": {"mixlora": {"num_experts": 4, "top_k": 2, "r": 4}}})
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=8, learning_rate=5e-3),
                            train_dataset=tiny_dataset, recipe=recipe)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    routers = [p for n, p in trainer.model.named_parameters() if "mixlora_router" in n]
    assert routers and all(p.requires_grad for p in routers)


def test_generation_through_the_peft_model(tiny_model):
    pm = _peft(tiny_model)
    _randomize_(pm, 0.1)
    pm.eval()
    out = pm.generate(input_ids=torch.randint(0, 100, (1, 4)), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)


def test_unload_restores_the_base_and_merge_is_refused(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pm = _peft(tiny_model)
    with pytest.raises(IncompatibleModelError, match="cannot be merged"):
        pm.merge_and_unload()
    base = pm.unload()
    assert {k: v for k, v in base.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_bad_input_gives_typed_errors(tiny_model):
    with pytest.raises(RecipeError, match=r"at .top_k.: top_k \(5\) cannot exceed num_experts \(4\)"):
        hf_memkit.MixLoraConfig(num_experts=4, top_k=5)
    with pytest.raises(RecipeError, match="top_k"):
        load_recipe({"adapter": {"mixlora": {"num_experts": 2, "top_k": 3}}})
    with pytest.raises(ValueError):
        hf_memkit.MixLoraConfig(r=0)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(4, 8)
            self.w2 = torch.nn.Linear(8, 4)

    with pytest.raises(IncompatibleModelError, match="model.layers.0.mlp.*not an FFN MixLoRA supports"):
        require_ffn_kind("model.layers.0.mlp", Odd(), "MixLoraConfig.ffn_modules")
    from peft import get_peft_model

    with pytest.raises(IncompatibleModelError, match="no FFN module named 'ffn'"):
        get_peft_model(tiny_model, hf_memkit.MixLoraConfig(ffn_modules="ffn"))
    with pytest.raises(IncompatibleModelError, match="not an FFN MixLoRA supports"):
        get_peft_model(tiny_model, hf_memkit.MixLoraConfig(ffn_modules="self_attn"))


def test_safetensors_export_keeps_the_adapter(tiny_model, tmp_path):
    from hf_memkit.export.checkpoint import export_safetensors

    pm = _peft(tiny_model)
    export_safetensors(pm, str(tmp_path / "export"), merge_adapters=True)
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["peft_type"] == "MIXLORA"
