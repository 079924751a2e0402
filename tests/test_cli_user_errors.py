"""Every `memkit` command, given a user error, exits non-zero with a message that names the problem, and never
shows a traceback (tracebacks are for our bugs, not for a misspelled flag)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test runs the command line in a child process


def memkit(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "hf_memkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.yaml").write_text("memkit: 1\nadapter: {lora: {rank: 8}}\n")
    (tmp_path / "no_compress.yaml").write_text("memkit: 1\noptimizer: {adamw: {}}\n")
    (tmp_path / "bomb.yaml").write_text("memkit: 1\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a]\n"
                                        "c: [*b, *b, *b, *b, *b, *b]\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "README.md").write_text("my notes")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "script.py").write_text("print('hi')\n")
    return tmp_path


CASES = {
    "train: misspelled recipe key": (["train", "--model", "tiny", "--recipe", "{t}/bad.yaml"], "did you mean 'r'"),
    "train: unknown model": (["train", "--model", "no/such-model"], "not 'tiny', 'smollm2' or a local folder"),
    "train: unknown flag": (["train", "--model", "tiny", "--bogus", "1"], "unknown argument '--bogus'"),
    # TrainingArguments' own check of a combination (a ValueError in its __post_init__) is a message too
    "train: flags TrainingArguments refuses": (["train", "--model", "tiny", "--bf16", "--fp16"],
                                               "TrainingArguments refuses these flags"),
    "run: missing script": (["run", "{t}/nope.py", "--memkit_recipe", "lora"], "nope.py"),
    "run: bad recipe": (["run", "{t}/script.py", "--memkit_recipe", "{t}/bad.yaml"], "did you mean 'r'"),
    "estimate: unknown recipe": (["estimate", "--model", "tiny", "--recipe", "no_such_recipe"], "not found"),
    "estimate: unknown flag": (["estimate", "--model", "tiny", "--bogus"], "unrecognized arguments: --bogus"),
    "compare: unknown model": (["compare", "baseline", "--model", "no/such-model"], "not 'tiny', 'smollm2'"),
    "compress: no compress slot": (["compress", "tiny", "--recipe", "{t}/no_compress.yaml", "-o", "{t}/out"],
                                   "compress"),
    "compress: non-empty output": (["compress", "tiny", "--recipe", "gptq_lorc", "-o", "{t}/full"], "--overwrite"),
    "export: foreign folder": (["export", "{t}/foreign"], "foreign"),
    "export: missing folder": (["export", "{t}/missing"], "missing"),
    "recipes explain: missing file": (["recipes", "explain", "{t}/missing.yaml"], "not found"),
    "recipes validate: alias bomb": (["recipes", "validate", "{t}/bomb.yaml"], "alias"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_a_message_and_a_non_zero_exit_never_a_traceback(case, files):
    args, needle = CASES[case]
    r = memkit(*[a.replace("{t}", str(files)) for a in args])
    assert r.returncode != 0, (case, r.stdout[-1000:], r.stderr[-1000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert needle.lower() in (r.stderr + r.stdout).lower(), (case, r.stderr[-2000:])
    if case.startswith("export"):
        assert (files / "foreign" / "README.md").read_text() == "my notes"
    assert (files / "full" / "keep.txt").read_text() == "x"
