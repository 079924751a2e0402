"""Recipes: YAML in, a validated :class:`Recipe` out, and back to YAML.

```yaml
memkit: 1                                   # schema version (required in files)
description: LoRA with 8-bit AdamW
optimizer: {adamw_8bit: {lr: 2.0e-4}}       # one-technique slot: a mapping with one key
adapter:   {lora: {r: 16}}
schedule:  [{lisa: {active_layers: 2}}]     # list slot: an ordered list of one-key mappings
training_args: {gradient_checkpointing: true}
```

Every problem is a :class:`~hf_memkit.errors.RecipeError` naming the file, the dotted key and the fix. Nothing
here touches a model: loading a recipe is safe and cheap enough for ``memkit recipes validate`` in CI.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import registry
from .errors import RecipeError, clip, short_repr, short_str
from .number_checks import INT64_MAX, number_spelling
from .recipe_yaml import dump_yaml, load_yaml, not_regular_error, read_recipe_file
from .technique import Technique, TechniqueConfig

SCHEMA_VERSION = 1
TOP_KEYS = ("memkit", "description", *registry.SLOTS, "export", "training_args")


class ExportConfig(BaseModel):
    """``export:`` — what ``finalize`` writes after training (and ``memkit compress`` / ``memkit export``).

    ``safetensors`` is a plain HF folder (adapters merged when ``merge_adapters``; layers quantized by a
    ``compress`` technique written dequantized). ``compressed-tensors`` is a ``pack-quantized`` checkpoint of the
    layers a ``compress`` technique quantized, loadable by plain ``AutoModelForCausalLM.from_pretrained`` with the
    ``compressed-tensors`` package installed; LoRC factors go beside it as a PEFT LoRA adapter (``lorc_adapter/``),
    never merged (that would leave the integer grid), and a README.md model card records the recipe, the technique
    versions and the measured perplexity and size.
    """

    model_config = ConfigDict(extra="forbid")
    format: Literal["safetensors", "compressed-tensors"] = Field(
        "safetensors", description="checkpoint format of the export: safetensors | compressed-tensors"
    )
    merge_adapters: bool = Field(True, description="merge LoRA-style adapters into the base weights (safetensors)")
    dir: str = Field("export", description="folder under output_dir that receives the export")
    sparse_layout: Literal["dense", "bitmask"] = Field(
        "dense", description="2:4 sparse models (compressed-tensors): dense = weights with exact zeros and a 2:4 "
        "sparsity_config (loads with plain from_pretrained on transformers 5 / compressed-tensors 0.20); bitmask = "
        "sparse-24-bitmask tensors (vLLM and older compressed-tensors readers)",
    )

    @field_validator("dir")
    @classmethod
    def _inside_output_dir(cls, v: str) -> str:
        # the export is written (and an old one replaced) at output_dir/dir: it must not land anywhere else
        parts = [p for p in v.replace("\\", "/").split("/") if p not in ("", ".")]
        if (not parts or "\0" in v or PurePosixPath(v).is_absolute() or PureWindowsPath(v).anchor
                or ".." in parts):
            raise ValueError(
                f"export.dir must be a relative folder inside output_dir, got {short_repr(v, 60)}: no absolute "
                "path, no '..', not empty; write e.g. `dir: export` or `dir: exports/final`"
            )
        return v


@dataclass
class TechniqueSpec:
    name: str
    slot: str
    config: TechniqueConfig

    def build(self) -> Technique:
        return registry.get(self.name, self.slot).technique_cls(self.config.model_copy(deep=True))


@dataclass
class Recipe:
    techniques: list[TechniqueSpec] = field(default_factory=list)
    training_args: dict[str, Any] = field(default_factory=dict)
    export: ExportConfig | None = None
    description: str = ""
    version: int = SCHEMA_VERSION
    source: str = "<dict>"

    def slot(self, slot: str) -> list[TechniqueSpec]:
        return [t for t in self.techniques if t.slot == slot]

    def get(self, name: str) -> TechniqueSpec | None:
        return next((t for t in self.techniques if t.name == name), None)

    def names(self) -> list[str]:
        return [t.name for t in self.techniques]

    def build(self) -> list[Technique]:
        """Fresh technique instances, in slot order."""
        return [t.build() for t in self.techniques]

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every technique with all its defaults."""
        out: dict[str, Any] = {"memkit": self.version}
        if self.description:
            out["description"] = self.description
        for slot, many in registry.SLOTS.items():
            specs = self.slot(slot)
            if not specs:
                continue
            dumped = [{s.name: s.config.model_dump(mode="json")} for s in specs]
            out[slot] = dumped if many else dumped[0]
        if self.export is not None:
            out["export"] = self.export.model_dump(mode="json")
        if self.training_args:
            out["training_args"] = dict(self.training_args)
        return out

    def to_yaml(self) -> str:
        # the strict dumper quotes strings the strict loader would read as numbers ('1e5') and writes no anchors
        return dump_yaml(self.to_dict())


# ---------------------------------------------------------------------------------------------------------
# loading


def _suggest(word: Any, candidates: typing.Iterable[str]) -> str:
    candidates = list(candidates)
    word = short_str(word, 64)  # difflib indexes the whole word: a 1 MB key would cost a dict of 1M entries
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    if not close:  # abbreviations and long forms: `rank` -> `r`, `alpha` -> `lora_alpha`
        w = word.lower()
        close = [c for c in candidates if len(c) < len(w) and w.startswith(c) or c.endswith("_" + w)][:3]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


#: how close a key of a file without `memkit:` must be to a recipe section for the file to count as a misspelt
#: recipe: stricter than the suggestions' 0.6, under which the common `version:` of other YAML files (compose
#: files, CITATION.cff) reads as a misspelt `precision:`
_RECIPE_LIKE_CUTOFF = 0.75


def _recipe_like(word: str) -> bool:
    word = short_str(word, 64)
    if difflib.get_close_matches(word, TOP_KEYS, n=1, cutoff=_RECIPE_LIKE_CUTOFF):
        return True
    w = word.lower()  # the abbreviations and long forms _suggest accepts
    return any(len(c) < len(w) and w.startswith(c) or c.endswith("_" + w) for c in TOP_KEYS)


def _join(*parts: Any) -> str:
    return ".".join(short_str(p, 100) for p in parts if p != "")


def load_recipe(source: "str | Path | dict | Recipe", *, check_training_args: bool = True) -> Recipe:
    """Load and validate a recipe from a YAML file path, a YAML string, a dict, or return a Recipe as is."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        data, where = source, "<dict>"
        data = {"memkit": SCHEMA_VERSION, **data}  # Python callers may omit the version
    elif isinstance(source, (str, Path)):
        text, where = _read_source(source)
        data = _parse_yaml(text, where)
    else:
        raise RecipeError(
            f"cannot read a recipe from a {type(source).__name__}",
            fix="pass a path to a YAML file, a YAML string, a dict or a Recipe",
        )
    return _build(data, where, check_training_args=check_training_args)


def _read_source(source: "str | Path") -> tuple[str, str]:
    if isinstance(source, str) and ("\n" in source or ":" in source) and not source.endswith((".yaml", ".yml")):
        return source, "<string>"
    path = Path(source)
    try:
        mode: int | None = path.stat().st_mode
    except (OSError, ValueError):  # missing, a name too long for the file system, or a NUL byte
        mode = None
    if mode is None or not stat.S_ISREG(mode):
        from .data.recipes import bundled_recipe_path

        bundled = bundled_recipe_path(str(source))
        if bundled is None and mode is not None and stat.S_ISDIR(mode):
            raise RecipeError(
                "this is a directory, not a recipe file", path=str(source), fix="name a .yaml file inside it"
            )
        if bundled is None and mode is not None:  # a FIFO would block the read, a device would never end
            raise not_regular_error(str(source), mode)
        if bundled is None:
            raise RecipeError(
                "recipe file not found",
                path=str(source),
                fix="check the path, or name a bundled recipe (see `memkit recipes list`)",
            )
        path = bundled
    return read_recipe_file(path), str(path)


def _parse_yaml(text: str, where: str) -> Any:
    return load_yaml(text, where)


def _build(data: Any, where: str, *, check_training_args: bool) -> Recipe:
    if data is None:
        raise RecipeError("the recipe is empty", path=where, fix="start the file with `memkit: 1`")
    if not isinstance(data, dict):
        raise RecipeError(
            f"not a recipe: the recipe must be a mapping of slots, got a {type(data).__name__}",
            path=where,
            fix="write `memkit: 1` followed by slots such as `optimizer: {adamw: {}}`",
        )
    if "memkit" not in data and not any(
        isinstance(k, str) and (k in TOP_KEYS or registry.slots_of(k) or _recipe_like(k))
        for k in list(data)[:50]  # enough to tell; difflib on thousands of keys would not be cheap
    ):
        # some other YAML/JSON file (nothing in it looks like a misspelt recipe): say so without quoting it
        raise RecipeError(
            "not a recipe: no `memkit:` version and none of the top-level keys is a recipe section",
            path=where,
            fix=f"a recipe starts with `memkit: {SCHEMA_VERSION}`; its sections are {', '.join(TOP_KEYS)} "
            "(see `memkit recipes list` for examples)",
        )
    for key in data:
        if key not in TOP_KEYS:
            hint = _suggest(key, TOP_KEYS)
            slots = registry.slots_of(str(key))
            if slots:
                hint = f"{key!r} is a technique of slot {slots[0]!r}: write it under `{slots[0]}:`"
            raise RecipeError(
                f"unknown top-level key {short_repr(key)}",
                path=where,
                key=short_str(key),
                fix=hint or f"top-level keys are: {', '.join(TOP_KEYS)}",
            )
    if "memkit" not in data:
        raise RecipeError("the schema version is missing", path=where, key="memkit", fix="add `memkit: 1`")
    version = data["memkit"]
    if type(version) is not int or version != SCHEMA_VERSION:  # 1.0 and true compare equal to 1
        raise RecipeError(
            f"unsupported schema version {short_repr(version)}",
            path=where,
            key="memkit",
            fix=f"this hf_memkit reads `memkit: {SCHEMA_VERSION}`",
        )
    description = data.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise RecipeError("description must be a string", path=where, key="description", fix="quote the text")

    techniques: list[TechniqueSpec] = []
    for slot, many in registry.SLOTS.items():
        if data.get(slot) is None:
            continue
        techniques.extend(_parse_slot(slot, many, data[slot], where))

    export = None
    if data.get("export") is not None:
        export = _validate_config(ExportConfig, data["export"], where, "export")
    training_args = {}
    if data.get("training_args") is not None:
        training_args = _check_training_args(data["training_args"], where, check_types=check_training_args)

    recipe = Recipe(techniques, training_args, export, description, version, where)
    check_compatibility(recipe)
    return recipe


def _parse_slot(slot: str, many: bool, value: Any, where: str) -> list[TechniqueSpec]:
    if many:
        if isinstance(value, dict):
            value = [{k: v} for k, v in value.items()]
        if not isinstance(value, list):
            raise RecipeError(
                f"slot {slot!r} takes a list of techniques, got a {type(value).__name__}",
                path=where,
                key=slot,
                fix=f"write `{slot}: [{{name: {{...}}}}]`",
            )
        items = value
    else:
        if isinstance(value, str):
            value = {value: {}}
        if isinstance(value, list):
            raise RecipeError(
                f"slot {slot!r} takes one technique, not a list",
                path=where,
                key=slot,
                fix=f"write `{slot}: {{name: {{...}}}}` with a single technique",
            )
        if not isinstance(value, dict):
            raise RecipeError(
                f"slot {slot!r} must be a mapping `{{technique: {{...}}}}`, got a {type(value).__name__}",
                path=where,
                key=slot,
                fix=f"write `{slot}: {{name: {{...}}}}`",
            )
        if len(value) > 1:
            raise RecipeError(
                f"slot {slot!r} takes one technique, but {len(value)} are given: "
                f"{', '.join(short_str(k, 40) for k in list(value)[:6])}",
                path=where,
                key=slot,
                fix="keep one of them; a slot that takes several (schedule, activations, compress) is a list",
            )
        if not value:
            raise RecipeError(
                f"slot {slot!r} is empty", path=where, key=slot, fix=f"name a technique or delete `{slot}:`"
            )
        items = [value]

    specs: list[TechniqueSpec] = []
    for i, item in enumerate(items):
        ipath = f"{slot}[{i}]" if many else slot
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(
                "each list entry must be a one-key mapping `{technique: {...}}`",
                path=where,
                key=ipath,
                fix=f"write `- name: {{...}}` for each entry of `{slot}`",
            )
        (name, params), = item.items()
        name_text = short_str(name, 100)
        entry = registry.get(name_text, slot)
        elsewhere = registry.slots_of(name_text)
        if entry is None and not elsewhere:
            known = registry.names(slot)
            hint = _suggest(name, registry.names())
            failed = registry.PLUGIN_FAILURES.get(name_text)
            if failed:
                hint = f"a plugin registers {name!r} but failed to import: {failed}"
            raise RecipeError(
                f"unknown technique {short_repr(name)} in slot {slot!r}",
                path=where,
                key=_join(ipath, name),
                fix=(hint + " " if hint else "")
                + (f"known {slot} techniques: {', '.join(known)}" if known else f"no {slot} technique is registered yet"),
            )
        if entry is None:
            raise RecipeError(
                f"{name!r} is a {elsewhere[0]!r} technique, not a {slot!r} one",
                path=where,
                key=_join(ipath, name),
                fix=f"move it under `{elsewhere[0]}:`",
            )
        if any(s.name == name for s in specs):
            raise RecipeError(
                f"technique {name!r} is listed twice in {slot!r}",
                path=where,
                key=_join(ipath, name),
                fix="list each technique once and merge their settings",
            )
        config = _validate_config(entry.config_cls, params, where, _join(ipath, name))
        specs.append(TechniqueSpec(name_text, slot, config))
    return specs


def _data_path(params: Any, loc: typing.Sequence[Any]) -> list[Any]:
    """The part of a pydantic error location that exists in the user's data (plus the field name itself):
    union member tags such as ``list[str]`` and markers such as ``[key]`` are not keys the user wrote."""
    out: list[Any] = []
    cur = params
    for i, p in enumerate(loc):
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, (list, tuple)) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        elif i == 0:
            cur = None
        else:
            continue
        out.append(p)
    return out


def _validate_config(cls: type[BaseModel], params: Any, where: str, key: str) -> Any:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RecipeError(
            f"settings must be a mapping, got {short_repr(params)}",
            path=where,
            key=key,
            fix=f"write `{key.split('.')[-1]}: {{}}` for all defaults, or `{{field: value}}`",
        )
    try:
        return cls.model_validate(params)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [short_str(p, 100) for p in err.get("loc", ())]
        full = _join(key, *_data_path(params, err.get("loc", ())))
        fields = cls.model_fields
        if err["type"] == "extra_forbidden":
            bad = loc[-1] if loc else "?"
            hint = _suggest(bad, fields)
            raise RecipeError(
                f"unknown setting {short_repr(bad)}",
                path=where,
                key=full,
                fix=(hint + " " if hint else "") + f"settings of `{key}`: {', '.join(fields) or '(none)'}",
            ) from None
        described = fields.get(loc[0]).description if loc and loc[0] in fields else None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise RecipeError(
            f"invalid value {short_repr(err.get('input'))}: {clip(msg, 400)}",
            path=where,
            key=full,
            fix=f"{loc[0] if loc else key}: {described}" if described else "see `memkit recipes explain` for the type",
        ) from None
    except (TypeError, ValueError) as exc:  # a model_validator raising a plain error
        raise RecipeError(clip(str(exc), 400), path=where, key=key,
                          fix="see the field descriptions of this technique") from None


# ---------------------------------------------------------------------------------------------------------
# training_args


def training_args_fields() -> dict[str, Any]:
    """Field name -> resolved type of ``transformers.TrainingArguments`` (imported on first use)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _conforms(value: Any, tp: Any) -> bool:
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        enums = _enums_of(tp)
        if enums and isinstance(value, str):
            # `SomeEnum | str` fields are converted with SomeEnum(value) by TrainingArguments: other strings fail
            return any(_conforms(value, e) for e in enums)
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        # `==`, not a set or dict lookup: the value may be an unhashable list or mapping
        return isinstance(value, tp) or any(value == m.value for m in tp) or (
            isinstance(value, str) and value in tp.__members__
        )
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # an exotic type: TrainingArguments itself will judge it when the run starts


def _enums_of(tp: Any) -> list[type[enum.Enum]]:
    return [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, enum.Enum)]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and _enums_of(tp):
        return " or ".join(_type_name(e) for e in _enums_of(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_training_args(value: Any, where: str, *, check_types: bool) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(
            "training_args must be a mapping of TrainingArguments fields",
            path=where,
            key="training_args",
            fix="write `training_args: {gradient_checkpointing: true}`",
        )
    if not check_types:
        return dict(value)
    fields = training_args_fields()
    for key, val in value.items():
        if key not in fields:
            hint = _suggest(key, fields)
            raise RecipeError(
                f"{short_repr(key)} is not a field of transformers.TrainingArguments",
                path=where,
                key=_join("training_args", key),
                fix=hint or "see `python -c 'import transformers; help(transformers.TrainingArguments)'`",
            )
        if not _conforms(val, fields[key]):
            expected = _type_name(fields[key])
            spelling = number_spelling(val) if isinstance(val, str) and _takes_numbers(fields[key]) else None
            raise RecipeError(
                f"invalid value {short_repr(val)} for TrainingArguments.{key}"
                + (": a string, not a number" if spelling else ""),
                path=where,
                key=f"training_args.{key}",
                fix=f"write {spelling} (a number, without quotes)" if spelling else f"expected {expected}",
            )
    check_training_arg_ranges(value, where)
    return dict(value)


def _takes_numbers(tp: Any) -> bool:
    return _conforms(1, tp) or _conforms(1.5, tp)


#: TrainingArguments fields with a range: name -> (lowest, lowest allowed?, highest, highest allowed?, what it is)
_RANGES: dict[str, tuple[float | None, bool, float | None, bool, str]] = {
    "learning_rate": (0, False, None, False, "a learning rate such as 2.0e-5"),
    "num_train_epochs": (0, False, None, False, "a number of epochs such as 3"),
    "per_device_train_batch_size": (1, True, None, False, "a batch size of at least 1"),
    "per_device_eval_batch_size": (1, True, None, False, "a batch size of at least 1"),
    "gradient_accumulation_steps": (1, True, None, False, "a step count of at least 1"),
    "eval_accumulation_steps": (1, True, None, False, "a step count of at least 1, or null"),
    "adam_beta1": (0, True, 1, False, "a decay rate in [0, 1) such as 0.9"),
    "adam_beta2": (0, True, 1, False, "a decay rate in [0, 1) such as 0.999"),
    "adam_epsilon": (0, False, None, False, "a small positive number such as 1.0e-8"),
    "weight_decay": (0, True, None, False, "a decay of 0 or more such as 0.01"),
    "warmup_ratio": (0, True, 1, True, "a fraction in [0, 1] such as 0.03"),
    "warmup_steps": (0, True, None, False, "0 or more steps (transformers 5: a value below 1 is a ratio)"),
    "max_grad_norm": (0, True, None, False, "a norm of 0 or more such as 1.0 (0 turns clipping off)"),
    "label_smoothing_factor": (0, True, 1, False, "a factor in [0, 1) such as 0.1"),
    "logging_steps": (0, False, None, False, "a positive step count (a value below 1 is a ratio of the run)"),
    "save_steps": (0, False, None, False, "a positive step count (a value below 1 is a ratio of the run)"),
    "eval_steps": (0, False, None, False, "a positive step count, or null"),
    "save_total_limit": (1, True, None, False, "at least 1 checkpoint, or null for no limit"),
    "seed": (0, True, 2**32 - 1, True, "a seed in [0, 2**32 - 1] such as 42"),
    "data_seed": (0, True, 2**32 - 1, True, "a seed in [0, 2**32 - 1], or null"),
    "dataloader_num_workers": (0, True, None, False, "0 or more worker processes"),
    "torch_empty_cache_steps": (1, True, None, False, "a step count of at least 1, or null"),
}


def check_training_arg_ranges(mapping: "typing.Mapping[str, Any]", where: str = "<recipe>", *,
                              prefix: str = "training_args") -> None:
    """Raise a RecipeError for the first out-of-range number among TrainingArguments fields in ``mapping``
    (field name -> value): every float must be finite and every int fit in 64 bits, and the common fields keep
    to their meaning (``learning_rate`` > 0, ``max_steps`` -1 or >= 1, batch sizes >= 1, ``adam_beta1/2`` in
    [0, 1), ...: see ``_RANGES``). Values that are not numbers (None, strings, bools) are left to the type check.

    ``where`` names the source (a recipe path, or e.g. ``"command line"``) and ``prefix`` is put before each
    field in the error's key (``training_args.max_steps``; pass ``prefix=""`` for bare field names). Meant to be
    reused for TrainingArguments given outside a recipe, e.g. command-line flags once parsed to numbers."""
    for name, val in mapping.items():
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        key = _join(prefix, name)
        shown = short_repr(val)
        if isinstance(val, float) and not math.isfinite(val):
            raise RecipeError(f"{name} = {shown} is not a finite number", path=where, key=key,
                              fix=f"write {name}: {_RANGES[name][4] if name in _RANGES else 'a finite number'}")
        if isinstance(val, int) and abs(val) > INT64_MAX:
            raise RecipeError(f"{name} = {shown} does not fit in 64 bits", path=where, key=key,
                              fix=f"write {name}: {_RANGES[name][4] if name in _RANGES else 'a smaller number'}")
        if name == "max_steps":
            if val != -1 and val < 1:
                raise RecipeError(
                    f"max_steps = {shown} is out of range: -1 trains for num_train_epochs, otherwise it is the "
                    "number of optimizer steps",
                    path=where, key=key, fix="write max_steps: -1 (epochs decide) or a step count of at least 1",
                )
            continue
        if name not in _RANGES:
            continue
        low, low_ok, high, high_ok, what = _RANGES[name]
        below = low is not None and (val < low or (val == low and not low_ok))
        above = high is not None and (val > high or (val == high and not high_ok))
        if below or above:
            bounds = f"{'[' if low_ok else '('}{low}, {high if high is not None else 'inf'}{']' if high_ok else ')'}"
            raise RecipeError(f"{name} = {shown} is out of range {bounds}", path=where, key=key,
                              fix=f"write {name}: {what}")


# ---------------------------------------------------------------------------------------------------------
# compatibility


def _present(recipe: Recipe, ref: str) -> bool:
    kind, _, what = ref.partition(":")
    if not what:
        return recipe.get(ref) is not None
    if kind == "slot":
        return bool(recipe.slot(what))
    if kind == "training_args":
        return bool(recipe.training_args.get(what))
    raise RecipeError(f"bad compatibility reference {ref!r}", fix="use NAME, slot:NAME or training_args:FIELD")


def check_compatibility(recipe: Recipe) -> None:
    """Raise a RecipeError for the first declared conflict or unmet requirement between the techniques, then for
    the first technique that does not support the distributed engine the recipe selects
    (:mod:`hf_memkit.engines`)."""
    for spec in recipe.techniques:
        cls = registry.get(spec.name, spec.slot).technique_cls
        key = f"{spec.slot}.{spec.name}"
        for ref, reason in cls.conflicts.items():
            if ref != spec.name and _present(recipe, ref):
                other = ref.split(":", 1)[-1] if ":" in ref else ref
                raise RecipeError(
                    f"{spec.name!r} cannot be combined with {ref!r}: {reason}",
                    path=recipe.source,
                    key=key,
                    fix=f"remove one of {spec.name!r} and {other!r}",
                )
        for ref, reason in cls.requires.items():
            if not _present(recipe, ref):
                raise RecipeError(
                    f"{spec.name!r} requires {ref!r}: {reason}",
                    path=recipe.source,
                    key=key,
                    fix=_requirement_fix(ref),
                )
    from .engines import check_engine, recipe_engine

    engine, source = recipe_engine(recipe)
    classes = [registry.get(s.name, s.slot).technique_cls for s in recipe.techniques]
    check_engine(classes, engine, path=recipe.source, extra_engine="ddp" if engine == "co2" else None,
                 source=source)
    check_patch_overlaps(recipe)
    # what each technique can tell from the recipe alone (no model, no machine): refused here, not at run time
    for spec in recipe.techniques:
        registry.get(spec.name, spec.slot).technique_cls(spec.config).check_recipe(recipe)


def check_patch_overlaps(recipe: Recipe) -> None:
    """Refuse two techniques that declare patches on the same part of the same modules (``Technique.patches``,
    :mod:`hf_memkit.integrations.patching`) unless the pair already declares its conflict (reported above) or its
    parts compose (kernel + weight view)."""
    from .integrations.patching import SURFACES, overlap

    specs = list(recipe.techniques)
    for i, a in enumerate(specs):
        ca = registry.get(a.name, a.slot).technique_cls
        for b in specs[i + 1:]:
            cb = registry.get(b.name, b.slot).technique_cls
            hits = overlap(ca.patches, cb.patches)
            if hits and b.name not in ca.composes and a.name not in cb.composes:
                sa, _, sb = hits[0].partition(" / ")
                sb = sb or sa
                raise RecipeError(
                    f"{a.name!r} and {b.name!r} would both patch {SURFACES.get(sa, sa)} "
                    f"({a.name}: {ca.patches[sa]}; {b.name}: {cb.patches[sb]}), and no composition "
                    f"of the two is declared",
                    path=recipe.source, key=f"{b.slot}.{b.name}",
                    fix=f"remove one of {a.name!r} and {b.name!r}")


def _requirement_fix(ref: str) -> str:
    kind, _, what = ref.partition(":")
    if not what:
        return f"add {ref!r} to the recipe"
    if kind == "slot":
        return f"add a technique under `{what}:`"
    return f"set {kind}.{what} in the recipe"
