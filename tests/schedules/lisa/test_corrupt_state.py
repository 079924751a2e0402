"""A LISA checkpoint whose memkit state was corrupted does not resume: a negative or out-of-range layer index, a
wrong type, a missing key or a damaged tensors file each stop with a CheckpointError naming the key and value (a
negative index would otherwise train a different layer, a string an AttributeError)."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_memkit import CheckpointError, MemkitTrainer
from tests.conftest import make_args

RECIPE = {"schedule": [{"lisa": {"active_layers": 1}}]}


@pytest.fixture(scope="module")
def lisa_checkpoint(tmp_path_factory, tiny_path, tiny_dataset):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lisa_ckpt")
    MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path),
                  args=make_args(out, max_steps=1, save_strategy="steps", save_steps=1),
                  train_dataset=tiny_dataset, recipe=RECIPE).train()
    return out / "checkpoint-1"


def resume(tiny_path, dataset, ckpt):
    from transformers import AutoModelForCausalLM

    t = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path),
                      args=make_args(ckpt.parent, max_steps=2, save_strategy="no"), train_dataset=dataset,
                      recipe=RECIPE)
    return t.train(resume_from_checkpoint=str(ckpt))


def _set(key, value):
    def change(entry):
        if value is KeyError:
            del entry[key]
        else:
            entry[key] = value
    return change


@pytest.mark.parametrize("change, match", [
    (_set("active_layers", [-1]), r"techniques\.lisa\.active_layers = \[-1\] holds -1, not an integer in \[0, 2\)"),
    (_set("active_layers", [7]), r"active_layers = \[7\] holds 7, not an integer in \[0, 2\)"),
    (_set("active_layers", [0, 1]), r"has 2 layers but this recipe trains active_layers=1"),
    (_set("active_layers", "0"), r"active_layers = '0' is not a list of integers"),
    (_set("drawn_at_step", 1.5), r"drawn_at_step = 1.5 is not an integer"),
    (_set("drawn_at_step", KeyError), r"techniques\.lisa has no 'drawn_at_step' entry"),
    (_set("sampler_state", KeyError), r"has no 'sampler_state' entry"),
    (_set("bogus", 1), r"techniques\.lisa\.bogus = 1 is a key this run does not have"),
], ids=["negative", "out-of-range", "too-many", "string", "float", "missing-key", "missing-tensor", "unknown"])
def test_corrupt_lisa_state_is_a_checkpoint_error(lisa_checkpoint, tmp_path, tiny_path, tiny_dataset, change,
                                                  match):
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(lisa_checkpoint, ckpt)
    path = ckpt / "memkit_state" / "state.json"
    meta = json.loads(path.read_text())
    change(meta["techniques"]["lisa"])
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match) as info:
        resume(tiny_path, tiny_dataset, ckpt)
    assert "fix:" in str(info.value) and str(ckpt) in str(info.value)


def test_a_damaged_tensors_file_is_a_checkpoint_error(lisa_checkpoint, tmp_path, tiny_path, tiny_dataset):
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(lisa_checkpoint, ckpt)
    tensors = ckpt / "memkit_state" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:40])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="unreadable"):
        resume(tiny_path, tiny_dataset, ckpt)


def test_an_intact_checkpoint_resumes(lisa_checkpoint, tmp_path, tiny_path, tiny_dataset):
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(lisa_checkpoint, ckpt)
    assert resume(tiny_path, tiny_dataset, ckpt).global_step == 2
