"""``memkit run`` / ``python -m hf_memkit.run``: a recipe applied to an unmodified HF script.

The end-to-end tests run ``tests/fixtures/run_clm_stock.py`` (a run_clm.py look-alike that knows nothing about
hf_memkit) in a subprocess on the tiny Llama, and check the artifacts, not the launcher's own claims: the saved
adapter, the 8-bit optimizer state inside the checkpoint, the memkit state folder, and that the script's own
flags still steer the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_memkit.integrations import launcher
from hf_memkit.integrations.launcher import explicit_flags, extract_recipe_flag, recipe_installed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
STOCK = FIXTURES / "run_clm_stock.py"
MEMKIT_ARGS = FIXTURES / "run_clm_memkit_args.py"

# min_8bit_size: LoRA factors of the tiny model hold 128..512 values, below bitsandbytes' default of 4096, so
# with the default every moment would stay fp32 and the test could not tell 8-bit AdamW from plain AdamW.
RECIPE = """\
memkit: 1
optimizer: {adamw_8bit: {min_8bit_size: 256}}
adapter: {lora: {r: 4}}
training_args: {logging_steps: 1}
"""
LR = 1e-3


# ------------------------------------------------------------------------------------------------------------
# helpers


def memkit_exe() -> list[str]:
    """The installed console script (next to this interpreter first, so a venv's own one wins)."""
    exe = Path(sys.executable).with_name("memkit")
    found = str(exe) if exe.is_file() else shutil.which("memkit")
    if found is None:
        pytest.fail("the `memkit` console script is not installed (pip install -e .)")
    return [found]


def run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(cwd / "hf_datasets_cache"),  # keep load_dataset's cache out of ~/.cache
        WANDB_DISABLED="true", PYTHONUNBUFFERED="1",
    )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-5000:]}"


def script_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "2", "--report_to", "none",
        "--learning_rate", str(LR), "--block_size", "32", "--seed", "0", "--disable_tqdm", "true", *extra,
    ]


def optimizer_tensors(obj, prefix=""):
    """(path, tensor) for every tensor anywhere in a (nested) optimizer state dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from optimizer_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from optimizer_tensors(v, f"{prefix}/{i}")


def assert_recipe_artifacts(out: Path, checkpoint: str = "checkpoint-2") -> None:
    """What only the recipe can have produced: a LoRA-only save, uint8 Adam moments, the memkit state."""
    import torch
    from safetensors import safe_open

    # LoRA attached: the Trainer saved a PEFT adapter and no full model
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists(), "the full model was saved: the adapter did not take over"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), keys[:5]

    # 8-bit AdamW: block-wise quantized moments (bitsandbytes' state1/state2) are uint8 in the checkpoint
    ckpt = out / checkpoint
    state = torch.load(ckpt / "optimizer.pt", weights_only=False, map_location="cpu")  # our own artifact
    tensors = dict(optimizer_tensors(state["state"]))
    uint8 = {p for p, t in tensors.items() if t.dtype == torch.uint8}
    assert any(p.endswith("/state1") for p in uint8) and any(p.endswith("/state2") for p in uint8), (
        f"no uint8 Adam moments in {ckpt}/optimizer.pt; dtypes: {sorted({str(t.dtype) for t in tensors.values()})}"
    )
    # one optimizer entry per trainable tensor: the LoRA factors only
    assert len(state["state"]) == len(keys)

    # the technique state travels with the checkpoint
    meta = json.loads((ckpt / "memkit_state" / "state.json").read_text())
    assert set(meta["techniques"]) == {"adamw_8bit", "lora"}
    assert meta["recipe"]["adapter"]["lora"]["r"] == 4


def trainer_state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from hf_memkit.data.corpus import topics

    root = tmp_path_factory.mktemp("launcher")
    text = "\n".join(topics().values())[:20_000]  # ~6k tokens: plenty for 6 blocks of 32
    (root / "train.txt").write_text(text, encoding="utf-8")
    (root / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from hf_memkit.data.models import tiny_dir

    return tiny_dir()


@pytest.fixture(scope="module")
def stock_run(work, model_dir):
    """The stock script through the console script, once for the module's checks."""
    out = work / "out_stock"
    proc = run([*memkit_exe(), "run", str(STOCK), "--memkit_recipe", str(work / "recipe.yaml"),
                *script_args(model_dir, work / "train.txt", out)], cwd=work)
    assert proc.returncode == 0, explain(proc)
    return proc, out


# ------------------------------------------------------------------------------------------------------------
# end to end, through a subprocess


@pytest.mark.slow
def test_memkit_run_applies_the_recipe_to_the_stock_trainer(stock_run):
    proc, out = stock_run
    assert_recipe_artifacts(out)
    assert "hf_memkit: optimizer AdamW8bit from technique 'adamw_8bit'" in proc.stderr, explain(proc)
    assert "applies to every Trainer in" in proc.stderr


@pytest.mark.slow
def test_memkit_run_keeps_the_scripts_own_flags(stock_run):
    _, out = stock_run
    state = trainer_state(out)
    assert state["global_step"] == 3  # --max_steps
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # --save_steps
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["train_batch_size"] == 2
    # --learning_rate with the default linear schedule (no warmup), logged every step (the recipe's
    # logging_steps): the lr of step k is LR * (1 - (k - 1) / max_steps)
    lrs = {h["step"]: h["learning_rate"] for h in state["log_history"] if "learning_rate" in h}
    assert sorted(lrs) == [1, 2, 3], state["log_history"]
    for step, lr in lrs.items():
        assert lr == pytest.approx(LR * (1 - (step - 1) / 3), rel=1e-6), (step, lr)
    # the script's own save_model / save_state / save_metrics ran after training
    assert json.loads((out / "train_results.json").read_text())["train_samples"] > 0


@pytest.mark.slow
def test_python_m_run_and_command_line_flags_win_over_the_recipe(work, model_dir):
    recipe = work / "recipe_50_steps.yaml"
    recipe.write_text(RECIPE.replace("{logging_steps: 1}", "{logging_steps: 1, max_steps: 50}"), encoding="utf-8")
    out = work / "out_python_m"
    proc = run([sys.executable, "-m", "hf_memkit.run", str(STOCK), f"--memkit_recipe={recipe}",
                *script_args(model_dir, work / "train.txt", out)], cwd=work)
    assert proc.returncode == 0, explain(proc)
    assert trainer_state(out)["global_step"] == 3, "the recipe's max_steps beat --max_steps"
    assert "--max_steps on the command line overrides training_args.max_steps" in proc.stderr
    assert_recipe_artifacts(out)
    assert "hf_memkit: optimizer AdamW8bit" in proc.stderr


@pytest.mark.slow
def test_memkit_training_arguments_script_applies_the_recipe_without_the_launcher(work, model_dir):
    out = work / "out_memkit_args"
    proc = run([sys.executable, str(MEMKIT_ARGS), "--memkit_recipe", str(work / "recipe.yaml"),
                *script_args(model_dir, work / "train.txt", out)], cwd=work)
    assert proc.returncode == 0, explain(proc)
    assert_recipe_artifacts(out)
    state = trainer_state(out)
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]  # the recipe's logging_steps


def test_bad_recipe_stops_before_the_script_runs(work, model_dir):
    bad = work / "bad.yaml"
    bad.write_text(RECIPE.replace("adapter:", "adaptr:"), encoding="utf-8")
    out = work / "out_bad"
    proc = run([*memkit_exe(), "run", str(STOCK), "--memkit_recipe", str(bad),
                *script_args(model_dir, work / "train.txt", out)], cwd=work, timeout=120)
    assert proc.returncode == 2, explain(proc)
    assert "adaptr" in proc.stderr and "did you mean 'adapter'" in proc.stderr, proc.stderr
    assert "nothing was run" in proc.stderr
    # the script never started: no output folder, no dataset or model loading, no banner
    assert not out.exists()
    assert "applies to every Trainer" not in proc.stderr
    assert "Generating train split" not in proc.stderr + proc.stdout


def test_missing_recipe_flag_is_a_usage_error(work, capsys):
    from hf_memkit.cli import main

    assert main(["run", str(STOCK), "--output_dir", str(work / "out_none")]) == 2
    err = capsys.readouterr().err
    assert "no --memkit_recipe given" in err and "--memkit_recipe FILE" in err

    assert main(["run", str(STOCK), "--output_dir", str(work / "out_none"), "--memkit_recipe"]) == 2
    assert "--memkit_recipe needs a value" in capsys.readouterr().err
    assert not (work / "out_none").exists()


def test_missing_script_is_reported(work, capsys):
    from hf_memkit.run import main

    assert main([str(work / "no_such_script.py"), "--memkit_recipe", str(work / "recipe.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_a_corrupt_checkpoint_stops_the_stock_script_with_a_message_not_a_traceback(stock_run, work, model_dir):
    _, out = stock_run
    resumed = work / "out_corrupt"
    ckpt = resumed / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", ckpt)
    state = ckpt / "memkit_state" / "state.json"
    meta = json.loads(state.read_text())
    meta["techniques"]["lora"] = "broken"
    state.write_text(json.dumps(meta))
    proc = run([*memkit_exe(), "run", str(STOCK), "--memkit_recipe", str(work / "recipe.yaml"),
                *script_args(model_dir, work / "train.txt", resumed, "--resume_from_checkpoint", str(ckpt))],
               cwd=work)
    assert proc.returncode == 1, explain(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, explain(proc)
    message = [line for line in proc.stderr.splitlines() if line.startswith("memkit run:")]
    assert len(message) == 1, explain(proc)
    assert "run_clm_stock.py stopped: CheckpointError:" in message[0]
    assert "techniques.lora = 'broken' is not a mapping" in message[0] and "resume from another" in message[0]


@pytest.mark.parametrize("error", ["RecipeError('the model has no such layer', key='schedule.lisa', fix='pick one')",
                                   "CheckpointError('checkpoint-3 is corrupt; resume from checkpoint-2')"])
def test_memkit_errors_raised_by_the_script_are_one_paragraph(work, tmp_path, capsys, error):
    script = tmp_path / "fails.py"
    script.write_text(f"from hf_memkit.errors import CheckpointError, RecipeError\nraise {error}\n")
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("memkit: 1\n")
    assert launcher.run_script(str(script), ["--memkit_recipe", str(recipe)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("memkit run:")]
    assert len(lines) == 1 and "fails.py stopped:" in lines[0] and "Traceback" not in err
    assert ("fix: pick one" in lines[0]) if "Recipe" in error else ("resume from checkpoint-2" in lines[0])


def test_multi_process_launch_validates_before_spawning(work, monkeypatch, capsys):
    from hf_memkit.run import main

    def no_exec(*args):  # pragma: no cover - reached only on failure
        raise AssertionError(f"torchrun was started: {args}")

    monkeypatch.setattr(os, "execv", no_exec)
    bad = work / "bad_nproc.yaml"
    bad.write_text(RECIPE.replace("optimizer:", "optimiser:"), encoding="utf-8")
    assert main(["--nproc-per-node", "2", str(STOCK), "--memkit_recipe", str(bad)]) == 2
    assert "did you mean 'optimizer'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--nproc-per-node", "2", str(STOCK), "--output_dir", "x"])
    assert exc.value.code == 2
    assert "--memkit_recipe" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# in process


@pytest.mark.parametrize(
    "argv, recipe, rest",
    [
        (["--a", "1", "--memkit_recipe", "r.yaml", "--b"], "r.yaml", ["--a", "1", "--b"]),
        (["--memkit_recipe=r.yaml", "--b", "2"], "r.yaml", ["--b", "2"]),
        (["--memkit-recipe", "x/r.yaml", "--b"], "x/r.yaml", ["--b"]),
        (["--memkit-recipe=r.yaml"], "r.yaml", []),
        (["--output_dir", "o"], None, ["--output_dir", "o"]),
        (["--memkit_recipe_extra", "1"], None, ["--memkit_recipe_extra", "1"]),  # only the exact flag
    ],
)
def test_extract_recipe_flag(argv, recipe, rest):
    assert extract_recipe_flag(argv) == (recipe, rest)


@pytest.mark.parametrize("argv", [["--memkit_recipe"], ["--x", "1", "--memkit-recipe"]])
def test_extract_recipe_flag_without_value(argv):
    with pytest.raises(SystemExit, match="needs a value"):
        extract_recipe_flag(argv)


def test_explicit_flags():
    flags = explicit_flags(["--max_steps", "3", "--learning-rate=1e-3", "--no_remove_unused_columns", "x", "-v"])
    assert {"max_steps", "learning_rate", "remove_unused_columns"} <= flags
    assert "x" not in flags and "v" not in flags


def test_recipe_installed_applies_to_trainers_built_inside_and_restores_init(tmp_path):
    import transformers
    from peft import PeftModel

    from hf_memkit import load_recipe
    from hf_memkit.data.models import load_model_and_tokenizer

    original = transformers.Trainer.__init__
    recipe = load_recipe({"adapter": {"lora": {"r": 2}}, "training_args": {"logging_steps": 7, "max_steps": 9}})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to="none", use_cpu=True)

    with recipe_installed(recipe, keep_args={"max_steps"}):
        assert transformers.Trainer.__init__ is not original
        model, _ = load_model_and_tokenizer("tiny")
        inside = transformers.Trainer(model=model, args=args)
    assert transformers.Trainer.__init__ is original

    assert inside.memkit is not None and inside.memkit.recipe is recipe
    assert isinstance(inside.model, PeftModel)
    assert inside.args.logging_steps == 7 and inside.args.max_steps == 3  # keep_args won over the recipe
    trainable = [n for n, p in inside.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    model, _ = load_model_and_tokenizer("tiny")
    outside = transformers.Trainer(model=model, args=args)
    assert getattr(outside, "memkit", None) is None and not isinstance(outside.model, PeftModel)

    with pytest.raises(RuntimeError, match="boom"):  # restored on an exception too
        with recipe_installed(recipe):
            raise RuntimeError("boom")
    assert transformers.Trainer.__init__ is original


def test_logging_to_stderr_is_scoped(capsys):
    import logging

    log = logging.getLogger("hf_memkit")
    before = (log.level, log.propagate, list(log.handlers))
    with launcher.logging_to_stderr():
        log.info("hf_memkit: visible")
    log.info("hf_memkit: not visible")
    assert (log.level, log.propagate, list(log.handlers)) == before
    err = capsys.readouterr().err
    assert "hf_memkit: visible" in err and "not visible" not in err


def test_a_torchrun_rank_skips_interpreter_teardown_but_keeps_atexit_and_status(work):
    """Under torchrun a rank leaves through ``os._exit`` after the ``atexit`` handlers: C++ objects of the process
    group are not finalised (their teardown could abort a rank after a successful run), buffered output and the
    script's exit status survive."""
    script = work / "rank_script.py"
    script.write_text(
        "import atexit, sys\n"
        "from pathlib import Path\n"
        "atexit.register(lambda: Path('atexit_ran').write_text('yes'))\n"
        "class Finalised:\n"
        "    def __del__(self):\n"
        "        Path('teardown_ran').write_text('yes')\n"
        "KEEP = Finalised()\n"
        "sys.stdout.write('buffered-without-newline')\n"
        "sys.exit(3)\n", encoding="utf-8")
    recipe = work / "empty_recipe.yaml"
    recipe.write_text("memkit: 1\n", encoding="utf-8")
    cwd = work / "rank"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "hf_memkit.run", str(script), "--memkit_recipe", str(recipe)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    as_rank = subprocess.run(cmd, cwd=cwd, env={**env, "TORCHELASTIC_RUN_ID": "test"}, capture_output=True,
                             text=True, timeout=120)
    assert as_rank.returncode == 3, explain(as_rank)
    assert "buffered-without-newline" in as_rank.stdout
    assert (cwd / "atexit_ran").is_file()
    assert not (cwd / "teardown_ran").exists()
    # the control: a plain process finalises its globals as usual
    plain = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 3, explain(plain)
    assert (cwd / "teardown_ran").is_file()
