"""Sparse Spectral Training (Zhao et al., ICML 2025, arXiv 2405.15481): the optimizer side.

Pure functions first, then :class:`SST`. Per step, for every :class:`~hf_memkit.optim.sst.layer.SSTLinear`:

1. Σ: Adam on ∂Σ (all k values, every step), decoupled weight decay on Σ (the same as decaying W = UΣVᵀ),
   then Σ ← max(Σ, 0).
2. the r active pairs: Adam on the enhanced gradients (the layer's backward gives G·V_i and Gᵀ·U_i), with the
   learning rate ramped linearly over the first ``iteration_warmup`` steps of each iteration, then each
   updated column is renormalised to unit length so that Σ carries the magnitude.
3. every ``interval`` steps an iteration ends: at the end of a round (``iterations_per_round`` iterations;
   default ceil(k/r), enough draws to visit every pair on average) the layer is re-SVD'ed; then r pairs are
   re-drawn from the sampling distribution, swapped into the trainable slice, and their Adam moments reset.
   The re-SVD also resets the moments of Σ and of the active pairs: the per-index moments described
   directions that the SVD rotates and re-orders.

Other trainable parameters (embeddings, norms, the head) take AdamW. Moments are fp32; a reset zeroes them in
place, so state bytes stay constant (exactly 2 fp32 moments per trainable element).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import IncompatibleModelError
from ...optimizer_slot.fp32_adamw import FP32StateOptimizer, as_fp32, write_back_
from .layer import SSTLinear, factorize_linears_, sample_active, sampling_probabilities, sst_layers

__all__ = ["SST", "normalize_columns_", "sampling_probabilities", "sample_active", "rounds_length"]


def normalize_columns_(w: torch.Tensor) -> torch.Tensor:
    """Scale each column of ``w`` (in place) to unit Euclidean norm."""
    return w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-12))


def rounds_length(k: int, r: int, iterations_per_round: int | None) -> int:
    return iterations_per_round if iterations_per_round else max(1, math.ceil(k / r))


def warmup_factor(steps_into_iteration: int, warmup: int) -> float:
    """lr multiplier for the trainable pairs at the ``steps_into_iteration``-th step (from 0) of an iteration."""
    return 1.0 if warmup <= 0 else min(1.0, (steps_into_iteration + 1) / warmup)


class SST(FP32StateOptimizer):
    """SST for the factored layers, AdamW for the other parameters.

    ``params``: a model whose Linear layers were factorised by
    :func:`~hf_memkit.optim.sst.layer.factorize_linears_` (its trainable parameters are taken), or parameter
    groups together with ``layers`` (the :class:`SSTLinear` modules)::

        handle = SST.factorize_(model, "all-linear", rank=64)   # Linear -> U·diag(Σ)·Vᵀ
        opt = SST(model, lr=1e-3, interval=200)
        ...                                                     # train as usual
        handle.remove()                                         # merged nn.Linear layers back
    """

    #: re-parameterise the model's Linear layers first (:func:`~hf_memkit.optim.sst.layer.factorize_linears_`)
    factorize_ = staticmethod(factorize_linears_)

    def __init__(self, params: Any, layers: Any = None, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, interval: int = 200, iteration_warmup: int = 20,
                 iterations_per_round: int | None = None, distribution: str = "mixed", seed: int = 0):
        if isinstance(params, torch.nn.Module):
            model = params
            layers = list(sst_layers(model).values()) if layers is None else layers
            params = sst_param_groups(model, weight_decay)
        layers = list(layers.values() if isinstance(layers, dict) else (layers or []))
        if not layers:
            raise IncompatibleModelError(
                "SST found no SSTLinear layers; factorise the model first: "
                "handle = hf_memkit.optim.sst.layer.factorize_linears_(model, rank=64), then SST(model, ...)")
        for name, value in (("lr", lr), ("eps", eps), ("interval", interval)):
            if not value > 0:
                raise ValueError(f"SST: {name} must be positive (got {value!r})")
        if iterations_per_round is not None and iterations_per_round < 1:
            raise ValueError(f"SST: iterations_per_round must be at least 1 or None (got {iterations_per_round})")
        sampling_probabilities(torch.ones(1), distribution)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.layers = layers
        self.interval, self.iteration_warmup = interval, iteration_warmup
        self.iterations_per_round, self.distribution = iterations_per_round, distribution
        self._roles: dict[int, tuple[str, SSTLinear]] = {}
        for layer in layers:
            for role in ("sigma", "u_active", "v_active"):
                self._roles[id(getattr(layer, role))] = (role, layer)
        self.generator = torch.Generator().manual_seed(seed + 1)  # the patch drew the first sets with `seed`
        self.global_step = 0
        self.iteration_start = 0
        self.iterations = 0

    # --- the step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        warm = warmup_factor(self.global_step - self.iteration_start, self.iteration_warmup)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                role = self._roles.get(id(p))
                if role is None:
                    self.adamw_param_(p, state, group)
                elif role[0] == "sigma":
                    self.adamw_param_(p, state, group)
                    p.data.clamp_(min=0)
                else:
                    self.adamw_param_(p, state, {**group, "lr": group["lr"] * warm, "weight_decay": 0.0})
                    w = as_fp32(p)
                    normalize_columns_(w)
                    write_back_(p, w)
        self.global_step += 1
        for layer in self.layers:
            layer.mark_trained_()
        if self.global_step % self.interval == 0:
            self.end_iteration_()
        return loss

    @torch.no_grad()
    def end_iteration_(self) -> None:
        """Re-SVD the layers whose round ends, then draw new active pairs and reset their moments."""
        self.iterations += 1
        self.iteration_start = self.global_step
        for layer in self.layers:
            if self.iterations % rounds_length(layer.k, layer.rank, self.iterations_per_round) == 0:
                layer.resvd_()
                for p in (layer.sigma, layer.u_active, layer.v_active):  # the SVD re-orders the basis
                    self._reset_moments(p)
            if layer.rank < layer.k:
                layer.set_active_(sample_active(layer.sigma, layer.rank, self.distribution, self.generator))
                self._reset_moments(layer.u_active)
                self._reset_moments(layer.v_active)

    def _reset_moments(self, p: torch.Tensor) -> None:
        state = self.state.get(p)
        if state:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["step"] = 0

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sst"] = {"global_step": self.global_step, "iteration_start": self.iteration_start,
                     "iterations": self.iterations, "generator": self.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sst", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.global_step = int(extra["global_step"])
            self.iteration_start = int(extra["iteration_start"])
            self.iterations = int(extra["iterations"])
            self.generator.set_state(extra["generator"].to("cpu", torch.uint8))


def sst_param_groups(model: torch.nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The Trainer's decay grouping of the trainable parameters (Σ, the active pairs and everything else).
    Weight decay reaches the factored layers through Σ only (decaying Σ is decaying W)."""
    from ...integrations.trainer_utils import decay_parameter_groups

    return decay_parameter_groups(model, weight_decay)

