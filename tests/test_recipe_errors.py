"""Bad recipes: every one is a RecipeError (also a ValueError) naming the file, the key path and the fix.

The second half is a property test: random mutations of valid recipes either load or raise a RecipeError;
any other exception is a bug in hf_memkit/recipe.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from hf_memkit import RecipeError, Technique, TechniqueConfig, load_recipe, registry
from hf_memkit.data.recipes import recipes_dir

# ---------------------------------------------------------------------------------------------------------
# throwaway techniques: no list-slot technique is built in yet, and none of the built-ins conflicts with or
# requires another technique


class _SchedConfig(TechniqueConfig):
    every: int = Field(1, ge=1, description="steps between two updates")


class _Sched(Technique):
    name: ClassVar[str] = "memkit_test_sched"
    slot: ClassVar[str] = "schedule"
    config_cls = _SchedConfig


class _NeedsOptimizer(Technique):
    name: ClassVar[str] = "memkit_test_needs_opt"
    slot: ClassVar[str] = "activations"
    requires: ClassVar[dict[str, str]] = {"slot:optimizer": "it reads the optimizer's state"}


class _NoLora(Technique):
    name: ClassVar[str] = "memkit_test_no_lora"
    slot: ClassVar[str] = "compress"
    conflicts: ClassVar[dict[str, str]] = {"lora": "it cannot compress an unmerged adapter"}


_THROWAWAY = (_Sched, _NeedsOptimizer, _NoLora)


@pytest.fixture(autouse=True)
def throwaway_techniques():
    for cls in _THROWAWAY:
        registry.register_technique(cls, origin="test")
    yield
    for cls in _THROWAWAY:
        registry.unregister_technique(cls.name)


def test_throwaway_techniques_are_removed_after_use():
    # the fixture registered them; this checks the unregister path they rely on actually works
    registry.unregister_technique("memkit_test_sched")
    assert registry.get("memkit_test_sched") is None
    with pytest.raises(RecipeError, match="unknown technique 'memkit_test_sched'"):
        load_recipe({"schedule": [{"memkit_test_sched": {}}]})
    registry.register_technique(_Sched, origin="test")  # the fixture unregisters it again


# ---------------------------------------------------------------------------------------------------------
# the table of bad recipes


class Bad(NamedTuple):
    id: str
    recipe: Any  # YAML text (written to a file) or a dict
    key: str | None  # the dotted key path the error must name (None: no key applies, e.g. broken YAML)
    fragments: tuple[str, ...]  # each must appear in the message (problem or fix)


V = "memkit: 1\n"

YAML_CASES = [
    # -- the document itself
    Bad("yaml-syntax-unclosed-flow", V + "optimizer: {adamw: {lr: 1.0e-4}\n", None,
        ("not valid YAML", "line 3", "fix the YAML syntax")),
    Bad("yaml-syntax-tab-indent", V + "adapter:\n\tlora: {}\n", None, ("not valid YAML", "line 3", "'\\t'")),
    Bad("yaml-syntax-bad-indent", V + "  optimizer: x\n", None, ("not valid YAML", "line 2")),
    Bad("yaml-unhashable-key", V + "optimizer: {? [a] : 1}\n", None, ("not valid YAML", "line 2")),
    Bad("empty-file", "", None, ("the recipe is empty", "memkit: 1")),
    Bad("comment-only-file", "# nothing here\n", None, ("the recipe is empty",)),
    Bad("top-level-list", "- memkit: 1\n- optimizer: adamw\n", None, ("must be a mapping", "got a list")),
    Bad("top-level-scalar", "just some words\n", None, ("must be a mapping", "got a str")),
    # -- version
    Bad("missing-memkit", "optimizer: {adamw: {}}\n", "memkit", ("schema version is missing", "add `memkit: 1`")),
    Bad("version-2", "memkit: 2\n", "memkit", ("unsupported schema version 2", "reads `memkit: 1`")),
    Bad("version-string", "memkit: '1'\n", "memkit", ("unsupported schema version '1'",)),
    Bad("version-bool", "memkit: true\n", "memkit", ("unsupported schema version True",)),
    Bad("version-float", "memkit: 1.0\n", "memkit", ("unsupported schema version 1.0",)),
    # -- top-level keys
    Bad("top-level-typo", V + "optimiser: {adamw: {}}\n", "optimiser",
        ("unknown top-level key 'optimiser'", "did you mean 'optimizer'")),
    Bad("top-level-unknown-no-match", V + "zzz: 1\n", "zzz",
        ("unknown top-level key 'zzz'", "top-level keys are: memkit, description", "training_args")),
    Bad("technique-as-top-level-key", V + "lora: {r: 8}\n", "lora",
        ("unknown top-level key 'lora'", "technique of slot 'adapter'", "write it under `adapter:`")),
    Bad("optimizer-technique-as-top-level-key", V + "adamw_8bit: {}\n", "adamw_8bit",
        ("write it under `optimizer:`",)),
    Bad("description-not-string", V + "description: [a, b]\n", "description", ("must be a string", "quote")),
    Bad("description-zero", V + "description: 0\n", "description", ("must be a string",)),
    # -- slots
    Bad("unknown-technique", V + "adapter: {lorra: {}}\n", "adapter.lorra",
        ("unknown technique 'lorra' in slot 'adapter'", "did you mean 'lora'", "known adapter techniques:",
         "lora", "qlora")),
    Bad("unknown-technique-shorthand", V + "optimizer: adamw8bit\n", "optimizer.adamw8bit",
        ("unknown technique 'adamw8bit'", "did you mean 'adamw_8bit'", "known optimizer techniques:", "adamw")),
    Bad("unknown-technique-in-list-slot", V + "schedule: [{memkit_test_schd: {}}]\n",
        "schedule[0].memkit_test_schd", ("did you mean 'memkit_test_sched'", "known schedule techniques:")),
    Bad("technique-in-wrong-slot", V + "optimizer: {lora: {}}\n", "optimizer.lora",
        ("'lora' is a 'adapter' technique, not a 'optimizer' one", "move it under `adapter:`")),
    Bad("adapter-in-list-slot", V + "schedule: [{qlora: {}}]\n", "schedule[0].qlora",
        ("'qlora' is a 'adapter' technique", "move it under `adapter:`")),
    Bad("two-in-one-slot", V + "optimizer: {adamw: {}, adamw_8bit: {}}\n", "optimizer",
        ("takes one technique, but 2 are given: adamw, adamw_8bit", "keep one of them")),
    Bad("list-in-one-slot", V + "optimizer: [{adamw: {}}]\n", "optimizer",
        ("takes one technique, not a list", "optimizer: {name: {...}}")),
    Bad("scalar-in-one-slot", V + "adapter: 3\n", "adapter", ("must be a mapping", "got a int")),
    Bad("empty-one-slot", V + "adapter: {}\n", "adapter", ("slot 'adapter' is empty", "delete `adapter:`")),
    Bad("scalar-in-list-slot", V + "schedule: memkit_test_sched\n", "schedule",
        ("takes a list of techniques, got a str", "schedule: [{name: {...}}]")),
    Bad("number-in-list-slot", V + "schedule: 7\n", "schedule", ("takes a list of techniques, got a int",)),
    Bad("list-entry-is-list", V + "schedule: [[memkit_test_sched]]\n", "schedule[0]",
        ("one-key mapping", "- name: {...}")),
    Bad("list-entry-two-keys", V + "schedule:\n  - {memkit_test_sched: {}, other: {}}\n", "schedule[0]",
        ("one-key mapping",)),
    Bad("list-entry-empty", V + "schedule: [{memkit_test_sched: {}}, {}]\n", "schedule[1]", ("one-key mapping",)),
    Bad("same-technique-twice", V + "schedule:\n  - memkit_test_sched: {every: 2}\n  - memkit_test_sched: {}\n",
        "schedule[1].memkit_test_sched", ("listed twice in 'schedule'", "list each technique once")),
    # -- settings
    Bad("unknown-setting", V + "optimizer: {adamw: {lrr: 1.0e-4}}\n", "optimizer.adamw.lrr",
        ("unknown setting 'lrr'", "did you mean 'lr'", "settings of `optimizer.adamw`: lr, betas")),
    Bad("unknown-setting-no-match", V + "adapter: {lora: {qqqq: 1}}\n", "adapter.lora.qqqq",
        ("unknown setting 'qqqq'", "settings of `adapter.lora`: r, lora_alpha")),
    Bad("settings-not-mapping", V + "optimizer: {adamw: 3}\n", "optimizer.adamw",
        ("settings must be a mapping, got 3", "adamw: {}")),
    Bad("settings-list", V + "adapter: {lora: [8]}\n", "adapter.lora", ("settings must be a mapping",)),
    Bad("lr-not-number", V + "optimizer: {adamw: {lr: fast}}\n", "optimizer.adamw.lr",
        ("invalid value 'fast'", "valid number", "lr: learning rate")),
    Bad("r-fractional", V + "adapter: {lora: {r: 1.5}}\n", "adapter.lora.r",
        ("invalid value 1.5", "valid integer", "r: rank of the update")),
    Bad("betas-too-short", V + "optimizer: {adamw_8bit: {betas: [0.9]}}\n", "optimizer.adamw_8bit.betas",
        ("Field required", "betas: decay rates")),
    Bad("lr-negative", V + "optimizer: {adamw: {lr: -1}}\n", "optimizer.adamw.lr",
        ("invalid value -1", "greater than 0")),
    Bad("r-zero", V + "adapter: {lora: {r: 0}}\n", "adapter.lora.r",
        ("invalid value 0", "greater than or equal to 1")),
    Bad("dropout-too-big", V + "adapter: {lora: {lora_dropout: 1.5}}\n", "adapter.lora.lora_dropout",
        ("invalid value 1.5", "less than 1", "dropout on the adapter input")),
    Bad("bias-literal", V + "adapter: {lora: {bias: some}}\n", "adapter.lora.bias",
        ("invalid value 'some'", "'none', 'all' or 'lora_only'")),
    Bad("quant-type-literal", V + "adapter: {qlora: {quant_type: nf3}}\n", "adapter.qlora.quant_type",
        ("invalid value 'nf3'", "'nf4' or 'fp4'")),
    Bad("blocksize-literal", V + "adapter: {qlora: {blocksize: 100}}\n", "adapter.qlora.blocksize",
        ("invalid value 100", "64, 128 or 256", "values per absmax block")),
    # union-typed fields: the key path names the user's key, not pydantic's union member tag (`list[str]`)
    Bad("target-modules-mapping", V + "adapter: {lora: {target_modules: {q: 1}}}\n", "adapter.lora.target_modules",
        ("invalid value {'q': 1}",)),
    Bad("layers-to-transform-fraction", V + "adapter: {lora: {layers_to_transform: [1, 2.5]}}\n",
        "adapter.lora.layers_to_transform.1", ("invalid value 2.5",)),
    Bad("list-slot-setting-range", V + "schedule: [{memkit_test_sched: {every: 0}}]\n",
        "schedule[0].memkit_test_sched.every", ("greater than or equal to 1", "steps between two updates")),
    # -- training_args
    Bad("training-args-not-mapping", V + "training_args: 3\n", "training_args",
        ("must be a mapping of TrainingArguments fields", "gradient_checkpointing: true")),
    Bad("training-args-list", V + "training_args: [gradient_checkpointing]\n", "training_args",
        ("must be a mapping",)),
    Bad("training-args-typo", V + "training_args: {learnin_rate: 1.0e-4}\n", "training_args.learnin_rate",
        ("'learnin_rate' is not a field of transformers.TrainingArguments", "did you mean 'learning_rate'")),
    Bad("training-args-int", V + "training_args: {per_device_train_batch_size: two}\n",
        "training_args.per_device_train_batch_size", ("invalid value 'two'", "expected int")),
    Bad("training-args-bool", V + "training_args: {gradient_checkpointing: 'yes'}\n",
        "training_args.gradient_checkpointing", ("invalid value 'yes'", "expected bool")),
    Bad("training-args-enum", V + "training_args: {lr_scheduler_type: bogus}\n", "training_args.lr_scheduler_type",
        ("invalid value 'bogus'", "expected one of 'linear', 'cosine'")),
    Bad("training-args-enum-unhashable", V + "training_args: {optim: [adamw_torch]}\n", "training_args.optim",
        ("invalid value ['adamw_torch']", "'adamw_torch'")),
    Bad("training-args-float", V + "training_args: {learning_rate: high}\n", "training_args.learning_rate",
        ("invalid value 'high'", "expected float")),
    # -- export
    Bad("export-unknown-key", V + "export: {fromat: safetensors}\n", "export.fromat",
        ("unknown setting 'fromat'", "did you mean 'format'")),
    Bad("export-bad-format", V + "export: {format: gguf}\n", "export.format",
        ("invalid value 'gguf'", "'safetensors'", "checkpoint format of the export")),
    Bad("export-not-mapping", V + "export: safetensors\n", "export", ("settings must be a mapping",)),
    # -- compatibility
    Bad("optimizer-vs-training-args-optim", V + "optimizer: {adamw: {}}\ntraining_args: {optim: adamw_torch}\n",
        "optimizer.adamw", ("cannot be combined with 'training_args:optim'",
                            "TrainingArguments.optim would be ignored", "remove one of 'adamw' and 'optim'")),
    Bad("requires-missing", V + "activations: [memkit_test_needs_opt]\n", "activations.memkit_test_needs_opt",
        ("'memkit_test_needs_opt' requires 'slot:optimizer'", "reads the optimizer's state",
         "add a technique under `optimizer:`")),
    Bad("technique-conflict", V + "adapter: lora\ncompress: [memkit_test_no_lora]\n", "compress.memkit_test_no_lora",
        ("cannot be combined with 'lora'", "cannot compress an unmerged adapter",
         "remove one of 'memkit_test_no_lora' and 'lora'")),
]

DICT_CASES = [
    Bad("dict-version-2", {"memkit": 2}, "memkit", ("unsupported schema version 2",)),
    Bad("dict-version-bool", {"memkit": True}, "memkit", ("unsupported schema version True",)),
    Bad("dict-non-string-top-key", {1: {}}, "1", ("unknown top-level key 1",)),
    Bad("dict-top-level-typo", {"trainig_args": {}}, "trainig_args", ("did you mean 'training_args'",)),
    Bad("dict-qlora-top-level", {"qlora": {}}, "qlora", ("write it under `adapter:`",)),
    Bad("dict-description-int", {"description": 3}, "description", ("must be a string",)),
    Bad("dict-description-false", {"description": False}, "description", ("must be a string",)),
    Bad("dict-unknown-technique-none", {"optimizer": {None: {}}}, "optimizer.None",
        ("unknown technique None", "known optimizer techniques:")),
    Bad("dict-wrong-slot", {"adapter": {"adamw": {}}}, "adapter.adamw", ("move it under `optimizer:`",)),
    Bad("dict-two-in-slot", {"adapter": {"lora": {}, "qlora": {}}}, "adapter", ("takes one technique, but 2",)),
    Bad("dict-tuple-in-one-slot", {"adapter": ("lora",)}, "adapter", ("must be a mapping", "got a tuple")),
    Bad("dict-list-slot-set", {"schedule": {"memkit_test_sched"}}, "schedule", ("takes a list", "got a set")),
    Bad("dict-unknown-setting", {"optimizer": {"adamw": {"lrr": 1e-4}}}, "optimizer.adamw.lrr",
        ("did you mean 'lr'",)),
    Bad("dict-non-string-setting-key", {"optimizer": {"adamw": {1: 2}}}, "optimizer.adamw.1", ("invalid value 1",)),
    Bad("dict-betas-scalar", {"optimizer": {"adamw": {"betas": 0.9}}}, "optimizer.adamw.betas",
        ("invalid value 0.9",)),
    Bad("dict-lr-nan", {"optimizer": {"adamw": {"lr": math.nan}}}, "optimizer.adamw.lr", ("not a finite number",)),
    Bad("dict-rank-pattern-key", {"adapter": {"lora": {"rank_pattern": {1: 4}}}}, "adapter.lora.rank_pattern.1",
        ("invalid value 1", "valid string")),
    Bad("dict-alpha-pattern-value", {"adapter": {"qlora": {"alpha_pattern": {"q": "x"}}}},
        "adapter.qlora.alpha_pattern.q", ("invalid value 'x'",)),
    Bad("dict-settings-string", {"adapter": {"lora": "r=8"}}, "adapter.lora", ("settings must be a mapping",)),
    Bad("dict-training-args-non-string-key", {"training_args": {1: 2}}, "training_args.1",
        ("is not a field of transformers.TrainingArguments",)),
    Bad("dict-training-args-none-batch", {"training_args": {"per_device_train_batch_size": None}},
        "training_args.per_device_train_batch_size", ("invalid value None", "expected int")),
    Bad("dict-training-args-strategy", {"training_args": {"save_strategy": "sometimes"}},
        "training_args.save_strategy", ("invalid value 'sometimes'", "'steps'")),
    Bad("dict-training-args-optim-dict", {"training_args": {"optim": {"name": "adamw_torch"}}},
        "training_args.optim", ("invalid value {'name': 'adamw_torch'}",)),
    Bad("dict-training-args-seed-float", {"training_args": {"seed": 1.5}}, "training_args.seed",
        ("expected int",)),
    Bad("dict-export-merge-type", {"export": {"merge_adapters": "perhaps"}}, "export.merge_adapters",
        ("invalid value 'perhaps'", "merge LoRA-style adapters")),
    Bad("dict-optimizer-vs-optim", {"optimizer": "adamw_8bit", "training_args": {"optim": "adamw_torch"}},
        "optimizer.adamw_8bit", ("cannot be combined with 'training_args:optim'",)),
    Bad("dict-conflict", {"adapter": {"lora": {"r": 4}}, "compress": [{"memkit_test_no_lora": None}]},
        "compress.memkit_test_no_lora", ("cannot be combined with 'lora'",)),
    Bad("dict-requires", {"activations": [{"memkit_test_needs_opt": {}}], "adapter": "lora"},
        "activations.memkit_test_needs_opt", ("requires 'slot:optimizer'",)),
]


def _check(exc: RecipeError, case: Bad, path: str) -> None:
    text = str(exc)
    assert isinstance(exc, ValueError)
    assert exc.path == path
    assert text.startswith(path), text
    assert exc.key == case.key, text
    if case.key is not None:
        assert f"at '{case.key}'" in text, text
    for fragment in case.fragments:
        assert fragment in text, f"{fragment!r} missing from:\n{text}"
    assert exc.fix, f"no fix given:\n{text}"
    assert "\n  fix: " in text


def test_the_table_has_enough_distinct_cases():
    ids = [c.id for c in YAML_CASES + DICT_CASES]
    assert len(ids) == len(set(ids))
    assert len({c.recipe if isinstance(c.recipe, str) else repr(c.recipe) for c in YAML_CASES + DICT_CASES}) >= 35


@pytest.mark.parametrize("case", YAML_CASES, ids=[c.id for c in YAML_CASES])
def test_bad_yaml_file(case: Bad, tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_text(case.recipe, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    _check(info.value, case, str(path))
    # the same file named by a str gives the same error
    with pytest.raises(RecipeError) as again:
        load_recipe(str(path))
    assert str(again.value) == str(info.value)


@pytest.mark.parametrize("case", [c for c in YAML_CASES if "\n" in c.recipe],
                         ids=[c.id for c in YAML_CASES if "\n" in c.recipe])
def test_bad_yaml_string(case: Bad):
    with pytest.raises(RecipeError) as info:
        load_recipe(case.recipe)
    _check(info.value, case, "<string>")


@pytest.mark.parametrize("case", DICT_CASES, ids=[c.id for c in DICT_CASES])
def test_bad_dict(case: Bad):
    before = copy.deepcopy(case.recipe)
    with pytest.raises(RecipeError) as info:
        load_recipe(case.recipe)
    _check(info.value, case, "<dict>")
    assert case.recipe == before  # loading never edits the caller's dict


def test_yaml_error_reports_the_line_of_the_problem(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(V + "description: ok\noptimizer: {adamw: {}}\nadapter: lora: 3\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"line 4, column \d+") as info:
        load_recipe(path)
    assert info.value.path == str(path)


def test_unknown_technique_in_a_slot_with_no_techniques_says_so():
    # computed from the registry: other packages may register loss techniques
    known = registry.names("loss")
    with pytest.raises(RecipeError) as info:
        load_recipe({"loss": {"nosuch_loss_xyz": {}}})
    assert info.value.key == "loss.nosuch_loss_xyz"
    text = str(info.value)
    if known:
        assert f"known loss techniques: {', '.join(known)}" in text
    else:
        assert "no loss technique is registered yet" in text


# ---------------------------------------------------------------------------------------------------------
# where the recipe comes from


def test_file_not_found(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as info:
        load_recipe(missing)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(missing)
    assert str(missing) in str(info.value)
    assert "recipe file not found" in str(info.value)
    assert "memkit recipes list" in str(info.value)


def test_unknown_bundled_name():
    with pytest.raises(RecipeError, match="recipe file not found") as info:
        load_recipe("no_such_bundled_recipe_xyz")
    assert info.value.path == "no_such_bundled_recipe_xyz"


def test_directory_is_not_a_recipe(tmp_path: Path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert info.value.path == str(tmp_path)
    assert "directory" in str(info.value)


def test_non_utf8_file(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("memkit: 1\ndescription: caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.path == str(path)
    assert "cannot read the file" in str(info.value)
    assert "utf-8" in str(info.value).lower()


def test_path_too_long_for_the_file_system():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("x" * 5000)


def test_unsupported_source_type():
    with pytest.raises(RecipeError, match="cannot read a recipe from a int") as info:
        load_recipe(42)  # type: ignore[arg-type]
    assert "YAML" in info.value.fix


def test_recipe_error_fields_are_structured(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(V + "optimizer: {adamw: {lrr: 1}}\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert (err.path, err.key, err.problem) == (str(path), "optimizer.adamw.lrr", "unknown setting 'lrr'")
    assert err.fix.startswith("did you mean 'lr'?")


# ---------------------------------------------------------------------------------------------------------
# property: mutations of valid recipes either load or raise a RecipeError


def _valid_bases() -> list[dict]:
    bases = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(recipes_dir().glob("*.yaml"))]
    assert bases, "no bundled recipes found"
    bases += [
        {"memkit": 1, "adapter": "lora", "optimizer": "adamw"},
        {"memkit": 1, "description": "all knobs", "optimizer": {"adamw_8bit": {"lr": 1e-4, "betas": [0.9, 0.95]}},
         "adapter": {"qlora": {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q": 2},
                               "layers_to_transform": [0, 1], "blocksize": 128}},
         "schedule": [{"memkit_test_sched": {"every": 3}}],
         "export": {"format": "safetensors", "merge_adapters": False},
         "training_args": {"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "report_to": ["none"],
                           "per_device_train_batch_size": 2}},
        {"memkit": 1, "optimizer": {"adamw": None}, "compress": [{"memkit_test_no_lora": {}}],
         "activations": [{"memkit_test_needs_opt": {}}]},
        # TrainingArguments fields of every checked kind: enum-or-str, bool, int, float, list, optional
        {"memkit": 1, "adapter": {"lora": {"bias": "all", "init_lora_weights": "pissa"}},
         "training_args": {"optim": "adamw_torch", "save_strategy": "steps", "eval_strategy": "no",
                           "gradient_checkpointing": True, "seed": 3, "warmup_ratio": 0.1,
                           "report_to": "none", "max_grad_norm": None}},
    ]
    return bases


BASES = _valid_bases()

WORDS = st.sampled_from(
    ["memkit", "description", "optimizer", "adapter", "schedule", "activations", "compress", "loss", "export",
     "training_args", "adamw", "adamw_8bit", "lora", "qlora", "memkit_test_sched", "memkit_test_no_lora",
     "memkit_test_needs_opt", "lr", "r", "betas", "bias", "format", "optim", "learning_rate", "every",
     "gradient_checkpointing", "quant_type", "blocksize", "target_modules", "rank_pattern"]
)
KEYS = st.one_of(WORDS, st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), WORDS,
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(KEYS, children, max_size=3)),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in obj: () is the root, then one tuple of keys/indices per nested value."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _at(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _at(obj, path[:-1])[path[-1]] = value
    return obj


def _edit_word(draw, word: str) -> str:
    op = draw(st.sampled_from(["insert", "delete", "replace", "swapcase"]))
    i = draw(st.integers(0, max(len(word) - 1, 0)))
    ch = draw(st.characters(codec="utf-8"))
    if op == "insert":
        return word[:i] + ch + word[i:]
    if op == "delete" and word:
        return word[:i] + word[i + 1:]
    if op == "replace" and word:
        return word[:i] + ch + word[i + 1:]
    return word.swapcase()


@st.composite
def mutated_recipes(draw):
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(data)))
        node = _at(data, path)
        parent = _at(data, path[:-1]) if path else None
        op = draw(st.sampled_from(["delete", "rename", "replace", "add", "wrap", "replace", "rename"]))
        if op == "delete" and path:
            del parent[path[-1]]
        elif op == "rename" and isinstance(parent, dict) and isinstance(path[-1], str):
            new_key = _edit_word(draw, path[-1])
            value = parent.pop(path[-1])
            parent[new_key] = value
        elif op == "add" and isinstance(node, dict):
            node[draw(KEYS)] = draw(VALUES)
        elif op == "add" and isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(VALUES))
        elif op == "wrap":
            data = _set(data, path, [node])
        else:
            data = _set(data, path, draw(VALUES))
    return data


def _load_or_recipe_error(source: Any) -> Any:
    try:
        return load_recipe(source)
    except RecipeError as exc:
        assert isinstance(exc, ValueError)
        assert str(exc)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=mutated_recipes())
def test_mutated_recipes_load_or_raise_recipe_error(data: Any):
    # any exception other than RecipeError propagates and fails the test
    recipe = _load_or_recipe_error(data)
    if recipe is not None:  # a recipe that loads also round-trips through YAML
        assert load_recipe(recipe.to_yaml()).to_yaml() == recipe.to_yaml()
    try:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a key PyYAML cannot represent: only the dict route applies
        return
    _load_or_recipe_error(text)
