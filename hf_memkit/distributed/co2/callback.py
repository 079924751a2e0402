"""The Trainer callback that runs CO2's outer loop (see :mod:`hf_memkit.distributed.co2.technique`)."""

from __future__ import annotations

import logging

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from transformers import TrainerCallback

from .outer import outer_step_

logger = logging.getLogger("hf_memkit")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def launch(tech, flat: torch.Tensor) -> None:
    """Start averaging ``flat`` over the ranks (in place): asynchronous when configured, else done on return."""
    tech.buffer, tech.handle = flat, None
    dist = _dist()
    if dist is None:
        return
    if tech.config.asynchronous:
        tech.handle = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
    else:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(_world())


def finish_pending(tech) -> torch.Tensor | None:
    """Wait for the all-reduce in flight; return the averaged parameters (None before the first round)."""
    if tech.handle is not None:
        tech.handle.wait()
        tech.handle = None
        tech.buffer.div_(_world())
    return tech.buffer


class CO2Callback(TrainerCallback):
    def __init__(self, technique):
        self.t = technique
        self.params: list[torch.nn.Parameter] = []

    def _ddp_off(self) -> None:
        trainer = self.t.trainer
        wrapped = getattr(trainer, "model_wrapped", None) if trainer is not None else None
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            if wrapped.require_backward_grad_sync:
                logger.info("hf_memkit: co2 turned off DDP's per-step gradient all-reduce")
            wrapped.require_backward_grad_sync = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        t = self.t
        self.params = [p for p in model.parameters() if p.requires_grad]
        flat = _flatten_dense_tensors([p.detach().float() for p in self.params])
        loaded = t._loaded
        if loaded:
            t.anchor = loaded["anchor"].to(flat.device, torch.float32).clone()
            t.momentum = loaded["momentum"].to(flat.device, torch.float32).clone()
            t.rounds = int(loaded.get("rounds", 0))
            t.buffer = loaded["in_flight"].to(flat.device).clone() if "in_flight" in loaded else None
            t._loaded = None
        else:
            dist = _dist()
            if dist is not None:  # start every rank from rank 0's parameters
                dist.broadcast(flat, src=0)
                self._write(flat)
            t.anchor, t.momentum, t.buffer, t.rounds = flat.clone(), torch.zeros_like(flat), None, 0
        t.handle = None
        self._ddp_off()

    def on_step_begin(self, args, state, control, **kwargs):
        self._ddp_off()

    def on_step_end(self, args, state, control, **kwargs):
        t, cfg = self.t, self.t.config
        if state.global_step % cfg.outer_interval:
            return
        current = _flatten_dense_tensors([p.detach().float() for p in self.params]).clone()
        if cfg.asynchronous:
            averaged = finish_pending(t)  # last round's average: one round stale
            if averaged is not None:
                self._outer(averaged)
            launch(t, current)  # overlaps the next interval
        else:
            launch(t, current)
            self._outer(finish_pending(t))
            t.buffer = None
        self._write(t.anchor)
        t.rounds += 1

    def on_train_end(self, args, state, control, **kwargs):
        finish_pending(self.t)  # never leave a collective in flight when the process group goes away

    def _outer(self, averaged: torch.Tensor) -> None:
        cfg = self.t.config
        outer_step_(self.t.anchor, self.t.momentum, averaged, lr=cfg.outer_lr, beta=cfg.outer_momentum,
                    penalty=cfg.staleness_penalty, clip=cfg.clip, clip_mode=cfg.clip_mode)

    @torch.no_grad()
    def _write(self, flat: torch.Tensor) -> None:
        for p, v in zip(self.params, _unflatten_dense_tensors(flat, self.params)):
            p.copy_(v.to(p.dtype))
