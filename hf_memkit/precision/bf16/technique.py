"""``precision: {bf16: {...}}`` — 16-bit weight storage, fp32 compute, updates written back with stochastic rounding
or Kahan compensation. The model side lives in :mod:`.patch` (+ :mod:`.functions`, the autograd Functions), the
optimizer side in :mod:`.optimizer`, the memory terms in :mod:`.estimate`; what this needs of transformers/PEFT
internals in :mod:`hf_memkit.integrations.weight_storage`."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from ...technique import PatchHandle, Technique
from ...integrations.versions import PEFT, TRANSFORMERS
from .config import Bf16Config

logger = logging.getLogger("hf_memkit")
KEY = "precision.bf16"
_OWN_FORWARD = "replaces nn.Linear forwards itself, which the 16-bit storage patch also does; use one of them"
_OWN_OPTIMIZER = ("builds and shards its own optimizer (with fp32 master weights), so the 16-bit write-back "
                  "wrapper would never run; use the engine's own bf16 mode instead")


class Bf16Technique(Technique):
    name: ClassVar[str] = "bf16"
    slot: ClassVar[str] = "precision"
    config_cls = Bf16Config
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS, "peft": PEFT}
    summary: ClassVar[str] = ("Linear/Embedding weights stored in bf16 (2 bytes), fp32 compute, updates written "
                              "back with stochastic rounding or Kahan compensation")
    reference: ClassVar[str] = "Zamirai et al. 2020 (Revisiting BFloat16 Training); torchao, optimi"
    patches: ClassVar[dict[str, str]] = {"linear.kernel": "nn.Linear layers (16-bit weights, fp32 compute)",
                                         "embedding.forward": "nn.Embedding layers (16-bit weights)"}
    conflicts: ClassVar[dict[str, str]] = {
        "mesa": "Mesa " + _OWN_FORWARD,
        "wta_crs": "WTA-CRS " + _OWN_FORWARD,
        "sparse_update": "sparse updates install their own Linear forward and weight slices; use one of them",
        "ast": "2:4 sparse training " + _OWN_FORWARD,
        "cast": "2:4 sparse training " + _OWN_FORWARD,
        "sst": "SST replaces Linear layers by spectral factors; use one of them",
        "e2e_qp": "quantization-aware training quantizes the Linear weights before training; use one of them",
        "training_args:fp16": "fp16 mixed precision needs a GradScaler, which cannot unscale 16-bit gradients; "
                              "the model computes in fp32 anyway",
    }
    unsupported_engines: ClassVar[dict[str, str]] = {
        "zero1": "DeepSpeed " + _OWN_OPTIMIZER,
        "zero2": "DeepSpeed " + _OWN_OPTIMIZER,
        "zero3": "DeepSpeed " + _OWN_OPTIMIZER,
        "fsdp": "FSDP flattens and shards the parameters and " + _OWN_OPTIMIZER,
        "co2": "CO2's outer step averages and moves the parameters outside the optimizer, where no 16-bit "
               "write-back runs (not verified)",
    }

    def __init__(self, config: Bf16Config | None = None):
        super().__init__(config)
        self._patch = None
        self.rng = None  # RoundingRNG, made by wrap_optimizer or restored by load_state_dict
        self.optimizer = None  # the WriteBack16 wrapper

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.config.dtype)

    def load_dtype(self):
        """The dtype to load the checkpoint in (no fp32 copy of the weights ever exists)."""
        return self.torch_dtype

    # 2 ----------------------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        from .estimate import add_terms

        add_terms(mem, self.config)

    # 3 ----------------------------------------------------------------------------------------------------------
    def patch_model(self, model: Any) -> PatchHandle:
        from .patch import StoragePatch

        patch = StoragePatch(model, self.torch_dtype, self.config.skip_modules)
        patch.apply()
        self._patch = patch

        def undo():
            patch.remove()
            self._patch = None
            return model

        return PatchHandle(model, undo)

    # 6 ----------------------------------------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer: Any, model: Any, args: Any) -> Any:
        from .optimizer import RoundingRNG, WriteBack16, find_write_back

        if find_write_back(optimizer) is not None:
            return optimizer
        if self.rng is None:
            seed = self.config.seed if self.config.seed is not None else int(getattr(args, "seed", 0) or 0)
            self.rng = RoundingRNG(seed)
        self.optimizer = WriteBack16(optimizer, self.config.update, self.rng, self.config.step_chunk_numel())
        steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        if steps > 1:
            logger.warning(
                "hf_memkit: %s: gradient_accumulation_steps=%d sums the micro-batch gradients of the 16-bit weights "
                "in %s (one rounding per micro-batch, like any 16-bit gradient); a larger per-device batch avoids it",
                KEY, steps, self.config.dtype)
        return self.optimizer

    def describe(self, model: Any, optimizer: Any = None) -> str:
        r = self._patch.report if self._patch is not None else None
        if r is None:
            return f"{self.summary} (not applied)"
        dtype = self.config.dtype
        line = (f"{len(r.stored)} weights ({r.stored_numel / 1e6:.1f}M elements, {r.stored_bytes / 2**20:.1f} MiB) "
                f"stored in {dtype}, {len(r.widened)} tensors widened to fp32; update={self.config.update}")
        if self.config.update == "stochastic" and self.rng is not None:
            line += f" (seed {self.rng.seed})"
        if self.config.update == "kahan":
            line += f", Kahan buffers {self._trainable_stored_bytes(model) / 2**20:.1f} MiB (16-bit, at the first step)"
        if r.kept:
            line += f"; kept fp32: {len(r.kept)} modules"
        return line

    @staticmethod
    def _trainable_stored_bytes(model: Any) -> int:
        import torch

        seen, total = set(), 0
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    # 7 ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.rng is None:
            return {}
        out: dict[str, Any] = {"format": 1, "seed": self.rng.seed}
        for device, st in self.rng.state().items():
            out[f"rng/{device}"] = st
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        from ...state_schema import StateReader
        from .optimizer import RoundingRNG

        if not state:
            return
        r = StateReader(state, self.name)
        r.int("format", lo=1, hi=1)
        seed = r.int("seed", lo=0)
        rng = RoundingRNG(seed)
        known = {"format", "seed"}
        for key in state:
            if key.startswith("rng/"):
                known.add(key)
                value = r.tensor(key, dtype=torch.uint8, ndim=1)
                try:
                    rng.load({key[len("rng/"):]: value})
                except (RuntimeError, ValueError) as exc:
                    raise r.error(key, value, f"is not a generator state this machine can restore ({exc})") from None
        r.unknown_keys(known)
        self.rng = rng
        if self.optimizer is not None:
            self.optimizer.rng = rng
