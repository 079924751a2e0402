"""The one patching layer: every change a technique makes to a model's modules goes through a :class:`Patches`.

A technique opens ``Patches(owner, model)`` in ``patch_model`` and installs through it; its ``remove()`` (the
technique's handle undo) takes everything off in reverse order and restores each module bit for bit: the
instance ``forward`` that was there (or its absence), the child module that was swapped out, the attributes that
were set, the hooks that were registered.

**Owners and parts.** Each patched module records which technique owns which *part* of it
(``module._memkit_parts``). A part has one owner; a second technique claiming the same part of the same module
raises :class:`CompositionError` naming both techniques, the module and the fix. Parts:

* ``forward`` — the module's whole forward (Mesa's norms and MLPs, CCE's causal-LM forward, sparse update's
  sliced Linear). It excludes every other part on the module.
* ``linear.kernel`` — how an ``nn.Linear`` computes ``x Wᵀ + b`` and what it saves for backward (Mesa: the input
  in 8 bits; WTA-CRS: sampled rows; bf16 storage: 16-bit weights, fp32 compute).
* ``linear.view`` — the weight the Linear computes with (AST: ``W ⊙ M`` with a straight-through gradient and the
  SLoRB branch; CAST: ``W ⊙ A``).
* ``module`` — the child module is replaced (SST, QAT, 4-bit layers, PEFT wrappers).

The declared composition: ``linear.kernel`` and ``linear.view`` compose, the kernel computing with the view's
weight (8-bit saving inside a masked sparse forward: Mesa + AST). A Linear with a view and no kernel runs the
view's own fused forward (AST's ``MaskedLinear`` saves only ``x``); with a kernel, the kernel keeps the view's
weight for its backward (one weight-sized tensor per covered Linear, freed by backward). Everything else on one
module is one owner's. Techniques declare the parts they claim in ``Technique.patches`` so that the recipe
loader refuses an overlapping pair before a model is touched (:func:`overlap`).

**Copies.** State lives on the module and forwards are plain functions of ``self`` bound with
``types.MethodType``: ``copy.deepcopy`` of a patched model (a distillation teacher, an EMA copy) rebinds every
patch to the copy, which then computes with its own weights.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecipeError

PARTS_ATTR = "_memkit_parts"
#: on a module a technique put in place of another (swap_module, or a PEFT adapter's wrapper): that technique's name
PUT_BY_ATTR = "_memkit_put_by"
#: the instance forward that was there before the first part was claimed (or _ABSENT)
BASE_ATTR = "_memkit_base_forward"


class _ABSENT:
    """Marks 'no instance forward was there' (a class: ``copy.deepcopy`` keeps its identity)."""


#: surfaces a technique may declare in ``Technique.patches`` -> what the user reads in an error
SURFACES = {
    "linear.forward": "the whole forward of nn.Linear layers",
    "linear.kernel": "the matmul kernel of nn.Linear layers (what it saves for backward)",
    "linear.view": "the weight nn.Linear layers compute with",
    "linear.module": "nn.Linear modules themselves (replaced by another module)",
    "norm.forward": "the forward of normalisation layers",
    "mlp.forward": "the forward of gated MLP blocks",
    "attention.forward": "the attention function",
    "embedding.forward": "the forward of nn.Embedding layers",
    "causal_lm.forward": "the forward of the *ForCausalLM model (its loss and logits)",
}
#: pairs of distinct surfaces that touch the same thing without a declared composition
_OVERLAPS = {frozenset(p) for p in (("linear.forward", "linear.kernel"), ("linear.forward", "linear.view"))}
#: the declared compositions of distinct surfaces on one module: (outer, inner) -> how
COMPOSITIONS = {
    ("linear.kernel", "linear.view"): "the kernel computes with the view's weight (e.g. Mesa's 8-bit saving "
                                      "inside AST's masked sparse forward)",
}


class CompositionError(RecipeError):
    """Two techniques would patch the same part of one module without a declared composition."""


def overlap(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The surfaces where two techniques' declared ``patches`` collide (same surface, or a whole forward against
    one of its parts)."""
    hits = []
    for sa in a:
        for sb in b:
            if sa == sb or frozenset((sa, sb)) in _OVERLAPS:
                hits.append(sa if sa == sb else f"{sa} / {sb}")
    return sorted(set(hits))


@dataclass
class Part:
    owner: str
    fn: Any = None          # kernel: fn(module, x, weight, bias); forward: fn(module, *args, **kw)
    state: tuple = ()
    fused: Any = None       # view: fn(module, x), the whole forward when no kernel is installed
    weight: Any = None      # view: fn(module) -> the weight to compute with
    extra: Any = None       # view: fn(module, x) -> a term added to the kernel's output, or None


def parts_of(module: Any) -> dict[str, Part]:
    return vars(module).get(PARTS_ATTR, {})


def owners(model: Any) -> dict[str, dict[str, str]]:
    """``{module name: {part: owner}}`` for every patched module of ``model``."""
    out = {}
    for name, m in model.named_modules():
        p = {k: v.owner for k, v in parts_of(m).items()}
        if put_by(m) is not None:
            p["module"] = put_by(m)
        if p:
            out[name] = p
    return out


def part_state(module: Any, part: str) -> tuple:
    return parts_of(module)[part].state


# the forwards the layer installs --------------------------------------------------------------------------------
def _dispatch_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    parts = vars(self)[PARTS_ATTR]
    fwd = parts.get("forward")
    if fwd is not None:
        return fwd.fn(self, *args, **kwargs)
    return _linear_forward(self, *args, **kwargs)


_DISPATCHERS: dict[type, Callable] = {}


def _dispatcher(cls: type) -> Callable:
    """``_dispatch_forward`` carrying ``cls.forward``'s signature (``__wrapped__``): the Trainer reads the model's
    forward signature to choose dataset columns. One function per class, closing over nothing of a module."""
    fn = _DISPATCHERS.get(cls)
    if fn is None:
        def fn(self: Any, *args: Any, **kwargs: Any) -> Any:
            return _dispatch_forward(self, *args, **kwargs)
        functools.update_wrapper(fn, cls.forward)
        _DISPATCHERS[cls] = fn
    return fn


def _linear_forward(self: Any, x: Any) -> Any:
    parts = vars(self)[PARTS_ATTR]
    kernel, view = parts.get("linear.kernel"), parts.get("linear.view")
    if kernel is None:
        return view.fused(self, x)
    weight = view.weight(self) if view is not None else self.weight
    y = kernel.fn(self, x, weight, self.bias)
    if view is not None and view.extra is not None:
        extra = view.extra(self, x)
        if extra is not None:
            y = y + extra
    return y


def base_forward(module: Any) -> Callable:
    """The forward the module had before the layer's first patch (an instance forward, or the class's)."""
    base = vars(module).get(BASE_ATTR, _ABSENT)
    if base is _ABSENT:
        return types.MethodType(type(module).forward, module)
    return base


def claim(module: Any, part: str, record: Part, name: str | None = None) -> None:
    """Give ``part`` of ``module`` to ``record.owner``; the layer's dispatching forward goes in on the first
    claim. Raises :class:`CompositionError` when another technique holds that part (or the whole forward)."""
    parts = vars(module).get(PARTS_ATTR)
    if parts is None:
        parts = {}
        module.__dict__[PARTS_ATTR] = parts
        module.__dict__[BASE_ATTR] = vars(module).get("forward", _ABSENT)
        module.forward = types.MethodType(_dispatcher(type(module)), module)
    clash = [p for p in parts if p == part or "forward" in (p, part)]
    if clash:
        other = parts[clash[0]].owner
        raise CompositionError(
            f"'{record.owner}' and '{other}' would both patch {SURFACES.get(part, part)} of module "
            f"{name or type(module).__name__!r} ({type(module).__name__}; '{other}' holds its {clash[0]!r}), and no "
            f"composition of the two is declared. Fix: use one of them in the recipe, or target different modules "
            f"(see docs/DESIGN.md, 'Patching rules')")
    parts[part] = record


def unclaim(module: Any, part: str, owner: str) -> None:
    """Take ``owner``'s ``part`` off ``module``; the last part restores the module's own forward exactly."""
    parts = vars(module).get(PARTS_ATTR, {})
    held = parts.get(part)
    if held is None or held.owner != owner:
        raise RuntimeError(f"{owner}: module {type(module).__name__} has no {part!r} patch of its own to remove "
                           f"(held by {held.owner if held else 'nobody'}); patches come off in the reverse order "
                           f"they were applied")
    del parts[part]
    if not parts:
        base = module.__dict__.pop(BASE_ATTR, _ABSENT)
        module.__dict__.pop(PARTS_ATTR, None)
        module.__dict__.pop("forward", None)
        if base is not _ABSENT:
            module.__dict__["forward"] = base


def strip_(model: Any) -> Any:
    """Take every part off every module of ``model`` (for a deep copy that must compute as the unpatched model:
    a dense distillation teacher). Attributes and hooks installed beside the parts stay."""
    for m in model.modules():
        for part, rec in list(parts_of(m).items()):
            unclaim(m, part, rec.owner)
    return model


def put_by(module: Any) -> str | None:
    """The technique that put ``module`` in place of another one (None: the model's own module)."""
    return vars(module).get(PUT_BY_ATTR)


def mark_put_(module: Any, owner: str) -> None:
    """Record that ``owner`` put ``module`` into the model (done by :func:`swap_module`; the PEFT wiring marks the
    adapter wrappers PEFT puts in)."""
    module.__dict__[PUT_BY_ATTR] = owner


def parent_of(model: Any, name: str) -> tuple[Any, str]:
    """(the module holding the submodule called ``name``, its attribute name there)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _held_by_other(module: Any, owner: str) -> tuple[str, str] | None:
    """(part, owner) of the first part of ``module`` another technique than ``owner`` holds, or None."""
    return next(((p, r.owner) for p, r in parts_of(module).items() if r.owner != owner), None)


def swap_module(parent: Any, child: str, new: Any, owner: str) -> Any:
    """Put ``new`` in place of ``parent.<child>`` for ``owner`` and return the module it replaces. A module whose
    parts another technique holds, or that another technique put there (an adapter's wrapper, a quantized
    layer), cannot be replaced: that technique's work would silently stop running. Undo with
    :func:`unswap_module`."""
    old = getattr(parent, child)
    held = _held_by_other(old, owner)
    if held:
        part, other = held
        raise CompositionError(
            f"'{owner}' would replace module {child!r} of {type(parent).__name__} ({type(old).__name__}), whose "
            f"{part!r} '{other}' has patched, and no composition of the two is declared. Fix: use one of them in "
            f"the recipe")
    putter = put_by(old)
    if putter is not None and putter != owner:
        raise CompositionError(
            f"'{owner}' would replace module {child!r} of {type(parent).__name__} ({type(old).__name__}), which "
            f"'{putter}' put there, and no composition of the two is declared. Fix: use one of them in the recipe")
    setattr(parent, child, new)
    mark_put_(new, owner)
    return old


def unswap_module(parent: Any, child: str, original: Any, owner: str) -> Any:
    """Undo :func:`swap_module`: ``original`` goes back in place of the module ``owner`` put there (unmarked, as it
    was); returns the module taken out."""
    current = getattr(parent, child)
    putter = put_by(current)
    if putter != owner:
        raise RuntimeError(f"{owner}: module {child!r} of {type(parent).__name__} ({type(current).__name__}) was "
                           f"put there by {putter or 'the model itself'}, not {owner}; patches come off in the "
                           "reverse order they were applied")
    held = _held_by_other(current, owner)
    if held:
        part, other = held
        raise RuntimeError(f"{owner}: module {child!r} still carries '{other}''s {part!r} patch; patches come off "
                           "in the reverse order they were applied")
    setattr(parent, child, original)
    current.__dict__.pop(PUT_BY_ATTR, None)
    return current


@contextlib.contextmanager
def stand_ins(model: Any, replacements: dict[str, Any]):
    """Inside the block, each module named in ``replacements`` is replaced by its stand-in (a pass that computes
    with modules of its own: Block-AP's fake-quantized Linears); after it, also on error, the originals are back
    with their patches and owners untouched. Nothing is recorded, and no owner is asked: the model leaves the
    block exactly as it came in."""
    done = []
    try:
        for name, new in replacements.items():
            parent, child = parent_of(model, name)
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
        yield
    finally:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)


@contextlib.contextmanager
def suspended(modules: Any):
    """The modules compute with their own class forward inside the block (a measurement of the dense gradient
    under a patch); their patches are back, untouched, after it."""
    saved = [(m, m.__dict__.pop("forward")) for m in modules if "forward" in vars(m)]
    try:
        yield
    finally:
        for m, fwd in saved:
            m.__dict__["forward"] = fwd


def unpatched_copy(model: Any) -> Any:
    """``copy.deepcopy(model)`` with every patch of this layer taken off the copy (the original keeps them)."""
    import copy

    return strip_(copy.deepcopy(model))


class Patches:
    """One technique's changes to one model, taken off in reverse order by :meth:`remove`."""

    def __init__(self, owner: str, model: Any = None):
        self.owner = owner
        self.model = model
        self._undo: list[Callable[[], None]] = []
        self._names: dict[int, str] = {}

    # naming, for errors --------------------------------------------------------------------------------------
    def _name(self, module: Any) -> str:
        if self.model is not None and not self._names:
            self._names = {id(m): n or "<model>" for n, m in self.model.named_modules()}
        return self._names.get(id(module), type(module).__name__)

    def _claim(self, module: Any, part: str, record: Part) -> None:
        claim(module, part, record, self._name(module))
        self._undo.append(lambda m=module, p=part, r=record: unclaim(m, p, r.owner))

    # what a technique installs ---------------------------------------------------------------------------------
    def forward(self, module: Any, fn: Callable, *state: Any) -> None:
        """``fn(module, *args, **kwargs)`` becomes ``module``'s forward; :func:`part_state` gives ``state`` back
        and :func:`base_forward` the forward it replaced."""
        self._claim(module, "forward", Part(self.owner, fn=fn, state=state))

    def linear_kernel(self, linear: Any, fn: Callable, *state: Any) -> None:
        """``fn(linear, x, weight, bias)`` computes the Linear (``weight`` is the view's, when one is installed)."""
        self._claim(linear, "linear.kernel", Part(self.owner, fn=fn, state=state))

    def linear_view(self, linear: Any, *, weight: Callable, fused: Callable, extra: Callable | None = None,
                    state: tuple = ()) -> None:
        """The weight ``linear`` computes with: ``weight(linear)``; ``fused(linear, x)`` is the whole forward used
        while no kernel is installed; ``extra(linear, x)`` a term added to a kernel's output."""
        self._claim(linear, "linear.view", Part(self.owner, fused=fused, weight=weight, extra=extra, state=state))

    def replace_module(self, parent: Any, child: str, new: Any) -> Any:
        """Swap ``parent.<child>`` for ``new`` (see :func:`swap_module`), swapped back on remove; returns the old
        module."""
        old = swap_module(parent, child, new, self.owner)
        self._undo.append(lambda: unswap_module(parent, child, old, self.owner))
        return old

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an attribute and restore what was there (or its absence) on remove."""
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)

        def undo():
            if had:
                setattr(obj, name, old)
            elif name in vars(obj):
                delattr(obj, name)
        self._undo.append(undo)

    def hook(self, handle: Any) -> Any:
        """A torch hook handle (``register_forward_hook`` and friends) to remove with the rest."""
        self._undo.append(handle.remove)
        return handle

    def on_remove(self, fn: Callable[[], Any]) -> None:
        """Any other undo step, run in order with the rest."""
        self._undo.append(fn)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __len__(self) -> int:
        return len(self._undo)
