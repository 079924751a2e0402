"""``distributed: {co2: {...}}`` — CO2 outer steps on top of torch.distributed.

How the per-step gradient all-reduce is switched off: the Trainer still wraps the model in DDP (so the launch,
the sampler sharding and the checkpoints stay stock), and the callback sets ``require_backward_grad_sync =
False`` on that wrapper before every step — the flag ``DDP.no_sync()`` toggles — so backward never reduces
gradients. Parameters are synchronised only by the outer all-reduce below (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..base import DistributedTechnique, cpu_ranks, world_size
from .config import CO2Config
from ...integrations.versions import TRANSFORMERS


class CO2Technique(DistributedTechnique):
    name: ClassVar[str] = "co2"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS}
    config_cls = CO2Config
    summary: ClassVar[str] = ("CO2: local steps + asynchronous outer all-reduce of the parameters (one-round "
                              "stale), outer momentum with staleness penalty and real clipping")
    reference: ClassVar[str] = "Sun et al., ICLR 2024; weigao266/fairscale-CO2"
    conflicts: ClassVar[dict[str, str]] = {
        "training_args:deepspeed": "CO2 runs on plain data-parallel ranks; DeepSpeed would all-reduce gradients",
        "training_args:fsdp": "CO2 runs on plain data-parallel ranks; FSDP shards the parameters it averages",
    }

    def __init__(self, config: CO2Config | None = None):
        super().__init__(config)
        self.trainer = None
        self.anchor = None  # θ_old, flat fp32
        self.momentum = None  # m, flat fp32
        self.buffer = None  # the parameters in flight (summed in place by the all-reduce)
        self.handle = None  # the pending all-reduce
        self.rounds = 0
        self._loaded: dict[str, Any] | None = None

    @classmethod
    def engine_of_config(cls, config: CO2Config) -> str:
        return "co2"

    def training_args(self, model_config: Any = None) -> dict[str, Any]:
        # unused parameters: no gradient reduction happens, so DDP's unused-parameter search is wasted work
        if world_size() == 1:
            return {}
        return {"ddp_find_unused_parameters": False, **cpu_ranks()}

    def bind_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def estimate(self, mem: Any) -> None:
        n = sum(p.numel for p in mem.trainable())
        mem.add("co2_state", 8 * n, self.name, "θ_old and outer momentum m, fp32 (unsharded)")
        if self.config.asynchronous:
            mem.add("co2_state", 4 * n, self.name, "the flat fp32 parameters in flight (async all-reduce)")

    def callbacks(self) -> list:
        from .callback import CO2Callback

        return [CO2Callback(self)]

    # state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.anchor is None:
            return {}
        from .callback import finish_pending

        finish_pending(self)
        out = {"anchor": self.anchor, "momentum": self.momentum, "rounds": self.rounds}
        if self.buffer is not None:
            out["in_flight"] = self.buffer
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._loaded = None
            return
        from ...state_schema import StateReader

        r = StateReader(state, self.name, fix="resume from a checkpoint of this recipe and model (CO2's state is "
                        "the flat trainable parameters, so the trainable set must match), or start without "
                        "resume_from_checkpoint")
        r.unknown_keys(("anchor", "momentum", "rounds", "in_flight"))
        model = getattr(self.trainer, "model", None)
        # the callback flattens the parameters that require grad: the saved vectors must have that length
        size = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else None
        shape = None if size is None else (size,)
        anchor = r.tensor("anchor", ndim=1, shape=shape, floating=True, finite=True)
        r.tensor("momentum", shape=tuple(anchor.shape), floating=True, finite=True)
        r.int("rounds", 0)
        if "in_flight" in state:
            r.tensor("in_flight", shape=tuple(anchor.shape), floating=True, finite=True)
        self._loaded = dict(state)
