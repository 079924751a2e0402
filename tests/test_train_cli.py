"""`memkit train` as a user meets it: the command line wins over the recipe, resume resumes, bad flags and
unusable output folders stop it before the model loads, with a message and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_memkit.train import TrainOptions, train

pytestmark = pytest.mark.slow  # each test runs `memkit train` in a child process


def memkit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hf_memkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _user_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, r.stderr[-2000:]
    assert "Loading weights" not in r.stderr  # refused before the model loads


def test_the_command_line_wins_over_the_recipes_output_dir_and_max_steps(tiny_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe_out = tmp_path / "recipe-out"
    recipe.write_text(f"memkit: 1\noptimizer: {{adamw: {{}}}}\n"
                      f"training_args: {{output_dir: {recipe_out}, max_steps: 7}}\n")
    summary = train(TrainOptions(model=str(tiny_path), recipe=str(recipe), max_steps=2, max_seq_len=32,
                                 output_dir=str(tmp_path / "cli-out"), eval_before=False,
                                 extra=["--per_device_train_batch_size", "2"]))
    assert summary["steps"] == 2
    assert (tmp_path / "cli-out" / "train_summary.json").is_file() and not recipe_out.exists()


def test_the_recipes_output_dir_is_used_when_the_command_line_gives_none(tiny_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"memkit: 1\ntraining_args: {{output_dir: {tmp_path / 'from-recipe'}}}\n")
    train(TrainOptions(model=str(tiny_path), recipe=str(recipe), max_steps=1, max_seq_len=32, eval_before=False,
                       extra=["--per_device_train_batch_size", "2"]))
    assert (tmp_path / "from-recipe" / "train_summary.json").is_file()
    assert not (tmp_path / "runs").exists()


def test_resume_from_checkpoint_resumes_instead_of_restarting(tmp_path):
    """The resumed run keeps the first run's log of step 2 (a restart with another learning rate would log a
    different step-2 loss) and continues to step 3."""
    out = tmp_path / "run"
    common = ["train", "--model", "tiny", "--max-seq-len", "32", "--output-dir", str(out), "--no-eval-before",
              "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "1",
              "--logging_steps", "1"]
    first = memkit(*common, "--max-steps", "2", "--learning_rate", "0.01")
    assert first.returncode == 0, first.stderr[-2000:]
    logged = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    second = memkit(*common, "--max-steps", "3", "--learning_rate", "0.5", "--resume_from_checkpoint", "true")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from the last checkpoint" in second.stdout
    resumed = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    step2 = [h["loss"] for h in resumed if h.get("step") == 2 and "loss" in h]
    assert step2 == [h["loss"] for h in logged if h.get("step") == 2 and "loss" in h]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3


def test_earlier_checkpoints_are_neither_overwritten_nor_mixed_silently(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-5").mkdir(parents=True)
    _user_error(memkit("train", "--model", "tiny", "--output-dir", str(out)),
                "holds checkpoints of an earlier run", "--resume_from_checkpoint", "--overwrite-output-dir")
    assert (out / "checkpoint-5").is_dir()


@pytest.mark.parametrize("args,needles", [
    (["--leraning_rate", "0.1"], ["unknown argument '--leraning_rate'", "did you mean --learning_rate"]),
    (["--learning_rate", "abc"], ["invalid TrainingArguments flag", "learning_rate"]),
    (["--learning_rate", "-1"], ["--learning_rate", "out of range"]),
    (["--max_steps", "-5"], ["max_steps", "-1 (epochs decide)"]),
    (["--per_device_train_batch_size", "0"], ["per_device_train_batch_size"]),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], ["not a checkpoint folder"]),
    (["--resume_from_checkpoint", "true"], ["holds no checkpoint-* folder"]),
])
def test_bad_flags_are_refused_before_the_model_loads(tmp_path, args, needles):
    _user_error(memkit("train", "--model", "tiny", "--output-dir", str(tmp_path / "out"), *args), *needles)


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("mine")
    _user_error(memkit("train", "--model", "tiny", "--output-dir", str(target)), "is a file")
    assert target.read_text() == "mine"


def test_compare_removes_its_temporary_folder_even_when_a_run_fails(tmp_path, monkeypatch):
    import tempfile

    from hf_memkit.errors import MemkitError
    from hf_memkit.memory import compare as cmp

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def failing_run(recipe, model, steps, out_dir, extra):
        import os

        os.makedirs(out_dir)
        open(os.path.join(out_dir, "model.safetensors"), "w").close()
        raise MemkitError("the run failed")

    monkeypatch.setattr(cmp, "run_one", failing_run)
    with pytest.raises(MemkitError):
        cmp.compare(["baseline"], model="tiny")
    assert list(tmp_path.glob("memkit-compare-*")) == []


def test_memkit_train_restarts_itself_on_the_allocator_that_returns_memory(tmp_path):
    """--allocator auto: mimalloc (a dependency on Linux x86-64) is preloaded by a re-exec before anything heavy
    is imported, and the summary records it; --allocator system leaves malloc alone."""
    from hf_memkit.memory.host_memory import mimalloc_library

    common = ["train", "--model", "tiny", "--max-steps", "1", "--max-seq-len", "32", "--no-eval-before",
              "--per_device_train_batch_size", "2"]
    r = memkit(*common, "--output-dir", str(tmp_path / "auto"), "--allocator", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    host = json.loads((tmp_path / "auto" / "train_summary.json").read_text())["host_memory"]
    expected = "mimalloc" if mimalloc_library() else ("glibc" if sys.platform.startswith("linux") else "other")
    assert host["allocator"] == expected and "allocator" in r.stdout
    if expected == "glibc":
        assert host["settings"]["mmap_threshold"] == 1 << 20
    r = memkit(*common, "--output-dir", str(tmp_path / "system"), "--allocator", "system")
    assert r.returncode == 0, r.stderr[-2000:]
    host = json.loads((tmp_path / "system" / "train_summary.json").read_text())["host_memory"]
    assert host["allocator"] != "mimalloc" and not host["settings"].get("mmap_threshold")
