"""Valid recipes: every source (file, string, dict, bundled name) loads, defaults are resolved, and a recipe
survives a trip through YAML unchanged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from pydantic import Field

from hf_memkit import Recipe, RecipeError, Technique, TechniqueConfig, load_recipe, registry
from hf_memkit.adapters.lora.config import LoraConfigFields
from hf_memkit.adapters.qlora.config import QLoraConfig
from hf_memkit.data.recipes import recipes_dir
from hf_memkit.optim.adamw.config import AdamWConfig
from hf_memkit.optim.adamw_8bit.config import AdamW8bitConfig
from hf_memkit.recipe import ExportConfig

BUNDLED = sorted(recipes_dir().glob("*.yaml"))

LORA_8BIT = """\
memkit: 1
description: LoRA r=4 with 8-bit AdamW
optimizer: {adamw_8bit: {lr: 2.0e-4, betas: [0.9, 0.95]}}
adapter:
  lora: {r: 4, target_modules: [q_proj, v_proj]}
export: {merge_adapters: false}
training_args: {gradient_checkpointing: true, per_device_train_batch_size: 2, lr_scheduler_type: cosine}
"""


def _check_lora_8bit(recipe: Recipe) -> None:
    assert recipe.version == 1
    assert recipe.description == "LoRA r=4 with 8-bit AdamW"
    assert recipe.names() == ["adamw_8bit", "lora"]
    opt, = recipe.slot("optimizer")
    assert isinstance(opt.config, AdamW8bitConfig)
    assert opt.config.lr == 2e-4 and opt.config.betas == (0.9, 0.95)
    lora = recipe.get("lora")
    assert lora is not None and lora.slot == "adapter"
    assert isinstance(lora.config, LoraConfigFields)
    assert lora.config.r == 4 and lora.config.target_modules == ["q_proj", "v_proj"]
    assert recipe.export == ExportConfig(merge_adapters=False)
    assert recipe.training_args == {
        "gradient_checkpointing": True, "per_device_train_batch_size": 2, "lr_scheduler_type": "cosine",
    }


# ---------------------------------------------------------------------------------------------------------
# sources


def test_load_yaml_file(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(LORA_8BIT, encoding="utf-8")
    recipe = load_recipe(path)
    _check_lora_8bit(recipe)
    assert recipe.source == str(path)
    assert load_recipe(str(path)).to_dict() == recipe.to_dict()


def test_load_yml_extension_and_utf8_text(tmp_path: Path):
    path = tmp_path / "r.yml"
    path.write_text("memkit: 1\ndescription: café crème ✓\noptimizer: adamw\n", encoding="utf-8")
    recipe = load_recipe(str(path))
    assert recipe.description == "café crème ✓"
    assert recipe.source == str(path)


def test_load_yaml_string():
    recipe = load_recipe(LORA_8BIT)
    _check_lora_8bit(recipe)
    assert recipe.source == "<string>"


def test_load_dict_without_memkit_defaults_to_version_1():
    data = {"optimizer": {"adamw": {"lr": 1e-3}}, "adapter": {"lora": {}}}
    before = copy.deepcopy(data)
    recipe = load_recipe(data)
    assert recipe.version == 1
    assert recipe.source == "<dict>"
    assert recipe.names() == ["adamw", "lora"]
    assert recipe.get("adamw").config.lr == 1e-3
    assert data == before  # the caller's dict is not edited
    assert recipe.to_dict()["memkit"] == 1


def test_load_dict_with_memkit():
    assert load_recipe({"memkit": 1, "optimizer": "adamw"}).names() == ["adamw"]


def test_a_recipe_is_returned_as_is():
    recipe = load_recipe({"optimizer": "adamw"})
    assert load_recipe(recipe) is recipe


def test_empty_dict_is_an_empty_recipe():
    recipe = load_recipe({})
    assert recipe.techniques == [] and recipe.training_args == {} and recipe.export is None
    assert recipe.to_dict() == {"memkit": 1}


@pytest.mark.parametrize("name", ["default", "default.yaml"])
def test_bundled_name(name: str):
    recipe = load_recipe(name)
    assert Path(recipe.source).resolve() == (recipes_dir() / "default.yaml").resolve()
    assert recipe.to_dict() == load_recipe(recipes_dir() / "default.yaml").to_dict()
    assert recipe.techniques  # the default recipe does something


def test_a_local_file_wins_over_a_bundled_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default.yaml").write_text("memkit: 1\ndescription: mine\n", encoding="utf-8")
    assert load_recipe("default.yaml").description == "mine"


def test_bundled_recipes_exist():
    assert "default" in {p.stem for p in BUNDLED}
    assert len(BUNDLED) >= 2


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_every_bundled_recipe_loads(path: Path):
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    assert recipe.description, "a bundled recipe says what it is for"
    assert recipe.techniques
    built = recipe.build()
    assert [t.name for t in built] == recipe.names()
    for technique, spec in zip(built, recipe.techniques):
        assert isinstance(technique, registry.get(spec.name, spec.slot).technique_cls)
        assert technique.config == spec.config
    # bundled recipes are also addressable by name
    assert load_recipe(path.stem).to_dict() == recipe.to_dict()


# ---------------------------------------------------------------------------------------------------------
# YAML round trip and resolved defaults

ROUND_TRIP_DICTS = [
    {},
    {"description": "only words"},
    {"optimizer": "adamw", "adapter": "qlora"},
    {"adapter": {"qlora": {"r": 4, "quant_type": "fp4", "blocksize": 128, "rank_pattern": {"q_proj": 2},
                           "layers_to_transform": [0, 2], "init_lora_weights": "gaussian"}},
     "optimizer": {"adamw_8bit": {"lr": 3e-4, "weight_decay": 0.0, "min_8bit_size": 1}},
     "export": {}, "training_args": {"learning_rate": 1e-4, "report_to": ["none"], "save_strategy": "no"}},
    yaml.safe_load(LORA_8BIT),
]


@pytest.mark.parametrize(
    "source", [*BUNDLED, *ROUND_TRIP_DICTS], ids=[p.stem for p in BUNDLED] + [f"dict{i}" for i in range(5)]
)
def test_to_yaml_round_trip(source, tmp_path: Path):
    recipe = load_recipe(source)
    text = recipe.to_yaml()
    again = load_recipe(text)
    assert again.to_dict() == recipe.to_dict()
    assert again.to_yaml() == text
    # through a file as well
    path = tmp_path / "out.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_recipe(path).to_dict() == recipe.to_dict()
    assert yaml.safe_load(text) == recipe.to_dict()


def test_to_dict_resolves_every_default():
    recipe = load_recipe({"optimizer": {"adamw": {"lr": 0.5}}, "adapter": {"qlora": {"r": 2}}, "export": None})
    d = recipe.to_dict()
    assert list(d) == ["memkit", "optimizer", "adapter"]  # no description, no export, no training_args
    assert d["optimizer"] == {"adamw": {**AdamWConfig().model_dump(mode="json"), "lr": 0.5}}
    qlora = d["adapter"]["qlora"]
    assert set(qlora) == set(QLoraConfig.model_fields)
    assert qlora["r"] == 2 and qlora["quant_type"] == "nf4" and qlora["blocksize"] == 64
    assert qlora["skip_modules"] == ["lm_head"]
    with_export = load_recipe({"export": {}}).to_dict()
    assert with_export["export"] == {"format": "safetensors", "merge_adapters": True, "dir": "export",
                                     "sparse_layout": "dense"}


def test_explain_prints_every_field(capsys: pytest.CaptureFixture):
    from hf_memkit.cli import main

    assert main(["recipes", "explain", str(recipes_dir() / "default.yaml")]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved == load_recipe("default").to_dict()
    assert set(resolved["adapter"]["lora"]) == set(LoraConfigFields.model_fields)
    assert set(resolved["optimizer"]["adamw_8bit"]) == set(AdamW8bitConfig.model_fields)


@pytest.mark.parametrize("empty", [{}, None], ids=["mapping", "null"])
def test_every_registered_technique_accepts_empty_settings(empty):
    entries = registry.entries()
    assert {"adamw", "adamw_8bit", "lora", "qlora"} <= {e.name for e in entries}
    for e in entries:
        item = {e.name: copy.copy(empty)}
        data = {e.slot: [item] if registry.SLOTS[e.slot] else item}
        try:
            recipe = load_recipe(data)
        except RecipeError as exc:
            # a technique that requires a partner cannot stand alone; its settings were still accepted
            assert e.technique_cls.requires and "requires" in exc.problem, str(exc)
            continue
        spec = recipe.get(e.name)
        assert spec.slot == e.slot
        assert spec.config == e.config_cls()
        assert isinstance(spec.build(), e.technique_cls)


# ---------------------------------------------------------------------------------------------------------
# shorthand and slot shapes


def test_string_shorthand_in_yaml():
    recipe = load_recipe("memkit: 1\nadapter: lora\noptimizer: adamw_8bit\n")
    assert recipe.names() == ["adamw_8bit", "lora"]
    assert recipe.get("lora").config == LoraConfigFields()
    assert recipe.to_dict()["adapter"] == {"lora": LoraConfigFields().model_dump(mode="json")}


def test_string_shorthand_in_dict_equals_the_long_form():
    short = load_recipe({"adapter": "lora"})
    long = load_recipe({"adapter": {"lora": {}}})
    null = load_recipe({"adapter": {"lora": None}})
    assert short.to_dict() == long.to_dict() == null.to_dict()


def test_null_slots_and_sections_are_ignored():
    recipe = load_recipe("memkit: 1\noptimizer: adamw\nadapter:\nexport:\ntraining_args:\ndescription:\n")
    assert recipe.names() == ["adamw"]
    assert recipe.export is None and recipe.training_args == {} and recipe.description == ""


class _StepConfig(TechniqueConfig):
    every: int = Field(1, ge=1, description="steps between two updates")


class _StepA(Technique):
    name: ClassVar[str] = "memkit_test_step_a"
    slot: ClassVar[str] = "schedule"
    config_cls = _StepConfig


class _StepB(Technique):
    name: ClassVar[str] = "memkit_test_step_b"
    slot: ClassVar[str] = "schedule"
    config_cls = _StepConfig


@pytest.fixture
def list_techniques():
    for cls in (_StepA, _StepB):
        registry.register_technique(cls, origin="test")
    yield
    for cls in (_StepA, _StepB):
        registry.unregister_technique(cls.name)


def test_list_slot_keeps_order_and_accepts_every_spelling(list_techniques):
    forms = [
        "memkit: 1\nschedule:\n  - memkit_test_step_b: {every: 3}\n  - memkit_test_step_a\n",
        {"schedule": [{"memkit_test_step_b": {"every": 3}}, {"memkit_test_step_a": None}]},
        {"schedule": {"memkit_test_step_b": {"every": 3}, "memkit_test_step_a": {}}},  # a mapping keeps its order
    ]
    dumped = None
    for form in forms:
        recipe = load_recipe(form)
        assert recipe.names() == ["memkit_test_step_b", "memkit_test_step_a"]
        assert [s.config.every for s in recipe.slot("schedule")] == [3, 1]
        d = recipe.to_dict()
        assert d["schedule"] == [{"memkit_test_step_b": {"every": 3}}, {"memkit_test_step_a": {"every": 1}}]
        assert dumped is None or d == dumped
        dumped = d
        assert load_recipe(recipe.to_yaml()).to_dict() == d


def test_techniques_are_in_slot_order_whatever_the_file_order():
    recipe = load_recipe("memkit: 1\nadapter: lora\noptimizer: adamw\n")
    assert recipe.names() == ["adamw", "lora"]
    assert list(recipe.to_dict()) == ["memkit", "optimizer", "adapter"]


def test_build_gives_fresh_independent_techniques():
    recipe = load_recipe({"adapter": {"lora": {"r": 4}}})
    first, = recipe.build()
    first.config.r = 64
    second, = recipe.build()
    assert second.config.r == 4 and recipe.get("lora").config.r == 4
    assert first is not second


def test_check_training_args_false_skips_field_checks():
    with pytest.raises(RecipeError):
        load_recipe({"training_args": {"not_a_field": 1}})
    recipe = load_recipe({"training_args": {"not_a_field": 1}}, check_training_args=False)
    assert recipe.training_args == {"not_a_field": 1}


def test_training_args_accept_enum_values_and_optionals():
    args = {"lr_scheduler_type": "cosine", "optim": "adamw_torch", "save_strategy": "no", "max_steps": 5,
            "learning_rate": 1, "report_to": None, "gradient_checkpointing": False}
    assert load_recipe({"training_args": args}).training_args == args
