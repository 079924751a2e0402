"""Strict, bounded recipe loading: the YAML reader refuses what a recipe never needs (anchors, duplicate keys,
huge or non-regular files), error messages stay short whatever the input, and numbers are finite and in range
before any model loads."""

from __future__ import annotations

import math
import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from hf_memkit import RecipeError, load_recipe
from hf_memkit.errors import MAX_MESSAGE_CHARS, short_repr
from hf_memkit.recipe import check_training_arg_ranges
from hf_memkit.recipe_yaml import MAX_RECIPE_BYTES

V = "memkit: 1\n"


def _error(source, **kw) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(source, **kw)
    assert len(str(info.value)) <= MAX_MESSAGE_CHARS
    assert info.value.fix
    return info.value


@pytest.fixture(autouse=True, scope="module")
def _warm_registry():
    load_recipe(V + "optimizer: {adamw: {}}\n")  # imports every technique once, outside the measured loads


# ---------------------------------------------------------------------------------------------------------
# the YAML reader


def test_duplicate_top_level_key_names_its_line():
    err = _error(V + "optimizer: {adamw: {}}\ndescription: x\noptimizer: {adamw_8bit: {}}\n")
    assert "duplicate key 'optimizer' at line 4 (first at line 2)" in str(err)


def test_duplicate_setting_names_its_line():
    err = _error(V + "optimizer:\n  adamw:\n    lr: 1.0e-4\n    lr: 1.0e-3\n")
    assert "duplicate key 'lr' at line 5 (first at line 4)" in str(err)


def test_duplicate_key_in_a_flow_mapping():
    assert "duplicate key 'r'" in str(_error(V + "adapter: {lora: {r: 4, r: 8}}\n"))


def test_anchor_and_alias_are_refused_with_the_reason():
    err = _error(V + "description: &d hello\ntraining_args: {run_name: *d}\n")
    assert "anchor &d at line 2" in err.problem
    assert "recipes do not support YAML anchors" in err.problem
    assert "in full" in err.fix


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    lines = [V, "description: ok\n", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]\n")
    lines.append(f"training_args: {{learning_rate: *l{levels - 1}}}\n")  # where validation fails
    return "".join(lines)


def test_alias_bomb_fails_fast_and_small():
    text = _alias_bomb()  # 10**8 * 9 strings once expanded
    tracemalloc.start()
    start = time.perf_counter()
    try:
        err = _error(text)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 5 * 2**20, peak
    assert "anchor" in err.problem


def test_merge_key_alias_is_refused_too():
    err = _error(V + "base: &b {lr: 1.0e-4}\noptimizer: {adamw: {<<: *b}}\n")
    assert "anchor" in err.problem


def test_recipe_file_over_the_size_limit(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text(V + "# " + "x" * MAX_RECIPE_BYTES + "\n", encoding="utf-8")
    err = _error(path)
    assert err.path == str(path)
    assert f"larger than {MAX_RECIPE_BYTES // 1024} KiB" in err.problem


def test_recipe_string_over_the_size_limit():
    err = _error(V + "description: " + "x" * (MAX_RECIPE_BYTES + 1) + "\n")
    assert err.path == "<string>"
    assert "larger than" in err.problem


def test_size_limit_counts_bytes_not_characters(tmp_path: Path):
    text = V + "description: " + "é" * (MAX_RECIPE_BYTES // 2 + 10) + "\n"  # 2 bytes each
    assert len(text) < MAX_RECIPE_BYTES
    assert "larger than" in _error(text).problem


def _load_in_thread(source) -> BaseException | None:
    """load_recipe(source) in a thread: a blocking read fails the test instead of hanging it."""
    result: list[BaseException | None] = []

    def run():
        try:
            load_recipe(source)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "load_recipe blocked"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_is_not_a_regular_file(tmp_path: Path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    exc = _load_in_thread(fifo)
    assert isinstance(exc, RecipeError), exc
    assert "not a regular file" in exc.problem and "FIFO" in exc.problem
    assert "not found" not in str(exc)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_is_not_a_regular_file():
    exc = _load_in_thread("/dev/zero")
    assert isinstance(exc, RecipeError), exc
    assert "not a regular file" in exc.problem and "device" in exc.problem


def test_huge_integer_literal_is_refused():
    err = _error(V + "training_args: {seed: " + "9" * 5000 + "}\n")
    assert "integer of 5000 characters" in err.problem


def test_deep_nesting_is_refused_not_a_recursion_error():
    err = _error(V + "description: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nests deeper" in err.problem


def test_many_values_are_refused():
    err = _error(V + "description: [" + ", ".join(["1"] * 30000) + "]\n")
    assert "more than" in err.problem


# ---------------------------------------------------------------------------------------------------------
# 1e-3 is a float everywhere


def test_exponent_without_dot_is_a_float_in_technique_settings_and_training_args():
    recipe = load_recipe(V + "optimizer: {adamw: {lr: 1e-3, eps: 1E-8}}\ntraining_args: {learning_rate: 1e-3}\n")
    lr = recipe.get("adamw").config.lr
    assert lr == recipe.training_args["learning_rate"] == 1e-3
    assert isinstance(recipe.training_args["learning_rate"], float)
    assert recipe.get("adamw").config.eps == 1e-8


def test_quoted_number_in_training_args_says_what_to_write():
    err = _error(V + "training_args: {learning_rate: '1e-3'}\n")
    assert err.key == "training_args.learning_rate"
    assert "write 1.0e-3 or 0.001" in err.fix


def test_quoted_number_in_technique_settings_says_what_to_write():
    err = _error(V + "optimizer: {adamw: {lr: '1e-3'}}\n")
    assert err.key == "optimizer.adamw.lr"
    assert "write 1.0e-3 or 0.001" in str(err)


def test_string_that_looks_like_a_number_round_trips_as_a_string():
    recipe = load_recipe({"description": "1e5"})
    assert "'1e5'" in recipe.to_yaml()
    assert load_recipe(recipe.to_yaml()).description == "1e5"


# ---------------------------------------------------------------------------------------------------------
# numbers: finite, in range, numbers


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("optimizer: {adamw: {lr: true}}", "optimizer.adamw.lr", "True is not a number"),
        ("optimizer: {adamw: {lr: .inf}}", "optimizer.adamw.lr", "inf is not a finite number"),
        ("optimizer: {adamw: {lr: .nan}}", "optimizer.adamw.lr", "nan is not a finite number"),
        ("optimizer: {adamw: {eps: -.inf}}", "optimizer.adamw.eps", "not a finite number"),
        ("optimizer: {adamw: {lr: 'nan'}}", "optimizer.adamw.lr", "not a finite number"),
        ("loss: {cce: {filter_eps: '-inf'}}", "loss.cce.filter_eps", "not a finite number"),
        ("loss: {cce: {filter_eps: .nan}}", "loss.cce.filter_eps", "not a finite number"),
        ("optimizer: {adamw: {betas: [1.0, 0.999]}}", "optimizer.adamw.betas.0", "less than 1"),
        ("optimizer: {adamw_8bit: {betas: [0.9, -0.1]}}", "optimizer.adamw_8bit.betas.1", "greater than or equal"),
        ("optimizer: {ast: {betas: [0.9, 1.5]}}", "optimizer.ast.betas.1", "less than 1"),
        ("optimizer: {adamw: {betas: [true, 0.9]}}", "optimizer.adamw.betas", "not a number"),
        ("optimizer: {adamw: {betas: [0.9, .nan]}}", "optimizer.adamw.betas", "not a finite number"),
        ("adapter: {lora: {r: 1e20}}", "adapter.lora.r", "too large"),
        ("adapter: {lora: {r: 1.0e+5}}", "adapter.lora.r", "less than or equal to 65536"),
        ("adapter: {lora: {r: 100000000000000000000000}}", "adapter.lora.r", "beyond 64 bits"),
        ("adapter: {lora: {r: true}}", "adapter.lora.r", "not a number"),
        ("adapter: {lora: {rank_pattern: {q: 0}}}", "adapter.lora.rank_pattern.q", "greater than or equal to 1"),
        ("adapter: {lora: {layers_to_transform: [0, -1]}}", "adapter.lora.layers_to_transform.1", "greater than"),
        ("activations: [{offload: {token_fraction: .nan}}]", "activations[0].offload.token_fraction", "finite"),
        ("training_args: {max_steps: -5}", "training_args.max_steps", "max_steps = -5 is out of range"),
        ("training_args: {max_steps: 0}", "training_args.max_steps", "out of range"),
        ("training_args: {per_device_train_batch_size: 0}", "training_args.per_device_train_batch_size",
         "out of range [1, inf)"),
        ("training_args: {gradient_accumulation_steps: 0}", "training_args.gradient_accumulation_steps", "range"),
        ("training_args: {adam_beta1: 1.0}", "training_args.adam_beta1", "out of range [0, 1)"),
        ("training_args: {adam_beta2: -0.5}", "training_args.adam_beta2", "out of range"),
        ("training_args: {adam_epsilon: 0}", "training_args.adam_epsilon", "out of range (0, inf)"),
        ("training_args: {learning_rate: .inf}", "training_args.learning_rate", "not a finite number"),
        ("training_args: {learning_rate: .nan}", "training_args.learning_rate", "not a finite number"),
        ("training_args: {learning_rate: -1.0e-4}", "training_args.learning_rate", "out of range"),
        ("training_args: {learning_rate: true}", "training_args.learning_rate", "expected float"),
        ("training_args: {num_train_epochs: 0}", "training_args.num_train_epochs", "out of range"),
        ("training_args: {weight_decay: -0.1}", "training_args.weight_decay", "out of range"),
        ("training_args: {max_grad_norm: .inf}", "training_args.max_grad_norm", "not a finite number"),
        ("training_args: {logging_steps: 0}", "training_args.logging_steps", "out of range"),
        ("training_args: {save_total_limit: 0}", "training_args.save_total_limit", "out of range"),
        ("training_args: {seed: -1}", "training_args.seed", "out of range"),
        ("training_args: {warmup_steps: -3}", "training_args.warmup_steps", "out of range"),
    ],
)
def test_bad_number_is_a_recipe_error_naming_the_key(text: str, key: str, fragment: str):
    err = _error(V + text + "\n")
    assert err.key == key, str(err)
    assert fragment in str(err), str(err)


def test_good_numbers_still_load():
    recipe = load_recipe(
        V + "optimizer: {adamw: {lr: 2.0e-4, betas: [0.0, 0.95], weight_decay: 0}}\n"
        "adapter: {lora: {r: 65536, rank_pattern: {q: 4}, layers_to_transform: [0, 1]}}\n"
        "training_args: {max_steps: -1, learning_rate: 1, adam_beta1: 0, warmup_steps: 0.03, save_total_limit: null,"
        " seed: 0, max_grad_norm: 0}\n"
    )
    assert recipe.get("adamw").config.betas == (0.0, 0.95)
    assert load_recipe({"training_args": {"max_steps": 5}}).training_args == {"max_steps": 5}


def test_check_training_arg_ranges_is_reusable_with_any_prefix():
    check_training_arg_ranges({"learning_rate": 1e-4, "max_steps": -1, "report_to": "none"})
    with pytest.raises(RecipeError) as info:
        check_training_arg_ranges({"max_steps": -5}, "command line", prefix="")
    assert (info.value.path, info.value.key) == ("command line", "max_steps")
    with pytest.raises(RecipeError) as info:
        check_training_arg_ranges({"learning_rate": math.nan}, "r.yaml")
    assert (info.value.path, info.value.key) == ("r.yaml", "training_args.learning_rate")


# ---------------------------------------------------------------------------------------------------------
# export.dir


@pytest.mark.parametrize("bad", ["/tmp/x", "..", "../x", "a/../../b", "", ".", "./", "C:\\x", "\\\\server\\x",
                                 "a/..\\..\\b"])
def test_export_dir_must_stay_inside_the_output_dir(bad: str):
    err = _error({"export": {"dir": bad}})
    assert err.key == "export.dir"
    assert "relative folder inside output_dir" in str(err)
    assert "dir: export" in str(err)


@pytest.mark.parametrize("good", ["export", "exports/final", "./final", "my..name"])
def test_export_dir_relative_is_fine(good: str):
    assert load_recipe({"export": {"dir": good}}).export.dir == good


# ---------------------------------------------------------------------------------------------------------
# bounded messages


def test_short_repr_is_bounded_for_huge_values():
    nested: list = ["x"]
    for _ in range(30):
        nested = [nested] * 10
    start = time.perf_counter()
    for value in (nested, 10**10000, "y" * 10**6, b"z" * 10**6, {i: i for i in range(10**5)}):
        assert len(short_repr(value)) <= 80
    assert time.perf_counter() - start < 1.0


def test_recipe_error_message_has_a_fixed_maximum():
    err = RecipeError("p" * 10**6, path="f" * 10**5, key="k" * 10**5, fix="x" * 10**6)
    assert len(str(err)) <= MAX_MESSAGE_CHARS
    assert len(err.problem) < 1000 and len(err.fix) < 1000


def test_huge_value_in_a_setting_gives_a_short_message():
    err = _error({"optimizer": {"adamw": {"lr": ["x" * 10**6] * 1000}}})
    assert len(str(err)) < 600


def test_huge_int_key_in_a_dict_recipe():
    err = _error({"optimizer": {"adamw": {10**5000: 1}}})
    assert "digits" in str(err)


SECRET = "TOKEN_d41d8cd98f00b204e9800998ecf8427e"


@pytest.mark.parametrize(
    "name, content",
    [
        ("script.py", f"import os\n\ndef main():\n    key = '{SECRET}'\n    return {{'a': [1, 2}}\n"),
        ("notes.md", f"# Notes\n\nThe token is: {SECRET} and: more: colons\n- a list\n"),
        ("data.json", f'{{"name": "{SECRET}", "values": [1, 2, 3]}}\n'),
        ("config.yaml", f"services:\n  web:\n    image: {SECRET}\n"),
        ("tabs.yaml", f"memkit: 1\ndescription:\n\t{SECRET}\n"),
        ("prose.txt", f"{SECRET} is just a line of words\n"),
        ("key.yaml", f"memkit: 1\noptimizer: {{adamw: {{lr: 1}}}}\n{SECRET}: [unclosed\n"),
    ],
)
def test_error_never_quotes_a_non_recipe_file(tmp_path: Path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    err = _error(path)
    assert SECRET not in str(err) and SECRET not in (err.fix or "")


def test_non_recipe_yaml_says_not_a_recipe(tmp_path: Path):
    path = tmp_path / "compose.yaml"
    path.write_text("services:\n  web: {image: nginx}\nversion: '3'\n", encoding="utf-8")
    err = _error(path)
    assert "not a recipe" in err.problem
    assert "memkit: 1" in err.fix


def test_binary_file_is_not_a_recipe(tmp_path: Path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10)
    err = _error(path)
    assert "not UTF-8" in err.problem


def test_a_misspelt_recipe_without_version_still_gets_its_hint():
    assert "write it under `adapter:`" in str(_error("lora: {r: 8}\n"))
    assert "did you mean 'optimizer'" in str(_error("optimiser: {adamw: {}}\n"))
