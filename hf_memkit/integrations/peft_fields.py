"""One config per PEFT adapter type: the PEFT config class (what ``adapter_config.json`` holds, what
``PeftModel.from_pretrained`` rebuilds) is generated from the recipe's config model, so a field, its default, its
help text and its validation are written once.

:func:`peft_config_class` makes a ``PeftConfig`` dataclass whose fields are the recipe model's fields (renamed
where PEFT's name differs, e.g. ``rank`` -> ``r``) plus the fields PEFT's tuner machinery reads (``exclude_modules``,
``layers_to_transform``, ``modules_to_save``, ...). Its ``__post_init__`` validates the values through the recipe
model, so a bad value in Python or in a saved ``adapter_config.json`` gets the same error, naming the class and
the field, as in a recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Callable, Optional, Union

from ..errors import RecipeError

#: fields every generated config carries besides the recipe's: (name, default, help) — read by PEFT's BaseTuner
PEFT_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("exclude_modules", None, "modules to skip (names, suffixes or a regex, as in PEFT)"),
    ("init_lora_weights", True, "True: the branch starts as the method defines it"),
    ("layers_to_transform", None, "unused"),
    ("layers_pattern", None, "unused"),
    ("target_parameters", None, "unsupported"),
    ("modules_to_save", None, "modules trained in full"),
    ("bias", "none", "only 'none'"),
)


def _as_list(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def peft_config_class(name: str, fields_model: type, peft_type: str, *, module: str, doc: str,
                      renames: dict[str, str] | None = None, check: Callable[[Any], None] | None = None,
                      namespace: dict[str, Any] | None = None) -> type:
    """A ``PeftConfig`` dataclass called ``name`` with the fields of the pydantic ``fields_model`` (a
    :class:`~hf_memkit.technique.TechniqueConfig`), registered under ``peft_type`` when instantiated.
    ``renames`` maps recipe names to PEFT names; ``check`` runs after validation for PEFT-only fields;
    ``namespace`` adds methods and properties."""
    from peft.config import PeftConfig

    renames = renames or {}
    back = {v: k for k, v in renames.items()}
    fields: list[tuple[str, Any, Any]] = []
    for fname, info in fields_model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        meta = {"help": info.description or ""}
        if isinstance(default, (list, dict)):
            spec = dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
        else:
            spec = dataclasses.field(default=default, metadata=meta)
        fields.append((renames.get(fname, fname), Any, spec))
    taken = {f[0] for f in fields}
    fields += [(n, Optional[Union[list, str, int, bool]], dataclasses.field(default=d, metadata={"help": h}))
               for n, d, h in PEFT_FIELDS if n not in taken]

    def __post_init__(self):
        PeftConfig.__post_init__(self)
        from pydantic import ValidationError

        from .peft_types import require

        require(peft_type)
        from peft.utils.peft_types import PeftType

        self.peft_type = getattr(PeftType, peft_type)
        values = {back.get(f, f): _as_list(getattr(self, f)) for f in (renames.get(k, k)
                                                                       for k in fields_model.model_fields)}
        try:
            fields_model(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err.get("loc"):  # one field
                key = renames.get(str(err["loc"][0]), str(err["loc"][0]))
                msg = f"{msg} (got {err.get('input')!r})"
            else:  # a rule across fields: named by the first field its message mentions
                hits = [(m.start(), f) for f in fields_model.model_fields
                        if (m := re.search(rf"\b{re.escape(f)}\b", msg))]
                key = renames.get(min(hits)[1], min(hits)[1]) if hits else "config"
            raise RecipeError(msg, path=name, key=key, fix=f"see help({name}) for the field's range") from None
        for f in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, f, None), list):
                setattr(self, f, set(getattr(self, f)))
        if self.bias != "none":
            raise RecipeError(f"bias={self.bias!r} is not supported by {name}", path=name, key="bias",
                              fix="use bias='none'")
        if self.target_parameters:
            raise RecipeError(f"{name} adapts modules, not parameters", path=name, key="target_parameters",
                              fix="remove target_parameters")
        if check is not None:
            check(self)

    ns = {"__post_init__": __post_init__, "__doc__": doc, "__module__": module, "__qualname__": name}
    ns.update(namespace or {})
    cls = dataclasses.make_dataclass(name, fields, bases=(PeftConfig,), namespace=ns)
    cls.recipe_fields = fields_model
    return cls
