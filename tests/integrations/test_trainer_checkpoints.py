"""The save and resume paths of the Trainer wiring: staged checkpoints, rotation after the technique state,
resume_from_checkpoint=True skipping incomplete checkpoints, and the structure of memkit_state/state.json.
(Kills at every phase of a save: test_trainer_save_faults.py.)"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers.trainer_utils import get_last_checkpoint

from hf_memkit import CheckpointError, MemkitTrainer
from tests.conftest import make_args
from tests.integrations.test_trainer import test_techniques  # noqa: F401 (fixture)

RECIPE = {"schedule": [{"counting_schedule": {}}]}


def trainer(tiny_path, dataset, out, recipe=RECIPE, **kw):
    from transformers import AutoModelForCausalLM

    args = make_args(out, save_strategy="steps", save_steps=1, **kw)
    return MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args, train_dataset=dataset,
                         recipe=recipe)


def test_rotation_runs_after_the_state_and_leaves_no_staging(test_techniques, tiny_path, tiny_dataset, tmp_path):
    trainer(tiny_path, tiny_dataset, tmp_path, max_steps=3, save_total_limit=2).train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-2", "checkpoint-3"]
    assert not [n for n in names if n.startswith(".")], names
    for n in ("checkpoint-2", "checkpoint-3"):
        assert (tmp_path / n / "memkit_state" / "state.json").is_file()
        assert (tmp_path / n / "trainer_state.json").is_file()


def test_resume_true_skips_an_incomplete_checkpoint(test_techniques, tiny_path, tiny_dataset, tmp_path, caplog):
    trainer(tiny_path, tiny_dataset, tmp_path, max_steps=2).train()
    # what an interrupted save of an older version left: the Trainer's files, no technique state
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-5")
    shutil.rmtree(tmp_path / "checkpoint-5" / "memkit_state")
    # a stock transformers JIT save that never finished
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / "checkpoint-is-incomplete.txt").write_text("in progress")
    (tmp_path / ".checkpoint-7.tmp-memkit").mkdir()  # a staging leftover
    resumed = trainer(tiny_path, tiny_dataset, tmp_path, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="hf_memkit"):
        out = resumed.train(resume_from_checkpoint=True)
    assert out.global_step == 3
    assert resumed.memkit.of_slot("schedule").steps == 3  # 2 restored from checkpoint-2 + 1
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("checkpoint-6" in m and "incomplete" in m for m in skipped), skipped
    assert any("checkpoint-5" in m and "memkit_state" in m for m in skipped), skipped
    assert not (tmp_path / ".checkpoint-7.tmp-memkit").exists(), "the next save cleans staging leftovers"


def test_an_explicit_incomplete_checkpoint_names_the_one_to_use(test_techniques, tiny_path, tiny_dataset, tmp_path):
    trainer(tiny_path, tiny_dataset, tmp_path, max_steps=1).train()
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"no trainer_state\.json.*resume from .*checkpoint-1"):
        trainer(tiny_path, tiny_dataset, tmp_path, max_steps=2).train(str(tmp_path / "checkpoint-4"))
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer(tiny_path, tiny_dataset, tmp_path, max_steps=2).train(str(tmp_path / "checkpoint-9"))


def test_resume_true_with_only_incomplete_checkpoints_says_so(test_techniques, tiny_path, tiny_dataset, tmp_path):
    trainer(tiny_path, tiny_dataset, tmp_path, max_steps=1).train()
    shutil.rmtree(tmp_path / "checkpoint-1" / "memkit_state")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*1 incomplete"):
        trainer(tiny_path, tiny_dataset, tmp_path, max_steps=2).train(resume_from_checkpoint=True)


def test_best_model_checkpoint_names_the_final_folder(tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, eval_strategy="steps",
                     eval_steps=1, metric_for_best_model="loss", load_best_model_at_end=True, save_total_limit=1)
    t = MemkitTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=args, train_dataset=tiny_dataset,
                      eval_dataset=tiny_dataset.select(range(4)), recipe={"adapter": {"lora": {"r": 2}}})
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and ".tmp-" not in best and best.startswith(str(tmp_path / "checkpoint-")), best
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert ".tmp-" not in saved and saved.startswith(str(tmp_path / "checkpoint-")), saved
    assert get_last_checkpoint(str(tmp_path)) is not None


# ------------------------------------------------------------------------------------------------------------
# memkit_state/state.json structure


@pytest.fixture
def saved(test_techniques, tiny_path, tiny_dataset, tmp_path):
    trainer(tiny_path, tiny_dataset, tmp_path, max_steps=1).train()
    return tmp_path / "checkpoint-1"


def _edit(ckpt, change):
    path = ckpt / "memkit_state" / "state.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(format=7), "format = 7"),
    (lambda m: m.update(techniques=["counting_schedule"]), "techniques = .* is not a mapping"),
    (lambda m: m["techniques"].update(counting_schedule=3), r"techniques\.counting_schedule = 3 is not a mapping"),
    (lambda m: m["techniques"]["counting_schedule"].update(trace={"__tensor__": "nope/trace"}),
     r"techniques\.counting_schedule\.trace refers to tensor 'nope/trace'"),
    # the test technique checks nothing itself: a wrong type is still a CheckpointError, not an AttributeError
    (lambda m: m["techniques"]["counting_schedule"].update(trace=[1, 2]), "cannot load its saved state"),
], ids=["format", "techniques-list", "entry-int", "tensor-ref", "unchecked-type"])
def test_a_malformed_state_json_is_a_checkpoint_error(saved, tiny_path, tiny_dataset, change, match):
    _edit(saved, change)
    with pytest.raises(CheckpointError, match=match):
        trainer(tiny_path, tiny_dataset, saved.parent, max_steps=2).train(str(saved))
