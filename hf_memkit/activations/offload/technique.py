"""``activations: [{offload: {...}}]`` — :class:`~.hooks.OffloadHooks` is active during every forward of the
patched model with gradients (pushed by a forward pre-hook, popped by an ``always_call`` forward hook, so an
exception cannot leave it installed); with ``token_fraction`` < 1 each decoder layer also pushes a
:class:`~.hooks.TokenFrame`. Hooks are used instead of replacing ``forward`` so that techniques which replace the
model's ``forward`` (``loss.cce``) stay inside the offloaded region."""

from __future__ import annotations

from typing import Any, ClassVar

from ...errors import RecipeError
from ...technique import PatchHandle, Technique, ValidationContext
from .config import OffloadConfig
from ...integrations.versions import TRANSFORMERS

KEY = "activations.offload"


def _resolve_to(cfg: OffloadConfig, device_type: str) -> str:
    if cfg.to == "auto":
        return "cpu" if device_type == "cuda" else "disk"
    if cfg.to == "cpu" and device_type != "cuda":
        raise RecipeError(
            f"to: cpu moves accelerator tensors to host RAM, but the model is on {device_type}, so nothing would "
            "move", key=f"{KEY}.to",
            fix="use to: disk (memory-mapped files free RAM on any device) or to: auto, or train on a CUDA device")
    return cfg.to


class OffloadTechnique(Technique):
    name: ClassVar[str] = "offload"
    slot: ClassVar[str] = "activations"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS}
    config_cls = OffloadConfig
    summary: ClassVar[str] = ("Offload: saved tensors to pinned host RAM or disk during forward, back in backward; "
                              "MEMO token-wise variant recomputes the rest")
    reference: ClassVar[str] = "torchtune OffloadActivations; Zhao et al. 2024 (MEMO)"

    def __init__(self, config: OffloadConfig | None = None):
        super().__init__(config)
        self.store = None
        self.hooks = None

    def validate(self, ctx: ValidationContext) -> None:
        gc = ctx.training_args.get("gradient_checkpointing") or ctx.training_args.get("activation_checkpointing")
        if self.config.token_fraction < 1 and gc:
            raise RecipeError(
                "token_fraction < 1 recomputes each decoder layer in backward, which gradient checkpointing "
                "already does", path=getattr(ctx.recipe, "source", None), key=f"{KEY}.token_fraction",
                fix="set token_fraction: 1 (then the checkpoint inputs are offloaded), or turn gradient "
                "checkpointing off")

    def describe(self, model: Any, optimizer: Any = None) -> str:
        if self.store is None:
            return super().describe(model, optimizer)
        where = "disk (a temporary folder" + (f" under {self.config.dir})" if self.config.dir else ")") \
            if hasattr(self.store, "parent") else "pinned host RAM"
        tokens = "" if self.config.token_fraction >= 1 else \
            f"; {self.config.token_fraction:.0%} of each layer's tokens, the rest recomputed"
        return (f"tensors saved for backward of {self.config.min_bytes:,} bytes or more go to {where}{tokens}; "
                "bytes written per step are logged after the first step")

    def callbacks(self) -> list:
        from .callback import OffloadReportCallback

        return [OffloadReportCallback(self)]

    def estimate(self, mem: Any) -> None:
        from .estimate import offload_estimate

        offload_estimate(mem, self.config)

    def finish_estimate(self, mem: Any) -> None:
        from .estimate import offload_finish

        offload_finish(mem, self.config)

    def patch_model(self, model: Any) -> PatchHandle:
        import torch

        from .hooks import OffloadHooks, TokenFrame
        from .store import DiskStore, HostStore

        cfg = self.config
        p = next(model.parameters(), None)
        device_type = p.device.type if p is not None else "cpu"
        to = _resolve_to(cfg, device_type)
        store = DiskStore(cfg.dir) if to == "disk" else HostStore(cfg.pin_memory)
        if to == "disk" and device_type == "cpu" and cfg.release_host_memory:
            from .allocator import fix_mmap_threshold

            fix_mmap_threshold(1 << 20)
        hooks = OffloadHooks(store, cfg.min_bytes, None if to == "disk" else {"cuda"}, set())
        active: list[Any] = []

        def root_pre(module, args):
            if torch.is_grad_enabled() and not active:
                hooks.excluded = {t.untyped_storage().data_ptr() for t in
                                  [*model.parameters(), *model.buffers()]}
                active.append(hooks.__enter__())
            else:
                active.append(None)

        def root_post(module, args, output):
            h = active.pop() if active else None
            if h is not None:
                h.__exit__(None, None, None)

        from ...integrations.patching import Patches

        patches = Patches(self.name, model)
        patches.on_remove(store.close)  # undone last
        patches.hook(model.register_forward_pre_hook(root_pre))
        patches.hook(model.register_forward_hook(root_post, always_call=True))
        if cfg.token_fraction < 1:
            from ...integrations.anatomy import find_decoder_layers

            frames: list[Any] = []

            def layer_pre(module, args, kwargs):
                if not (active and active[0] is not None and torch.is_grad_enabled()):
                    frames.append(None)
                    return
                if getattr(module, "gradient_checkpointing", False) and module.training:
                    raise RecipeError(
                        "token_fraction < 1 recomputes each decoder layer, and gradient checkpointing is on",
                        key=f"{KEY}.token_fraction",
                        fix="set token_fraction: 1, or train without gradient checkpointing")
                frames.append(TokenFrame(module, args, kwargs, hooks, cfg.token_fraction).__enter__())

            def layer_post(module, args, output):
                f = frames.pop() if frames else None
                if f is not None:
                    f.__exit__(None, None, None)

            for layer in find_decoder_layers(model, key=KEY).modules:
                patches.hook(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
                patches.hook(layer.register_forward_hook(layer_post, always_call=True))
        self.store, self.hooks = store, hooks

        def undo():
            patches.remove()
            self.store = self.hooks = None
            return model

        return PatchHandle(model, undo)
