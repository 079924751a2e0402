"""Training with 16-bit weights: the loss tracks the fp32 run, small updates survive stochastic rounding and
Kahan compensation (not round-to-nearest), checkpoints resume exactly, and the technique composes with LoRA,
gradient checkpointing and Cut Cross-Entropy."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_memkit import MemkitTrainer
from hf_memkit.precision.bf16.config import Bf16Config
from hf_memkit.precision.bf16.optimizer import KAHAN, WriteBack16, find_write_back
from hf_memkit.precision.bf16.technique import Bf16Technique
from tests.conftest import make_args

from .conftest import bf16_representable_


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def _train(path, dataset, out, recipe, steps=10, **kw):
    model = AutoModelForCausalLM.from_pretrained(path)
    bf16_representable_(model)  # the same starting point for the fp32 run and the 16-bit ones
    cb = _Losses()
    trainer = MemkitTrainer(model=model, args=make_args(out, max_steps=steps, learning_rate=1e-3, **kw),
                            train_dataset=dataset, recipe=recipe, callbacks=[cb])
    trainer.train()
    return cb.losses, trainer


def test_loss_tracks_the_fp32_run(tiny_path, tiny_dataset, tmp_path):
    ref, _ = _train(tiny_path, tiny_dataset, tmp_path / "fp32", {"optimizer": {"adamw": {}}})
    assert len(ref) == 10 and ref[-1] < ref[0] - 0.1
    for update in ("stochastic", "kahan"):
        got, trainer = _train(tiny_path, tiny_dataset, tmp_path / update,
                              {"optimizer": {"adamw": {}}, "precision": {"bf16": {"update": update}}})
        assert max(abs(a - b) for a, b in zip(got, ref)) < 0.01, (update, got, ref)
        assert isinstance(find_write_back(trainer.optimizer), WriteBack16)
        assert trainer.model.lm_head.weight.dtype == torch.bfloat16


def _updates(model, ids, update, lr=2e-5, steps=10):
    """Weight movement of the 16-bit Linear/Embedding weights after ``steps`` AdamW steps on one batch (fp32 run
    when ``update`` is None)."""
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    if update is not None:
        t = Bf16Technique(Bf16Config(update=update))
        t.patch_model(m)
        opt = t.wrap_optimizer(opt, m, None)
    names = [n for n, p in model.named_parameters() if n.endswith("proj.weight") or "embed" in n or "lm_head" in n]
    for _ in range(steps):
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    params, start = dict(m.named_parameters()), dict(model.named_parameters())
    moved = []
    for n in names:
        value = params[n].detach().float()
        if update == "kahan":
            value = value + opt.state[params[n]][KAHAN].float()
        moved.append((value - start[n].detach()).flatten())
    return torch.cat(moved)


def test_updates_below_half_an_ulp_survive_stochastic_rounding_and_kahan_not_nearest(tiny_model):
    bf16_representable_(tiny_model)
    ids = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = _updates(tiny_model, ids, None)
    cos = {}
    for update in ("stochastic", "kahan", "nearest"):
        d = _updates(tiny_model, ids, update)
        cos[update] = (float(torch.nn.functional.cosine_similarity(d, ref, dim=0)), float((d != 0).float().mean()))
    assert cos["kahan"][0] > 0.99  # weight + compensation follows the fp32 trajectory
    assert cos["stochastic"][0] > 0.75  # unbiased, with rounding noise
    assert cos["nearest"][0] < cos["stochastic"][0] - 0.15  # most updates below half an ulp are lost
    assert cos["nearest"][1] < 0.5 * cos["kahan"][1], cos


def test_kahan_buffers_are_checkpointed_and_resume_exactly(tiny_path, tiny_dataset, tmp_path):
    recipe = {"optimizer": {"adamw": {}}, "precision": {"bf16": {"update": "kahan"}}}
    args = make_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    first = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args,
                          train_dataset=tiny_dataset, recipe=recipe)
    first.train()
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    kahan = [s[KAHAN] for s in saved["state"].values() if KAHAN in s]
    assert kahan and all(k.dtype == torch.bfloat16 for k in kahan) and any(bool(k.abs().sum()) for k in kahan)
    done = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    comp = {n: first.optimizer.state[p][KAHAN].clone() for n, p in first.model.named_parameters()
            if KAHAN in first.optimizer.state[p]}

    resumed = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args,
                            train_dataset=tiny_dataset, recipe=recipe)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, done[n]), n
        if n in comp:
            assert torch.equal(resumed.optimizer.state[p][KAHAN], comp[n]), n
            assert resumed.optimizer.state[p]["exp_avg"].dtype == torch.float32


def test_full_fine_tune_recipe_with_cce_and_checkpointing(tiny_path, tiny_dataset, tmp_path):
    losses, trainer = _train(tiny_path, tiny_dataset, tmp_path, "bf16_full", steps=4)
    assert len(losses) == 4 and all(map(lambda x: x == x, losses))
    model = trainer.model
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert type(find_write_back(trainer.optimizer).optimizer).__name__ == "AdamW8bit"
    runtime = trainer.memkit
    assert {t.name for t in runtime.techniques} == {"bf16", "adamw_8bit", "cce"}
    assert runtime.unpatch().lm_head.weight.dtype == torch.float32


def test_lora_with_checkpointing_and_cce_on_a_bf16_base(tiny_path, tiny_dataset, tmp_path):
    recipe = {"adapter": {"lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}, "optimizer": {"adamw_8bit": {}},
              "loss": {"cce": {}}, "precision": {"bf16": {}}, "training_args": {"gradient_checkpointing": True}}
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16)
    trainer = MemkitTrainer(model=model, args=make_args(tmp_path, max_steps=3), train_dataset=tiny_dataset,
                            recipe=recipe)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = trainer.train()
    assert out.training_loss == out.training_loss
    params = dict(trainer.model.named_parameters())
    assert before and all(params[n].dtype == torch.float32 for n in before)  # adapters train in fp32
    assert any(not torch.equal(params[n], before[n]) for n in before)
    base = [p for n, p in params.items() if n.endswith("base_layer.weight")]
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)


def test_describe_names_what_is_stored_and_the_update(tiny_model):
    t = Bf16Technique(Bf16Config(update="kahan"))
    t.patch_model(tiny_model)
    line = t.describe(tiny_model)
    assert "16 weights" in line and "bfloat16" in line and "update=kahan" in line and "Kahan buffers" in line


def test_gradient_release_drives_the_16_bit_write_back(tiny_path, tiny_dataset, tmp_path):
    # gradient release wraps last and steps one parameter at a time inside backward, through WriteBack16; with
    # a deterministic write back and no clipping it gives the weights of the plain run exactly
    from hf_memkit.precision.bf16.optimizer import find_write_back as inner_wrapper

    runs = {}
    for release in (False, True):
        recipe = {"precision": {"bf16": {"update": "kahan"}}, "loss": {"cce": {}},
                  "optimizer": {"adamw_8bit": {"gradient_release": release}}}
        _, trainer = _train(tiny_path, tiny_dataset, tmp_path / str(release), recipe, steps=3, max_grad_norm=0.0)
        runs[release] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        if release:
            outer = trainer.optimizer.optimizer
            assert type(outer).__name__ == "GradientRelease" and inner_wrapper(outer) is not None
    for n, p in runs[False].items():
        assert torch.equal(p, runs[True][n]), n
