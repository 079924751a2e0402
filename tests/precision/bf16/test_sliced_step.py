"""WriteBack16 steps a large 16-bit parameter in slices of rows: the same weights and state as whole-parameter
stepping (bit for bit with nearest/kahan), checkpoints with only the parents' full state, and no fp32 tensor of the
whole parameter's size during the step."""

from __future__ import annotations

import pytest
import torch

from hf_memkit.optimizer_slot.release.optimizer import GradientRelease
from hf_memkit.precision.bf16.optimizer import (
    BLOCK, KAHAN, STEP_CHUNK_NUMEL, RoundingRNG, WriteBack16, slice_rows)

SHAPE = (4099, 60)  # 60 elements a row: slices are multiples of 64 rows; the last block is partial
CHUNK = 65536  # -> slices of 1,088 rows (65,280 elements), the last one 835
SLICE = 1088 * 60


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _adamw_foreach(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True, amsgrad=True)


def _adamw8bit(params):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1)


INNER = {"adamw": _adamw, "adamw_foreach_amsgrad": _adamw_foreach, "adamw8bit": _adamw8bit}


def _seen_shapes(opt: WriteBack16) -> list[tuple[int, ...]]:
    """Records the shapes of the parameters each inner ``step()`` is handed."""
    inner, seen = opt.optimizer, []
    original = inner.step

    def step(*args, **kwargs):
        seen.extend(tuple(p.shape) for g in inner.param_groups for p in g["params"])
        return original(*args, **kwargs)

    inner.step = step
    return seen


def _run(make, update, chunk, steps=5, shape=SHAPE, weight=None):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape).bfloat16() if weight is None else weight)
    b = torch.nn.Parameter(torch.randn(shape[-1]))  # an fp32 neighbour, stepped in the wide group
    opt = WriteBack16(make([w, b]), update, RoundingRNG(0), step_chunk=chunk)
    seen = _seen_shapes(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(*w.shape, generator=gen).bfloat16()
        b.grad = torch.randn(*b.shape, generator=gen)
        opt.step()
    return w, b, opt, seen


def _assert_same_state(s1: dict, s2: dict) -> None:
    assert sorted(s1) == sorted(s2)
    for k, v in s1.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == s2[k].dtype and v.shape == s2[k].shape and torch.equal(v, s2[k]), k
        else:
            assert v == s2[k], k


def test_slice_rows():
    rows = slice_rows((49152, 576), STEP_CHUNK_NUMEL)  # SmolLM2's tied embedding
    assert rows == 1756 and rows * 576 % BLOCK == 0 and rows * 576 <= STEP_CHUNK_NUMEL
    assert slice_rows(SHAPE, CHUNK) == 1088 and 1088 * 60 % BLOCK == 0
    assert slice_rows((4096, 64), CHUNK) == 1024
    assert slice_rows(SHAPE, 0) == 0  # never
    assert slice_rows(SHAPE, 10**6) == 0  # not larger than the limit
    assert slice_rows((3, 100_003), CHUNK) == 0  # odd rows: 256 rows per slice, more than there are
    assert slice_rows((100_000,), CHUNK) == 50176  # a vector (rows of one element): two equal slices


@pytest.mark.parametrize("update", ["nearest", "kahan"])
@pytest.mark.parametrize("inner", list(INNER))
def test_sliced_steps_are_bit_identical_to_whole_steps(inner, update):
    w1, b1, o1, seen1 = _run(INNER[inner], update, 0)
    w2, b2, o2, seen2 = _run(INNER[inner], update, CHUNK)
    assert SHAPE in seen1 and SHAPE not in seen2  # whole vs sliced
    assert (1088, 60) in seen2 and (4099 - 3 * 1088, 60) in seen2
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    _assert_same_state(o1.state[w1], o2.state[w2])
    _assert_same_state(o1.state[b1], o2.state[b2])
    step = o2.state[w2]["step"]
    assert (int(step.item()) if isinstance(step, torch.Tensor) else step) == 5  # once per step, not per slice
    assert len(o2.optimizer.state) == 2  # no slice's temporary state left behind
    if update == "kahan":
        assert o2.state[w2][KAHAN].dtype == torch.bfloat16 and o2.state[w2][KAHAN].shape == SHAPE


@pytest.mark.parametrize("inner", list(INNER))
def test_sliced_stochastic_rounding_differs_at_most_in_the_draws(inner):
    w1, _, o1, _ = _run(INNER[inner], "stochastic", 0)
    w2, _, o2, _ = _run(INNER[inner], "stochastic", 7 * 60 * 64)  # slices of 448 rows, not the SR chunk
    bits = (w1.detach().view(torch.int16).int() - w2.detach().view(torch.int16).int()).abs()
    assert int(bits.max()) <= 1  # one ulp (no value here is near zero, where the sign bit would flip)
    diff = w1.detach().float() - w2.detach().float()
    assert abs(float(diff.mean())) <= 4 * float(diff.std()) / diff.numel() ** 0.5 + 1e-12
    for key in ("exp_avg", "state1"):  # the moments do not depend on the rounding
        if key in o1.state[w1]:
            assert torch.equal(o1.state[w1][key], o2.state[w2][key])


def _release_run(make, update, chunk, steps=5):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*SHAPE).bfloat16())
    v = torch.nn.Parameter(torch.randn(SHAPE[-1]))
    opt = GradientRelease(WriteBack16(make([w, v]), update, RoundingRNG(0), step_chunk=chunk))
    seen = _seen_shapes(opt.optimizer)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(8, SHAPE[0], generator=gen)
        loss = ((x @ w.float()) * v).square().mean()
        loss.backward()  # each parameter steps in its hook
        opt.step()
        opt.zero_grad()
    return w, v, opt, seen


@pytest.mark.parametrize("update", ["nearest", "kahan"])
@pytest.mark.parametrize("inner", ["adamw", "adamw8bit"])
def test_sliced_under_gradient_release(inner, update):
    w1, v1, o1, seen1 = _release_run(INNER[inner], update, 0)
    w2, v2, o2, seen2 = _release_run(INNER[inner], update, CHUNK)
    assert SHAPE in seen1 and SHAPE not in seen2 and (1088, 60) in seen2
    assert torch.equal(w1, w2) and torch.equal(v1, v2)
    _assert_same_state(o1.state[w1], o2.state[w2])
    assert len(o2.optimizer.optimizer.state) == 2


@pytest.mark.parametrize("inner", ["adamw", "adamw8bit"])
def test_checkpoint_holds_the_full_state_and_resumes_exactly(inner):
    make = INNER[inner]
    whole, _, whole_opt, _ = _run(make, "kahan", CHUNK, steps=5)

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*SHAPE).bfloat16())
    b = torch.nn.Parameter(torch.randn(SHAPE[-1]))
    opt = WriteBack16(make([w, b]), "kahan", RoundingRNG(0), step_chunk=CHUNK)
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(*SHAPE, generator=gen).bfloat16(), torch.randn(SHAPE[-1], generator=gen))
             for _ in range(5)]
    for gw, gb in grads[:3]:
        w.grad, b.grad = gw, gb
        opt.step()
    saved = opt.state_dict()
    assert sorted(saved["state"]) == [0, 1]  # the two parameters, nothing of a slice
    entry = saved["state"][0]
    entry = {**entry, **entry.get("__bnb_optimizer_quant_state__", {})}
    for key in ("exp_avg", "exp_avg_sq", "state1", "state2", KAHAN):
        if key in entry:
            assert entry[key].shape == SHAPE, key
    for key in ("absmax1", "absmax2"):
        if key in entry:
            assert entry[key].shape == (-(-SHAPE[0] * SHAPE[1] // BLOCK),)

    w2 = torch.nn.Parameter(w.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    opt2 = WriteBack16(make([w2, b2]), "kahan", RoundingRNG(0), step_chunk=CHUNK)
    opt2.load_state_dict(saved)
    for gw, gb in grads[3:]:
        w2.grad, b2.grad = gw, gb
        opt2.step()
    assert torch.equal(w2, whole)
    _assert_same_state(whole_opt.state[whole], opt2.state[w2])


def _allocations(step) -> list[int]:
    """Signed sizes of the CPU allocations and frees during ``step()``, in order (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        pytest.skip("this torch's profiler does not expose its memory events")
    events = [e for e in results.events() if e.name() == "[memory]"]
    return [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
@pytest.mark.parametrize("inner,per_element", [("adamw", 8 + 8 + 4), ("adamw8bit", 8 + 20)])
def test_sliced_step_allocates_one_slice_at_a_time(inner, per_element, update):
    full = SHAPE[0] * SHAPE[1] * 4  # bytes of an fp32 copy of the parameter
    for chunk in (0, CHUNK):
        _, _, opt, _ = _run(INNER[inner], update, chunk, steps=1)  # the state exists from here on
        w = opt.param_groups[0]["params"][0]
        w.grad = torch.randn(*SHAPE).bfloat16()
        sizes = _allocations(opt.step)
        alive = peak = 0
        for n in sizes:
            alive += n
            peak = max(peak, alive)
        if chunk == 0:  # the measurement sees the whole-parameter copies
            assert max(sizes) >= full
            continue
        assert max(sizes) < full / 3
        assert peak <= SLICE * per_element + 64 * 1024, peak / SLICE


@pytest.mark.parametrize("inner", list(INNER))
def test_rows_that_cannot_align_to_blocks_step_whole(inner):
    shape = (3, 100_003)
    w1, _, o1, seen1 = _run(INNER[inner], "kahan", 0, shape=shape, steps=2)
    w2, _, o2, seen2 = _run(INNER[inner], "kahan", CHUNK, shape=shape, steps=2)
    assert shape in seen2
    assert torch.equal(w1, w2)
    _assert_same_state(o1.state[w1], o2.state[w2])


def test_non_contiguous_parameter_steps_whole():
    torch.manual_seed(0)
    weight = torch.randn(SHAPE[1], SHAPE[0]).bfloat16().t()
    w1, _, o1, _ = _run(_adamw, "nearest", 0, weight=weight.clone())
    w2, _, o2, seen = _run(_adamw, "nearest", CHUNK, weight=weight.clone())
    assert SHAPE in seen and torch.equal(w1, w2)


def test_other_optimizers_and_32_bit_states_step_whole():
    w1, _, _, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "kahan", 0, steps=2)
    w2, _, _, seen = _run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "kahan", CHUNK, steps=2)
    assert SHAPE in seen and torch.equal(w1, w2)
    bnb = pytest.importorskip("bitsandbytes")

    def make(ps):  # below min_8bit_size: 32-bit state, which is stepped whole
        return bnb.optim.AdamW8bit(ps, lr=1e-2, min_8bit_size=10**6)

    w1, _, o1, _ = _run(make, "kahan", 0, steps=2)
    w2, _, o2, seen = _run(make, "kahan", CHUNK, steps=2)
    assert SHAPE in seen and o2.state[w2]["state1"].dtype == torch.float32
    assert torch.equal(w1, w2)
    _assert_same_state(o1.state[w1], o2.state[w2])


def test_bitsandbytes_override_reaches_the_slices():
    bnb = pytest.importorskip("bitsandbytes")
    mng = bnb.optim.GlobalOptimManager.get_instance()
    saved = dict(mng.pid2config)
    try:
        runs = []
        for chunk in (0, CHUNK):
            torch.manual_seed(0)
            w = torch.nn.Parameter(torch.randn(*SHAPE).bfloat16())
            mng.pid2config[id(w)] = {"lr": 0.05, "betas": (0.8, 0.99)}
            opt = WriteBack16(bnb.optim.AdamW8bit([w], lr=1e-3), "nearest", step_chunk=chunk)
            w.grad = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3)).bfloat16()
            opt.step()
            runs.append(w)
            del mng.pid2config[id(w)]
        assert torch.equal(*runs)
        assert set(mng.pid2config) == set(saved)  # the slices' entries are gone
    finally:
        mng.pid2config.clear()
        mng.pid2config.update(saved)


def test_config_option_reaches_the_wrapper_and_the_estimate():
    from hf_memkit.memory.estimate import estimate_memory
    from hf_memkit.precision.bf16.config import Bf16Config
    from hf_memkit.precision.bf16.technique import Bf16Technique

    assert Bf16Config().step_chunk_numel() == STEP_CHUNK_NUMEL
    t = Bf16Technique(Bf16Config(step_chunk_mib=0))
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    assert t.wrap_optimizer(torch.optim.SGD([p], lr=0.1), None, None).step_chunk == 0
    with pytest.raises(ValueError):
        Bf16Config(step_chunk_mib=-1)

    def buffers(chunk_mib):
        recipe = {"optimizer": {"adamw_8bit": {}}, "precision": {"bf16": {"step_chunk_mib": chunk_mib}}}
        cats = estimate_memory("tiny", recipe, batch_size=1, seq_len=8).categories()
        return cats["precision_buffers"]

    # tiny: a 512x64 embedding (32,768 elements); 1/16 MiB = 16,384 fp32 elements -> two slices of 256 rows;
    # bitsandbytes on CPU: fp32 weight + gradient (8 B) + the kernel's temporaries (20 B) per element
    assert buffers(0) == 32768 * 28
    assert buffers(1 / 16) == 16384 * 28
