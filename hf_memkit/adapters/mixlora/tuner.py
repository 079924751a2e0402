"""``MixLoraModel``: the PEFT tuner of the MIXLORA type (registered by :mod:`hf_memkit.integrations.peft_types`).

It wraps the attention projections named by ``target_modules`` in :class:`~.layers.MixLoraLinear` and each FFN
named by ``ffn_modules`` in :class:`~.layers.MixLoraFFN`; nothing under an FFN is targeted on its own (its
projections belong to the experts)."""

from __future__ import annotations

import re
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists

from ...errors import IncompatibleModelError
from .ffn import require_ffn_kind
from .layers import MixLoraFFN, MixLoraLinear
from .peft_config import DEFAULT_TARGETS


def _name_matches(patterns: Any, name: str) -> bool:
    if isinstance(patterns, str):
        return name == patterns or name.endswith("." + patterns) or re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class MixLoraModel(BaseTuner):
    prefix: str = "mixlora_"
    tuner_layer_cls = (MixLoraLinear, MixLoraFFN)
    target_module_mapping = DEFAULT_TARGETS
    #: read by hf_memkit's export: routed experts have no merged equivalent
    memkit_mergeable = False

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        if peft_config.target_modules is None:
            targets = DEFAULT_TARGETS.get(model_config.get("model_type"))
            if targets is None:
                raise IncompatibleModelError(
                    f"MixLoRA has no default attention projections for model type {model_config.get('model_type')!r}; "
                    "set target_modules to the attention projection names (see model.named_modules())"
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _prepare_model(self, peft_config: Any, model: Any) -> None:
        ffns = {}
        for name, module in model.named_modules():
            if name and _name_matches(peft_config.ffn_modules, name) and not isinstance(module, BaseTunerLayer):
                if any(name.startswith(f + ".") for f in ffns):
                    continue
                ffns[name] = require_ffn_kind(name, module, "MixLoraConfig.ffn_modules")
        if not ffns:
            raise IncompatibleModelError(
                f"MixLoRA found no FFN module named {peft_config.ffn_modules!r} in {type(model).__name__}; set "
                "ffn_modules to the name of the model's FFN blocks (e.g. 'mlp')"
            )
        self._memkit_ffns = ffns

    def _check_target_module_exists(self, peft_config: Any, key: str):
        ffns = getattr(self, "_memkit_ffns", {})
        if key in ffns:
            return True
        if any(key.startswith(f + ".") for f in ffns):
            return False
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: Any, target_name: str, parent: Any,
                            current_key: str, **kwargs) -> None:
        if isinstance(target, (MixLoraLinear, MixLoraFFN)):
            target.update_layer(adapter_name, peft_config)
            return
        kind = getattr(self, "_memkit_ffns", {}).get(current_key)
        if kind is not None:
            new = MixLoraFFN(target, kind, adapter_name, peft_config)
        else:
            new = MixLoraLinear(target, adapter_name, peft_config, name=current_key)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _check_merge_allowed(self):
        raise IncompatibleModelError(
            "MixLoRA experts are chosen per token, so the adapter cannot be merged into the base weights; keep it "
            "as an adapter (save_pretrained / PeftModel.from_pretrained)"
        )

    def _replace_module(self, parent: Any, child_name: str, new_module: Any, child: Any) -> None:
        # an FFN has no single weight for PEFT's device/weight bookkeeping: the MoE layer already sits on the
        # FFN's device, and unloading puts the untouched FFN module back as it was
        if isinstance(new_module, MixLoraFFN) or isinstance(child, MixLoraFFN):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)
