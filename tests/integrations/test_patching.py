"""The patching layer (hf_memkit/integrations/patching.py): owners, declared composition, reverse-order undo,
deep copies, and the recipe loader's refusal of two techniques that would patch the same part."""

from __future__ import annotations

import copy
import inspect
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from hf_memkit.integrations import patching
from hf_memkit.integrations.patching import CompositionError, Patches


def _lin(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4)


def _double_kernel(m, x, w, b):
    return 2 * F.linear(x, w, b)


def _half_view(m):
    return m.weight * 0.5


def _half_fused(m, x):
    return F.linear(x, _half_view(m), m.bias)


def test_remove_restores_the_module_exactly_with_and_without_an_earlier_instance_forward():
    lin = _lin()
    x = torch.randn(3, 8)
    want = lin(x)
    p = Patches("a", lin)
    p.linear_kernel(lin, _double_kernel)
    torch.testing.assert_close(lin(x), 2 * want)
    p.remove()
    assert "forward" not in vars(lin) and patching.PARTS_ATTR not in vars(lin)
    torch.testing.assert_close(lin(x), want)

    earlier = lin.forward.__func__.__get__(lin)  # an instance forward someone else left (a hub kernel, say)
    lin.forward = earlier
    p = Patches("a", lin)
    p.forward(lin, lambda m, x: patching.base_forward(m)(x) + 1)
    torch.testing.assert_close(lin(x), want + 1)
    p.remove()
    assert vars(lin)["forward"] is earlier


def test_kernel_and_view_compose_kernel_computing_with_the_view_weight():
    lin = _lin()
    x = torch.randn(3, 8, requires_grad=True)
    view, kernel = Patches("view", lin), Patches("kernel", lin)
    view.linear_view(lin, weight=_half_view, fused=_half_fused, extra=lambda m, x: x.sum(-1, keepdim=True))
    torch.testing.assert_close(lin(x), _half_fused(lin, x))  # no kernel: the view's own forward
    kernel.linear_kernel(lin, _double_kernel)
    torch.testing.assert_close(lin(x), 2 * _half_fused(lin, x) + x.sum(-1, keepdim=True))
    kernel.remove()
    view.remove()
    assert "forward" not in vars(lin)


def test_a_second_owner_of_the_same_part_is_refused_naming_both_and_the_module():
    model = torch.nn.Sequential(_lin())
    Patches("mesa", model).linear_kernel(model[0], _double_kernel)
    with pytest.raises(CompositionError) as err:
        Patches("wta_crs", model).linear_kernel(model[0], _double_kernel)
    msg = str(err.value)
    assert "'wta_crs'" in msg and "'mesa'" in msg and "'0'" in msg and "Fix:" in msg
    with pytest.raises(CompositionError):  # a whole forward excludes every part
        Patches("sparse_update", model).forward(model[0], lambda m, x: x)


def test_patches_come_off_in_reverse_order_only():
    lin = _lin()
    first, second = Patches("first", lin), Patches("second", lin)
    first.linear_view(lin, weight=_half_view, fused=_half_fused)
    second.linear_kernel(lin, _double_kernel)
    patching.unclaim(lin, "linear.kernel", "second")
    with pytest.raises(RuntimeError, match="reverse order"):
        second.remove()  # its part is already gone: a stale handle says so instead of removing another's


def test_replacing_a_patched_module_is_refused():
    model = torch.nn.Sequential(_lin())
    Patches("mesa", model).linear_kernel(model[0], _double_kernel)
    with pytest.raises(CompositionError, match="'sst' would replace module"):
        Patches("sst", model).replace_module(model, "0", torch.nn.Identity())
    assert isinstance(model[0], torch.nn.Linear)



def test_a_module_another_technique_put_in_cannot_be_swapped_out_and_remove_leaves_no_mark():
    model = torch.nn.Sequential(_lin())
    original = model[0]
    quant = Patches("e2e_qp", model)
    quant.replace_module(model, "0", _lin(1))
    assert patching.owners(model) == {"0": {"module": "e2e_qp"}}
    with pytest.raises(CompositionError, match="'sst' would replace module '0'.*which 'e2e_qp' put there"):
        Patches("sst", model).replace_module(model, "0", torch.nn.Identity())
    quant.remove()
    assert model[0] is original and patching.owners(model) == {} and patching.put_by(original) is None
    with pytest.raises(RuntimeError, match="put there by the model itself, not sst"):
        patching.unswap_module(model, "0", _lin(), "sst")


def test_peft_adapter_wrappers_belong_to_the_adapter_until_it_is_removed(tiny_model):
    """PEFT replaces the targeted Linears itself; the wiring records the adapter as their owner, so a later
    technique that would swap a wrapper out (its adapter would silently stop training) is refused."""
    from peft import LoraConfig

    from hf_memkit.integrations.peft_utils import wrap_with_peft

    handle = wrap_with_peft(tiny_model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
                            "adapter.lora")
    wrapped = {n: o for n, o in patching.owners(handle.model).items()}
    assert wrapped and all(o == {"module": "adapter.lora"} and n.endswith("q_proj") for n, o in wrapped.items())
    attn = handle.model.base_model.model.model.layers[0].self_attn
    with pytest.raises(CompositionError, match="'sst' would replace module 'q_proj'.*'adapter.lora' put there"):
        swap = Patches("sst", handle.model)
        swap.replace_module(attn, "q_proj", torch.nn.Identity())
    base = handle.remove()
    assert patching.owners(base) == {} and type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear

def test_a_deep_copy_computes_with_its_own_weights_and_an_unpatched_copy_with_none_of_the_patches():
    model = torch.nn.Sequential(_lin())
    Patches("kernel", model).linear_kernel(model[0], _double_kernel)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model[0].weight.zero_()  # the original changes; the copy must not follow
    x = torch.randn(2, 8)
    torch.testing.assert_close(twin(x), 2 * F.linear(x, twin[0].weight, twin[0].bias))
    plain = patching.unpatched_copy(twin)
    assert patching.owners(plain) == {} and patching.owners(twin) == {"0": {"linear.kernel": "kernel"}}
    torch.testing.assert_close(plain(x), F.linear(x, twin[0].weight, twin[0].bias))


def test_the_patched_forward_keeps_the_model_signature(tiny_model):
    """The Trainer picks dataset columns from ``model.forward``'s signature."""
    p = Patches("cce", tiny_model)
    p.forward(tiny_model, lambda m, *a, **k: patching.base_forward(m)(*a, **k))
    assert "input_ids" in inspect.signature(tiny_model.forward).parameters
    p.remove()


def test_suspended_runs_the_class_forward_and_puts_the_patch_back():
    lin = _lin()
    Patches("k", lin).linear_kernel(lin, _double_kernel)
    x = torch.randn(1, 8)
    with patching.suspended([lin]):
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(lin(x), 2 * F.linear(x, lin.weight, lin.bias))


# the recipe loader ------------------------------------------------------------------------------------------------
def test_a_recipe_whose_techniques_patch_the_same_part_is_refused_when_it_loads():
    from hf_memkit import load_recipe, registry
    from hf_memkit.errors import RecipeError
    from hf_memkit.technique import Technique, TechniqueConfig

    class KernelPlugin(Technique):
        name: ClassVar[str] = "kernel_plugin"
        slot: ClassVar[str] = "activations"
        config_cls = TechniqueConfig
        patches: ClassVar[dict[str, str]] = {"linear.kernel": "every nn.Linear (a plugin's own saving)"}

    registry.register_technique(KernelPlugin, origin="user")
    try:
        with pytest.raises(RecipeError) as err:
            load_recipe({"memkit": 1, "activations": [{"mesa": {}}, {"kernel_plugin": {}}]})
        msg = str(err.value)
        assert "'mesa' and 'kernel_plugin'" in msg and "matmul kernel of nn.Linear" in msg
        assert "remove one of 'mesa' and 'kernel_plugin'" in msg
        # a part that composes (a weight view under Mesa's kernel) loads
        KernelPlugin.patches = {"linear.view": "every nn.Linear"}
        load_recipe({"memkit": 1, "activations": [{"mesa": {}}, {"kernel_plugin": {}}]})
    finally:
        registry.unregister_technique("kernel_plugin", "activations")


def test_builtin_overlaps_are_declared_conflicts_or_compositions():
    """No built-in pair reaches the generic refusal: each overlapping pair says why it conflicts, or how it
    composes."""
    from hf_memkit import registry

    entries = registry.entries()
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            ca, cb = a.technique_cls, b.technique_cls
            if a.slot == b.slot and not registry.SLOTS[a.slot]:
                continue  # never in one recipe
            if not patching.overlap(ca.patches, cb.patches):
                continue
            declared = (b.name in ca.conflicts or a.name in cb.conflicts or f"slot:{b.slot}" in ca.conflicts
                        or f"slot:{a.slot}" in cb.conflicts or b.name in ca.composes or a.name in cb.composes)
            assert declared, (a.name, b.name)


def test_sparse_update_with_2_4_sparse_training_is_refused():
    """Regression: accepted before, and AST's forward replaced sparse update's, so the trained column slice never
    reached the output."""
    from hf_memkit import load_recipe
    from hf_memkit.errors import RecipeError

    for opt in ("ast", "cast"):
        with pytest.raises(RecipeError, match=f"'sparse_update' cannot be combined with '{opt}'"):
            load_recipe({"memkit": 1, "schedule": [{"sparse_update": {}}], "optimizer": {opt: {}}})


def test_e2e_qp_before_its_quantizer_is_refused_with_the_order_fix():
    """Regression: accepted before; at the first train step e2e_qp then said 'gptq left no quantized Linear layer
    to train; check its skip_modules' (gptq had not run yet)."""
    from hf_memkit import load_recipe
    from hf_memkit.errors import RecipeError

    with pytest.raises(RecipeError, match="gptq must come before it") as err:
        load_recipe({"memkit": 1, "compress": [{"e2e_qp": {}}, {"gptq": {}}]})
    assert "list gptq before e2e_qp" in str(err.value)
    load_recipe({"memkit": 1, "compress": [{"gptq": {}}, {"e2e_qp": {}}]})


def test_stand_ins_replace_modules_for_a_block_and_put_them_back_patched_even_on_error():
    model = torch.nn.Sequential(_lin(), _lin(1))
    Patches("mesa", model).linear_kernel(model[0], _double_kernel)
    x = torch.randn(2, 8)
    patched = model[0](x)
    first = model[0]
    with patching.stand_ins(model, {"0": torch.nn.Identity()}):
        assert isinstance(model[0], torch.nn.Identity)
    assert model[0] is first and patching.owners(model) == {"0": {"linear.kernel": "mesa"}}
    torch.testing.assert_close(model[0](x), patched)
    with pytest.raises(ZeroDivisionError):
        with patching.stand_ins(model, {"0": torch.nn.Identity(), "1": torch.nn.Identity()}):
            1 / 0
    assert model[0] is first and isinstance(model[1], torch.nn.Linear)
