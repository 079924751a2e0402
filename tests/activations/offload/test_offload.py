"""Offload: bit-identical gradients (disk, token-wise, with gradient checkpointing), temp files cleaned up, outer
hooks still see what stays, typed errors."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from hf_memkit import load_recipe
from hf_memkit.activations.offload.config import OffloadConfig
from hf_memkit.activations.offload.hooks import OffloadHooks
from hf_memkit.activations.offload.store import DiskStore
from hf_memkit.activations.offload.technique import OffloadTechnique
from hf_memkit.errors import RecipeError
from hf_memkit.memory.estimate import estimate_memory
from hf_memkit.memory.profiler import SavedTensorMeter
from hf_memkit.technique import ValidationContext

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))


def _grads(model, checkpointing=False):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    meter = SavedTensorMeter(model, 512)
    with meter.measure():
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def fresh(tiny_path):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_path)


@pytest.mark.parametrize("fraction,checkpointing", [(1.0, False), (0.5, False), (0.0001, False), (1.0, True)])
def test_gradients_are_bit_identical_and_files_are_removed(fresh, tmp_path, fraction, checkpointing):
    base_loss, base_bytes, base = _grads(fresh(), checkpointing)
    model = fresh()
    t = OffloadTechnique(OffloadConfig(to="disk", token_fraction=fraction, dir=str(tmp_path)))
    handle = t.patch_model(model)
    loss, saved, grads = _grads(model, checkpointing)
    assert torch.equal(loss, base_loss)
    for n, g in base.items():
        assert torch.equal(grads[n], g), n
    assert t.hooks.offloaded_bytes > 0
    # what stayed is what the meter still sees; under checkpointing the meter counts the checkpoint inputs
    # (2 layers x 4x32x64 fp32) through a forward pre-hook, wherever they live
    held = 2 * 4 * 32 * 64 * 4 if checkpointing else 0
    assert saved["activations"] - held < 8192 < base_bytes["activations"] - held
    assert t.store.files() == [], "every file is deleted once autograd frees the saved tensor"
    folder = t.store.folder
    handle.remove()
    assert not os.path.exists(folder) and os.listdir(tmp_path) == []
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_pack_unpack_round_trip_keeps_values_strides_and_dtype(tmp_path):
    store = DiskStore(str(tmp_path))
    for t in (torch.randn(5, 7).t(), torch.randn(3, 4, 5).to(torch.bfloat16), torch.randn(4, 6)[:, ::2],
              torch.arange(10)):
        e = store.put(t)
        back = store.get(e)
        assert back.dtype == t.dtype and torch.equal(back, t)
        if t.is_contiguous() or t.stride() == (1, 5):
            assert back.stride() == t.stride()
        del e
    assert store.files() == []
    store.close()


def test_small_tensors_stay_and_reach_the_outer_hooks(tmp_path):
    seen = []
    x = torch.randn(64, 64, requires_grad=True)
    hooks = OffloadHooks(DiskStore(str(tmp_path)), min_bytes=1024, device_types=None, excluded=set())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        with hooks:
            y = (x * x).sum() + (x[:2, :2].exp()).sum()  # 64x64 saved (offloaded), 2x2 saved (kept)
    y.backward()
    assert 4 in seen and 4096 not in seen
    assert torch.allclose(x.grad, 2 * x + torch.nn.functional.pad(x[:2, :2].exp(), (0, 62, 0, 62)))
    hooks.store.close()


def test_estimate_matches_the_meter(fresh, tmp_path):
    model = fresh()
    recipe = load_recipe({"activations": [{"offload": {"to": "disk", "dir": str(tmp_path)}}]})
    handle = OffloadTechnique(recipe.get("offload").config).patch_model(model)
    _, saved, _ = _grads(model)
    handle.remove()
    est = estimate_memory(model.config, recipe, batch_size=4, seq_len=32).categories()
    assert est["activations"] == pytest.approx(saved["activations"], abs=1024)
    assert est["logits"] == saved["logits"] == 0
    assert est["activations_offloaded"] > 1_000_000


def test_bad_input_names_the_fix(fresh):
    with pytest.raises(RecipeError, match="to: disk"):
        OffloadTechnique(OffloadConfig(to="cpu")).patch_model(fresh())  # a CPU model: nothing would move
    with pytest.raises(RecipeError, match="token_fraction"):
        load_recipe({"activations": [{"offload": {"token_fraction": 0}}]})
    with pytest.raises(RecipeError, match="'auto', 'cpu' or 'disk'"):
        load_recipe({"activations": [{"offload": {"to": "gpu"}}]})
    recipe = load_recipe({"activations": [{"offload": {"token_fraction": 0.5}}],
                          "training_args": {"gradient_checkpointing": True}})
    with pytest.raises(RecipeError, match="gradient checkpointing"):
        recipe.build()[0].validate(ValidationContext(recipe, None, dict(recipe.training_args)))
    model = fresh()
    handle = OffloadTechnique(OffloadConfig(to="disk", token_fraction=0.5)).patch_model(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(RecipeError, match="token_fraction"):
        model(input_ids=IDS, labels=IDS)
    handle.remove()


def test_each_block_is_written_once_per_forward(fresh, tmp_path):
    """q/k/v read one normalised input and each Linear saves its own 2-D view of it: the block goes to disk once
    (the other views are aliases), so the bytes written equal the bytes the meter counts without offload."""
    _, base_bytes, base = _grads(fresh())
    model = fresh()
    t = OffloadTechnique(OffloadConfig(to="disk", dir=str(tmp_path), min_bytes=512))
    handle = t.patch_model(model)
    _, _, grads = _grads(model)
    for n, g in base.items():
        assert torch.equal(grads[n], g), n
    assert t.hooks.offloaded_bytes == pytest.approx(base_bytes["activations"] + base_bytes["logits"], rel=0.01)
    handle.remove()
    if sys.platform.startswith("linux"):  # release_host_memory (default true) fixed glibc's threshold
        from hf_memkit.activations.offload import allocator

        assert allocator._applied == 1 << 20


def test_alias_of_a_stored_block_keeps_its_own_view(tmp_path):
    x = torch.randn(4, 8, 16, requires_grad=True)
    w1, w2 = torch.randn(16, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    hooks = OffloadHooks(DiskStore(str(tmp_path)), min_bytes=0, device_types=None, excluded=set())
    h = x.tanh()
    with hooks:
        y = (h.view(-1, 16) @ w1).sum() + (h.transpose(0, 1) * w2).square().sum()
    written = hooks.offloaded_bytes
    y.backward()
    # h once (a 2-D view and a transposed view of it), w1, w2, and the product that square() saves
    assert written == h.numel() * 4 + 16 * 16 * 4 + 16 * 4 + h.numel() * 4
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w1, ref_w2 = w1.detach().clone().requires_grad_(True), w2.detach().clone().requires_grad_(True)
    rh = ref_x.tanh()
    ((rh.view(-1, 16) @ ref_w1).sum() + (rh.transpose(0, 1) * ref_w2).square().sum()).backward()
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(w1.grad, ref_w1.grad) and torch.equal(w2.grad, ref_w2.grad)
    hooks.store.close()


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_nothing_the_forward_saved_outlives_backward(fresh, tmp_path, fraction):
    """Regression: the token-wise recompute once kept every recomputed layer alive after backward (a reference
    cycle through the recompute graph) and appended keys/values to the KV cache a second time."""
    import gc

    model = fresh()
    t = OffloadTechnique(OffloadConfig(to="disk", token_fraction=fraction, dir=str(tmp_path)))
    handle = t.patch_model(model)
    keep = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}

    def alive() -> int:
        gc.collect()
        return sum(o.numel() for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and id(o) not in keep and o.numel() >= 1024)

    before = alive()
    _grads(model)  # the gradients it returns are clones; the parameters' .grad stay
    grads = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert alive() - before <= 2 * grads  # .grad + the clones, nothing of the activations
    handle.remove()


def test_release_host_memory_fixes_the_mmap_threshold_in_a_fresh_process(tmp_path):
    """Process-wide and irreversible, so checked in a child: with the threshold fixed, a freed 4 MiB block goes
    back to the OS (RSS falls), which glibc's dynamic threshold does not do once a block that size was freed."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        from hf_memkit.activations.offload.allocator import fix_mmap_threshold
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        if sys.argv[1] == "fix":
            assert fix_mmap_threshold(1 << 20)
        for _ in range(3):  # free 16 MiB blocks: glibc's dynamic threshold rises past the 4 MiB ones below (a
            torch.empty(4 << 20).fill_(1)  # 4 MiB block could be served from a hole the imports left, not mmapped)
        keep = [torch.empty(1 << 20).fill_(1) for _ in range(64)]  # 256 MiB of 4 MiB blocks
        hold = torch.empty(128 * 1024).fill_(1)  # 512 KiB, heap in both modes, allocated last: pins the heap top
        before = rss()
        del keep
        print((before - rss()) / 2**20)
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux-only")
    freed = {}
    for mode in ("fix", "default"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        freed[mode] = float(out.stdout.strip().splitlines()[-1])
    assert freed["fix"] > 200, freed
    assert freed["default"] < freed["fix"] / 2, freed
