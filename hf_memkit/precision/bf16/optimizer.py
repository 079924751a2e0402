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
them. The transient memory is one parameter's fp32 weight and gradient (the largest: SmolLM2's tied 49152x576
embedding, 2 x 113 MiB), plus whatever the inner optimizer allocates for one parameter.

Pass-through: ``param_groups`` (read and assign), ``state``, ``defaults``, ``state_dict``/``load_state_dict``,
``zero_grad``, ``add_param_group`` and any other attribute reach the inner optimizer, so LR schedulers, Trainer
checkpoints and accelerate's wrapper see the inner optimizer's groups and state. ``load_state_dict`` keeps each
saved tensor's dtype (torch and bitsandbytes would cast fp32 moments to the 16-bit parameter dtype). A caller
that narrows the param groups itself (gradient release steps one parameter at a time) gets exactly the
parameters in the current groups that have a gradient stepped.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch

from ...ops.stochastic_round import round_into_

#: optimizer-state key of the Kahan compensation buffer (16 bits, the parameter's shape)
KAHAN = "memkit_kahan_comp"
_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")
#: attributes the wrapper keeps itself even when the inner optimizer has one of the same name
_LOCAL = frozenset({"update", "rng", "_zero_grad_profile_name", "_opt_called", "_memkit_wrapped", *_HOOK_DICTS})
SIXTEEN = (torch.bfloat16, torch.float16)
UPDATES = ("stochastic", "kahan", "nearest")


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
                 rng: "RoundingRNG | None" = None):
        if update not in UPDATES:
            raise ValueError(f"update={update!r} is not one of {', '.join(UPDATES)}")
        # torch.optim.Optimizer.__init__ would build groups of its own: set only what its methods read
        own = self.__dict__
        own["optimizer"] = optimizer
        own["update"] = update
        own["rng"] = rng if rng is not None else RoundingRNG(0)
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
        return f"WriteBack16(update={self.update}, {self.optimizer!r})"

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
            with _positional_overrides_hidden(self.optimizer):
                if any(wide):
                    for g, ps in zip(groups, wide):
                        g["params"] = ps
                    self.optimizer.step()
                for i, p in narrow:
                    for j, g in enumerate(groups):
                        g["params"] = [p] if j == i else []
                    self._step_16(p)
        finally:
            for g, ps in zip(groups, lists):
                g["params"] = ps
        return loss

    def _step_16(self, p: torch.nn.Parameter) -> None:
        """One inner step on an fp32 view of the 16-bit ``p``, then the write back."""
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


def _prepare_bitsandbytes(inner: Any) -> None:
    """bitsandbytes' first ``step()`` registers per-parameter config overrides by scanning the param groups; run
    it once on the groups as they are now (whole, unless a caller narrowed them and ran it already)."""
    if hasattr(inner, "check_overrides") and getattr(inner, "initialized", True) is False:
        inner.check_overrides()
        inner.to_gpu()
        inner.initialized = True


@contextlib.contextmanager
def _positional_overrides_hidden(inner: Any) -> Iterator[None]:
    """bitsandbytes looks per-parameter overrides up by (group index, position in the group) and then by
    parameter id; in a narrowed step every parameter sits at position 0, so only the id lookup is right."""
    mng = getattr(inner, "mng", None)
    positional = getattr(mng, "index2config", None)
    if not positional:
        yield
        return
    mng.index2config = {}
    try:
        yield
    finally:
        mng.index2config = positional


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
