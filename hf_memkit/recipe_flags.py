"""Techniques given as command-line flags, merged into a recipe.

Three spellings, one meaning (the command line wins over the recipe, as for ``training_args``):

* a slot flag per registry slot, ``--memkit_loss cce``, ``--memkit_optimizer 'fira: {rank: 64}'``: the value is a
  technique name, or YAML read by the recipe's strict loader (``NAME: {settings}``); list slots also take
  comma-separated names (``--memkit_activations mesa,offload``) or a YAML list (``'[{mesa: {bits: 8}}]'``). It
  *replaces* the recipe's technique(s) in that slot (its settings start from the defaults); ``none`` removes them.
* ``--memkit_set TECHNIQUE.SETTING=VALUE ...`` (VALUE is YAML): one setting of a technique that the recipe or a
  slot flag selects; ``SLOT.TECHNIQUE.SETTING`` when the name lives in two slots (``lorc``), deeper keys for
  nested settings (``sparse_update.budget.mb=8``), ``export.FIELD`` for the export section.
* ``--memkit.TECHNIQUE.SETTING VALUE``: the same, in the form that reads best on a command line. HfArgumentParser
  refuses flags it does not declare, so this form works where argv is pre-processed: ``memkit run`` (the
  launcher) and scripts that parse ``hf_memkit.parse_memkit_args(sys.argv[1:])`` instead of ``sys.argv``; it is
  rewritten to ``--memkit_set``.

:func:`apply_flags` is the merge: pure, no model, no torch. It checks every flag alone first (so an error names
the flag, with the recipe's did-you-mean for a misspelt technique or setting), then builds the merged recipe
through :func:`hf_memkit.recipe._build`, so every check and compatibility rule of a recipe file applies.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from . import registry
from .errors import RecipeError, short_repr, short_str
from .recipe import (SCHEMA_VERSION, ExportConfig, Recipe, _build, _parse_slot, _suggest, _validate_config,
                     load_recipe)
from .recipe_yaml import load_yaml

PREFIX = "memkit_"
SET = "memkit_set"
DOTTED = "--memkit."
#: the value of a slot flag that removes the recipe's technique(s) of that slot
NONE_WORDS = ("none", "null", "~")


def slot_flag(slot: str) -> str:
    return f"{PREFIX}{slot}"


@dataclass
class MemkitFlags:
    """What the command line says about techniques: ``slots`` maps a slot to its flag's text, ``settings`` holds
    ``TECHNIQUE.SETTING=VALUE`` entries in command-line order (a later one wins)."""

    slots: dict[str, str] = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.slots or self.settings)

    def apply(self, recipe: "Recipe | None", *, check_training_args: bool = True) -> Recipe:
        return apply_flags(recipe, self, check_training_args=check_training_args)

    def to_argv(self) -> list[str]:
        """The flags as HfArgumentParser reads them (``--memkit_<slot> V``, one ``--memkit_set ...``)."""
        out = [a for slot, text in self.slots.items() for a in (f"--{slot_flag(slot)}", text)]
        return out + ([f"--{SET}", *self.settings] if self.settings else [])


# ------------------------------------------------------------------------------------------------------------
# parsing one flag


def slot_value(slot: str, text: Any) -> Any:
    """The recipe value of a slot flag's text; None for ``none``."""
    where = f"--{slot_flag(slot)}"
    if not isinstance(text, str):
        return text  # already a recipe value (a dict or list from Python)
    stripped = text.strip()
    if not stripped:
        raise RecipeError("the flag is empty", path=where, fix=f"name a technique, or `{where} none` to drop the slot")
    if stripped.lower() in NONE_WORDS:
        return None
    if not any(c in stripped for c in "{}[]:"):  # plain names; commas separate several in a list slot
        names = [n.strip() for n in stripped.split(",")]
        if any(not n for n in names):
            raise RecipeError(f"empty name in {short_repr(stripped)}", path=where, fix="write NAME or NAME,NAME")
        if registry.SLOTS[slot]:
            return names
        if len(names) > 1:
            raise RecipeError(f"slot {slot!r} takes one technique, but {len(names)} are given", path=where,
                              fix="keep one name; a slot that takes several is a list (schedule, activations, ...)")
        return names[0]
    return load_yaml(stripped, where)


def parse_setting(text: Any) -> tuple[list[str], Any]:
    """``"lisa.active_layers=4"`` -> ``(["lisa", "active_layers"], 4)``; the value is read as YAML."""
    shown = short_str(text, 100)
    if not isinstance(text, str) or "=" not in text:
        raise RecipeError(f"{short_repr(text)} is not TECHNIQUE.SETTING=VALUE", path=f"--{SET}",
                          fix="write e.g. --memkit_set lisa.active_layers=4 (or --memkit.lisa.active_layers 4)")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise RecipeError(f"{short_repr(key)} is not TECHNIQUE.SETTING", path=f"--{SET} {shown}",
                          fix="name a technique and one of its settings, e.g. lisa.active_layers=4")
    return parts, load_yaml(raw, f"--memkit.{key.strip()}")


# ------------------------------------------------------------------------------------------------------------
# the merge


def apply_flags(recipe: "Recipe | None", flags: "MemkitFlags | Mapping[str, Any] | None" = None, *,
                settings: Iterable[str] = (), check_training_args: bool = True) -> Recipe:
    """``recipe`` (or none) with the command-line ``flags`` applied: the merged recipe, validated like a file.

    ``flags`` is a :class:`MemkitFlags` or a mapping slot -> flag text; ``settings`` adds more
    ``TECHNIQUE.SETTING=VALUE`` entries. Without any flag, ``recipe`` comes back as it is (``None``: an empty
    recipe)."""
    if not isinstance(flags, MemkitFlags):
        flags = MemkitFlags(dict(flags or {}), [])
    flags = MemkitFlags(dict(flags.slots), [*flags.settings, *settings])
    if not flags:
        return recipe if recipe is not None else load_recipe({})
    data = recipe_data(recipe) if recipe is not None else {"memkit": SCHEMA_VERSION}
    for slot, text in flags.slots.items():
        _apply_slot(data, slot, text)
    for entry in flags.settings:
        _apply_setting(data, entry)
    source = f"{recipe.source} + command-line flags" if recipe is not None else "command-line flags"
    return _build(data, source, check_training_args=check_training_args)


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the mapping a file would hold, each technique with the settings the recipe *gave* (not the
    filled-in defaults, so that a setting changed on the command line meets the same validators as in a file)."""
    data: dict[str, Any] = {"memkit": recipe.version}
    if recipe.description:
        data["description"] = recipe.description
    for slot, many in registry.SLOTS.items():
        specs = recipe.slot(slot)
        if specs:
            items = [{s.name: s.config.model_dump(mode="json", exclude_unset=True)} for s in specs]
            data[slot] = items if many else items[0]
    if recipe.export is not None:
        data["export"] = recipe.export.model_dump(mode="json", exclude_unset=True)
    if recipe.training_args:
        data["training_args"] = dict(recipe.training_args)
    return data


def _apply_slot(data: dict[str, Any], slot: str, text: Any) -> None:
    if slot not in registry.SLOTS:
        raise RecipeError(f"there is no slot {slot!r}", path=f"--{slot_flag(slot)}",
                          fix=_suggest(slot, registry.SLOTS) or f"slots are: {', '.join(registry.SLOTS)}")
    value = slot_value(slot, text)
    if value is None:
        data.pop(slot, None)
        return
    many = registry.SLOTS[slot]
    specs = _parse_slot(slot, many, value, f"--{slot_flag(slot)}")  # the recipe's own checks, naming the flag
    items = [{s.name: s.config.model_dump(mode="json", exclude_unset=True)} for s in specs]
    data[slot] = items if many else items[0]


def _apply_setting(data: dict[str, Any], entry: str) -> None:
    parts, value = parse_setting(entry)
    where = f"--memkit.{'.'.join(parts)}"
    if parts[0] == "export":
        section = data.get("export") or {}
        _set_nested(section, parts[1:], value, where)
        _validate_config(ExportConfig, section, where, "export")
        data["export"] = section
        return
    slot, name, path = _locate(data, parts, where)
    settings = _technique_settings(data, slot, name)
    _set_nested(settings, path, value, where)
    _validate_config(registry.get(name, slot).config_cls, settings, where, f"{slot}.{name}")


def _locate(data: dict[str, Any], parts: list[str], where: str) -> tuple[str, str, list[str]]:
    """(slot, technique, setting path) of a setting flag, the technique being one the run selects."""
    if parts[0] in registry.SLOTS and len(parts) >= 3:
        slot, name, path = parts[0], parts[1], parts[2:]
        if name not in _selected(data, slot):
            raise _not_in_run(data, name, where, slot)
        return slot, name, path
    name, path = parts[0], parts[1:]
    slots = [s for s in registry.SLOTS if name in _selected(data, s)]
    if not slots:
        raise _not_in_run(data, name, where)
    if len(slots) > 1:
        raise RecipeError(f"{name!r} is selected in the slots {' and '.join(slots)}", path=where,
                          fix=f"say which: --memkit.{slots[0]}.{'.'.join(parts)} VALUE")
    return slots[0], name, path


def _selected(data: dict[str, Any], slot: str) -> list[str]:
    value = data.get(slot)
    items = value if isinstance(value, list) else [value] if value else []
    return [next(iter(i)) for i in items if isinstance(i, dict) and i]


def _technique_settings(data: dict[str, Any], slot: str, name: str) -> dict[str, Any]:
    value = data[slot]
    items = value if isinstance(value, list) else [value]
    item = next(i for i in items if name in i)
    if item[name] is None:
        item[name] = {}
    return item[name]


def _set_nested(settings: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    for key in path[:-1]:
        inner = settings.get(key)
        if inner is None:
            inner = settings[key] = {}
        if not isinstance(inner, dict):
            raise RecipeError(f"setting {key!r} holds {short_repr(inner)}, not a mapping of settings", path=where,
                              fix=f"set {key} itself, e.g. --memkit_set ...{key}=VALUE")
        settings = inner
    settings[path[-1]] = value


def _not_in_run(data: dict[str, Any], name: str, where: str, slot: str | None = None) -> RecipeError:
    run = [n for s in registry.SLOTS for n in _selected(data, s)]
    in_run = f"this run selects {', '.join(run)}" if run else "this run selects no technique"
    known = registry.slots_of(name)
    if not known:
        hint = _suggest(name, run) or _suggest(name, registry.names())
        return RecipeError(f"unknown technique {name!r} ({in_run})", path=where,
                           fix=(hint + " " if hint else "") + "a setting flag changes a technique the recipe or a "
                           "slot flag selects")
    slot = slot or known[0]
    return RecipeError(f"technique {name!r} is not in this run ({in_run})", path=where,
                       fix=f"select it first: --{slot_flag(slot)} {name} (or add it to the recipe's `{slot}:`)")


# ------------------------------------------------------------------------------------------------------------
# argv


def split_argv(argv: list[str]) -> tuple[MemkitFlags, list[str]]:
    """Take the ``--memkit_<slot>``, ``--memkit_set`` and ``--memkit.T.S`` flags (also ``=`` and dashed forms)
    out of ``argv``; everything else comes back in order. ``--memkit_recipe`` is left where it is. A
    ``--memkit_<name>`` close to a slot name is refused with a did-you-mean; other ``--memkit_*`` flags pass."""
    flags, rest, i = MemkitFlags(), [], 0
    by_name = {f"--{slot_flag(s)}": s for s in registry.SLOTS}
    by_name.update({k.replace("_", "-"): s for k, s in list(by_name.items())})
    sets = (f"--{SET}", f"--{SET.replace('_', '-')}")
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in by_name or name.startswith(DOTTED):
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):  # "-1" is a value, "--seed" a flag
                value, i = argv[i + 1], i + 2
            else:
                raise RecipeError(f"{arg} needs a value", path="command line",
                                  fix=f"write {arg} VALUE or {arg}=VALUE")
            if name in by_name:
                flags.slots[by_name[name]] = value
            else:
                flags.settings.append(f"{name[len(DOTTED):]}={value}")
            continue
        if name in sets:
            i += 1
            values = [inline] if eq else []
            while not eq and i < len(argv) and not argv[i].startswith("--") and "=" in argv[i]:
                values.append(argv[i])
                i += 1
            if not values:
                raise RecipeError(f"{arg} needs TECHNIQUE.SETTING=VALUE", path="command line",
                                  fix=f"write {arg} lisa.active_layers=4")
            flags.settings.extend(values)
            continue
        _refuse_near_miss(name)
        rest.append(arg)
        i += 1
    return flags, rest


def _refuse_near_miss(name: str) -> None:
    bare = name.lstrip("-").replace("-", "_")
    if not bare.startswith(PREFIX) or bare == "memkit_recipe":
        return
    wanted = [slot_flag(s) for s in registry.SLOTS] + [SET]
    close = difflib.get_close_matches(bare, wanted, n=1, cutoff=0.85)
    if close:
        raise RecipeError(f"unknown flag --{bare}", path="command line", fix=f"did you mean --{close[0]}?")


def parse_memkit_args(argv: "list[str] | None" = None) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) with ``--memkit.TECHNIQUE.SETTING VALUE`` rewritten for
    HfArgumentParser: every setting (dotted or ``--memkit_set``) goes into one ``--memkit_set ...`` at the end
    (argparse keeps only the last ``--memkit_set``), slot flags stay as ``--memkit_<slot> VALUE``.

    ``parser.parse_args_into_dataclasses(args=hf_memkit.parse_memkit_args())`` with
    :class:`~hf_memkit.MemkitTrainingArguments` in the parser."""
    import sys

    flags, rest = split_argv(list(sys.argv[1:] if argv is None else argv))
    return rest + flags.to_argv()


# ------------------------------------------------------------------------------------------------------------
# help texts (read when a parser is built, so techniques registered later are listed too)


def slot_help(slot: str) -> str:
    names = registry.names(slot)
    many = registry.SLOTS[slot]
    example = names[0] if names else "NAME"
    fields = list(registry.get(names[0], slot).config_cls.model_fields) if names else []
    inline = f"{example}: {{{fields[0]}: ...}}" if fields else f"{example}: {{}}"
    form = (f"a name, comma-separated names, or a YAML list '[{{{inline}}}]'" if many
            else f"a name, or a name with settings '{inline}'")
    return (f"hf_memkit {slot} technique{'s' if many else ''} ({form}); replaces the recipe's {slot}, 'none' drops "
            f"it. Registered: {', '.join(names) or '(none yet)'}")


def settings_help() -> str:
    entries = registry.entries()
    twice = {e.name for e in entries if len(registry.slots_of(e.name)) > 1}  # lorc: say which slot
    per = "; ".join(f"{e.slot + '.' if e.name in twice else ''}{e.name}: "
                    f"{', '.join(e.config_cls.model_fields) or '(none)'}" for e in entries)
    return ("hf_memkit technique settings, TECHNIQUE.SETTING=VALUE ... (VALUE is YAML), for techniques the recipe or "
            "a slot flag selects, e.g. --memkit_set lisa.active_layers=4 lisa.interval=10; `memkit run` and "
            "hf_memkit.parse_memkit_args() also take --memkit.lisa.active_layers 4. `memkit recipes explain "
            "'{memkit: 1, schedule: [lisa]}'` prints every default. Settings: " + per)
