"""``memkit run LAUNCHER ...``: the recipe reaches the processes that ``trl``, ``accelerate launch``, ``deepspeed``
and ``torchrun`` start (integrations/relaunch.py, child_hook.py, child_boot/sitecustomize.py).

The end-to-end runs (slow) use two CPU ranks on the tiny Llama and check artifacts only the recipe can produce:
a LoRA adapter and no full model, the memkit state in the checkpoint, and one marker per rank. The fast tests
check the child hook's cost and chaining, the flag removal, and that a run in which no process applied the
recipe fails instead of passing for a memkit run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_memkit.integrations import child_hook, relaunch
from tests.distributed.launch import corpus, free_port
from tests.integrations.test_launcher import RECIPE, STOCK, assert_recipe_artifacts, explain, memkit_exe, run

LORA_ONLY = "memkit: 1\nadapter: {lora: {r: 2}}\n"


def child(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "lora.yaml"
    path.write_text(LORA_ONLY, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------------
# the child hook


def test_child_hook_is_lazy_and_chains_to_the_users_sitecustomize(tmp_path, recipe_file):
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    env = child_hook.child_env(str(recipe_file), set(), str(tmp_path), base={**os.environ, "PYTHONPATH": str(user)})
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(child_hook.BOOT_DIR), str(user)]
    code = ("import os, sys, json; print(json.dumps({'user': os.environ.get('USER_SITECUSTOMIZE_RAN'), "
            "'hooked': any(type(f).__name__ == '_TrainerImportHook' for f in sys.meta_path), "
            "'heavy': sorted(m for m in ('hf_memkit', 'transformers', 'torch') if m in sys.modules), "
            f"'boot_on_path': {str(child_hook.BOOT_DIR)!r} in sys.path}}))")
    proc = child(code, env, tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert json.loads(proc.stdout) == {"user": "1", "hooked": True, "heavy": [], "boot_on_path": False}
    # without HF_MEMKIT_RECIPE nothing is hooked (a stray PYTHONPATH entry does nothing), the chain still runs
    proc = child(code, {k: v for k, v in env.items() if k != child_hook.ENV_RECIPE}, tmp_path)
    assert json.loads(proc.stdout)["hooked"] is False and json.loads(proc.stdout)["user"] == "1"


def test_importing_the_trainer_installs_only_a_shim(tmp_path, recipe_file):
    env = child_hook.child_env(str(recipe_file), set(), str(tmp_path))
    code = ("import sys, transformers.trainer as t; "
            "print(t.Trainer.__init__.__code__.co_filename.endswith('sitecustomize.py'), 'hf_memkit' in sys.modules)")
    proc = child(code, env, tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.split() == ["True", "False"]


@pytest.mark.slow
def test_the_first_trainer_in_a_child_applies_the_recipe_and_leaves_a_marker(tmp_path, recipe_file):
    from hf_memkit.data.models import tiny_dir

    markers = tmp_path / "markers"
    markers.mkdir()
    env = child_hook.child_env(str(recipe_file), {"max_steps"}, str(markers))
    code = (
        "import transformers\n"
        "from peft import PeftModel\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(tiny_dir())!r})\n"
        "args = transformers.TrainingArguments(output_dir='out', max_steps=2, report_to='none', use_cpu=True)\n"
        "trainer = transformers.Trainer(model=model, args=args)\n"
        "print(isinstance(trainer.model, PeftModel), trainer.memkit.recipe.names())\n")
    proc = child(code, env, tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "True ['lora']" in proc.stdout.splitlines()
    [marker] = child_hook.read_markers(markers)
    assert marker["trainer"] == "Trainer" and marker["techniques"] == ["lora"]


# ------------------------------------------------------------------------------------------------------------
# memkit run LAUNCHER: routing, refusals, verdict


def test_a_launcher_that_builds_no_trainer_fails_instead_of_claiming_the_recipe(tmp_path, recipe_file, capsys):
    """The reproduced bug: the recipe silently missed the training process and memkit run exited 0."""
    argv_file = tmp_path / "argv.json"
    code = f"import sys, json; open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    status = relaunch.run_launcher(sys.executable, ["-c", code, "--memkit_recipe", str(recipe_file), "--x", "1"])
    err = capsys.readouterr().err
    assert status == 1 and "recipe did NOT apply" in err, err
    assert json.loads(argv_file.read_text()) == ["--x", "1"]  # --memkit_recipe never reaches the program


def test_the_launchers_own_failure_is_its_exit_status(recipe_file, capsys):
    status = relaunch.run_launcher(sys.executable, ["-c", "raise SystemExit(7)", "--memkit_recipe", str(recipe_file)])
    assert status == 7 and "exited with status 7" in capsys.readouterr().err


def test_markers_folder_is_removed_on_errors_too(recipe_file, monkeypatch):
    seen = []

    def boom(cmd, env):
        seen.append(env[child_hook.ENV_MARKERS])
        assert os.path.isdir(seen[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(relaunch, "_call", boom)
    with pytest.raises(KeyboardInterrupt):
        relaunch.run_launcher(sys.executable, ["-c", "pass", "--memkit_recipe", str(recipe_file)])
    assert seen and not os.path.exists(seen[0])


@pytest.mark.parametrize("args, message", [
    (["-c", "pass"], "no --memkit_recipe given"),
    (["-c", "pass", "--memkit_recipe"], "needs a value"),
    (["-c", "pass", "--memkit_recipe", "optimiser: {adamw: {}}"], "the recipe is invalid, nothing was run"),
    (["-m", "hf_memkit.run", "x.py", "--memkit_recipe", "lora"], "drop `-m hf_memkit.run`"),
])
def test_refused_before_anything_starts(args, message, monkeypatch, capsys):
    monkeypatch.setattr(relaunch, "_call", lambda *a: pytest.fail("the launcher was started"))
    assert relaunch.run_launcher(sys.executable, args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_program_is_a_usage_error(capsys):
    from hf_memkit.run import main

    assert main(["no-such-launcher-xyz", "--memkit_recipe", "lora"]) == 2
    assert "script 'no-such-launcher-xyz' not found" in capsys.readouterr().err


def test_routing(monkeypatch, tmp_path):
    from hf_memkit import run as run_mod
    from hf_memkit.integrations import launcher

    calls = []
    monkeypatch.setattr(relaunch, "run_launcher", lambda prog, args: calls.append(("launcher", prog, args)) or 0)
    monkeypatch.setattr(launcher, "run_script", lambda script, args: calls.append(("script", script, args)) or 0)
    script = tmp_path / "train.py"
    script.write_text("")
    trl_file = tmp_path / "trl"  # a console script given by path is still a launcher
    trl_file.write_text("")
    assert run_mod.main(["python", str(script), "--a"]) == 0
    assert run_mod.main([str(script), "--a"]) == 0
    assert run_mod.main(["trl", "sft", "--a"]) == 0
    assert run_mod.main([str(trl_file), "sft"]) == 0
    assert calls == [("script", str(script), ["--a"]), ("script", str(script), ["--a"]),
                     ("launcher", "trl", ["sft", "--a"]), ("launcher", str(trl_file), ["sft"])]
    with pytest.raises(SystemExit):
        run_mod.main(["--nproc-per-node", "2", "accelerate", "launch", "x.py"])


@pytest.mark.parametrize("program, args, hinted", [
    ("accelerate", ["launch", "--num_processes", "2", "s.py"], True),
    ("accelerate", ["launch", "--cpu", "--num_processes=2", "s.py"], True),
    ("/venv/bin/trl", ["sft", "--num_processes", "2"], True),
    ("accelerate", ["launch", "--multi_gpu", "--num_processes", "2", "s.py"], False),
    ("accelerate", ["launch", "--num_processes", "1", "s.py"], False),
    ("deepspeed", ["--num_gpus", "2", "s.py"], False),
])
def test_accelerate_on_cpu_gets_the_multi_gpu_hint(program, args, hinted, monkeypatch):
    monkeypatch.setattr(relaunch, "_has_cuda", lambda: False)
    got = relaunch.hints(program, args)
    assert bool(got) == hinted
    if hinted:
        assert "starts one process on a machine without GPUs" in got[0] and "--multi_gpu" in got[0]
        assert ("drop --cpu" in got[0]) == ("--cpu" in args)
    monkeypatch.setattr(relaunch, "_has_cuda", lambda: True)
    assert relaunch.hints(program, args) == []


# ------------------------------------------------------------------------------------------------------------
# end to end on two CPU ranks


@pytest.fixture
def e2e(tmp_path, monkeypatch):
    from hf_memkit.data.models import tiny_dir

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    return tmp_path, tiny_dir()


def stock_args(model: Path, tmp: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(corpus(tmp)), "--output_dir", str(out),
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "2", "--report_to", "none",
            "--learning_rate", "1e-3", "--block_size", "32", "--seed", "0", "--disable_tqdm", "true", "--use_cpu",
            "--memkit_recipe", str(tmp / "recipe.yaml")]


def assert_two_ranks_applied(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, explain(proc)
    assert "hf_memkit: the recipe applied in 2 processes (ranks 0, 1" in proc.stderr, explain(proc)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_ranks(e2e):
    tmp, model = e2e
    out = tmp / "out"
    proc = run([*memkit_exe(), "run", "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), str(STOCK), *stock_args(model, tmp, out)], cwd=tmp)
    assert_two_ranks_applied(proc)
    assert_recipe_artifacts(out)


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_ranks(e2e):
    """DeepSpeed's launcher starts its ranks on CPU too (gloo, no --deepspeed config: the Trainer runs DDP)."""
    tmp, model = e2e
    out = tmp / "out"
    proc = run([*memkit_exe(), "run", "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                str(STOCK), *stock_args(model, tmp, out)], cwd=tmp)
    assert_two_ranks_applied(proc)
    assert_recipe_artifacts(out)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(e2e):
    tmp, model = e2e
    out = tmp / "out"
    proc = run([*memkit_exe(), "run", "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()),
                str(STOCK), *stock_args(model, tmp, out)], cwd=tmp)
    assert_two_ranks_applied(proc)
    assert_recipe_artifacts(out)


@pytest.mark.slow
def test_trl_sft_two_cpu_ranks_trains_a_lora_adapter(e2e):
    """`trl sft` re-launches itself through accelerate; the bundled lora recipe must reach both ranks. Offline:
    --dataset_name is a local folder holding a JSON-lines file (load_dataset infers the json builder)."""
    tmp, model = e2e
    data = tmp / "sft_data"
    data.mkdir()
    lines = [p.strip()[:400] for p in corpus(tmp).read_text(encoding="utf-8").split("\n") if p.strip()]
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    out = tmp / "out"
    proc = run([*memkit_exe(), "run", "trl", "sft", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), "--model_name_or_path", str(model),
                "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--max_length", "32", "--save_steps", "2",
                "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--memkit_recipe", "lora"], cwd=tmp)
    assert_two_ranks_applied(proc)
    assert "SFTTrainer" in proc.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # recipes/lora.yaml
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists(), "a full model was saved: the recipe did not apply"
    state = json.loads((out / "checkpoint-2" / "memkit_state" / "state.json").read_text())
    assert set(state["techniques"]) == {"adamw", "lora"}


def test_technique_flags_reach_the_children_as_one_resolved_recipe(tmp_path, recipe_file, capsys):
    """--memkit_<slot> and --memkit.T.S work through a launcher as in a script run: merged over the recipe,
    validated before anything starts, handed to the children as a file, and stripped from their arguments."""
    seen = tmp_path / "seen.json"
    code = (f"import os, sys, json; open({str(seen)!r}, 'w').write(json.dumps("
            f"[open(os.environ[{child_hook.ENV_RECIPE!r}]).read(), sys.argv[1:]]))")
    relaunch.run_launcher(sys.executable, ["-c", code, "--memkit_recipe", str(recipe_file),
                                           "--memkit_adapter", "lora", "--memkit.lora.r", "4", "--x", "1"])
    text, argv = json.loads(seen.read_text())
    from hf_memkit import load_recipe

    resolved = load_recipe(text)
    assert resolved.get("lora").config.r == 4 and argv == ["--x", "1"]


def test_a_misspelt_technique_flag_is_refused_before_the_launcher_starts(monkeypatch, capsys):
    monkeypatch.setattr(relaunch, "_call", lambda *a: pytest.fail("the launcher was started"))
    assert relaunch.run_launcher(sys.executable, ["-c", "pass", "--memkit_adapter", "lorra"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lora'" in err and "Traceback" not in err
