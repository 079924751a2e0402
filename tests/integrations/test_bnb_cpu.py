"""bitsandbytes' 4-bit layers stay trainable on CPU after an evaluation (hf_memkit.integrations.bnb_cpu).

bitsandbytes 0.50 repacks a Linear4bit's weight for its CPU inference kernel on the first no-grad eval call and
never packs it back; afterwards a training-mode backward gives the layer's input no gradient. The reference here
is plain PyTorch: ``x @ dequantize_4bit(W).T`` and its gradient."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from hf_memkit.integrations.bnb_cpu import keep_4bit_trainable  # noqa: E402

CAN_PACK = bool(F.has_avx512bf16())


def layer(seed=0, n_in=256, n_out=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.02
    q = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                          quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                 blocksize=64).to("cpu")
    return q


def train_call(q, x, g):
    """Output and input gradient of one training-mode call."""
    q.train()
    x = x.clone().requires_grad_(True)
    y = q(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def eval_call(q, x):
    q.eval()
    with torch.no_grad():
        q(x)


def reference(q, x, g):
    w = F.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    return x @ w.t(), g @ w


def test_an_eval_call_leaves_training_exact():
    q = layer()
    assert keep_4bit_trainable(torch.nn.Sequential(q)) == (1 if CAN_PACK else 0)
    x, g = torch.randn(8, 256), torch.randn(8, 512)
    y_ref, gx_ref = reference(q, x, g)
    y0, gx0 = train_call(q, x, g)
    eval_call(q, x)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    y1, gx1 = train_call(q, x, g)
    assert gx1 is not None
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=0)
    torch.testing.assert_close(y1, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CAN_PACK, reason="bitsandbytes repacks for CPU inference only with AVX-512 BF16")
def test_the_upstream_behaviour_this_guards_against():
    """Control: without keep_4bit_trainable, one eval call cuts the input gradient. If this fails, bitsandbytes
    changed (see hf_memkit/integrations/bnb_cpu.py) and the guard may no longer be needed."""
    q = layer()
    x, g = torch.randn(8, 256), torch.randn(8, 512)
    _, gx_ref = reference(q, x, g)
    eval_call(q, x)
    assert getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    _, gx = train_call(q, x, g)
    assert gx is None or not torch.allclose(gx, gx_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not CAN_PACK, reason="bitsandbytes repacks for CPU inference only with AVX-512 BF16")
def test_a_layer_already_packed_is_unpacked_with_a_warning(caplog):
    """bitsandbytes' inverse is approximate for double-quantized statistics: the unpacked layer trains exactly on
    what it now holds, within 0.5% of the original 4-bit weights, and the log says so."""
    q = layer()
    x, g = torch.randn(8, 256), torch.randn(8, 512)
    y_orig, _ = reference(q, x, g)
    eval_call(q, x)
    with caplog.at_level("WARNING", logger="hf_memkit"):
        assert keep_4bit_trainable(torch.nn.Sequential(q)) == 1
    assert "repacked for CPU inference" in caplog.text and "reload the model" in caplog.text
    y_ref, gx_ref = reference(q, x, g)  # from the unpacked weights
    y, gx = train_call(q, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert float((y - y_orig).norm() / y_orig.norm()) < 5e-3


@pytest.mark.parametrize("loss", [None, "cce"])
def test_qlora_trains_the_same_after_an_evaluation(tiny_path, loss, tmp_path):
    """The qlora recipe, alone and with the fused loss (whose head check is a no-grad eval call): LoRA gradients
    of one batch after an evaluation equal those of a model that never evaluated, and the fused loss equals the
    plain one."""
    from transformers import AutoModelForCausalLM

    from hf_memkit import MemkitTrainer
    from tests.conftest import make_args

    recipe = {"memkit": 1, "adapter": {"qlora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}},
              "optimizer": {"adamw": {}}}
    if loss:
        recipe["loss"] = {loss: {}}
    ids = torch.randint(1, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}

    def grads(recipe, evaluate):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_path)
        trainer = MemkitTrainer(model=model, args=make_args(tmp_path), recipe=recipe)
        m = trainer.model
        # LoRA's B starts at zero, which hides the base's input gradients from A: give B a value first
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        if evaluate:
            m.eval()
            with torch.no_grad():
                m(input_ids=ids[:, :4])
        m.train()
        out = trainer.compute_loss(m, dict(batch))
        out.backward()
        return out.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss0, g0 = grads(recipe, evaluate=False)
    loss1, g1 = grads(recipe, evaluate=True)
    assert g0.keys() == g1.keys() and any("lora_A" in n for n in g0)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    if loss:
        plain = {k: v for k, v in recipe.items() if k != "loss"}
        loss_p, g_p = grads(plain, evaluate=False)  # the clean reference: never evaluated
        assert loss1 == pytest.approx(loss_p, rel=1e-5)
        for n in g_p:
            torch.testing.assert_close(g1[n], g_p[n], rtol=1e-4, atol=1e-6, msg=n)
