"""Make ``MIXLORA`` and ``LORC`` real PEFT adapter types.

PEFT registers a method with ``peft.utils.peft_types.register_peft_method(name=..., config_cls=...,
model_cls=..., prefix=...)``, which fills ``peft.mapping.PEFT_TYPE_TO_{CONFIG,TUNER,PREFIX}_MAPPING``: from then
on ``get_peft_model``, ``PeftModel.save_pretrained`` / ``from_pretrained`` and ``AutoPeftModel*`` treat the type
like LoRA. But ``register_peft_method`` refuses any name that is not already a member of the ``PeftType`` enum
(ecosystem spec §7; PEFT issues #2273, #2634), so a third party must add the member first. That is the one
narrow intervention here, :func:`_add_enum_member`: it adds a member to ``PeftType`` exactly as the enum
metaclass would have (member map, value map, name list, class attribute), nothing else of PEFT is touched,
and it is checked against the installed PEFT by ``tests/integrations/test_peft_types.py``.

If the installed PEFT already has the type (a future PEFT with its own MixLoRA or LoRC), ours steps aside: the
enum is left alone, PEFT's registration is kept, and hf_memkit's config for that type raises a typed error
naming the PEFT version, instead of silently loading checkpoints with the wrong tuner.

Registration happens once per process, when an hf_memkit adapter is first used (``hf_memkit.MixLoraConfig``,
``hf_memkit.LorcConfig``, the recipe techniques) or, after ``import hf_memkit``, as soon as ``peft`` itself is
imported (:func:`install_import_hook`), so ``AutoPeftModelForCausalLM.from_pretrained(dir)`` of a saved MixLoRA
or LoRC adapter works in a fresh process with only ``import hf_memkit`` before it. ``import hf_memkit`` itself
stays cheap: the hook is a ``sys.meta_path`` finder that imports nothing until ``peft`` is imported.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from typing import Any

from ..errors import IncompatibleModelError

logger = logging.getLogger("hf_memkit")

#: PeftType member -> (method name for register_peft_method, "module:Config", "module:Tuner", state-dict prefix)
TYPES: dict[str, tuple[str, str, str, str]] = {
    "MIXLORA": ("mixlora", "hf_memkit.adapters.mixlora.peft_config:MixLoraConfig",
                "hf_memkit.adapters.mixlora.tuner:MixLoraModel", "mixlora_"),
    "LORC": ("lorc", "hf_memkit.adapters.lorc.peft_config:LorcConfig",
             "hf_memkit.adapters.lorc.tuner:LorcModel", "lorc_"),
}

#: type -> "registered" (ours), "peft" (PEFT has its own: we stepped aside)
STATUS: dict[str, str] = {}
#: enum members this module added (so a second registration in the same process recognises them as ours)
ADDED_MEMBERS: set[str] = set()
_lock = threading.RLock()
_registering = False


class _NotReady(Exception):
    """The config or tuner module is being imported right now (it imports peft, which fired the hook)."""


def _load(path: str) -> Any:
    import importlib

    module, _, attr = path.partition(":")
    loading = sys.modules.get(module)
    if loading is not None and not hasattr(loading, attr):
        raise _NotReady(path)
    return getattr(importlib.import_module(module), attr)


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    """Add ``name = value`` to an existing ``(str, Enum)`` class, the way ``EnumType.__new__`` builds members:
    ``PeftType(value)``, ``PeftType[name]``, ``PeftType.NAME``, iteration and ``in`` all see it afterwards."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_sort_order_") or any(hasattr(m, "_sort_order_") for m in enum_cls):
        member._sort_order_ = len(enum_cls._member_names_)
    member.__init__(value)
    # the metaclass refuses to set attributes that are members; this one is not a member yet
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    ADDED_MEMBERS.add(name)
    return member


def ensure_registered() -> dict[str, str]:
    """Register both types with the installed PEFT (idempotent); returns :data:`STATUS`."""
    global _registering
    with _lock:
        if len(STATUS) == len(TYPES) or _registering:
            return STATUS
        _registering = True
        try:
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
            from peft.utils.peft_types import PeftType, register_peft_method

            for type_name, (method, config_path, tuner_path, prefix) in TYPES.items():
                if type_name in STATUS:
                    continue
                native = type_name in PeftType.__members__ and type_name not in ADDED_MEMBERS
                if native and PeftType[type_name] in PEFT_TYPE_TO_CONFIG_MAPPING:
                    import peft

                    STATUS[type_name] = "peft"
                    logger.warning("hf_memkit: PEFT %s has its own %s adapter type; hf_memkit's steps aside",
                                   peft.__version__, type_name)
                    continue
                member = _add_enum_member(PeftType, type_name, type_name)
                if member in PEFT_TYPE_TO_CONFIG_MAPPING:  # registered earlier in this process (module reload)
                    STATUS[type_name] = "registered"
                    continue
                try:
                    config_cls, tuner_cls = _load(config_path), _load(tuner_path)
                except _NotReady:  # registered on the next call (the config's __post_init__ makes it)
                    continue
                register_peft_method(name=method, config_cls=config_cls, model_cls=tuner_cls, prefix=prefix)
                STATUS[type_name] = "registered"
        finally:
            _registering = False
        return STATUS


def require(type_name: str) -> None:
    """Raise when ``type_name`` cannot be used through hf_memkit because PEFT owns it."""
    status = ensure_registered().get(type_name)
    if status == "peft":
        import peft

        raise IncompatibleModelError(
            f"the installed PEFT {peft.__version__} ships its own {type_name} adapter type, so hf_memkit's "
            f"{type_name.lower()} adapter stepped aside; use PEFT's config class for {type_name}, or pin "
            "peft<=0.21 to use hf_memkit's"
        )


# ------------------------------------------------------------------------------------------------------------
# register as soon as peft is imported (after `import hf_memkit`), without importing peft ourselves


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``peft`` is about to be imported it wraps the real loader so that
    :func:`ensure_registered` runs right after ``peft/__init__`` has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, s):
                return real.create_module(s)

            def exec_module(self, module):
                real.exec_module(module)
                _remove_hook()
                try:
                    ensure_registered()
                except Exception as exc:  # never break `import peft`; the adapters report it when used
                    logger.warning("hf_memkit: could not register the MIXLORA/LORC PEFT types: %s", exc)

        spec.loader = _Loader()
        return spec


_HOOK = _PeftImportHook()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install_import_hook() -> None:
    """Called by ``hf_memkit/__init__``: register now if ``peft`` is already imported, else when it is."""
    if "peft" in sys.modules:
        if getattr(sys.modules["peft"], "__spec__", None) is not None:
            try:
                ensure_registered()
            except Exception as exc:  # pragma: no cover - a broken peft install is reported when used
                logger.warning("hf_memkit: could not register the MIXLORA/LORC PEFT types: %s", exc)
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
