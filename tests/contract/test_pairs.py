"""The composition matrix: every pair of registered techniques that the recipe loader accepts, on the tiny Llama.

Per pair, two Trainer runs: four uninterrupted steps (saving at step 2, tensor accounting on), then a resume from
step 2 to step 4. Checked: finite loss; something trained; the resumed run ends where the uninterrupted one did;
the estimate is within 15% of tensor accounting per category; ``unpatch`` gives back the model object with its
structure (adapters: bit for bit); each technique's defining check still holds inside the pair
(:data:`INVARIANTS`: Mesa saves 8-bit, AST/CAST's teacher is the dense original, adapters and LISA leave frozen
weights bit for bit, LoRC's base stays quantized). Refused pairs must carry a reason
(``test_refused_pairs_say_why``)."""

from __future__ import annotations

import copy

import pytest
import torch

from transformers import TrainerCallback

from hf_memkit import MemkitTrainer
from tests.conftest import make_args
from tests.contract.pairs import classified, for_matrix

ACCEPTED, REFUSED = classified()
IDS = torch.randint(1, 500, (2, 16), generator=torch.Generator().manual_seed(0))


# each technique's defining property, checked inside every pair it is in ---------------------------------------
def _mesa_saves_8_bit(trainer, technique, dense):
    """Mesa's quantizer packs the tensors it saves into 8 bits inside the pair (observed at the quantizer, so
    that another saved-tensor hook — offload's — cannot hide it)."""
    from hf_memkit.activations.mesa.quantizer import RangeTracker

    packed, pack = [], RangeTracker.pack

    def spy(self, x):
        out = pack(self, x)
        packed.append(out.tensors()[0].dtype)
        return out

    model = trainer.model
    model.train()
    RangeTracker.pack = spy
    try:
        model(input_ids=IDS, labels=IDS).loss.backward()
    finally:
        RangeTracker.pack = pack
    model.zero_grad(set_to_none=True)
    assert packed and set(packed) <= {torch.int8, torch.uint8}, f"Mesa packed {set(packed)} inside the pair"


def _teacher_is_the_dense_original(trainer, technique, dense):
    if technique.teacher is None:
        return
    with torch.no_grad():
        torch.testing.assert_close(technique.teacher(input_ids=IDS).logits, dense(input_ids=IDS).logits,
                                   rtol=0, atol=1e-6)


def _adapter_base_untouched(trainer, technique, dense):
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    want = dict(dense.named_parameters())
    frozen = [(n, p) for n, p in base.named_parameters() if not p.requires_grad and n in want
              and p.dtype == want[n].dtype and p.shape == want[n].shape]
    assert frozen, "the adapter left no frozen base parameter to compare"
    for n, p in frozen:
        assert torch.equal(p, want[n]), f"frozen base parameter {n} moved"


def _dense_name(name):
    """The dense model's name for a parameter of a (possibly PEFT-wrapped) model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _lisa_frozen_layers_do_not_move(trainer, technique, dense):
    """The layers LISA did not activate end the run bit for bit as they started (the four steps fall inside
    one interval, so the first draw is the only one)."""
    from hf_memkit.integrations.anatomy import find_decoder_layers

    assert technique.config.interval > 4, "the check needs one draw per run"
    layers = find_decoder_layers(trainer.model)
    if technique.config.active_layers >= len(layers):
        return  # a bundled recipe's setting on the 2-layer model: nothing is frozen (pairs run with MATRIX_CONFIG)
    frozen = set(range(len(layers))) - set(technique.active_layers or [])
    assert frozen, "LISA activated every layer"
    want = dict(dense.named_parameters())
    compared = 0
    # the weights as the last step left them: at the end of training a 2:4 technique projects every Linear, frozen
    # ones too, to its mask (CAST also folds its scales in), which is that technique's output, not training
    for n, p in trainer.matrix_last_step.items():
        d = want.get(_dense_name(n))
        if layers.layer_of.get(n) in frozen and d is not None and d.shape == p.shape:
            assert torch.equal(p.to(d.dtype), d), f"{n} is in a frozen LISA layer and moved"
            compared += 1
    assert compared, "no parameter of a frozen LISA layer was compared"


def _lorc_base_stays_quantized(trainer, technique, dense):
    """Every LoRC layer's base is still only its integer codes (the dense storage released), and the codes
    still are the RTN grid of the original weight: |Ŵ - W| within half a step per group."""
    from hf_memkit.adapters.lorc.layers import LorcLinear
    from hf_memkit.compress.grid import dequantize, expand_groups

    want = dict(dense.named_parameters())
    layers = [(n, m) for n, m in trainer.model.named_modules() if isinstance(m, LorcLinear)]
    assert layers, "no LoRC layer in the pair"
    for n, m in layers:
        assert m.base_layer.weight.numel() == 0, f"{n}: a dense base weight came back"
        assert m.lorc_codes.dtype == torch.uint8 and int(m.lorc_codes.max()) <= m.spec.maxq, n
        if technique.config.quantizer == "rtn":
            w = want[_dense_name(n) + ".weight"]
            step = expand_groups(m.lorc_scale.float(), w.shape[1])
            err = (dequantize(m.lorc_codes, m.lorc_scale, m.lorc_zero).float() - w).abs()
            assert bool((err <= 0.52 * step + 1e-6).all()), f"{n}: the base left its quantization grid"


INVARIANTS = {
    "mesa": _mesa_saves_8_bit,
    "ast": _teacher_is_the_dense_original,
    "cast": _teacher_is_the_dense_original,
    "lora": _adapter_base_untouched,
    "mixlora": _adapter_base_untouched,
    "lisa": _lisa_frozen_layers_do_not_move,
    "adapter.lorc": _lorc_base_stays_quantized,
}


@pytest.fixture(scope="module")
def base_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path)


def _structure(model):
    return ({n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()}, list(model.state_dict()))


#: pairs whose estimate is known to miss tensor accounting by more than 15%, with why (everything else is still
#: checked for them, and the test fails once the estimate is right, so the list cannot go stale)
ESTIMATE_GAPS = {
    "adapter.mixlora+activations.offload": "MixLoRA's per-expert token slices are smaller than offload's min_bytes "
    "(1 KiB) on the tiny model and stay on the device; their sizes follow the routing, which the estimate does not "
    "model (45 KiB measured, 2 KiB estimated)",
}


class _SaveOnlyAt(TrainerCallback):
    """One checkpoint, at ``step`` (the end-of-run save would only cost time here); the parameters as the last
    step left them go to ``trainer.matrix_last_step``."""

    def __init__(self, step: int):
        self.step = step
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        control.should_save = state.global_step == self.step
        if state.global_step == state.max_steps and self.trainer is not None:  # before the techniques' finalize
            self.trainer.matrix_last_step = {n: p.detach().clone() for n, p in model.named_parameters()}


def check_combination(recipe, base_model, dataset, tmp_path, *, estimate_gap=None, estimator=True):
    """Train, check, resume and undo one combination (see the module docstring)."""
    from hf_memkit import estimate_memory, load_recipe
    from hf_memkit.memory.profiler import MemoryReportCallback
    from hf_memkit.memory.report import MEASURED

    recipe = load_recipe(recipe)
    base_model = copy.deepcopy(base_model)
    for t in recipe.build():
        if t.slot == "precision":  # 16-bit storage is exact for the values it holds (see test_every_technique)
            with torch.no_grad():
                for p in base_model.parameters():
                    p.copy_(p.to(t.load_dtype()).to(p.dtype))
    model = copy.deepcopy(base_model)
    dense = copy.deepcopy(base_model).eval()
    before = _structure(model)
    report = MemoryReportCallback(profile_step=None, profile_eval=False, sample=False)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    saver = _SaveOnlyAt(2)
    first = MemkitTrainer(model=model, args=args, train_dataset=dataset, recipe=recipe, callbacks=[report, saver])
    saver.trainer = first
    trainable = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    out = first.train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(p, trainable[n]) for n, p in first.model.named_parameters() if n in trainable), \
        "four steps changed no trainable parameter"
    for t in first.memkit.techniques:
        check = INVARIANTS.get(f"{t.slot}.{t.name}", INVARIANTS.get(t.name))
        if check is not None:
            check(first, t, dense)

    if not estimator:  # a family the estimator does not model: it says so instead of guessing
        from hf_memkit.errors import IncompatibleModelError

        with pytest.raises(IncompatibleModelError, match="models Llama-family decoders"):
            estimate_memory(model.config, recipe, batch_size=4, seq_len=32)
        estimate_gap = "not modelled"
    est = estimate_memory(model.config, recipe, batch_size=4, seq_len=32).to_dict() if estimator else {}
    measured = report.report()
    off = [cat for cat in MEASURED if est.get(cat, 0) != pytest.approx(measured[cat], rel=0.15, abs=4096)]
    if estimate_gap is None:
        assert not off, {c: (est.get(c, 0), measured[c]) for c in off}
    elif estimator:  # a known gap stays listed only while it is real
        assert off, f"the estimate gap '{estimate_gap}' is closed: remove it from ESTIMATE_GAPS"

    final = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    resumed = MemkitTrainer(model=copy.deepcopy(base_model), args=make_args(tmp_path, max_steps=4),
                            train_dataset=dataset, recipe=recipe)
    assert resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2")).global_step == 4
    for n, p in resumed.model.named_parameters():
        if n in final:
            torch.testing.assert_close(p, final[n], rtol=1e-5, atol=1e-6, msg=n)

    restored = first.memkit.unpatch()
    assert restored is model
    assert _structure(restored) == before
    if recipe.slot("adapter"):
        for n, p in restored.state_dict().items():
            assert torch.equal(p, dense.state_dict()[n]), n


@pytest.mark.parametrize("recipe", [r for _, r in ACCEPTED], ids=[k for k, _ in ACCEPTED])
def test_pair(recipe, base_model, tiny_dataset, tmp_path, request):
    key = request.node.callspec.id
    check_combination(recipe, base_model, tiny_dataset, tmp_path, estimate_gap=ESTIMATE_GAPS.get(key))


def test_refused_pairs_say_why():
    assert len(ACCEPTED) > 200 and REFUSED
    for k, reason in REFUSED:
        assert len(reason) > 20, (k, reason)


# triples: every bundled recipe, and a fixed list of random three-technique recipes ----------------------------
def _bundled():
    from hf_memkit.data.recipes import recipes_dir

    return sorted(recipes_dir().glob("*.yaml"))


#: bundled recipes whose estimate misses tensor accounting on the tiny model, with why (checked like ESTIMATE_GAPS)
BUNDLED_ESTIMATE_GAPS = {
    "bf16_full": "gradient release: the estimate keeps the largest single gradient (alive inside backward, 64 KiB "
                 "here); tensor accounting samples between steps, when no gradient is alive",
}


@pytest.mark.parametrize("path", _bundled(), ids=lambda p: p.stem)
def test_bundled_recipe(path, base_model, tiny_dataset, tmp_path):
    from hf_memkit import load_recipe

    # the export is not part of the composition (tests/integrations/test_export_*): the bundled grids (group 128)
    # do not fit the tiny model's 64-wide layers, which the compressed-tensors export rightly refuses
    recipe = load_recipe(str(path)).to_dict()
    recipe.pop("export", None)
    check_combination(recipe, base_model, tiny_dataset, tmp_path, estimate_gap=BUNDLED_ESTIMATE_GAPS.get(path.stem))


def _three(entries):
    from hf_memkit.docs import _accepts, _recipe

    for order in (entries, entries[::-1], (entries[1], entries[0], entries[2]), (entries[0], entries[2], entries[1])):
        d = _recipe(order)
        if d is not None and _accepts(d):
            return for_matrix(d)
    return None


def test_random_three_technique_recipes(base_model, tiny_dataset, tmp_path_factory):
    """Hypothesis draws three techniques; the recipes the loader accepts are trained and checked like a pair.
    Derandomized: the same fixed list every run (a failure names its recipe)."""
    from hypothesis import HealthCheck, Phase, assume, given, settings, strategies as st

    from hf_memkit import registry

    entries = [e for e in registry.entries() if e.origin == "builtin"]
    tried = []

    @settings(derandomize=True, max_examples=10, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(entries), min_size=3, max_size=3, unique_by=lambda e: (e.slot, e.name)))
    def run(three):
        recipe = _three(tuple(three))
        assume(recipe is not None)
        tried.append(recipe)
        check_combination(recipe, base_model, tiny_dataset, tmp_path_factory.mktemp("triple"))

    run()
    assert len(tried) >= 5, tried
