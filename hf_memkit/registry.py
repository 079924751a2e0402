"""The ONE table of techniques: (slot, name) -> (config class, technique class).

Built-in techniques register when the table is first read; third-party packages add theirs through the
entry-point group ``hf_memkit.techniques`` (the entry point names a :class:`~hf_memkit.technique.Technique`
subclass). Duplicate names within a slot are an error, wherever they come from.

A name may live in two slots when it is the same method seen from two sides: ``compress: [{lorc: ...}]`` (the
post-training pass) and ``adapter: {lorc: ...}`` (the trainable PEFT adapter). Recipes always name the slot, so
they are never ambiguous; :func:`get` without a slot raises for such a name (pass ``slot=``). This departs from
docs/DESIGN.md's "one name, one entry" only for names that appear in several slots.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

from .errors import RegistryError
from .technique import Technique, TechniqueConfig

ENTRY_POINT_GROUP = "hf_memkit.techniques"

#: slot -> whether it takes a list of techniques (True) or exactly one (False)
SLOTS: dict[str, bool] = {
    "loss": False,
    "optimizer": False,
    "adapter": False,
    "schedule": True,
    "activations": True,
    "compress": True,
    "distributed": False,
    "guard": True,
    "precision": False,
}

#: modules whose import registers the built-in techniques (kept cheap: no torch at module level)
_BUILTIN_MODULES = (
    "hf_memkit.optim.adamw.technique",
    "hf_memkit.optim.adamw_8bit.technique",
    "hf_memkit.optim.cosmos.technique",
    "hf_memkit.optim.fira.technique",
    "hf_memkit.optim.sst.technique",
    "hf_memkit.adapters.lora.technique",
    "hf_memkit.adapters.qlora.technique",
    "hf_memkit.adapters.mixlora.technique",
    "hf_memkit.adapters.lorc.technique",
    "hf_memkit.losses.cce.technique",
    "hf_memkit.schedules.lisa.technique",
    "hf_memkit.schedules.sparse_update.technique",
    "hf_memkit.quant.rtn.technique",
    "hf_memkit.quant.gptq.technique",
    "hf_memkit.quant.lorc.technique",
    "hf_memkit.quant.efficientqat.technique",
    "hf_memkit.prune.magnitude_24.technique",
    "hf_memkit.prune.wanda_24.technique",
    "hf_memkit.prune.comp.technique",
    "hf_memkit.prune.l1_structured.technique",
    "hf_memkit.prune.ast.technique",
    "hf_memkit.prune.cast.technique",
    "hf_memkit.activations.mesa.technique",
    "hf_memkit.activations.wta_crs.technique",
    "hf_memkit.activations.offload.technique",
    "hf_memkit.distributed.deepspeed.technique",
    "hf_memkit.distributed.fsdp.technique",
    "hf_memkit.distributed.co2.technique",
    "hf_memkit.guards.divergence.technique",
    "hf_memkit.precision.bf16.technique",
)


@dataclass(frozen=True)
class Entry:
    name: str
    slot: str
    config_cls: type[TechniqueConfig]
    technique_cls: type[Technique]
    origin: str  # "builtin", "entry point <dist>", or "user"


#: (slot, name) -> Entry
_TABLE: dict[tuple[str, str], Entry] = {}
_loaded = False
_loading = False
#: entry points that failed to import: name -> error text (reported by `recipes list` and unknown-name errors)
PLUGIN_FAILURES: dict[str, str] = {}


def _check(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Technique)):
        raise RegistryError(f"{cls!r} is not a subclass of hf_memkit.Technique; register a Technique subclass")
    if not isinstance(cls.name, str) or not cls.name.isidentifier() or cls.name != cls.name.lower():
        raise RegistryError(
            f"{cls.__qualname__}.name={cls.name!r} is not a valid technique name; use a lower-case identifier "
            "such as 'my_optimizer'"
        )
    if not isinstance(cls.slot, str) or cls.slot not in SLOTS:
        raise RegistryError(
            f"{cls.__qualname__}.slot={cls.slot!r} is not a slot; choose one of {', '.join(SLOTS)}"
        )
    if not (isinstance(cls.config_cls, type) and issubclass(cls.config_cls, TechniqueConfig)):
        raise RegistryError(
            f"{cls.__qualname__}.config_cls must subclass hf_memkit.technique.TechniqueConfig (extra='forbid')"
        )
    try:
        cls.config_cls()
    except Exception as exc:  # every config must accept {} (all defaults)
        raise RegistryError(
            f"{cls.__qualname__}.config_cls cannot be built from {{}} ({exc}); give every field a default"
        ) from exc


def register_technique(cls: type[Technique] | None = None, *, origin: str = "user", replace: bool = False):
    """Add a technique to the table. Usable as a decorator. A duplicate name raises :class:`RegistryError`
    unless ``replace=True`` (meant for tests and deliberate overrides)."""

    def _register(c: type[Technique]) -> type[Technique]:
        _check(c)
        if not _loading:
            _ensure_loaded()
        old = _TABLE.get((c.slot, c.name))
        if old is not None and old.technique_cls is not c and not replace:
            raise RegistryError(
                f"technique name {c.name!r} is already registered by {old.technique_cls.__module__}."
                f"{old.technique_cls.__qualname__} ({old.origin}), so {c.__module__}.{c.__qualname__} "
                f"({origin}) cannot register it too; pick another name or pass replace=True"
            )
        _TABLE[(c.slot, c.name)] = Entry(c.name, c.slot, c.config_cls, c, origin)
        return c

    return _register(cls) if cls is not None else _register


def unregister_technique(name: str, slot: str | None = None) -> None:
    entry = get(name, slot)
    if entry is None:
        raise RegistryError(f"no technique named {name!r} is registered")
    del _TABLE[(entry.slot, entry.name)]


def _ensure_loaded() -> None:
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        for mod in _BUILTIN_MODULES:
            module = importlib.import_module(mod)
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Technique) and obj.__module__ == mod and obj.name:
                    register_technique(obj, origin="builtin")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break every recipe; it is reported, not hidden
                PLUGIN_FAILURES[ep.name] = f"{ep.value} from {dist}: {type(exc).__name__}: {exc}"
                warnings.warn(
                    f"hf_memkit: the technique plugin {ep.name!r} ({ep.value}, package {dist}) failed to import: "
                    f"{exc}. Fix or uninstall that package.",
                    stacklevel=2,
                )
                continue
            register_technique(obj, origin=f"entry point of {dist}")
        _loaded = True
    finally:
        _loading = False


def get(name: str, slot: str | None = None) -> Entry | None:
    """The entry of ``name`` in ``slot``; without ``slot``, the only entry of that name (None when there is
    none, :class:`RegistryError` when the name lives in several slots)."""
    _ensure_loaded()
    if slot is not None:
        return _TABLE.get((slot, name))
    found = [e for e in _TABLE.values() if e.name == name]
    if len(found) > 1:
        raise RegistryError(
            f"technique name {name!r} exists in several slots ({', '.join(e.slot for e in found)}); "
            "pass slot= to say which"
        )
    return found[0] if found else None


def slots_of(name: str) -> list[str]:
    """Every slot that has a technique called ``name``, in slot order."""
    _ensure_loaded()
    return [s for s in SLOTS if (s, name) in _TABLE]


def entries() -> list[Entry]:
    _ensure_loaded()
    return sorted(_TABLE.values(), key=lambda e: (list(SLOTS).index(e.slot), e.name))


def names(slot: str | None = None) -> list[str]:
    return [e.name for e in entries() if slot is None or e.slot == slot]
