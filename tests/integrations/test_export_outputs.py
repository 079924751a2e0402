"""Where a user's work lands: exports are staged and renamed into place, carry a manifest, never replace a folder
hf_memkit did not write (nor merge into one it did), stay inside the output directory, and a compress pass after
training leaves the trained model as it was (the compressed model goes to export/)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from hf_memkit import MemkitTrainer
from hf_memkit.errors import MemkitError, RecipeError
from hf_memkit.export.checkpoint import OutputDirError, export_model, export_target, find_export
from hf_memkit.export.hub import (
    EXPORT_INFO,
    ForeignFolderError,
    check_manifest,
    push_to_hub,
    upload_plan,
)
from hf_memkit.recipe import ExportConfig
from tests.conftest import make_args

CT = ExportConfig(format="compressed-tensors")
RTN4 = "memkit: 1\ncompress: [{rtn: {bits: 4, group_size: 32, symmetric: true}}]\n"


def _recipe(tmp_path, text=RTN4, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """One `memkit compress` output (tiny, RTN w4, no eval); tests copy it."""
    from hf_memkit.quant.oneshot import compress

    root = tmp_path_factory.mktemp("compressed")
    compress("tiny", _recipe(root), str(root / "out"), evaluate=False, log=lambda _m: None)
    return root / "out"


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder).replace(os.sep, "/")
                  for r, _d, fs in os.walk(folder) for f in fs)


def assert_complete_export(folder):
    """Every file is listed in the manifest with its hash, and nothing else is there (no stale merge)."""
    data = check_manifest(str(folder), hashes=True)
    assert _files(folder) == sorted({*data["files"], *data["reports"], EXPORT_INFO})
    return data


# ------------------------------------------------------------------------------------------------------------
# memkit compress -o DIR


def test_compress_output_has_a_manifest_of_its_files(compressed):
    data = assert_complete_export(compressed)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(data["files"])
    assert set(data["reports"]) == {"compression_report.json"}
    assert data["memkit_manifest"] == 1 and data["hf_memkit_version"]
    assert not [p for p in os.listdir(compressed.parent) if p.startswith(".")]  # no staging leftovers


def test_compress_refuses_a_non_empty_folder_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from hf_memkit.cli import main
    from hf_memkit.data import models

    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["compress", "tiny", "--recipe", _recipe(tmp_path), "-o", str(out), "--no-eval"]) == 1
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert _files(out) == ["model-00002-of-00002.safetensors"]


def test_compress_overwrite_replaces_the_folder_whole(tmp_path, compressed, capsys):
    from hf_memkit.cli import main

    out = tmp_path / "out"
    shutil.copytree(compressed, out)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "notes.txt").write_text("mine")
    recipe = _recipe(tmp_path, "memkit: 1\ncompress: [{rtn: {bits: 2, group_size: 32, symmetric: true}}]\n")
    assert main(["compress", "tiny", "--recipe", recipe, "-o", str(out), "--no-eval"]) == 1  # an own one too
    assert main(["compress", "tiny", "--recipe", recipe, "-o", str(out), "--no-eval", "--overwrite"]) == 0
    assert_complete_export(out)
    assert not (out / "model-00002-of-00002.safetensors").exists() and not (out / "notes.txt").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 2


def test_compress_refuses_to_overwrite_its_own_input(tmp_path, compressed, capsys):
    from hf_memkit.cli import main

    assert main(["compress", str(compressed), "--recipe", _recipe(tmp_path), "-o", str(compressed),
                 "--overwrite", "--no-eval"]) == 1
    assert "would delete the input" in capsys.readouterr().err
    assert_complete_export(compressed)


def test_an_export_that_fails_mid_write_leaves_the_old_one(tmp_path, compressed, monkeypatch):
    from hf_memkit.export import hub
    from hf_memkit.quant.oneshot import compress

    out = tmp_path / "out"
    shutil.copytree(compressed, out)
    before = assert_complete_export(out)

    def boom(*a, **k):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(hub, "write_card", boom)  # after the weights and config.json are written
    recipe = _recipe(tmp_path, "memkit: 1\ncompress: [{rtn: {bits: 2, group_size: 32, symmetric: true}}]\n")
    with pytest.raises(RuntimeError, match="disk went away"):
        compress("tiny", recipe, str(out), evaluate=False, overwrite=True, log=lambda _m: None)
    assert assert_complete_export(out)["files"] == before["files"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_a_failed_rename_puts_the_old_export_back(tmp_path, compressed, monkeypatch):
    from hf_memkit import atomic

    out = tmp_path / "out"
    shutil.copytree(compressed, out)
    before = assert_complete_export(out)
    real = os.replace

    def flaky(src, dst):
        if os.path.basename(src).startswith(".out.tmp-") and str(dst) == str(out.absolute()):
            # the old folder has just been moved aside; renaming the new one in fails
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        export_model(_quantized_tiny(), str(out), CT, model_card=False)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert assert_complete_export(out)["files"] == before["files"]


def test_a_crash_between_the_two_renames_is_recovered(tmp_path, compressed):
    """What a kill at the `publish` pause leaves (the old export moved aside, the new one not in) comes back."""
    out = tmp_path / "out"
    shutil.copytree(compressed, tmp_path / ".out.old-abc123")
    assert not out.exists()
    assert find_export(str(out)) == str(out)
    assert_complete_export(out)


# ------------------------------------------------------------------------------------------------------------
# memkit export DIR


def _quantized_tiny():
    from transformers import AutoModelForCausalLM

    from hf_memkit.data.models import tiny_dir
    from hf_memkit.quant.pipeline import quantize_model_
    from hf_memkit.quant.rtn.config import RTNConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_dir())
    quantize_model_(model, "rtn", RTNConfig(bits=4, group_size=32, symmetric=True))
    return model


class FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", repo_id))
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, repo_type, folder_path, allow_patterns, commit_message):
        FakeHfApi.calls.append(("upload_folder", folder_path, sorted(allow_patterns)))
        return type("Commit", (), {"commit_url": "https://example.invalid/commit/0"})()


def test_memkit_export_refuses_a_foreign_folder_and_leaves_its_readme(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from hf_memkit.cli import main

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "README.md").write_text("my own notes")
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    assert main(["export", str(tmp_path), "--push-to-hub", "someone/x"]) == 1
    err = capsys.readouterr().err
    assert "did not export" in err and "memkit compress" in err and "Traceback" not in err
    assert (tmp_path / "README.md").read_text() == "my own notes" and FakeHfApi.calls == []
    with pytest.raises(ForeignFolderError):
        upload_plan(str(tmp_path))


def test_upload_plan_of_a_training_output_is_its_export_only(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"o")
    (run / "model.safetensors").write_bytes(b"trained")
    (run / "compression_report.json").write_text("{}")
    export_model(_quantized_tiny(), str(run / "export"), CT, model_card=False)
    (run / "export" / "optimizer.pt").write_bytes(b"dropped here later")  # not in the manifest: never uploaded
    folder = find_export(str(run))
    assert folder == str(run / "export")
    files = upload_plan(folder)
    assert {"config.json", "model.safetensors", EXPORT_INFO} <= set(files)
    assert not [f for f in files if "checkpoint" in f or "optimizer" in f or "report" in f]
    FakeHfApi.calls = []
    pushed = push_to_hub(folder, "someone/tiny", api=FakeHfApi())
    assert FakeHfApi.calls == [("create_repo", "someone/tiny"), ("upload_folder", folder, files)]
    assert pushed["files"] == files


def test_reports_are_uploaded_only_when_asked(compressed, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from hf_memkit.cli import main

    out = tmp_path / "out"
    shutil.copytree(compressed, out)
    assert "compression_report.json" not in upload_plan(str(out))
    assert "compression_report.json" in upload_plan(str(out), include_reports=True)
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    assert main(["export", str(out), "--push-to-hub", "someone/x", "--include-reports"]) == 0
    assert "compression_report.json" in FakeHfApi.calls[-1][2]
    assert "someone/x" in (out / "README.md").read_text()
    assert_complete_export(out)  # the rewritten card is in the manifest with its new hash


def test_memkit_export_refuses_an_export_that_differs_from_its_manifest(compressed, tmp_path, capsys):
    from hf_memkit.cli import main

    out = tmp_path / "out"
    shutil.copytree(compressed, out)
    (out / "config.json").write_text("{}")
    assert main(["export", str(out)]) == 1
    assert "differs from the manifest" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# the export folder of a training run


def test_export_dir_must_stay_inside_the_output_dir(tmp_path):
    for bad in ("../elsewhere", ".", "/tmp/abs-export", "a/../../x"):
        with pytest.raises(RecipeError, match="not a folder inside the output directory") as info:
            export_target(str(tmp_path / "run"), bad)
        assert "fix:" in str(info.value)
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "run" / "link")
    with pytest.raises(RecipeError):
        export_target(str(tmp_path / "run"), "link/export")
    assert export_target(str(tmp_path / "run"), "sub/export") == str((tmp_path / "run" / "sub" / "export").resolve())


def test_a_run_refuses_an_export_folder_it_did_not_write(tiny_model, tiny_dataset, tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "README.md").write_text("not yours")
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            recipe={"compress": [{"rtn": {"group_size": 32}}], "export": {"format": "safetensors"}})
    with pytest.raises(OutputDirError, match="was not written by hf_memkit") as info:
        trainer.train()
    assert isinstance(info.value, MemkitError)
    assert _files(tmp_path / "export") == ["README.md"]
    assert (tmp_path / "export" / "README.md").read_text() == "not yours"


def test_training_with_compress_keeps_the_trained_model_and_exports_the_compressed_one(tiny_model, tiny_dataset,
                                                                                       tmp_path, caplog):
    """The fault-campaign scenario: compress [gptq, lorc], then the script's own trainer.save_model()."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    (tmp_path / "export").mkdir()  # an earlier run's export: replaced whole, the stale shard goes
    (tmp_path / "export" / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (tmp_path / "export" / EXPORT_INFO).write_text(json.dumps({"memkit_manifest": 1, "files": {}}))
    recipe = {"compress": [{"gptq": {"num_samples": 8, "seq_len": 32, "group_size": 32}}, {"lorc": {"rank": 2}}],
              "export": {"format": "compressed-tensors"}}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset,
                            recipe=recipe)
    trained = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Keep())
    with caplog.at_level("INFO", logger="hf_memkit"):
        trainer.train()
    trainer.save_model()
    saved = load_file(tmp_path / "model.safetensors")
    assert saved and all(torch.equal(v, trained[k]) for k, v in saved.items())  # not fake-quantized
    export = tmp_path / "export"
    data = assert_complete_export(export)
    assert "lorc_adapter/adapter_model.safetensors" in data["files"]
    assert json.loads((export / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert "model-00002-of-00002.safetensors" not in os.listdir(export)
    log = caplog.text
    assert f"the compressed model is in {export.resolve()}" in log and "keeps its trained weights" in log


def test_structured_pruning_after_training_works_on_a_copy(tiny_model, tiny_dataset, tmp_path):
    """l1_structured rebuilds modules and edits the config: the export is the smaller model, the trainer's model
    keeps its shape and its trained weights."""
    from transformers import TrainerCallback

    sizes = (tiny_model.config.num_hidden_layers, tiny_model.config.intermediate_size)
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                            recipe={"compress": [{"l1_structured": {"ratio": 0.3, "round_to": 8}}],
                                    "export": {"format": "compressed-tensors"}})
    trained = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Keep())
    trainer.train()
    assert (tiny_model.config.num_hidden_layers, tiny_model.config.intermediate_size) == sizes
    assert all(torch.equal(v, trained[k]) for k, v in tiny_model.state_dict().items())
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["intermediate_size"] < sizes[1]
    assert_complete_export(tmp_path / "export")


def test_a_failing_compress_pass_still_restores_the_trained_model(tiny_model):
    from hf_memkit.compress.plan import Plan
    from hf_memkit.compress.linear import quantized_modules
    from hf_memkit.compress.aside import compress_aside
    from hf_memkit.quant.pipeline import quantize_model_
    from hf_memkit.recipe import load_recipe

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    plan = Plan.from_recipe(load_recipe({"compress": [{"rtn": {"group_size": 32}}, {"lorc": {"rank": 2}}]}))
    with pytest.raises(RuntimeError, match="export failed"):
        with compress_aside(tiny_model, plan) as work:
            assert work is tiny_model  # in place, the trained values wait on the CPU
            quantize_model_(work, "rtn", plan.quantizer[1], lorc=plan.lorc)
            assert quantized_modules(tiny_model)
            raise RuntimeError("export failed")
    assert not quantized_modules(tiny_model)
    assert not any(hasattr(m, "_memkit_lorc_hook") for m in tiny_model.modules())
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
