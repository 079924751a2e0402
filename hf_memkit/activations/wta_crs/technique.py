"""``activations: [{wta_crs: {...}}]`` — instance-level ``forward`` on the targeted ``nn.Linear`` modules (class,
state dict and hooks untouched); the sampling RNG is torch's global generator, which the Trainer checkpoints."""

from __future__ import annotations

from typing import Any, ClassVar

from ...errors import IncompatibleModelError
from ...technique import PatchHandle, Technique
from .config import WtaCrsConfig

KEY = "activations.wta_crs"


def find_targets(model: Any, targets: list[str]) -> dict[str, Any]:
    """The plain ``nn.Linear`` layers each target selects, PEFT's way (a module named ``o_proj`` or ending in
    ``.o_proj``; in a PEFT model, the adapter's Linears under it, the ones that train). Not subclasses: bnb
    4-bit layers keep their own forward."""
    from ...integrations.anatomy import target_linears

    found: dict[str, Any] = {}
    missing = []
    for t in targets:
        try:
            found.update(target_linears(model, [t], key=KEY, exact_type=True))
        except IncompatibleModelError:
            missing.append(t)
    if missing:
        import torch

        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear})
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
    patches: ClassVar[dict[str, str]] = {"linear.kernel": "the targeted nn.Linear layers (sampled rows saved)"}
    composes: ClassVar[dict[str, str]] = {
        "sparse_update": "WTA-CRS leaves the Linears sparse update owns: their forward saves only the selected "
                         "input channels already",
    }
    conflicts: ClassVar[dict[str, str]] = {
        "mesa": "both replace what Linear layers save for backward; use one of them",
    }

    def estimate(self, mem: Any) -> None:
        from .estimate import wta_crs_activation_delta

        delta, note = wta_crs_activation_delta(mem, self.config)
        mem.add("activations", delta, self.name, note)

    def patch_model(self, model: Any) -> PatchHandle:
        from ...integrations.patching import Patches, parts_of

        cfg = self.config
        targets = find_targets(model, cfg.targets)
        patches = Patches(self.name, model)
        for m in targets.values():
            if "forward" in parts_of(m):
                continue  # sparse update's sliced Linears: their forward saves only the selected channels
            # the kernel part of the Linear (what it saves for backward): composes with a weight view
            patches.linear_kernel(m, _wta_crs_kernel, cfg.ratio, cfg.min_k, cfg.winners)

        def undo():
            patches.remove()
            return model

        return PatchHandle(model, undo)


def _wta_crs_kernel(self: Any, x: Any, weight: Any, bias: Any) -> Any:
    import torch

    from ...integrations.patching import part_state
    from .function import WtaCrsLinear

    ratio, min_k, winners = part_state(self, "linear.kernel")
    if torch.is_grad_enabled() and weight.requires_grad:
        return WtaCrsLinear.apply(x, weight, bias, ratio, min_k, winners)
    return torch.nn.functional.linear(x, weight, bias)
