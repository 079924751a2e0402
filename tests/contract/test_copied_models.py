"""Mesa (and WTA-CRS) + a technique that copies the model (AST and CAST distil from a dense teacher made with
``copy.deepcopy``). Mesa's forwards used to be closures over the student's modules, so the deep-copied teacher
kept computing with the student's (masked, training) weights: on the tiny Llama its logits differed from the dense
original's by up to 0.08 at step 0. Mesa and WTA-CRS now bind their forwards as methods with their state on the
module, and a deep copy rebinds them to the copy."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_args


@pytest.mark.parametrize("activations,technique", [("mesa", "ast"), ("mesa", "cast"), ("wta_crs", "ast")])
def test_the_teacher_is_the_dense_original_and_the_student_keeps_its_saving(tiny_path, tiny_dataset, tmp_path,
                                                                           activations, technique):
    from transformers import AutoModelForCausalLM

    from hf_memkit import MemkitTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager")
    dense = copy.deepcopy(model).eval()
    recipe = {"memkit": 1, "activations": [{activations: {}}], "optimizer": {technique: {}}}
    trainer = MemkitTrainer(model=model, args=make_args(tmp_path, max_steps=3, learning_rate=1e-2),
                            train_dataset=tiny_dataset, recipe=recipe)
    teacher = trainer.memkit.of_slot("optimizer").teacher
    assert teacher is not None
    ids = torch.randint(1, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        torch.testing.assert_close(teacher(input_ids=ids).logits, want, rtol=0, atol=1e-6)

    # the student (Mesa inside the sparse forward) saves 8-bit tensors for backward
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.model(input_ids=ids, labels=ids).loss.backward()
    trainer.model.zero_grad()
    if activations == "mesa":
        assert torch.int8 in saved or torch.uint8 in saved

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # the student moved
    with torch.no_grad():  # the teacher did not
        torch.testing.assert_close(teacher(input_ids=ids).logits, want, rtol=0, atol=1e-6)


def _float_activations_saved(model, ids):
    """Shapes of the floating-point tensors with a (batch, seq) prefix that autograd saves in one step."""
    shapes = []

    def pack(t):
        if t.is_floating_point() and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(ids.shape):
            shapes.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()
    return sorted(shapes)


@pytest.mark.parametrize("technique", ["ast", "cast"])
def test_mesa_keeps_the_sparse_linears_inputs_in_8_bits(tiny_path, tiny_dataset, tmp_path, technique):
    """Regression: AST/CAST used to replace the Linear forwards Mesa had installed, so inside the pair every
    Linear saved its fp32 input again. Through the patching layer Mesa's kernel computes with the sparse weight
    view: the pair saves exactly the floating-point activations Mesa alone saves."""
    from transformers import AutoModelForCausalLM

    from hf_memkit import MemkitTrainer

    ids = torch.randint(1, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    saved = {}
    for name, recipe in (("mesa", {"memkit": 1, "activations": [{"mesa": {}}]}),
                         ("pair", {"memkit": 1, "activations": [{"mesa": {}}], "optimizer": {technique: {}}})):
        model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager")
        trainer = MemkitTrainer(model=model, args=make_args(tmp_path / name, max_steps=1),
                                train_dataset=tiny_dataset, recipe=recipe)
        saved[name] = _float_activations_saved(trainer.model, ids)
    assert saved["pair"] == saved["mesa"]
