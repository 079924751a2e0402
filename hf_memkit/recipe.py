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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import registry
from .errors import RecipeError
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
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------
# loading


def _suggest(word: Any, candidates: typing.Iterable[str]) -> str:
    candidates = list(candidates)
    close = difflib.get_close_matches(str(word), candidates, n=3, cutoff=0.6)
    if not close:  # abbreviations and long forms: `rank` -> `r`, `alpha` -> `lora_alpha`
        w = str(word).lower()
        close = [c for c in candidates if len(c) < len(w) and w.startswith(c) or c.endswith("_" + w)][:3]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _join(*parts: Any) -> str:
    return ".".join(str(p) for p in parts if p != "")


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
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, or a NUL byte
        is_file = is_dir = False
    if not is_file:
        from .data.recipes import bundled_recipe_path

        bundled = bundled_recipe_path(str(source))
        if bundled is None and is_dir:
            raise RecipeError(
                "this is a directory, not a recipe file", path=str(source), fix="name a .yaml file inside it"
            )
        if bundled is None:
            raise RecipeError(
                "recipe file not found",
                path=str(source),
                fix="check the path, or name a bundled recipe (see `memkit recipes list`)",
            )
        path = bundled
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read the file ({exc})", path=str(path), fix="pass a readable UTF-8 YAML file")


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(
            f"not valid YAML{line}: {problem}", path=where, fix="fix the YAML syntax; keys are `name: value`"
        ) from None


def _build(data: Any, where: str, *, check_training_args: bool) -> Recipe:
    if data is None:
        raise RecipeError("the recipe is empty", path=where, fix="start the file with `memkit: 1`")
    if not isinstance(data, dict):
        raise RecipeError(
            f"the recipe must be a mapping of slots, got a {type(data).__name__}",
            path=where,
            fix="write `memkit: 1` followed by slots such as `optimizer: {adamw: {}}`",
        )
    for key in data:
        if key not in TOP_KEYS:
            hint = _suggest(key, TOP_KEYS)
            slots = registry.slots_of(str(key))
            if slots:
                hint = f"{key!r} is a technique of slot {slots[0]!r}: write it under `{slots[0]}:`"
            raise RecipeError(
                f"unknown top-level key {key!r}",
                path=where,
                key=str(key),
                fix=hint or f"top-level keys are: {', '.join(TOP_KEYS)}",
            )
    if "memkit" not in data:
        raise RecipeError("the schema version is missing", path=where, key="memkit", fix="add `memkit: 1`")
    version = data["memkit"]
    if type(version) is not int or version != SCHEMA_VERSION:  # 1.0 and true compare equal to 1
        raise RecipeError(
            f"unsupported schema version {version!r}",
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
                f"slot {slot!r} takes one technique, but {len(value)} are given: {', '.join(map(str, value))}",
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
        entry = registry.get(str(name), slot)
        elsewhere = registry.slots_of(str(name))
        if entry is None and not elsewhere:
            known = registry.names(slot)
            hint = _suggest(name, registry.names())
            failed = registry.PLUGIN_FAILURES.get(str(name))
            if failed:
                hint = f"a plugin registers {name!r} but failed to import: {failed}"
            raise RecipeError(
                f"unknown technique {name!r} in slot {slot!r}",
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
        specs.append(TechniqueSpec(str(name), slot, config))
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
            f"settings must be a mapping, got {params!r}",
            path=where,
            key=key,
            fix=f"write `{key.split('.')[-1]}: {{}}` for all defaults, or `{{field: value}}`",
        )
    try:
        return cls.model_validate(params)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err.get("loc", ())]
        full = _join(key, *_data_path(params, err.get("loc", ())))
        fields = cls.model_fields
        if err["type"] == "extra_forbidden":
            bad = loc[-1] if loc else "?"
            hint = _suggest(bad, fields)
            raise RecipeError(
                f"unknown setting {bad!r}",
                path=where,
                key=full,
                fix=(hint + " " if hint else "") + f"settings of `{key}`: {', '.join(fields) or '(none)'}",
            ) from None
        described = fields.get(loc[0]).description if loc and loc[0] in fields else None
        raise RecipeError(
            f"invalid value {err.get('input')!r}: {err['msg']}",
            path=where,
            key=full,
            fix=f"{loc[0] if loc else key}: {described}" if described else "see `memkit recipes explain` for the type",
        ) from None
    except (TypeError, ValueError) as exc:  # a model_validator raising a plain error
        raise RecipeError(str(exc), path=where, key=key, fix="see the field descriptions of this technique") from None


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
                f"{key!r} is not a field of transformers.TrainingArguments",
                path=where,
                key=f"training_args.{key}",
                fix=hint or "see `python -c 'import transformers; help(transformers.TrainingArguments)'`",
            )
        if not _conforms(val, fields[key]):
            raise RecipeError(
                f"invalid value {val!r} for TrainingArguments.{key}",
                path=where,
                key=f"training_args.{key}",
                fix=f"expected {_type_name(fields[key])}",
            )
    return dict(value)


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
    (:mod:`hf_memkit.distributed.engines`)."""
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
    from .distributed.engines import check_engine, recipe_engine

    engine, source = recipe_engine(recipe)
    classes = [registry.get(s.name, s.slot).technique_cls for s in recipe.techniques]
    check_engine(classes, engine, path=recipe.source, extra_engine="ddp" if engine == "co2" else None,
                 source=source)


def _requirement_fix(ref: str) -> str:
    kind, _, what = ref.partition(":")
    if not what:
        return f"add {ref!r} to the recipe"
    if kind == "slot":
        return f"add a technique under `{what}:`"
    return f"set {kind}.{what} in the recipe"
