"""LISA as a recipe technique: ``patch_model`` decides which parameters LISA owns (the decoder layers) and
which always train, a callback switches the active layers at optimizer-step boundaries and drops the optimizer
state of the layers it deactivates, and ``state_dict`` carries the active set and the sampler's RNG into every
checkpoint.

Why the optimizer is not rebuilt: the Trainer (or the recipe's optimizer technique) builds it once, before
``on_train_begin``, from the parameters that require grad at that moment. LISA leaves every layer trainable until
then, so every layer is in the optimizer's parameter groups; afterwards a frozen layer simply has no gradient
(torch and bitsandbytes skip it: no update, no weight decay, bit-identical) and no state (deleted at the switch).
The scheduler, the parameter groups and the optimizer object stay the same for the whole run, which is what
keeps resuming exact.

LISA trains the base weights in place, so ``remove()`` restores the ``requires_grad`` flags and keeps the
training (like an optimizer technique), it does not bring back the pre-training values.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, ClassVar

from ...errors import IncompatibleModelError, RecipeError
from ...technique import PatchHandle, Technique, ValidationContext
from ...integrations.anatomy import num_hidden_layers, find_decoder_layers, resolve_always_train, role_parameters
from ..optimizer_state import check_per_parameter_state, drop_state, optimized_parameters
from ...memory.frozen_prefix import frozen_prefix_correction
from .config import LisaConfig
from .sampler import LayerSampler
from ...integrations.versions import TRANSFORMERS

logger = logging.getLogger("hf_memkit")

KEY = "schedule.lisa"


_FLAT = (
    "DeepSpeed/FSDP build flat parameter groups and partitions once; per-layer freezing and optimizer-state "
    "dropping need the original parameters"
)


class LisaTechnique(Technique):
    name: ClassVar[str] = "lisa"
    slot: ClassVar[str] = "schedule"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS}
    config_cls = LisaConfig
    summary: ClassVar[str] = ("LISA: γ sampled decoder layers + embeddings/head train, re-drawn every K steps; "
                              "state of inactive layers dropped")
    reference: ClassVar[str] = "Pan et al. 2024; OptimalScale/LMFlow"
    unsupported_engines: ClassVar[dict[str, str]] = {
        "zero1": _FLAT,
        "zero2": _FLAT,
        "zero3": _FLAT,
        "fsdp": _FLAT,
        "co2": "CO2 averages the parameters that train when training starts; LISA changes that set every K steps",
    }
    conflicts: ClassVar[dict[str, str]] = {
        "slot:adapter": "an adapter freezes the base model and trains its own small tensors, so LISA would only "
        "switch adapter tensors on and off; use LISA for full-parameter training or an adapter, not both",
        "sparse_update": "both decide which parameters train",
    }

    def __init__(self, config: LisaConfig | None = None):
        super().__init__(config)
        self._layer_params: list[list[Any]] = []  # per layer: the parameters LISA switches
        self._always: list[Any] = []
        self._sampler: LayerSampler | None = None
        self._pending_sampler_state: Any = None
        self._active: list[int] | None = None
        self._drawn_at = -1
        self._patched = False

    # 1 ----------------------------------------------------------------------------------------------------------
    def validate(self, ctx: ValidationContext) -> None:
        n = num_hidden_layers(ctx.model_config) if ctx.model_config is not None else None
        if n is not None and self.config.active_layers > n:
            raise RecipeError(
                f"active_layers={self.config.active_layers} but the model has only {n} decoder layers",
                path=getattr(ctx.recipe, "source", None), key=f"{KEY}.active_layers",
                fix=f"set active_layers to at most {n} (LISA trains a few of them at a time, typically 1-4)",
            )

    # 2 ----------------------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        """Steady state: the always-trained parameters plus γ layers. Every layer has the same size, so which
        γ does not matter for gradients and optimizer state; the bottom γ are marked, the worst case for
        activations when the embeddings are frozen (the layers below the lowest active one save nothing)."""
        layers = find_decoder_layers(mem.model, self.config.layers_attribute, KEY)
        always = resolve_always_train(mem.model, layers, self.config.always_train, KEY)
        gamma = min(self.config.active_layers, len(layers))
        for name, p in mem.params.items():
            if name in always:
                continue
            i = layers.layer_of.get(name)
            p.trainable = p.trainable and i is not None and i < gamma
        cut = _input_side_cut(mem.model, layers, self.config.always_train, KEY) is not None
        over = frozen_prefix_correction(mem, mem.model.config, embeddings_grad=False if cut else None)
        if over:
            mem.add("activations", -over, self.name, "layers below the lowest active one save nothing")
        mem.add("gradients", 0, self.name, f"steady state: {gamma} of {len(layers)} layers + always-trained")

    # 3 ----------------------------------------------------------------------------------------------------------
    def patch_model(self, model: Any) -> PatchHandle:
        cfg = self.config
        layers = find_decoder_layers(model, cfg.layers_attribute, KEY)
        if cfg.active_layers > len(layers):
            raise RecipeError(
                f"active_layers={cfg.active_layers} but {type(model).__name__} has {len(layers)} decoder layers",
                key=f"{KEY}.active_layers", fix=f"set active_layers to at most {len(layers)}",
            )
        if cfg.active_layers == len(layers):
            warnings.warn(
                f"{KEY}: active_layers={cfg.active_layers} equals the number of decoder layers, so every layer "
                "trains at every step (a plain full fine-tune); lower active_layers to save memory",
                stacklevel=2,
            )
        always = resolve_always_train(model, layers, cfg.always_train, KEY)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        per_layer: list[list[Any]] = [[] for _ in range(len(layers))]
        always_params, frozen = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue  # frozen by the user: LISA leaves it alone
            if n in always:
                always_params.append(p)
            elif n in layers.layer_of:
                per_layer[layers.layer_of[n]].append(p)  # stays trainable until on_train_begin (see module doc)
            else:
                frozen.append(p)
        if not always_params and not any(per_layer):
            raise IncompatibleModelError(
                f"{KEY}: no parameter of {type(model).__name__} requires grad, so LISA has nothing to train; "
                "unfreeze the model (or the parts named in always_train) before applying the recipe"
            )
        for p in frozen:
            p.requires_grad_(False)
        from ...integrations.patching import Patches

        patches = Patches(self.name, model)
        embedding = _input_side_cut(model, layers, cfg.always_train, KEY)
        if embedding is not None:
            patches.hook(embedding.register_forward_hook(functools.partial(_cut_input_side, model)))
            logger.info("hf_memkit: %s: the embedding matrix is tied to lm_head and always_train names lm_head but "
                        "not embeddings: it trains through the head only, so the layers below the lowest active "
                        "one save no activations", KEY)
        self._layer_params, self._always, self._patched = per_layer, always_params, True
        self._sampler = LayerSampler(len(layers), cfg.active_layers)
        if self._pending_sampler_state is not None:
            self._sampler.set_state(self._pending_sampler_state)

        def undo():
            patches.remove()
            for n, p in model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
            self._layer_params, self._always, self._patched = [], [], False
            return model

        return PatchHandle(model, undo)

    def optimizer_ready(self, optimizer: Any, args: Any, state: Any) -> None:
        """Draw and apply the first active layers as soon as the optimizer holds every layer, so the Trainer's
        "trainable parameters" banner counts what really trains (on_train_begin repeats it idempotently)."""
        if self._patched:
            self.on_train_begin(args, state, optimizer)

    def describe(self, model: Any, optimizer: Any = None) -> str:
        c = self.config
        active = f" (now layers {self._active})" if self._active is not None else ""
        return (f"{c.active_layers} of {len(self._layer_params)} decoder layers train{active}, re-drawn every "
                f"{c.interval} steps; always: {', '.join(c.always_train) or 'nothing'}; optimizer state of "
                f"inactive layers {'dropped' if c.drop_optimizer_state else 'kept'}")

    # 6 ----------------------------------------------------------------------------------------------------------
    def callbacks(self) -> list:
        from .callback import LisaCallback

        return [LisaCallback(self)]

    def on_train_begin(self, args: Any, state: Any, optimizer: Any) -> None:
        if not self._patched:
            raise IncompatibleModelError(
                f"{KEY}: the model was not patched by this technique; apply the recipe with "
                "MemkitTrainer(..., recipe=...) or hf_memkit.apply_recipe(trainer, recipe)"
            )
        _check_engine(args)
        if optimizer is not None:
            if self.config.drop_optimizer_state:
                check_per_parameter_state(optimizer, KEY)
            held = optimized_parameters(optimizer)
            missing = [i for i, ps in enumerate(self._layer_params) if any(id(p) not in held for p in ps)]
            if missing:
                raise RecipeError(
                    f"the optimizer does not hold the parameters of decoder layers {missing[:8]}"
                    f"{' ...' if len(missing) > 8 else ''}; LISA switches layers on during training, so every "
                    "layer must be in the optimizer from the start",
                    key=KEY,
                    fix="let the Trainer or the recipe's optimizer technique build the optimizer, or build yours "
                    "over every parameter that requires grad after the recipe is applied",
                )
        if not self._sampler.started:
            self._sampler.seed(self.config.seed if self.config.seed is not None else args.seed)
        if self._active is None:
            self._active, self._drawn_at = self._sampler.draw(), state.global_step
        self._apply(self._active, optimizer)

    def on_step_begin(self, state: Any, optimizer: Any) -> None:
        step = state.global_step
        if step % self.config.interval == 0 and step != self._drawn_at:
            self._active, self._drawn_at = self._sampler.draw(), step
            self._apply(self._active, optimizer)

    def _apply(self, active: list[int], optimizer: Any) -> None:
        on = set(active)
        for i, params in enumerate(self._layer_params):
            for p in params:
                if p.requires_grad != (i in on):
                    p.requires_grad_(i in on)
                if i not in on:
                    p.grad = None
        if optimizer is not None and self.config.drop_optimizer_state:
            drop_state(optimizer, (p for i, ps in enumerate(self._layer_params) if i not in on for p in ps))
        logger.info("hf_memkit: lisa: layers %s train from step %d", active, self._drawn_at)

    @property
    def active_layers(self) -> list[int] | None:
        return list(self._active) if self._active is not None else None

    # 7 ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        import torch

        sampler = self._sampler.get_state() if self._sampler is not None else torch.empty(0, dtype=torch.uint8)
        return {"active_layers": list(self._active or []), "drawn_at_step": self._drawn_at,
                "sampler_state": sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ...state_schema import StateReader

        r = StateReader(state, self.name, fix="resume from a checkpoint written by this recipe on this model "
                        "(memkit_state/state.json holds its recipe), or start without resume_from_checkpoint")
        r.unknown_keys(("active_layers", "drawn_at_step", "sampler_state"))
        n = len(self._layer_params) or None  # None: not patched yet, the layer count is unknown
        gamma = min(self.config.active_layers, n) if n else self.config.active_layers
        active = r.int_list("active_layers", 0, n)
        if active and len(active) != gamma:
            raise r.error("active_layers", active, f"has {len(active)} layers but this recipe trains "
                          f"active_layers={self.config.active_layers}{f' of {n}' if n else ''}")
        drawn_at = r.int("drawn_at_step", -1)
        sampler = r.tensor("sampler_state", dtype=_uint8(), ndim=1)
        if sampler.numel() not in (0, _generator_state_size()):
            raise r.error("sampler_state", sampler, f"is not a CPU generator state ({_generator_state_size()} "
                          "bytes)")
        if bool(active) != bool(sampler.numel()) or bool(active) != (drawn_at >= 0):
            raise r.error("active_layers", active, f"does not match drawn_at_step={drawn_at} and the sampler "
                          "state (a set is drawn exactly when the sampler has started)")
        try:
            LayerSampler(max(n or gamma, gamma), gamma).set_state(sampler)  # a state torch refuses fails here
        except (RuntimeError, ValueError) as exc:
            raise r.error("sampler_state", sampler, f"is refused by torch ({exc})") from None
        self._active = active or None
        self._drawn_at = drawn_at
        self._pending_sampler_state = sampler
        if self._sampler is not None:
            self._sampler.set_state(sampler)


def _uint8() -> Any:
    import torch

    return torch.uint8


@functools.lru_cache(maxsize=1)
def _generator_state_size() -> int:
    import torch

    return torch.Generator(device="cpu").get_state().numel()


def _check_engine(args: Any) -> None:
    """Engines configured outside the recipe (command-line flags) are caught here, before the first step."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise RecipeError(
            "LISA cannot run under DeepSpeed or FSDP: they keep parameters and optimizer state in flat buffers, "
            "so layers can neither be frozen nor have their state dropped step by step",
            key=KEY, fix="train on one device (or with DDP) without --deepspeed/--fsdp, or drop lisa",
        )
    if getattr(args, "world_size", 1) > 1 and not getattr(args, "ddp_find_unused_parameters", None):
        raise RecipeError(
            "under DDP the frozen layers produce no gradient, which DDP treats as an error by default",
            key=KEY, fix="set ddp_find_unused_parameters=True (training_args or --ddp_find_unused_parameters true)",
        )


def _input_side_cut(model: Any, layers: Any, always_train: list[str], key: str) -> Any:
    """The input-embedding module whose output LISA detaches, or None.

    With tied embeddings one matrix is both the token embedding and the output head. ``always_train: [lm_head,
    ...]`` without ``embeddings`` then means: the matrix trains from the head's gradient only. Its input-side
    gradient (the rows of the tokens in the batch) is dropped by detaching the embedding output, so no layer
    below the lowest active one needs a graph and the frozen prefix saves nothing (the point of leaving
    ``embeddings`` out). Untied models need no cut: a frozen embedding already stops the gradient there."""
    if "embeddings" in always_train or "lm_head" not in always_train:
        return None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if weight is None or not weight.requires_grad:
        return None
    head = role_parameters(model, layers, "lm_head")
    others = resolve_always_train(model, layers, [e for e in always_train if e != "lm_head"], key)
    tied = {n for n, p in model.named_parameters() if p is weight}
    return embedding if tied & head and not tied & others else None


def _cut_input_side(model: Any, module: Any, args: Any, output: Any) -> Any:
    out = output.detach()
    if getattr(model, "is_gradient_checkpointing", False):
        out.requires_grad_(True)  # reentrant checkpointing needs an input that requires grad; no path to the matrix
    return out
