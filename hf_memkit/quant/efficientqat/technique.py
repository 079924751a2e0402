from __future__ import annotations

import logging
from typing import Any, ClassVar

from ...errors import IncompatibleModelError
from ...technique import PatchHandle, ValidationContext
from ...compress.capabilities import QUANTIZER, TRAINER
from ...compress.technique import ADAPTER_CONFLICT, CompressTechnique
from ..technique import QuantizerTechnique
from .config import BlockAPConfig, E2EQPConfig

logger = logging.getLogger("hf_memkit")

#: learning rates above this move a 4-bit step size by more than its own size within a few AdamW steps
E2E_LR_WARN = 1e-3


class BlockAPTechnique(QuantizerTechnique):
    name: ClassVar[str] = "block_ap"
    config_cls = BlockAPConfig
    role: ClassVar[str] = QUANTIZER
    calibrated: ClassVar[bool] = True
    trains_blocks: ClassVar[bool] = True
    summary: ClassVar[str] = "EfficientQAT Block-AP: block-wise training of weights, norms and quantization steps"
    reference: ClassVar[str] = "Chen et al. 2024, EfficientQAT (arXiv 2407.11062); OpenGVLab/EfficientQAT"
    conflicts: ClassVar[dict[str, str]] = {
        "rtn": "one quantizer per recipe: rtn already rounds the weights",
        "gptq": "one quantizer per recipe: gptq already rounds the weights",
        "slot:adapter": ADAPTER_CONFLICT,
    }


class E2EQPTechnique(CompressTechnique):
    name: ClassVar[str] = "e2e_qp"
    patches: ClassVar[dict[str, str]] = {"linear.module": "the quantized nn.Linear layers (QuantLinear, scales train)"}
    config_cls = E2EQPConfig
    role: ClassVar[str] = TRAINER
    summary: ClassVar[str] = "EfficientQAT E2E-QP: the Trainer run trains only the scales of the frozen quantized model"
    reference: ClassVar[str] = "Chen et al. 2024, EfficientQAT (arXiv 2407.11062); OpenGVLab/EfficientQAT"
    conflicts: ClassVar[dict[str, str]] = {
        "slot:adapter": ADAPTER_CONFLICT,
        "lisa": "e2e_qp trains only the quantization step sizes of every layer; LISA switches whole layers' "
                "parameters on and off, which the quantized layers no longer have",
        "sparse_update": "e2e_qp freezes the quantized weights and trains their step sizes; a sparse update trains "
                         "column slices of float weights that are no longer there",
        "wta_crs": "WTA-CRS samples the weight gradient of nn.Linear layers; e2e_qp's quantized layers train only "
                   "their step sizes",
        "fira": "Fira projects the gradients of trainable nn.Linear weights; e2e_qp trains only step sizes",
    }

    def validate(self, ctx: ValidationContext) -> None:
        super().validate(ctx)
        lr = (ctx.training_args or {}).get("learning_rate")
        if isinstance(lr, (int, float)) and lr > E2E_LR_WARN:
            logger.warning(
                "hf_memkit: compress.e2e_qp trains the quantization scales directly with learning_rate=%g; the "
                "paper uses 1e-5 (3/4 bits) or 2e-5 (2 bits): a larger rate can move a step size by more than "
                "itself", lr)

    def _grid(self) -> tuple[Any, list[str]]:
        qname, qcfg = self.plan.quantizer_or_default()
        return qcfg.spec(), list(qcfg.skip_modules)

    def estimate(self, mem: Any) -> None:
        """Integer codes (1 byte each, unpacked in memory) + uint8 zero points replace the quantized weights; the
        scales are the only trainable tensors; every quantized layer keeps its input for the scale gradient."""
        spec, skip = getattr(mem, "quant_grid", None) or self._grid()
        linears = mem.params_of_linears(skip=skip)
        mem.freeze_all()
        for p in linears:
            out, cols = p.shape
            groups = out * spec.num_groups(cols)
            mem.set_storage(p.name, p.numel + groups, note=f"{spec.describe()} codes + zero points (uint8)")
            module = p.name.rpartition(".")[0]
            mem.add_param(module + ".weight_scale", (out, spec.num_groups(cols)), trainable=True, category="weights")
            mem.needs_input.add(module)
            mem.replaced_linears.add(module)

    def patch_model(self, model: Any) -> PatchHandle:
        import torch

        from ...compress.grid import rtn_quantize
        from ...compress.linear import quantized_weight, require_targets
        from .qlinear import QuantLinear

        spec, skip = self._grid()
        key = self.key
        plan = self.plan
        if plan.quantizer is not None:  # it ran in its own patch_model, just before this one
            targets = {n: m for n, m in model.named_modules()
                       if type(m) is torch.nn.Linear and quantized_weight(m) is not None}
            if not targets:
                raise IncompatibleModelError(
                    f"{key}: {plan.quantizer[0]} left no quantized Linear layer to train; check its skip_modules")
        else:
            targets = require_targets(model, skip, key)
            for n, m in targets.items():
                spec.check_width(m.in_features, n, f"{key} (which starts from rtn's default grid; list a "
                                 "quantizer before it to choose one)")
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        swapped: dict[str, Any] = {}
        try:
            for n, m in targets.items():
                qw = quantized_weight(m) or rtn_quantize(m.weight.detach(), spec, dtype=m.weight.dtype)
                ql = QuantLinear(qw, m.bias, m.weight.dtype)
                _set_module(model, n, ql)
                swapped[n] = m
        except Exception:
            for n, m in swapped.items():
                _set_module(model, n, m, undo=True)
            raise
        for p in model.parameters():
            p.requires_grad_(False)
        for n in swapped:
            model.get_submodule(n).weight_scale.requires_grad_(True)

        def undo():
            for n, m in swapped.items():
                _set_module(model, n, m, undo=True)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            return model

        return PatchHandle(model, undo)


def _set_module(model: Any, name: str, module: Any, undo: bool = False) -> None:
    from ...integrations.patching import parent_of, swap_module, unswap_module

    parent, child = parent_of(model, name)
    (unswap_module if undo else swap_module)(parent, child, module, "e2e_qp")
