"""The optimizer side of 16-bit weight storage: :class:`WriteBack16` wraps the run's optimizer.

For each 16-bit parameter with a gradient, ``step()`` gives the inner optimizer an fp32 view for the duration of
one inner ``step()``: the parameter's ``.data`` becomes an fp32 copy of the weight (plus the Kahan compensation),
its ``.grad`` an fp32 copy of the gradient, and the param groups are narrowed to that one parameter. The inner
optimizer therefore keeps exactly the state it keeps for an fp32 parameter (fp32 moments for torch AdamW, 8-bit
blocks for bitsandbytes), keyed by the same ``Parameter`` object, and applies weight decay in fp32. The new fp32
value is then written into the 16-bit storage:

* ``stochastic`` — stochastic rounding (:func:`hf_memkit.ops.stochastic_round.round_into_`), from a seeded
  generator whose state is the technique's checkpoint state;
* ``kahan`` — round to nearest, and the rounding error, itself stored in 16 bits, becomes ``state[KAHAN]`` of that
  parameter: the next step starts from weight + compensation (so weight + compensation tracks the fp32
  trajectory; optimi's Kahan summation, folded into the fp32 view);
* ``nearest`` — round to nearest (updates below half an ulp are lost; kept for comparison).

fp32 parameters (norms, biases, adapters) are stepped together in one inner ``step()`` with the groups narrowed to
them.

**Sliced stepping.** A 16-bit parameter of more than ``step_chunk`` elements (default :data:`STEP_CHUNK_NUMEL`, 1M
= 4 MiB of fp32; 0 = never) is stepped slice by slice along its first dimension, so that neither its fp32 copy,
nor its fp32 gradient, nor the inner optimizer's own temporaries (bitsandbytes' CPU kernel dequantizes both moments
of the tensor it is given) ever exist at full size. Each slice of rows becomes a temporary fp32 parameter (the
rows of the weight, plus the rows of the Kahan compensation; its gradient the fp32 rows of the gradient) whose
state is a view of the parent's: entries shaped like the parameter are row slices (updated in place), per-block
entries (bitsandbytes' ``absmax1/2``, one fp32 per 256 elements of the flattened tensor) the matching block
slices, shared entries (``qmap1/2``) shared, and the step counter is copied in and written back once per step.
That state is installed as ``inner.state[temp]`` with the groups narrowed to ``[temp]`` and removed afterwards, so
the inner optimizer's ``state`` and checkpoints only ever hold the parent's full state. A parameter without state
gets its full-size state first, in the inner optimizer's own format. Slices start and end on multiples of 256
flattened elements (the bitsandbytes block; it also keeps torch's vectorised loops on the same lanes), so the row
count per slice is a multiple of ``256 / gcd(row size, 256)``; a parameter that cannot be cut into at least two
such slices, or is not contiguous, is stepped whole. With ``nearest`` and ``kahan`` the result is bit-identical
to whole-parameter stepping; ``stochastic`` draws from the same generator, slice after slice in element order, so
the result can differ only in the draws (at most one ulp per element; with torch's CPU generator it came out
identical).

Sliced: ``torch.optim.Adam``/``AdamW`` (for-each or not; not ``fused``, ``capturable`` or ``differentiable``) and
bitsandbytes' blockwise 8-bit two-state Adam (``Adam8bit``, ``AdamW8bit``, their paged variants). Stepped whole,
as before: every other optimizer, and for bitsandbytes a parameter with 32-bit state (below ``min_8bit_size``, or
an ``optim_bits: 32`` override), ``max_unorm`` > 0, percentile clipping or non-blockwise quantization.

Transient memory of one 16-bit parameter's step (``B`` = its elements, or one slice's when sliced): the fp32
weight and gradient, 8 B per element, plus the inner optimizer's temporaries: torch AdamW 8 B per element without
for-each (``exp_avg_sq.sqrt()`` and its quotient by the bias correction), 4 B with it; bitsandbytes' CPU
``optimizer_update_8bit_blockwise`` 20 B (both moments dequantized to fp32, ``g * gnorm_scale``, and the
denominator's ``sqrt`` and quotient), its CUDA kernel none. With the default, SmolLM2's tied 49152x576 embedding
(28.3M elements) is stepped in 28 slices of 1,756 rows (1.01M elements): 27 MiB with bitsandbytes on CPU instead
of 756 MiB whole, about what its largest unsliced weight (a 576x1536 MLP matrix) needs. The default is the
stochastic-rounding chunk (:data:`~hf_memkit.ops.stochastic_round.write.CHUNK`); on 2 CPU cores a step of that
embedding took as long in 1M-element slices as whole (~1.3-2.3 s, within the noise); on a GPU each slice costs a
few kernel launches, so a large model there may want a larger ``step_chunk``.

Pass-through: ``param_groups`` (read and assign), ``state``, ``defaults``, ``state_dict``/``load_state_dict``,
``zero_grad``, ``add_param_group`` and any other attribute reach the inner optimizer, so LR schedulers, Trainer
checkpoints and accelerate's wrapper see the inner optimizer's groups and state. ``load_state_dict`` keeps each
saved tensor's dtype (torch and bitsandbytes would cast fp32 moments to the 16-bit parameter dtype). A caller
that narrows the param groups itself (gradient release steps one parameter at a time) gets exactly the
parameters in the current groups that have a gradient stepped.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ...ops.stochastic_round import round_into_
from ...optimizer_slot.narrowed import positional_overrides_hidden

#: optimizer-state key of the Kahan compensation buffer (16 bits, the parameter's shape)
KAHAN = "memkit_kahan_comp"
_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")
#: attributes the wrapper keeps itself even when the inner optimizer has one of the same name
_LOCAL = frozenset({"update", "rng", "step_chunk", "_zero_grad_profile_name", "_opt_called", "_memkit_wrapped",
                    *_HOOK_DICTS})
SIXTEEN = (torch.bfloat16, torch.float16)
UPDATES = ("stochastic", "kahan", "nearest")
#: default ``step_chunk``: a 16-bit parameter of more elements is stepped in slices of at most this many (4 MiB
#: of fp32, the stochastic-rounding chunk; SmolLM2-135M's only larger weight is its 28.3M-element embedding, its
#: MLP matrices have 0.9M)
STEP_CHUNK_NUMEL = 1 << 20
#: elements of the flattened tensor per bitsandbytes ``absmax`` (blockwise 8-bit state); slices align to it
BLOCK = 256


class RoundingRNG:
    """The generators stochastic rounding draws from, one per device (seeded alike), and their states for the
    checkpoint: a resumed run rounds exactly as the uninterrupted one, and data-parallel ranks (same seed, same
    fp32 update) write identical weights."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generators: dict[str, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self.generators.get(key)
        if gen is None:
            gen = self.generators[key] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def state(self) -> dict[str, torch.Tensor]:
        return {key: gen.get_state() for key, gen in sorted(self.generators.items())}

    def load(self, states: dict[str, torch.Tensor]) -> None:
        for key, st in states.items():
            self.on(torch.device(key)).set_state(st)


class WriteBack16(torch.optim.Optimizer):
    """``WriteBack16(inner, update="stochastic", generator=g)``; see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, update: str = "stochastic",
                 rng: "RoundingRNG | None" = None, step_chunk: int = STEP_CHUNK_NUMEL):
        if update not in UPDATES:
            raise ValueError(f"update={update!r} is not one of {', '.join(UPDATES)}")
        if int(step_chunk) < 0:
            raise ValueError(f"step_chunk={step_chunk!r} must be >= 0 (0: never slice)")
        # torch.optim.Optimizer.__init__ would build groups of its own: set only what its methods read
        own = self.__dict__
        own["optimizer"] = optimizer
        own["update"] = update
        own["rng"] = rng if rng is not None else RoundingRNG(0)
        own["step_chunk"] = int(step_chunk)
        for name in _HOOK_DICTS:
            own[name] = OrderedDict()
        self._patch_step_function()

    # pass-through ------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """An attribute the inner optimizer owns is set there (e.g. bitsandbytes' ``initialized``, which a
        gradient-release wrapper sets after running its override scan on the whole groups)."""
        inner = self.__dict__.get("optimizer")
        if (inner is not None and name not in self.__dict__ and name not in _LOCAL
                and not hasattr(type(self), name)  # methods and properties (an LR scheduler wraps step)
                and name in getattr(inner, "__dict__", {})):
            setattr(inner, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        self.optimizer.load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entry in saved.items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
                continue
            p, now = params[index], self.state[params[index]]
            for k, v in entry.items():
                # fp32 moments of a 16-bit parameter must come back fp32 (torch and bitsandbytes cast them to the
                # parameter's dtype); the Kahan buffer comes back in its own 16 bits
                if isinstance(v, torch.Tensor) and isinstance(now.get(k), torch.Tensor) and now[k].dtype != v.dtype:
                    now[k] = v.to(device=p.device, copy=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"WriteBack16(update={self.update}, step_chunk={self.step_chunk}, {self.optimizer!r})"

    # step --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.optimizer.param_groups
        lists = [g["params"] for g in groups]
        wide = [[p for p in ps if p.grad is not None and p.dtype not in SIXTEEN] for ps in lists]
        narrow = [(i, p) for i, ps in enumerate(lists) for p in ps if p.grad is not None and p.dtype in SIXTEEN]
        _prepare_bitsandbytes(self.optimizer)
        try:
            with positional_overrides_hidden(self.optimizer):
                if any(wide):
                    for g, ps in zip(groups, wide):
                        g["params"] = ps
                    self.optimizer.step()
                for i, p in narrow:
                    for j, g in enumerate(groups):
                        g["params"] = [p] if j == i else []
                    self._step_16(p, i)
        finally:
            for g, ps in zip(groups, lists):
                g["params"] = ps
        return loss

    def _step_16(self, p: torch.nn.Parameter, gindex: int) -> None:
        """One inner step on an fp32 view of the 16-bit ``p`` (the groups are narrowed to ``p``, in group
        ``gindex``), then the write back; in slices when ``p`` is large and the inner optimizer allows it."""
        rows = slice_rows(tuple(p.shape), self.step_chunk)
        if rows and p.data.is_contiguous() and p.grad.shape == p.shape:
            layout = _sliceable_state(self.optimizer, p, gindex)
            if layout is not None:
                self._step_16_sliced(p, gindex, rows, layout)
                return
        low, grad16 = p.data, p.grad
        state = self.optimizer.state[p]
        comp = state.get(KAHAN) if self.update == "kahan" else None
        w32 = low.float()
        if comp is not None:
            w32.add_(comp)
        p.grad = None
        p.data = w32
        p.grad = grad16.float()
        try:
            self.optimizer.step()
        finally:
            new32 = p.data
            p.grad = None
            p.data = low
            p.grad = grad16
        if self.update == "kahan":
            low.copy_(new32)  # round to nearest
            err = new32.sub_(low)  # the rounding error, exact in fp32
            state = self.optimizer.state[p]  # the inner step may have created the entry
            if KAHAN in state:
                state[KAHAN].copy_(err)
            else:
                state[KAHAN] = err.to(low.dtype)
        else:
            round_into_(low, new32, self.update, self.rng.on(low.device))

    def _step_16_sliced(self, p: torch.nn.Parameter, gindex: int, rows: int, layout: "_Layout") -> None:
        """The step of :meth:`_step_16`, ``rows`` rows at a time (module docstring, *Sliced stepping*); ``p``'s
        state exists in full and ``layout`` says how to cut it."""
        inner, group = self.optimizer, self.optimizer.param_groups[gindex]
        low, grad16 = p.data, p.grad
        state = inner.state[p]
        d0, row = low.shape[0], low.numel() // low.shape[0]
        kahan = self.update == "kahan"
        comp = state.get(KAHAN) if kahan else None
        fresh = kahan and comp is None  # the first step: nothing to add, the buffer is filled row by row
        if fresh:
            comp = torch.zeros_like(low)
        width = (rows,) + tuple(low.shape[1:])
        w_buf = torch.empty(width, dtype=torch.float32, device=low.device)
        g_buf = torch.empty(width, dtype=torch.float32, device=low.device)
        temp = torch.nn.Parameter(torch.empty(0, dtype=torch.float32, device=low.device))
        gen = self.rng.on(low.device) if self.update == "stochastic" else None
        step = state["step"]
        last = step
        try:
            with _config_shared(inner, temp, p):
                for a in range(0, d0, rows):
                    b = min(a + rows, d0)
                    w32, g32 = w_buf[:b - a], g_buf[:b - a]
                    w32.copy_(low[a:b])
                    if comp is not None and not fresh:
                        w32.add_(comp[a:b])
                    g32.copy_(grad16[a:b])
                    temp.grad = None
                    temp.data = w32
                    temp.grad = g32
                    sub = layout.cut(state, a * row, b * row, a, b)
                    sub["step"] = step.clone() if isinstance(step, torch.Tensor) else step
                    inner.state[temp] = sub
                    group["params"] = [temp]
                    try:
                        inner.step()
                    finally:
                        inner.state.pop(temp, None)
                        group["params"] = [p]
                    last = sub["step"]
                    new32 = temp.data
                    if kahan:
                        low[a:b].copy_(new32)  # round to nearest
                        comp[a:b].copy_(new32.sub_(low[a:b]))  # the rounding error, exact in fp32
                    else:
                        round_into_(low[a:b], new32, self.update, gen)
        finally:
            temp.grad = None
            temp.data = torch.empty(0, dtype=torch.float32, device=low.device)
            if isinstance(step, torch.Tensor):  # the counter advanced once however many slices ran
                step.copy_(last)
            else:
                state["step"] = last
            if fresh:
                state[KAHAN] = comp


def slice_rows(shape: tuple[int, ...], step_chunk: int) -> int:
    """Rows per slice when a 16-bit parameter of ``shape`` is stepped in slices of at most ``step_chunk``
    elements (module docstring), or 0 when it is stepped whole: ``step_chunk`` is 0, the parameter is not larger,
    or no multiple of ``256 / gcd(row size, 256)`` rows (slices on bitsandbytes block boundaries) cuts it in two.
    A slice is larger than ``step_chunk`` only where one such multiple of rows already is."""
    if step_chunk <= 0 or not shape or shape[0] < 2:
        return 0
    numel = math.prod(shape)
    if numel <= step_chunk:
        return 0
    row = numel // shape[0]
    unit = BLOCK // math.gcd(row, BLOCK)
    most = max(step_chunk // row // unit, 1) * unit
    if most >= shape[0]:
        return 0
    pieces = -(-shape[0] // most)  # as few slices as the limit allows, of (nearly) equal size
    per = -(-shape[0] // pieces)
    return -(-per // unit) * unit  # a multiple of unit, still at most `most`


@dataclass
class _Layout:
    """How a parameter's state is cut for one slice: ``rows`` entries are shaped like the parameter (row
    slices), ``blocks`` have one element per :data:`BLOCK` flattened elements (block slices), ``shared`` are
    handed over as they are; ``step`` is the counter (set by the caller)."""

    rows: tuple[str, ...]
    blocks: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # entries that may be absent (torch's max_exp_avg_sq without amsgrad)

    def cut(self, state: dict[str, Any], start: int, stop: int, a: int, b: int) -> dict[str, Any]:
        sub: dict[str, Any] = {"step": None}
        for key in self.rows:
            if key in state:
                sub[key] = state[key][a:b]
        for key in self.blocks:
            sub[key] = state[key][start // BLOCK:-(-stop // BLOCK)]
        for key in self.shared:
            sub[key] = state[key]
        return sub


_TORCH_ADAM = _Layout(rows=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), optional=("max_exp_avg_sq",))
_BNB_ADAM = _Layout(rows=("state1", "state2"), blocks=("absmax1", "absmax2"), shared=("qmap1", "qmap2"))


def _sliceable_state(inner: Any, p: torch.nn.Parameter, gindex: int) -> "_Layout | None":
    """The layout to slice ``p``'s state by, after creating that state in full where it has none; None: the
    inner optimizer or this parameter's state is one that is stepped whole."""
    if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
        group = inner.param_groups[gindex]
        if group.get("fused") or group.get("capturable") or group.get("differentiable"):
            return None
        state = inner.state[p]
        if not state:
            _init_torch_adam(state, p, group)
        return _TORCH_ADAM if _fits(state, p, _TORCH_ADAM, torch.float32) else None
    if _is_bnb_adam_8bit(inner):
        group = inner.param_groups[gindex]
        args = getattr(inner, "args", None)
        if getattr(args, "percentile_clipping", 100) < 100 or not getattr(args, "block_wise", True):
            return None
        config = inner.get_config(gindex, 0, group)  # the groups are narrowed to [p]; overrides included
        if config.get("max_unorm", 0.0) > 0.0 or config.get("optim_bits", 8) != 8:
            return None
        state = inner.state[p]
        if not state:
            inner.init_state(group, p, gindex, 0)  # full size, in its own format (uint8 moments, absmax, qmaps)
        return _BNB_ADAM if _fits(state, p, _BNB_ADAM, torch.uint8) else None
    return None


def _init_torch_adam(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
    """``torch.optim.Adam._init_group``'s lazy state for ``p`` as the fp32 view would get it."""
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        scalar = _get_scalar_dtype()
    except ImportError:  # pragma: no cover - torch moved it
        scalar = torch.float32
    state["step"] = torch.tensor(0.0, dtype=scalar)
    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def _is_bnb_adam_8bit(inner: Any) -> bool:
    """bitsandbytes' two-state Adam (Adam8bit, AdamW8bit, paged), with the library's own step and update."""
    mod = sys.modules.get("bitsandbytes.optim.optimizer")
    two = getattr(mod, "Optimizer2State", None)
    if two is None or not isinstance(inner, two):
        return False
    kind = type(inner)
    return (getattr(inner, "optimizer_name", None) == "adam" and kind.update_step is two.update_step
            and kind.init_state is two.init_state)


def _fits(state: dict[str, Any], p: torch.Tensor, layout: _Layout, moment: torch.dtype) -> bool:
    """``state`` holds exactly what ``layout`` cuts (plus the Kahan buffer), in the shapes it assumes."""
    known = {"step", KAHAN, *layout.rows, *layout.blocks, *layout.shared}
    if set(state) - known or "step" not in state:
        return False
    blocks = -(-p.numel() // BLOCK)
    for key in layout.rows:
        v = state.get(key)
        if v is None and key not in layout.optional:
            return False
        if v is not None and (not isinstance(v, torch.Tensor) or v.shape != p.shape or v.dtype != moment
                              or not v.is_contiguous() or v.device != p.device):
            return False
    for key in layout.blocks:
        v = state.get(key)
        if not isinstance(v, torch.Tensor) or v.shape != (blocks,) or not v.is_contiguous():
            return False
    if any(key not in state for key in layout.shared):
        return False
    comp = state.get(KAHAN)
    return comp is None or (isinstance(comp, torch.Tensor) and comp.shape == p.shape and comp.is_contiguous())


@contextlib.contextmanager
def _config_shared(inner: Any, temp: torch.Tensor, p: torch.Tensor) -> Iterator[None]:
    """bitsandbytes looks a per-parameter override up by ``id``: the slice's temporary parameter gets the
    parent's (and never a stale entry left under a recycled id)."""
    mng = getattr(inner, "mng", None)
    table = getattr(mng, "pid2config", None)
    if not isinstance(table, dict):
        yield
        return
    missing = object()
    before = table.get(id(temp), missing)
    if id(p) in table:
        table[id(temp)] = table[id(p)]
    else:
        table.pop(id(temp), None)
    try:
        yield
    finally:
        if before is missing:
            table.pop(id(temp), None)
        else:
            table[id(temp)] = before


def _prepare_bitsandbytes(inner: Any) -> None:
    """bitsandbytes' first ``step()`` registers per-parameter config overrides by scanning the param groups; run
    it once on the groups as they are now (whole, unless a caller narrowed them and ran it already)."""
    if hasattr(inner, "check_overrides") and getattr(inner, "initialized", True) is False:
        inner.check_overrides()
        inner.to_gpu()
        inner.initialized = True


def kahan_buffers(optimizer: Any) -> list[torch.Tensor]:
    """The compensation buffers the wrapped optimizer holds now."""
    state = getattr(optimizer, "state", {})
    return [s[KAHAN] for s in state.values() if isinstance(s, dict) and isinstance(s.get(KAHAN), torch.Tensor)]


def find_write_back(optimizer: Any) -> "WriteBack16 | None":
    """The :class:`WriteBack16` inside ``optimizer`` (through accelerate's and other wrappers' ``.optimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, WriteBack16):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) if not isinstance(optimizer, WriteBack16) else None
        seen += 1
    return None
