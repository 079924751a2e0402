from __future__ import annotations

from typing import Any, ClassVar

from ...errors import IncompatibleModelError
from ...technique import PatchHandle
from ...optimizer_slot.technique import OptimizerTechnique
from .config import SSTConfig


_ENGINE_REASON = (
    "re-samples singular vectors of whole U/V matrices and resets their moments in place; ZeRO's flat "
    "partitions and FSDP's shards hide the matrices"
)


class SSTTechnique(OptimizerTechnique):
    """Patches the model (Linear → SSTLinear) and builds the SST optimizer over it.

    Saving: the layers' ``state_dict`` merges, so checkpoints hold a plain model (no ``finalize`` step is
    needed and none is done: after ``train()`` the model stays factored and trainable; ``handle.remove()`` or
    ``trainer.memkit.unpatch()`` swaps merged ``nn.Linear`` layers back in). This technique's checkpoint state
    carries the factors and active sets, which a resume restores before the Trainer loads the merged weights
    (those then match the factors and are kept as they are).
    """

    name: ClassVar[str] = "sst"
    config_cls = SSTConfig
    state_description: ClassVar[str] = "Adam moments of the singular values and the sampled singular vectors"
    summary: ClassVar[str] = "Sparse Spectral Training: W = U·diag(Σ)·Vᵀ, all Σ + r sampled pairs train"
    reference: ClassVar[str] = "Zhao et al., ICML 2025, arXiv 2405.15481"
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero1", "zero2", "zero3", "fsdp")}
    release_refusal: ClassVar[str | None] = (
        "SST's step ends with a step-wide epilogue (a global step counter for the warm-up of the sampled pairs; "
        "every `interval` steps a re-SVD that rewrites each layer's Σ, U and V together and resets their moments, "
        "and new pairs drawn) that must run once after every parameter stepped, not per parameter in backward"
    )
    replaces_modules: ClassVar[bool] = True
    patches: ClassVar[dict[str, str]] = {"linear.module": "the targeted nn.Linear layers (spectral factors)"}
    conflicts: ClassVar[dict[str, str]] = {
        **OptimizerTechnique.conflicts,
        "slot:adapter": "SST re-parameterises the base Linear layers, which an adapter freezes and wraps",
        "slot:compress": "compression expects nn.Linear layers; train with SST, save (the checkpoint is a plain "
                         "model), then compress that checkpoint in a second recipe",
        "lisa": "SST's optimizer holds the spectral factors it creates, not the layer parameters LISA switches "
                "on and off",
        "sparse_update": "both decide which parameters of the Linear layers train (spectral pairs or column "
                         "slices); use one of them",
        "wta_crs": "WTA-CRS samples the weight gradient of nn.Linear layers; SST replaces them by spectral "
                   "factors (not nn.Linear)",
    }

    def __init__(self, config: SSTConfig | None = None):
        super().__init__(config)
        self.layers: dict[str, Any] = {}

    def patch_model(self, model: Any) -> PatchHandle:
        from .layer import factorize_linears_

        cfg = self.config
        handle = factorize_linears_(model, cfg.target_modules, cfg.rank, distribution=cfg.distribution,
                                    seed=cfg.seed, key=f"optimizer.{self.name}")
        self.layers = handle.layers
        return handle

    def create_optimizer(self, model: Any, args: Any):
        from .layer import sst_layers
        from .optimizer import SST, sst_param_groups

        layers = sst_layers(model)
        if not layers:
            raise IncompatibleModelError(
                "optimizer.sst: the model has no SST layers, so the recipe's patch did not run on it; build the "
                "Trainer with MemkitTrainer(..., recipe=...) or apply_recipe(trainer, recipe), which patch first")
        hp = self.hyperparameters(args)
        cfg = self.config
        return SST(sst_param_groups(model, hp["weight_decay"]), layers=layers, lr=hp["lr"], betas=cfg.betas,
                   eps=cfg.eps, weight_decay=hp["weight_decay"], interval=cfg.interval,
                   iteration_warmup=cfg.iteration_warmup, iterations_per_round=cfg.iterations_per_round,
                   distribution=cfg.distribution, seed=cfg.seed)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from .layer import factor_state_dict

        return factor_state_dict(self.layers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ...state_schema import StateReader
        from .layer import FACTOR_FIELDS, load_factor_state_dict_

        if not state:
            return
        r = StateReader(state, self.name, fix="resume with the rank and target_modules the checkpoint was written "
                        "with (memkit_state/state.json holds its recipe), or start without resume_from_checkpoint")
        r.unknown_keys(f"{name}.{f}" for name in self.layers for f in FACTOR_FIELDS)
        for name, layer in self.layers.items():
            for f in FACTOR_FIELDS:
                target = getattr(layer, f)
                # a perm is an index (integer dtype), the factors are values: the dtype class must match
                v = r.tensor(f"{name}.{f}", shape=tuple(target.shape), finite=True)
                if v.is_floating_point() != target.is_floating_point():
                    raise r.error(f"{name}.{f}", v, f"has dtype {v.dtype} where this run needs {target.dtype}")
                if f == "perm" and not _is_permutation(v):
                    raise r.error(f"{name}.{f}", v, f"is not a permutation of 0..{v.numel() - 1}")
        load_factor_state_dict_(self.layers, state)

    # --- memory ----------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        """Each factored weight becomes frozen buffers ((m+n)·(k−r) values + an int64 perm of k) plus trainable
        Σ (k) and active pairs ((m+n)·r); the layer keeps its input for backward (∂Σ and the pairs need it);
        Adam holds 2 fp32 moments per trainable element, the AdamW parameters' included."""
        from ..common.targets import resolve_target_linears

        cfg = self.config
        for module, _ in resolve_target_linears(mem.model, cfg.target_modules, key=f"optimizer.{self.name}",
                                                exact_type=True):
            info = mem.param(f"{module}.weight")
            if info is None or not info.trainable:
                continue
            m, n = info.shape
            k = min(m, n)
            r = min(cfg.rank, k)
            info.trainable = False
            mem.set_storage(info.name, mem.dtype_bytes * (m + n) * (k - r) + 8 * k, "SST frozen pairs + perm")
            mem.add_param(f"{module}.sigma", (k,), trainable=True, category="weights")
            mem.add_param(f"{module}.u_active", (m, r), trainable=True, category="weights")
            mem.add_param(f"{module}.v_active", (n, r), trainable=True, category="weights")
            mem.needs_input.add(module)
            mem.replaced_linears.add(module)
        mem.add("optimizer_states", sum(8 * p.numel for p in mem.trainable()), self.name,
                "2 fp32 moments for Σ, the active pairs and the AdamW parameters")


def _is_permutation(perm: Any) -> bool:
    import torch

    return perm.dim() == 1 and torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(perm.numel()))
