"""Techniques as ``MemkitTrainingArguments`` fields: ``HfArgumentParser`` on a stock script, ``--help``, the merge
with ``--memkit_recipe``, and the same flags through ``memkit run`` on an unmodified script."""

from __future__ import annotations

import dataclasses
import pickle
import sys

import pytest
import torch

from hf_memkit import RecipeError, load_recipe, registry

from .test_launcher import MEMKIT_ARGS, STOCK, assert_recipe_artifacts, explain, memkit_exe, run, script_args

TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
         "--logging_steps", "1", "--learning_rate", "1e-2", "--seed", "0", "--dataloader_pin_memory", "false",
         "--disable_tqdm", "true"]


def parse(argv: list[str]):
    from transformers import HfArgumentParser

    from hf_memkit import MemkitTrainingArguments

    (args,) = HfArgumentParser(MemkitTrainingArguments).parse_args_into_dataclasses(args=argv)
    return args


def test_slot_flags_resolve_to_the_recipe_file(tmp_path):
    args = parse(["--output_dir", str(tmp_path), "--memkit_loss", "cce", "--memkit_optimizer", "adamw_8bit"])
    (tmp_path / "r.yaml").write_text("memkit: 1\nloss: {cce: {}}\noptimizer: {adamw_8bit: {}}\n")
    assert args.memkit_resolved_recipe().to_dict() == load_recipe(str(tmp_path / "r.yaml")).to_dict()


def _train(model, args, dataset, recipe=None):
    from hf_memkit import MemkitTrainer

    torch.manual_seed(0)
    trainer = MemkitTrainer(model=model, args=args, train_dataset=dataset, recipe=recipe)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def test_flags_train_exactly_like_the_recipe_file(tiny_model, tiny_path, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments

    (tmp_path / "r.yaml").write_text("memkit: 1\nloss: {cce: {}}\noptimizer: {adamw_8bit: {}}\n")
    flagged = parse(["--output_dir", str(tmp_path / "a"), *TRAIN, "--memkit_loss", "cce",
                     "--memkit_optimizer", "adamw_8bit"])
    (plain,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path / "b"), *TRAIN])
    losses_a, weights_a, trainer_a = _train(tiny_model, flagged, tiny_dataset)
    losses_b, weights_b, trainer_b = _train(AutoModelForCausalLM.from_pretrained(tiny_path), plain, tiny_dataset,
                                            recipe=str(tmp_path / "r.yaml"))
    assert trainer_a.memkit.recipe.names() == trainer_b.memkit.recipe.names() == ["cce", "adamw_8bit"]
    inner = [getattr(t.optimizer, "optimizer", t.optimizer) for t in (trainer_a, trainer_b)]  # accelerate wraps it
    assert [type(o).__name__ for o in inner] == ["AdamW8bit", "AdamW8bit"]
    assert len(losses_a) == 2 and losses_a == losses_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_misspelt_technique_fails_when_the_arguments_are_parsed(tmp_path):
    with pytest.raises(RecipeError) as err:
        parse(["--output_dir", str(tmp_path), "--memkit_loss", "ccee"])
    assert "--memkit_loss" in str(err.value) and "did you mean 'cce'?" in str(err.value)
    with pytest.raises(RecipeError, match="did you mean 'active_layers'"):
        parse(["--output_dir", str(tmp_path), "--memkit_schedule", "lisa", "--memkit_set", "lisa.active_layer=1"])


def test_help_lists_every_slot_its_techniques_and_their_settings():
    from transformers import HfArgumentParser

    from hf_memkit import MemkitTrainingArguments

    text = " ".join(HfArgumentParser(MemkitTrainingArguments).format_help().split())  # unwrapped
    for slot in registry.SLOTS:
        start = text.index(f"--memkit_{slot} MEMKIT_{slot.upper()}, ")  # the entry, not the usage line
        entry = text[start:text.index("(default:", start)]
        assert all(name in entry for name in registry.names(slot)), (slot, entry)
    assert "--memkit_set MEMKIT_SET [MEMKIT_SET ...]" in text
    assert "lisa: active_layers, interval" in text and "--memkit.lisa.active_layers 4" in text
    assert "divergence_guard: action, spike_factor" in text


def test_flags_win_over_the_recipe_and_the_dotted_form_needs_parse_memkit_args(tmp_path):
    from hf_memkit import parse_memkit_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("memkit: 1\nschedule: [{lisa: {active_layers: 2, interval: 5}}]\noptimizer: {adamw: {}}\n")
    argv = ["--output_dir", str(tmp_path), "--memkit_recipe", str(recipe), "--memkit.lisa.active_layers", "1",
            "--memkit_optimizer", "adamw_8bit"]
    args = parse(parse_memkit_args(argv))
    r = args.memkit_resolved_recipe()
    assert r.names() == ["adamw_8bit", "lisa"]
    assert (r.get("lisa").config.active_layers, r.get("lisa").config.interval) == (1, 5)
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):  # it refuses the dotted form alone
        parse(argv)
    with pytest.raises(RecipeError, match="'lora' is not in this run") as err:
        parse(["--output_dir", str(tmp_path), "--memkit_recipe", str(recipe), "--memkit_set", "lora.r=4"])
    assert "--memkit_adapter lora" in str(err.value)


def test_arguments_survive_replace_and_pickle(tmp_path):
    args = parse(["--output_dir", str(tmp_path), "--memkit_loss", "cce", "--memkit_set", "cce.z_loss=0.1"])
    copy = dataclasses.replace(args, max_steps=3)  # what the recipe's training_args do
    assert copy.memkit_resolved_recipe().get("cce").config.z_loss == 0.1
    again = pickle.loads(pickle.dumps(args))  # training_args.bin
    assert type(again) is type(args) and again.memkit_set == ["cce.z_loss=0.1"]


def test_memkit_run_refuses_a_misspelt_flag_before_the_script_runs(tmp_path, capsys):
    from hf_memkit.cli import main

    out = tmp_path / "out"
    assert main(["run", str(STOCK), "--output_dir", str(out), "--memkit_optimizer", "adamw_8bti"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'adamw_8bit'" in err and "nothing was run" in err and "Traceback" not in err
    assert main(["run", str(STOCK), "--output_dir", str(out), "--memkit.lora.r", "4"]) == 2
    assert "'lora' is not in this run" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from hf_memkit.data.corpus import topics

    root = tmp_path_factory.mktemp("memkit_args")
    (root / "train.txt").write_text("\n".join(topics().values())[:20_000], encoding="utf-8")
    return root


FLAGS = ["--memkit_optimizer", "adamw_8bit: {min_8bit_size: 256}", "--memkit_adapter", "lora"]


@pytest.mark.slow
def test_memkit_run_applies_flags_to_an_unmodified_script(work, tiny_path):
    out = work / "out_run"
    proc = run([*memkit_exe(), "run", str(STOCK), *FLAGS, "--memkit.lora.r", "4",
                *script_args(tiny_path, work / "train.txt", out)], cwd=work)
    assert proc.returncode == 0, explain(proc)
    assert "recipe command-line flags (adamw_8bit, lora)" in proc.stderr
    assert_recipe_artifacts(out)


@pytest.mark.slow
def test_memkit_training_arguments_script_takes_the_flags_without_the_launcher(work, tiny_path):
    out = work / "out_args"
    proc = run([sys.executable, str(MEMKIT_ARGS), *FLAGS, "--memkit_set", "lora.r=4",
                *script_args(tiny_path, work / "train.txt", out)], cwd=work)
    assert proc.returncode == 0, explain(proc)
    assert_recipe_artifacts(out)
