"""Live tensor bytes of a profiled region from the allocator's events (hf_memkit.memory.peak)."""

from __future__ import annotations

import torch

from hf_memkit.memory.peak import Block, RegionProfiler, Tag, Window, analyze

MiB = 2**20


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_known_allocations_give_the_hand_computed_peak_phase_and_categories():
    before = torch.ones(MiB // 4)  # allocated before the window: the caller's base, its free is not counted
    rp = RegionProfiler(cuda=False)
    rp.start("forward")
    a = torch.empty(1 * MiB, dtype=torch.uint8)  # "saved activation", alive when the forward ends
    b = torch.empty(2 * MiB, dtype=torch.uint8)
    rp.phase("backward")
    c = torch.empty(3 * MiB, dtype=torch.uint8)  # the peak: 1 + 2 + 3 MiB in the window
    del c, before
    rp.phase("optimizer")
    del b
    d = torch.empty(512, dtype=torch.uint8)  # noqa: F841 - alive at the end
    w = rp.stop()
    r = analyze(w, base_bytes=7, tags=[Tag("activations", {_ptr(a)}, ("end", "forward"))])
    assert r["window_peak_bytes"] == 6 * MiB and r["peak_bytes"] == 6 * MiB + 7
    assert r["peak_phase"] == "backward"
    assert r["at_peak"] == {"activations": 1 * MiB, "transients": 5 * MiB}
    assert [p["phase"] for p in r["phases"]] == ["forward", "backward", "optimizer"]
    assert max(v for _, v in r["timeline"]) == r["peak_bytes"]
    assert r["blocks"] == 4


def test_a_tag_needs_the_block_alive_at_its_reference_time():
    # the pointer of a gradient is reused by a later transient: only the block alive at "optimizer start" counts
    w = Window(blocks={"cpu": [Block(100, 10, 1, 5), Block(100, 20, 6, None), Block(200, 5, 2, None)]},
               ranges=[("backward", 0, 3), ("optimizer", 4, 5), ("train", 6, 9)], t0=0, t1=9)
    r = analyze(w, tags=[Tag("gradients", {100}, ("start", "optimizer"))])
    assert r["window_peak_bytes"] == 25 and r["peak_phase"] == "train"
    assert r["at_peak"] == {"transients": 25}  # the gradient's block was freed before the peak
    w.blocks["cpu"][1] = Block(300, 20, 6, None)
    w.blocks["cpu"].append(Block(100, 1, 0, None))
    r = analyze(w, tags=[Tag("gradients", {100}, ("start", "optimizer"))])
    assert r["at_peak"] == {"gradients": 1, "transients": 25}


def test_a_free_and_an_allocation_at_one_instant_make_no_phantom_peak():
    w = Window(blocks={"cpu": [Block(1, 10, 0, 5), Block(2, 10, 5, None)]}, ranges=[], t0=0, t1=5)
    assert analyze(w)["window_peak_bytes"] == 10


def test_profiling_a_small_training_step_is_cheap():
    """A step of a small MLP: the profiled step's peak covers its saved tensors; analysis is fast."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(512, 64)
    rp = RegionProfiler(cuda=False)
    rp.start("forward")
    loss = model(x).square().mean()
    rp.phase("backward")
    loss.backward()
    rp.phase("optimizer")
    with torch.no_grad():  # (torch.optim would import torch._dynamo here: seconds, not what is tested)
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    w = rp.stop()
    r = analyze(w)
    # saved for backward: x is the caller's; the first Linear's output (GELU input) and GELU output 512 x 256 fp32
    assert r["window_peak_bytes"] >= 2 * 512 * 256 * 4
    assert r["peak_phase"] in ("forward", "backward")
    assert rp.parse_seconds < 2.0
