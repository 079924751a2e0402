"""``LorcModel``: the PEFT tuner of the LORC type (registered by :mod:`hf_memkit.integrations.peft_types`).

Before the layers are replaced, the targeted Linears are quantized in one pass by
:func:`hf_memkit.quant.pipeline.quantize_model_` (RTN, or GPTQ calibrated on the embedded corpus; run by name
through :func:`hf_memkit.compress.passes.run_pass`) with the LoRC
step of the quantization issue, which leaves codes and SVD factors on each Linear; each is then wrapped in a
:class:`~.layers.LorcLinear` that takes them over. A model already quantized by hf_memkit (``compress`` pass or
``quantize_model_``) is adopted as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers, check_target_module_exists

from ...errors import IncompatibleModelError
from .layers import LorcLinear


class LorcModel(BaseTuner):
    prefix: str = "lorc_"
    tuner_layer_cls = LorcLinear
    target_module_mapping: dict = {}

    def _prepare_model(self, peft_config: Any, model: Any) -> None:
        from ...compress.linear import is_quantized

        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        targets = {n: m for n, m in model.named_modules()
                   if n and type(m) is torch.nn.Linear and check_target_module_exists(peft_config, n)}
        if not targets:
            raise IncompatibleModelError(
                f"LoRC: no nn.Linear of {type(model).__name__} matches target_modules={peft_config.target_modules!r}; "
                "name Linear layers of the model (GPT-2 style Conv1D projections cannot be quantized)"
            )
        done = [n for n, m in targets.items() if is_quantized(m)]
        if done and len(done) != len(targets):
            raise IncompatibleModelError(
                f"LoRC: {done[0]} is already quantized but {next(n for n in targets if n not in done)} is not; "
                "quantize all the targeted layers in one pass, or none"
            )
        if not done:
            self._quantize(peft_config, model, targets)

    def _quantize(self, cfg: Any, model: Any, targets: dict[str, Any]) -> None:
        from ...compress.passes import config_for, run_pass

        skip = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in targets]
        common = dict(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, skip_modules=skip)
        key = "LorcConfig"
        calib = None
        if cfg.quantizer == "gptq":
            from ...compress.calibration import resolve

            qcfg = config_for("gptq", **common, calibration="corpus", num_samples=cfg.num_samples,
                              seq_len=cfg.seq_len)
            calib = resolve("corpus", key=key, num_samples=cfg.num_samples, seq_len=cfg.seq_len, model=model)
        else:
            qcfg = config_for("rtn", **common)
        lorc = config_for("lorc", rank=cfg.r, factor_bits=cfg.factor_bits)
        run_pass(cfg.quantizer, model, qcfg, lorc=lorc, calibration=calib, key=key)

    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: Any, target_name: str, parent: Any,
                            current_key: str, **kwargs) -> None:
        from ...compress.linear import clear_quantized_, lorc_factors, quantized_weight

        if isinstance(target, LorcLinear):
            target.update_layer(adapter_name, peft_config)
            return
        if type(target) is not torch.nn.Linear:
            raise IncompatibleModelError(
                f"LoRC: {current_key} is a {type(target).__name__}, not an nn.Linear; leave it out of target_modules"
            )
        qw = quantized_weight(target)
        if qw is None:  # pragma: no cover - _prepare_model quantized every target
            raise IncompatibleModelError(f"LoRC: {current_key} was not quantized")
        f = lorc_factors(target)
        factors = (f[0].clone(), f[1].clone()) if f is not None else None
        qw = type(qw)(qw.codes.clone(), qw.scale.clone(), qw.zero.clone(), qw.spec)
        clear_quantized_(target)
        new = LorcLinear(target, adapter_name, peft_config, qw, factors)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)
