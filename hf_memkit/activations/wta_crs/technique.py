"""``activations: [{wta_crs: {...}}]`` — instance-level ``forward`` on the targeted ``nn.Linear`` modules (class,
state dict and hooks untouched); the sampling RNG is torch's global generator, which the Trainer checkpoints."""

from __future__ import annotations

import types
from typing import Any, ClassVar

from ...errors import IncompatibleModelError
from ...technique import PatchHandle, Technique
from .config import WtaCrsConfig

KEY = "activations.wta_crs"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: Any, targets: list[str]) -> dict[str, Any]:
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = {n: m for n, m in linears.items() if any(_matches(n, t) for t in targets)}
    missing = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise IncompatibleModelError(
            f"{KEY}: targets {missing} match no Linear layer of {type(model).__name__}; its Linear layers are "
            f"named {', '.join(suffixes)} — fix activations.wta_crs.targets"
        )
    return found


class WtaCrsTechnique(Technique):
    name: ClassVar[str] = "wta_crs"
    slot: ClassVar[str] = "activations"
    config_cls = WtaCrsConfig
    summary: ClassVar[str] = ("WTA-CRS: Linear weight gradients from k sampled token rows (winners kept), only "
                              "those rows saved; forward and input gradient exact")
    reference: ClassVar[str] = "Liu et al. 2023; zirui-ray-liu/WTACRS"
    conflicts: ClassVar[dict[str, str]] = {
        "mesa": "both replace what Linear layers save for backward; use one of them",
    }

    def estimate(self, mem: Any) -> None:
        from .estimate import wta_crs_activation_delta

        delta, note = wta_crs_activation_delta(mem, self.config)
        mem.add("activations", delta, self.name, note)

    def patch_model(self, model: Any) -> PatchHandle:
        cfg = self.config
        targets = find_targets(model, cfg.targets)
        for m in targets.values():
            # bound as a method with its state on the module: a deep copy of the model (a distillation teacher)
            # rebinds both to the copy, where a closure would keep computing with this module's weights
            m._memkit_wta_crs = (m.forward, cfg.ratio, cfg.min_k, cfg.winners)
            m.forward = types.MethodType(_wta_crs_forward, m)

        def undo():
            for m in targets.values():
                for attr in ("forward", "_memkit_wta_crs"):
                    if attr in vars(m):
                        delattr(m, attr)
            return model

        return PatchHandle(model, undo)


def _wta_crs_forward(self: Any, x: Any) -> Any:
    import torch

    from .function import WtaCrsLinear

    orig, ratio, min_k, winners = self._memkit_wta_crs
    if torch.is_grad_enabled() and self.weight.requires_grad:
        return WtaCrsLinear.apply(x, self.weight, self.bias, ratio, min_k, winners)
    return orig(x)
