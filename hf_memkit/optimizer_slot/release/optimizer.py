"""The gradient-release wrapper: each parameter is stepped inside backward, as soon as its gradient is complete,
and its gradient is freed at once (LOMO, torchtune's ``optimizer_in_bwd``, optimi's gradient release).

How a parameter is stepped: a ``post_accumulate_grad`` hook narrows every param group of the inner optimizer to
that one parameter (the other groups to ``[]``), calls the inner ``step()`` and puts the groups back. The inner
optimizer keeps its own state, keyed by the parameter as usual, and reads the group's lr, betas and weight decay
of the moment, so an LR scheduler and checkpoints work as with the plain optimizer. This is exact for optimizers
whose update of a parameter reads only that parameter's gradient and state (torch AdamW, bitsandbytes AdamW8bit,
COSMOS, Fira); it is wrong for one with a step-wide epilogue or shared state (SST), which the techniques refuse.

Three things of the plain step need every gradient at once, and change meaning here:

* **clipping** — ``max_grad_norm`` > 0 clips each parameter's gradient to that norm on its own (the global norm
  is known only after the last gradient); the *reported* norm is still the global pre-clip one,
  ``sqrt(sum ||g_p||²)``, accumulated from the per-parameter norms (:meth:`GradientRelease.grad_norm`).
* **accumulation** — while ``accumulating()`` is true (the non-final micro-batches of a Trainer step), hooks
  keep the gradients; the final micro-batch steps and frees each one, so with accumulation every gradient is
  alive between micro-batches, as in a plain run.
* **loss scaling** (fp16 GradScaler) would need to unscale and check all gradients for inf before any step:
  not supported (the techniques refuse fp16).

``step()`` steps whatever still carries a gradient (a parameter whose gradient was not formed by backward, or
that got none on the final micro-batch), so calling it after backward, as every training loop does, is always
right. ``memkit_peak_gradient_bytes`` is the most gradient bytes alive at once over the run, counted in the hooks.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator

import torch

from ..narrowed import positional_overrides_hidden

#: attribute set on every hooked parameter: a weak reference to the wrapper that owns its hook
_OWNER = "_memkit_gradient_release"


class GradientRelease(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each parameter of its param groups steps during backward.

    ``max_grad_norm`` > 0 clips each parameter's gradient to that L2 norm before its step (0: no clipping).
    ``accumulating``: called in every hook; True leaves the gradient in place (a non-final micro-batch).
    ``state``, ``param_groups``, ``defaults``, ``state_dict()`` and ``load_state_dict()`` are the inner
    optimizer's, so checkpoints are interchangeable with a plain run's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
                 accumulating: Callable[[], bool] | None = None):
        # no super().__init__: like accelerate's AcceleratedOptimizer, this only forwards to `optimizer`
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm)
        self.accumulating = accumulating
        self.memkit_peak_gradient_bytes = 0
        #: the global L2 norm (before clipping) of the last step's gradients, a 0-d tensor
        self.last_grad_norm: torch.Tensor | None = None
        self._held: dict[torch.Tensor, int] = {}  # parameter -> bytes of its gradient, while it holds one
        self._alive = 0
        self._sq_norm: torch.Tensor | None = None  # sum of ||g_p||² of this step's released gradients
        self._group_of: dict[torch.Tensor, int] = {}
        self._handles: list[Any] = []
        self._bnb_ready = False
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self._hook_params(p for g in optimizer.param_groups for p in g["params"])

    # --- forwarded to the inner optimizer ---------------------------------------------------------------------
    @property
    def state(self):
        return self.optimizer.state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._group_of.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._group_of.clear()
        self._hook_params(self.optimizer.param_groups[-1]["params"])

    def __getattr__(self, name: str) -> Any:
        # only reached for names this object lacks: the inner optimizer's own extras (SST's layers, bnb's args)
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"GradientRelease({self.optimizer!r}, max_grad_norm={self.max_grad_norm})"

    # --- hooks ------------------------------------------------------------------------------------------------
    def _hook_params(self, params: Any) -> None:
        me = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            owner = me()
            if owner is not None:
                owner._on_gradient(p)

        for p in params:
            if not p.requires_grad:  # frozen now: its gradient, if it ever gets one, is stepped by step()
                continue
            previous = getattr(p, _OWNER, lambda: None)()
            if previous is not None and previous is not self:
                previous.remove_hooks()  # a new run over the same model takes over
            self._handles.append(p.register_post_accumulate_grad_hook(hook))
            setattr(p, _OWNER, me)

    def remove_hooks(self) -> None:
        """Stop stepping in backward (gradients then stay, and ``step()`` steps them all)."""
        _remove_handles(self._handles)

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self._count(p)
        if self.accumulating is not None and self.accumulating():
            return
        self._release(p)

    def _count(self, p: torch.Tensor) -> None:
        if p not in self._held:
            self._held[p] = p.grad.numel() * p.grad.element_size()
            self._alive += self._held[p]
            self.memkit_peak_gradient_bytes = max(self.memkit_peak_gradient_bytes, self._alive)

    def _release(self, p: torch.Tensor) -> None:
        """Norm, clip, step and free the gradient of ``p``."""
        grad = p.grad
        norm = torch.linalg.vector_norm(grad)
        sq = norm.float().square()
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq.to(self._sq_norm.device)
        if self.max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_'s coefficient, for this tensor alone
            grad.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        self._step_one(p)
        p.grad = None
        self._alive -= self._held.pop(p, 0)

    def _step_one(self, p: torch.Tensor) -> None:
        groups = self.optimizer.param_groups
        index = self._group_index(p)
        kept = [g["params"] for g in groups]
        self._prepare_bitsandbytes()
        try:
            for i, g in enumerate(groups):
                g["params"] = [p] if i == index else []
            with positional_overrides_hidden(self.optimizer):
                self.optimizer.step()
        finally:
            for g, params in zip(groups, kept):
                g["params"] = params

    def _group_index(self, p: torch.Tensor) -> int:
        if p not in self._group_of:  # first use, or the groups were replaced (load_state_dict, a new group)
            self._group_of = {q: i for i, g in enumerate(self.optimizer.param_groups) for q in g["params"]}
        return self._group_of[p]

    def _prepare_bitsandbytes(self) -> None:
        """bitsandbytes' first ``step()`` registers per-parameter config overrides by scanning the groups; run it
        once on the whole groups, not on a narrowed one (which would register only one parameter's)."""
        if self._bnb_ready:
            return
        self._bnb_ready = True
        inner = self.optimizer
        while inner is not None and not hasattr(type(inner), "check_overrides"):
            inner = getattr(inner, "__dict__", {}).get("optimizer")  # under a wrapper (the precision slot's)
        if inner is not None and getattr(inner, "initialized", True) is False:
            inner.check_overrides()
            inner.to_gpu()
            inner.initialized = True

    # --- the optimizer interface ------------------------------------------------------------------------------
    def _with_gradient(self) -> Iterator[torch.Tensor]:
        return (p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None)

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm, before clipping, of this step's gradients: those released in backward plus those
        still held (what ``clip_grad_norm_`` over all gradients would return in a plain step)."""
        total = self._sq_norm if self._sq_norm is not None else torch.zeros(())
        for p in self._with_gradient():
            total = total + torch.linalg.vector_norm(p.grad).float().square().to(total.device)
        return total.sqrt()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every parameter that still has a gradient, then close the step (``last_grad_norm``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in list(self._with_gradient()):
            self._count(p)
            self._release(p)
        self.last_grad_norm = self._sq_norm.sqrt() if self._sq_norm is not None else torch.zeros(())
        self._sq_norm = None
        self._held.clear()
        self._alive = 0
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._held.clear()
        self._alive = 0
        self._sq_norm = None


def _remove_handles(handles: list[Any]) -> None:
    while handles:
        handles.pop().remove()


def find_release(optimizer: Any) -> GradientRelease | None:
    """The GradientRelease inside ``optimizer`` (itself, or under accelerate's ``.optimizer`` wrappers)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GradientRelease):
            return optimizer
        optimizer = vars(optimizer).get("optimizer") if hasattr(optimizer, "__dict__") else None
        seen += 1
    return None
