"""Property: any mutation of a bundled recipe (as YAML text, or as a dict) either loads or raises a RecipeError,
quickly, in little memory, with a short message. Mutations: deleted, renamed and duplicated keys, anchors and
aliases (an alias bomb among them), non-finite, out-of-range and quoted numbers, huge values (ints, strings,
lists, nesting) and values of the wrong type.

Deterministic (``derandomize``) and sized to run in well under a minute.
"""

from __future__ import annotations

import copy
import re
import time
import tracemalloc
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from hf_memkit import RecipeError, load_recipe
from hf_memkit.data.recipes import recipes_dir
from hf_memkit.errors import MAX_MESSAGE_CHARS
from tests.test_recipe_errors import _at, _paths  # locations in a parsed recipe, shared with the error tests

TEXTS = [p.read_text(encoding="utf-8") for p in sorted(recipes_dir().glob("*.yaml"))]
DICTS = [yaml.safe_load(t) for t in TEXTS]
MAX_SECONDS = 2.0
MAX_PEAK_BYTES = 50 * 2**20

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _warm():
    for text in TEXTS:  # every technique module imported before anything is measured
        load_recipe(text)


def _alias_bomb(levels: int) -> str:
    out = ["bomb0: &b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    out += [f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(out) + f"\ntraining_args: {{learning_rate: *b{levels - 1}}}"


NUMBERS = st.sampled_from([
    ".inf", "-.inf", ".nan", ".NaN", "1e20", "-1e20", "1e-3", "'1e-3'", "1E+308", "1e400", "-5", "0", "-1", "0.0",
    "1.0", "65537", "2", "true", "false", "null", "'8'", "9" * 30, "9" * 5000, "-0.5", "1.5", "[0.9, 1.0]",
    "[true, 0.9]", "[.nan, 0.9]", "{a: 1}", "[]", "'text'", "~", "0x10", "0o7", "1_000",
])
#: settings of the bundled techniques and TrainingArguments fields that take numbers
NUMERIC_FIELDS = st.sampled_from([
    "lr", "eps", "weight_decay", "betas", "r", "rank", "lora_alpha", "lora_dropout", "bits", "group_size",
    "interval", "active_layers", "token_fraction", "ratio", "min_k", "groups", "ema_decay", "outer_lr",
    "num_samples", "seq_len", "decay", "temperature", "z_loss", "num_experts", "top_k", "mask_interval",
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "adam_beta1", "adam_beta2", "adam_epsilon", "warmup_steps", "max_grad_norm", "logging_steps", "save_steps",
    "save_total_limit", "seed",
])
WORDS = st.sampled_from([
    "memkit", "description", "optimizer", "adapter", "schedule", "activations", "compress", "loss", "export",
    "training_args", "adamw", "adamw_8bit", "lora", "qlora", "cce", "lisa", "lr", "r", "betas", "eps", "dir",
    "max_steps", "learning_rate", "per_device_train_batch_size", "adam_beta1", "seed", "format", "<<", "?",
])


@st.composite
def huge_values(draw) -> str:
    kind = draw(st.sampled_from(["string", "int", "list", "nest", "map", "bomb", "float"]))
    n = draw(st.integers(1, 6))
    if kind == "string":
        return "'" + "x" * (10 ** n) + "'"
    if kind == "int":
        return "9" * (10 ** min(n, 5))
    if kind == "float":
        return "1." + "1" * (10 ** min(n, 5)) + "e5"
    if kind == "list":
        return "[" + ", ".join(["1"] * (5 ** n)) + "]"
    if kind == "nest":
        depth = draw(st.integers(1, 3000))
        return "[" * depth + "]" * depth
    if kind == "map":
        return "{" + ", ".join(f"k{i}: {i}" for i in range(4 ** n)) + "}"
    return "*b" + str(draw(st.integers(0, 9)))  # an alias, defined or not


@st.composite
def mutated_texts(draw) -> str:
    lines = draw(st.sampled_from(TEXTS)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        # line 0 is `memkit: 1`: touched rarely, or most recipes would stop at the version check
        i = draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, max(len(lines) - 1, 0)))
        line = lines[i] if lines else ""
        op = draw(st.sampled_from(["delete", "duplicate", "rename", "rename", "number", "setting", "setting",
                                   "setting", "training_args", "training_args", "huge", "huge", "anchor", "bomb",
                                   "retype"]))
        if op == "setting":  # a number field into a technique's settings: `adamw: {` -> `adamw: {lr: .nan, `
            spots = [m.end() for m in re.finditer(r"[a-z0-9_]+: \{", line)][1:] or [m.end() for m in re.finditer(
                r"[a-z0-9_]+: \{", line)]
            if spots:
                at = draw(st.sampled_from(spots))
                lines[i] = line[:at] + f"{draw(NUMERIC_FIELDS)}: {draw(NUMBERS)}, " + line[at:]
        elif op == "training_args":
            lines = [ln for ln in lines if not ln.startswith("training_args:")]
            lines.append(f"training_args: {{{draw(NUMERIC_FIELDS)}: {draw(NUMBERS)}}}")
        elif op == "delete" and lines:
            del lines[i]
        elif op == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif op == "rename":
            words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", line)
            if words:
                old = draw(st.sampled_from(words))
                lines[i] = line.replace(old, draw(st.one_of(WORDS, st.text("abcdefg_ :", max_size=6))), 1)
        elif op == "number":
            spans = [m.span() for m in re.finditer(r"(?<=: )[^,{}\[\]\n]+", line)]
            if spans:
                a, b = draw(st.sampled_from(spans))
                lines[i] = line[:a] + draw(NUMBERS) + line[b:]
            else:
                lines.insert(i, f"{draw(WORDS)}: {draw(NUMBERS)}")
        elif op == "huge":
            lines.insert(i, f"{draw(WORDS)}: {draw(huge_values())}")
        elif op == "anchor":
            lines.insert(i, f"{draw(WORDS)}: &a {draw(NUMBERS)}")
            lines.insert(draw(st.integers(0, len(lines))), f"{draw(WORDS)}: *a")
        elif op == "bomb":
            lines.insert(i, _alias_bomb(draw(st.integers(2, 12))))
        elif op == "retype":
            spans = [m.span() for m in re.finditer(r"(?<=: ).+$", line)]
            if spans:
                a, b = spans[0]
                lines[i] = line[:a] + draw(st.sampled_from(["[x]", "{}", "x", "3", "[{}]", "{a: {b: {c: d}}}"]))
    return "\n".join(lines) + "\n"


PY_VALUES = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), float("nan"), True, False, None, 0, -1, -5, 10**20, 2**63,
                     10**5000, 1e20, "1e-3", "0.001", "", "x" * 100_000, [0.9, 1.0], [True], {"a": [1.5]}]),
    st.integers(), st.floats(), st.text(max_size=10),
)


@st.composite
def mutated_dicts(draw) -> dict:
    data = copy.deepcopy(draw(st.sampled_from(DICTS)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(data)))
        if not path:
            continue
        parent, key = _at(data, path[:-1]), path[-1]
        op = draw(st.sampled_from(["delete", "rename", "replace", "replace", "nest"]))
        if op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.one_of(WORDS, st.text(max_size=6)))] = parent.pop(key)
        elif op == "nest":
            deep: Any = parent[key]
            for _ in range(draw(st.integers(1, 500))):
                deep = [deep]
            parent[key] = deep
        else:
            parent[key] = draw(PY_VALUES)
    return data


def _load(source: Any) -> Any:
    try:
        recipe = load_recipe(source)
    except RecipeError as exc:
        assert len(str(exc)) <= MAX_MESSAGE_CHARS
        assert exc.fix
        _event(f"refused: {re.sub(r'[0-9]+', 'N', exc.problem)[:40]}")
        return None
    _event("loaded")
    return recipe


def _event(what: str) -> None:
    """Outcome counts for ``pytest --hypothesis-show-statistics`` (a check that the mutations reach past YAML)."""
    if currently_in_test_context():
        event(what)


def _load_bounded(source: Any) -> Any:
    """load_recipe(source): a Recipe or None (RecipeError); anything else fails. Timed in a plain run, then
    loaded again under tracemalloc for the peak memory (tracing slows the pure-Python YAML scanner ~10x)."""
    start = time.perf_counter()
    recipe = _load(source)
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"took {elapsed:.2f} s"
    tracemalloc.start()
    try:
        _load(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"peak {peak / 2**20:.1f} MiB"
    return recipe


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # huge values are the point here
@SETTINGS
@given(text=mutated_texts())
def test_mutated_recipe_text_loads_or_raises_recipe_error(text: str):
    recipe = _load_bounded(text)
    if recipe is not None:  # what loads writes YAML that loads to the same recipe
        assert load_recipe(recipe.to_yaml()).to_dict() == recipe.to_dict()


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # huge values are the point here
@SETTINGS
@given(data=mutated_dicts())
def test_mutated_recipe_dict_loads_or_raises_recipe_error(data: dict):
    recipe = _load_bounded(data)
    if recipe is not None:
        assert load_recipe(recipe.to_yaml()).to_dict() == recipe.to_dict()


def test_the_alias_bomb_of_the_fuzzer_is_refused_at_once():
    assert _load_bounded("memkit: 1\n" + _alias_bomb(12)) is None
