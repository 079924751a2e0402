"""Plain-number checks shared by technique settings (:class:`~hf_memkit.technique.TechniqueConfig`) and
``training_args`` (:mod:`hf_memkit.recipe`).

pydantic's lax mode reads ``true`` as 1 and the string ``"1e-3"`` as 0.001 in number fields, and lets ``.inf``
and ``.nan`` through ``gt=0``-style bounds only half of the time (``nan > 0`` is False, ``inf > 0`` is True).
A recipe means what it says: a number field takes a finite number written as a number.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Literal

#: ints beyond this do not fit the 64-bit fields of torch, numpy and the C libraries that receive them
INT64_MAX = 2**63 - 1

_NON_FINITE = ("nan", "inf", "infinity")
_NUMBER_TEXT = re.compile(r"^\s*[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?\s*$")


def number_spelling(text: str) -> str | None:
    """How to write the number that ``text`` spells, as YAML reads it: ``"1e-3"`` -> ``"1.0e-3 or 0.001"``,
    ``"8"`` -> ``"8"``; None when ``text`` is not a number."""
    if len(text) > 64 or not _NUMBER_TEXT.match(text):
        return None
    t = text.strip().replace("_", "")
    if re.fullmatch(r"[-+]?[0-9]+", t):
        return str(int(t))
    mantissa, _, exponent = t.lower().partition("e")
    plain = repr(float(t))
    if not exponent:
        return plain
    if "." not in mantissa:
        mantissa += ".0"
    elif mantissa.endswith("."):
        mantissa += "0"
    if mantissa.startswith((".", "-.", "+.")):
        mantissa = mantissa.replace(".", "0.", 1)
    sci = f"{mantissa}e{exponent}"
    return f"{sci} or {plain}" if "e" not in plain else sci


def _kinds(tp: Any) -> set[str]:
    """What an annotation accepts at the top level: int and/or float (plus number for either), bool, str, none,
    seq, map or any."""
    if tp is Any or tp is object:
        return {"any"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(tp)))
    if origin is typing.Annotated:
        return _kinds(typing.get_args(tp)[0])
    if origin is Literal:
        return {_value_kind(a) for a in typing.get_args(tp)}
    if tp is bool:
        return {"bool"}
    if tp in (int, float):
        return {"number", tp.__name__}
    if tp is str:
        return {"str"}
    if tp is type(None):
        return {"none"}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        return {"seq"}
    if origin is dict or tp is dict:
        return {"map"}
    return {"any"}  # pydantic models check their own fields; exotic types are left to pydantic


def _value_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"  # a Literal of numbers: pydantic compares, a float 4.0 matches 4
    if v is None:
        return "none"
    return "str" if isinstance(v, str) else "any"


def _members(tp: Any, origins: tuple) -> list[Any]:
    """The element annotations of the container arms of ``tp`` (list[X] -> X, tuple[X, Y] -> X, Y,
    dict[K, V] -> V)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _members(a, origins)]
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0], origins)
    if origin not in origins:
        return []
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if origin is dict:
        return args[1:] or [Any]
    return args or [Any]


def number_problem(value: Any, tp: Any, _depth: int = 0) -> str | None:
    """Why ``value`` is not acceptable where ``tp`` expects a number, or None. Checked: bools and quoted numbers
    where only numbers go, non-finite floats anywhere, ints beyond 64 bits where numbers go; inside lists, tuples
    and dict values too."""
    if _depth > 16:  # recipes are a few levels deep; anything deeper is left to pydantic
        return None
    kinds = _kinds(tp)
    numeric = "number" in kinds
    if isinstance(value, bool):
        if numeric and not kinds & {"bool", "any"}:
            return f"{value!r} is not a number: write a number"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"{value!r} is not a finite number: write a finite number"
        if "int" in kinds and "float" not in kinds and abs(value) > INT64_MAX:  # pydantic: "exceeded maximum size"
            return f"{value!r} is too large for a whole number (beyond 64 bits)"
    elif isinstance(value, int):
        if numeric and abs(value) > INT64_MAX:
            return "the number is too large (beyond 64 bits)"
    elif isinstance(value, str):
        if numeric and value.strip().lower().lstrip("+-.") in _NON_FINITE:  # pydantic reads 'nan' as a float
            return f"{value[:16]!r} is not a finite number: write a finite number"
        if numeric and not kinds & {"str", "any"}:
            spelling = number_spelling(value)
            if spelling is not None:
                return f"{value[:64]!r} is a string, not a number: write {spelling} without quotes"
    elif isinstance(value, (list, tuple)):
        members = _members(tp, (list, tuple, set, frozenset))
        if members or kinds & {"any"}:
            elem = typing.Union[tuple(members)] if members else Any
            for i, v in enumerate(value):
                problem = number_problem(v, elem, _depth + 1)
                if problem:
                    return f"item {i}: {problem}"
    elif isinstance(value, dict):
        members = _members(tp, (dict,))
        if members or kinds & {"any"}:
            elem = typing.Union[tuple(members)] if members else Any
            for k, v in value.items():
                problem = number_problem(v, elem, _depth + 1)
                if problem:
                    return f"{k if isinstance(k, str) else type(k).__name__!s:.40}: {problem}"
    return None
