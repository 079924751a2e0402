"""What AST and CAST share as ``optimizer:`` techniques.

Why the optimizer slot: both methods *are* optimizers (the decay on pruned weights lives inside the Adam update,
which a callback cannot change), and they also need ``patch_model`` (the masked or scaled forward), a callback
(mask refresh every ``mask_interval`` steps), ``extra_loss`` (distillation from a frozen dense copy taken at patch
time), checkpoint state (the masks) and ``finalize`` (hard projection to exact 2:4 and the export). One technique
in one slot owns all of them.

``finalize`` leaves plain ``nn.Linear`` layers whose weights are exactly 2:4 (marked for the exporter); with
``export: {format: compressed-tensors}`` it writes the 2:4 checkpoint (:mod:`hf_memkit.export.sparse`)
and, with SLoRB, the branch as a PEFT LoRA in ``slorb_adapter/``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from pydantic import Field

from ..errors import IncompatibleModelError, RecipeError
from ..optimizer_slot.technique import OptimizerTechnique
from ..technique import PatchHandle, TechniqueConfig, ValidationContext

logger = logging.getLogger("hf_memkit")

SLORB_DIR = "slorb_adapter"


class SparseTrainingFields(TechniqueConfig):
    lr: float | None = Field(None, gt=0, description="learning rate; null = TrainingArguments.learning_rate")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay on 2-D weights; null = "
                                       "TrainingArguments.weight_decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam β1, β2")
    eps: float = Field(1e-8, gt=0, description="Adam ε")
    mask_interval: int = Field(10, ge=1, description="recompute the 2:4 masks from the dense weights every this "
                               "many optimizer steps (T1 in CAST, 10 in AST's code)")
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="Linear layers (name or name "
                                    "suffix) kept dense")


_ENGINE_REASON = (
    "2:4 masks are chosen over groups of 4 inputs of whole weight rows and applied in the optimizer step; "
    "ZeRO/FSDP hand the optimizer flat partitions or shards"
)


class SparseTrainingTechnique(OptimizerTechnique):
    unsupported_engines: ClassVar[dict[str, str]] = {e: _ENGINE_REASON for e in ("zero1", "zero2", "zero3", "fsdp")}
    kind: ClassVar[str] = ""
    patches: ClassVar[dict[str, str]] = {"linear.view": "the 2:4 target nn.Linear layers (masked or scaled weight)"}
    conflicts: ClassVar[dict[str, str]] = {
        **OptimizerTechnique.conflicts,
        "slot:adapter": "2:4 sparse training updates the base Linear weights, which an adapter freezes",
        "slot:compress": "train to 2:4 first and export; compress the exported checkpoint in a second recipe",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.layers: dict[str, Any] = {}
        self.teacher: Any = None
        self.flips: int = 0
        self.recipe: Any = None
        self.tokenizer: Any = None

    # --- config-dependent knobs (subclasses) -----------------------------------------------------------------
    @property
    def key(self) -> str:
        return f"optimizer.{self.name}"

    def distill_weights(self) -> tuple[float, float, float]:
        """(task weight, KL weight, temperature)."""
        raise NotImplementedError

    def install_kwargs(self) -> dict[str, Any]:
        return {}

    # 1
    def validate(self, ctx: ValidationContext) -> None:
        super().validate(ctx)
        self.recipe = ctx.recipe
        if ctx.recipe is not None:
            self.check_recipe(ctx.recipe)

    def check_recipe(self, recipe: Any) -> None:
        ctx = ValidationContext(recipe=recipe)
        _task, kl, _t = self.distill_weights()
        if kl > 0 and ctx.recipe.slot("loss"):
            raise RecipeError(
                f"{self.name} distils from the dense teacher's logits, and the loss technique "
                f"{ctx.recipe.slot('loss')[0].name!r} does not materialise the student's logits",
                path=getattr(ctx.recipe, "source", None), key=self.key,
                fix=f"drop the loss slot, or set kl_weight: 0 in {self.name}")

    # 3
    def patch_model(self, model: Any) -> PatchHandle:
        from ..compress.linear import remove_lorc_
        from . import sparse_linear as sl
        from .masks import magnitude_scores, nm_mask
        from .targets import sparse_targets, unmark_sparse_

        targets = sparse_targets(model, self.config.skip_modules, self.key)
        _task, kl, _t = self.distill_weights()
        if kl > 0:
            from ..integrations.patching import unpatched_copy

            # the dense original: a copy without the other techniques' patches (Mesa's 8-bit forwards)
            self.teacher = unpatched_copy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        for name, lin in targets.items():
            mask = nm_mask(magnitude_scores(lin.weight), 2, 4, name=name)
            sl.install_(lin, mask, self.kind, **self.install_kwargs_for(lin))
        self.layers = dict(targets)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}

        def undo():
            for lin in targets.values():
                sl.uninstall_(lin)
                unmark_sparse_(lin)
                remove_lorc_(lin)
            self.teacher = None
            self.layers = {}
            for n, p in model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
            return model

        return PatchHandle(model, undo)

    def install_kwargs_for(self, linear: Any) -> dict[str, Any]:
        return self.install_kwargs()

    # 4
    def param_groups_for(self, model: Any, weight_decay: float) -> list[dict[str, Any]]:
        from . import sparse_linear as sl

        extra = {id(p) for lin in self.layers.values() for n, p in lin._parameters.items()
                 if n in (sl.SLORB, sl.SCALE) and p is not None}
        groups = self.param_groups(model, weight_decay)
        moved = [p for g in groups for p in g["params"] if id(p) in extra]
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in extra]
        groups = [g for g in groups if g["params"]]
        if moved:
            groups.append({"params": moved, "weight_decay": 0.0})
        return groups

    def owners(self) -> dict[int, Any]:
        if not self.layers:
            raise IncompatibleModelError(
                f"{self.key}: the model was not patched (no masked layers); build the Trainer with "
                "MemkitTrainer(..., recipe=...) or apply_recipe(trainer, recipe), which patch first")
        return {id(lin.weight): lin for lin in self.layers.values()}

    # 5
    def extra_loss(self, model: Any, inputs: dict, outputs: Any):
        task_w, kl_w, temperature = self.distill_weights()
        extra = None
        loss = outputs.get("loss") if isinstance(outputs, dict) or hasattr(outputs, "get") else None
        if task_w != 1.0 and loss is not None:
            extra = (task_w - 1.0) * loss
        if kl_w > 0 and self.teacher is not None:
            import torch

            from .distill import kl_distill_loss

            logits = outputs.get("logits") if hasattr(outputs, "get") else None
            if logits is None:
                raise IncompatibleModelError(f"{self.key}: the model's outputs carry no logits to distil")
            device = logits.device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            with torch.no_grad():
                t_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            kl = kl_w * kl_distill_loss(logits, t_logits, temperature, inputs.get("attention_mask"))
            extra = kl if extra is None else extra + kl
        return extra

    # 6
    def callbacks(self) -> list:
        from transformers import TrainerCallback

        technique = self

        class MaskRefreshCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, processing_class=None, **kw):
                technique.tokenizer = processing_class
                if optimizer is not None:
                    technique.on_schedule(optimizer, int(state.max_steps))

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step % technique.config.mask_interval == 0:
                    technique.refresh_masks_()

        return [MaskRefreshCallback()]

    def on_schedule(self, optimizer: Any, max_steps: int) -> None:
        """Give the optimizer the run's length (α_t = t/T, the decay ramp)."""

    def refresh_masks_(self) -> int:
        import torch

        from .masks import nm_mask
        from .sparse_linear import effective_weight

        flips = 0
        with torch.no_grad():
            for name, lin in self.layers.items():
                new = nm_mask(effective_weight(lin).abs(), 2, 4, name=name)
                flips += int((new != lin.sparse_mask).sum())
                lin.sparse_mask.copy_(new)
        self.flips += flips
        logger.debug("hf_memkit: %s: masks recomputed, %d entries flipped", self.name, flips)
        return flips

    # 7
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"flips": self.flips}
        for name, lin in self.layers.items():
            if hasattr(lin, "sparse_mask"):
                out[f"mask/{name}"] = lin.sparse_mask
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        from ..state_schema import StateReader

        r = StateReader(state, self.name)
        masked = {name: lin for name, lin in self.layers.items() if hasattr(lin, "sparse_mask")}
        r.unknown_keys(["flips", *(f"mask/{n}" for n in masked)])
        flips = r.int("flips", 0)
        masks = {}
        for name, lin in masked.items():
            # a mask that is missing or not 2:4 would train a different sparsity pattern without a word
            mask = r.tensor(f"mask/{name}", dtype=torch.bool, shape=tuple(lin.sparse_mask.shape))
            groups = mask.reshape(mask.shape[0], -1, 4) if mask.dim() == 2 and mask.shape[-1] % 4 == 0 else None
            if groups is None or not bool((groups.sum(-1) == 2).all()):
                raise r.error(f"mask/{name}", mask, "is not a 2:4 mask (two of every four inputs kept)")
            masks[name] = mask
        self.flips = flips
        with torch.no_grad():
            for name, mask in masks.items():
                masked[name].sparse_mask.copy_(mask)

    # 2
    def estimate(self, mem: Any) -> None:
        """2 fp32 moments per trainable element (the extra parameters' included), a bool mask per pruned weight
        (a buffer: counted with the weights), and the frozen teacher (its own category: it is not part of the
        trained model). Distillation keeps the student's and the teacher's fp32 log-probabilities for backward."""
        from ..compress.linear import matches

        tied = set(mem.aliases.values())
        for info in list(mem.params.values()):
            module = info.name.rpartition(".")[0]
            if not (info.name.endswith(".weight") and len(info.shape) == 2 and info.trainable):
                continue
            if matches(module, self.config.skip_modules) or info.name in tied or info.name in mem.aliases:
                continue
            if "embed" in module or info.shape[1] % 4:
                continue
            mem.add("weights", info.numel, self.name, f"{module} 2:4 mask (bool)")
            mem.linear_views[module] = info.numel * mem.dtype_bytes
            self.estimate_layer(mem, module, info.shape)
        _task, kl, _t = self.distill_weights()
        if kl > 0:
            mem.add("teacher_weights", sum(p.storage_bytes for p in mem.params.values()), self.name,
                    "frozen dense teacher (a copy of the model)")
            tokens = mem.batch_size * mem.seq_len
            vocab = mem.model.config.vocab_size
            mem.add("logits", 2 * tokens * vocab * 4, self.name, "distillation: student and teacher fp32 log-probs")
        mem.add("optimizer_states", sum(8 * p.numel for p in mem.trainable()), self.name, "2 fp32 moments")

    def estimate_layer(self, mem: Any, module: str, shape: tuple[int, ...]) -> None:
        pass

    # 8
    def finalize(self, model: Any, output_dir: str) -> None:
        import torch

        from ..compress.linear import set_lorc_
        from . import sparse_linear as sl
        from .masks import nm_mask
        from .targets import mark_sparse_

        if not self.layers:
            return
        with torch.no_grad():
            for name, lin in self.layers.items():
                if not hasattr(lin, "sparse_mask"):
                    continue  # finalized already
                mask, w = self.final_mask_and_weight(name, lin)
                slorb = lin._parameters.get(sl.SLORB)
                k = getattr(lin, "memkit_slorb_k", None)
                sl.uninstall_(lin)
                lin.weight.copy_((w * mask.to(w.dtype)).to(lin.weight.dtype))
                mark_sparse_(lin, mask)
                if slorb is not None:
                    P = sl.slorb_matrix(lin.in_features, k, dtype=lin.weight.dtype, device=lin.weight.device)
                    set_lorc_(lin, slorb.detach().clone(), P, {"rank": P.shape[0], "kind": "slorb", "k": k})
        self.teacher = None
        logger.info("hf_memkit: %s: %d layers projected to exact 2:4 (%d mask flips during training)", self.name,
                    len(self.layers), self.flips)
        if any(getattr(lin, "memkit_lorc", None) for lin in self.layers.values()):
            from ..atomic import atomic_dir
            from ..export.lorc_adapter import write_lorc_adapter

            with atomic_dir(os.path.join(output_dir, SLORB_DIR)) as tmp:  # replaced whole, never half written
                write_lorc_adapter(model, str(tmp))
        export = getattr(self.recipe, "export", None)
        if export is not None and export.format == "compressed-tensors":
            from ..export.checkpoint import export_sparse, export_target

            export_sparse(model, export_target(output_dir, export.dir), recipe=self.recipe, tokenizer=self.tokenizer)

    def final_mask_and_weight(self, name: str, lin: Any):
        raise NotImplementedError
