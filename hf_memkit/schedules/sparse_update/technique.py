"""Sparse update as a recipe technique.

``patch_model`` freezes the model, then makes trainable what the :class:`~.plan.Plan` names: norm weights and
biases as they are, selected weight channels through :class:`~.linear.LinearPatch` slices. In ``budget`` mode the
plan needs training batches, which only exist once training starts: every candidate is made trainable (slices
still empty) so that the optimizer, built before ``on_train_begin``, holds them all; the callback then measures,
plans, fills the chosen slices and freezes the rest (an empty or frozen parameter never gets a gradient, so the
optimizer skips it and keeps no state for it). The plan goes into every checkpoint, and resuming rebuilds the same
slices before the Trainer loads the weights and the optimizer state. ``remove()`` folds the trained slices into
the weights, restores the plain ``nn.Linear`` modules and the ``requires_grad`` flags: the training is kept.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

from ...errors import CheckpointError, IncompatibleModelError, RecipeError
from ...technique import PatchHandle, Technique, ValidationContext
from ...integrations.anatomy import find_decoder_layers, num_hidden_layers, role_parameters
from ..optimizer_state import optimized_parameters
from ...memory.frozen_prefix import frozen_prefix_correction
from .config import SparseUpdateConfig
from .plan import Plan, bias_norm_parameters, linear_modules, resolve_layer_indices
from ...integrations.versions import TRANSFORMERS

logger = logging.getLogger("hf_memkit")

KEY = "schedule.sparse_update"
MiB = 2**20
#: optimizer state per trainable element, by the recipe's optimizer (budget mode's default)
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0}


_FLAT = (
    "DeepSpeed/FSDP flatten parameters into buffers built once; the channel slices and per-parameter freezing "
    "need the original parameters"
)


class SparseUpdateTechnique(Technique):
    name: ClassVar[str] = "sparse_update"
    slot: ClassVar[str] = "schedule"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS}
    config_cls = SparseUpdateConfig
    summary: ClassVar[str] = ("sparse update: biases/norms of the last k layers + top-L2 input channels of chosen "
                              "weights; budget planner; int8 + QAS")
    reference: ClassVar[str] = "Lin et al. 2022; mit-han-lab/tiny-training"
    unsupported_engines: ClassVar[dict[str, str]] = {
        "zero1": _FLAT,
        "zero2": _FLAT,
        "zero3": _FLAT,
        "fsdp": _FLAT,
        "co2": "CO2 averages whole parameters; the channel slices train separate tensors swapped in and out",
    }
    patches: ClassVar[dict[str, str]] = {"linear.forward": "the updated nn.Linear layers (a trainable column slice)"}
    conflicts: ClassVar[dict[str, str]] = {
        "slot:adapter": "an adapter freezes the base model and trains its own tensors; a sparse update chooses "
        "which base parameters train — use one of them",
        "lisa": "both decide which parameters train",
        "ast": "2:4 sparse training computes its Linears with the masked whole weight, which would drop the "
               "trained column slice from the forward (and trains the weights sparse update freezes)",
        "cast": "2:4 sparse training computes its Linears with the scaled whole weight, which would drop the "
                "trained column slice from the forward (and trains the weights sparse update freezes)",
    }

    def __init__(self, config: SparseUpdateConfig | None = None):
        super().__init__(config)
        self._model: Any = None
        self._layers: Any = None
        self._patches: dict[str, Any] = {}  # module name -> LinearPatch
        self._bias_candidates: list[str] = []
        self._plan: Plan | None = None
        self._frozen_to_plan = False
        self._optimizer_bytes: float | None = None
        self._restored_slices: dict[str, Any] = {}

    # 1 ----------------------------------------------------------------------------------------------------------
    def validate(self, ctx: ValidationContext) -> None:
        opt = [t.name for t in ctx.recipe.techniques if t.slot == "optimizer"] if ctx.recipe is not None else []
        self._optimizer_bytes = OPTIMIZER_BYTES.get(opt[0], 8.0) if opt else 8.0
        n = num_hidden_layers(ctx.model_config) if ctx.model_config is not None else None
        if n is None or self.config.budget is not None:
            return
        bad = [i for i in self.config.layers() if not -n <= i < n]
        if bad:
            raise RecipeError(
                f"weight_layers {bad} lie outside the model's {n} decoder layers",
                path=getattr(ctx.recipe, "source", None), key=f"{KEY}.weight_layers",
                fix=f"use indices 0..{n - 1}, or -1..-{n} counting from the end",
            )
        if self.config.num_bias_layers() > n:
            raise RecipeError(
                f"bias_layers={self.config.bias_layers} but the model has {n} decoder layers",
                path=getattr(ctx.recipe, "source", None), key=f"{KEY}.bias_layers", fix=f"set at most {n}",
            )

    # plans -----------------------------------------------------------------------------------------------------
    def _manual_plan(self, model: Any, layers: Any, with_channels: bool) -> tuple[Plan, dict[str, int]]:
        """The plan of the explicit settings. Without weights (the estimator's meta model) only the channel
        counts are known: they are returned as the second value (module -> k)."""
        from .linear import select_channels

        cfg = self.config
        k_bias = min(cfg.num_bias_layers(), len(layers))
        plan, counts = Plan(k_bias), {}
        indices = resolve_layer_indices(cfg.layers(), len(layers), KEY)
        for i, ratio in zip(indices, cfg.ratios()):
            for _, name, m in linear_modules(model, layers, [i], cfg.weight_modules, KEY):
                c_in = m.weight.shape[1]
                k = int(ratio * c_in)
                if k == 0:
                    warnings.warn(f"{KEY}: weight_ratio={ratio} of {name}'s {c_in} input channels is 0 channels; "
                                  "it gets no weight update (raise the ratio)", stacklevel=3)
                    continue
                if k == c_in and cfg.quantized is None:
                    plan.full.append(name)
                    continue
                counts[name] = k
                if with_channels:
                    plan.channels[name] = select_channels(m.weight, k).tolist()
        return plan, counts

    def _budget_candidates(self, model: Any, layers: Any) -> tuple[list[tuple[int, str, Any]], list[str]]:
        n = len(layers)
        depth = min(self.config.budget.layers or n, n)
        cand = list(range(n - depth, n))
        return (linear_modules(model, layers, cand, self.config.weight_modules, KEY),
                bias_norm_parameters(model, layers, depth))

    def _budget_plan(self, model: Any, layers: Any, tokens: int, d: int, slice_bytes: int,
                     channel_scores: dict[str, Any] | None, bias_scores: dict[str, float] | None,
                     with_channels: bool) -> tuple[Plan, dict[str, int]]:
        """The planner's choice under the budget. Without scores (the estimate, before any data) every byte is
        worth the same, so the plan fills the budget: an upper bound of what the run will use."""
        from .linear import select_channels
        from .planner import BiasCandidate, CostModel, WeightCandidate, frozen_layer_bytes_per_token, plan_budget

        b = self.config.budget
        opt_bytes = b.optimizer_bytes_per_param
        if opt_bytes is None:
            opt_bytes = self._optimizer_bytes if self._optimizer_bytes is not None else 8.0
        cost = CostModel(slice_bytes, opt_bytes, d, tokens)
        n = len(layers)
        depth = min(b.layers or n, n)
        modules, bias_names = self._budget_candidates(model, layers)
        weights = []
        for i, name, m in modules:
            out_f, c_in = m.weight.shape
            gains = None
            if channel_scores is not None:
                gains = {r: float(channel_scores[name][select_channels(m.weight, int(r * c_in))].sum())
                         for r in b.ratios if int(r * c_in) > 0}
            weights.append(WeightCandidate(name, i, out_f, c_in, gains))
        params = dict(model.named_parameters())
        biases = [BiasCandidate(pn, layers.layer_of.get(pn, n - 1), params[pn].numel(),
                                not pn.endswith(".bias"), bias_scores[pn] if bias_scores is not None else None)
                  for pn in bias_names]
        chosen = plan_budget(weights, biases, n, depth, b.ratios, cost, int(b.mb * MiB),
                             frozen_layer_bytes_per_token(model.config, d), model.config.hidden_size)
        if chosen.bias_layers == 0 and not chosen.ratios:
            raise RecipeError(
                f"a budget of {b.mb} MiB fits no update: the cheapest one (a norm or a few channels of the last "
                f"layer, with the activations that layer then saves for {tokens} tokens) needs "
                f"{chosen.cheapest / MiB:.2f} MiB", key=f"{KEY}.budget.mb",
                fix=f"raise budget.mb to at least {chosen.cheapest / MiB:.2f}, or train on shorter batches",
            )
        plan, counts = Plan(chosen.bias_layers), {}
        for name, r in chosen.ratios.items():
            w = model.get_submodule(name).weight
            k = int(r * w.shape[1])
            counts[name] = k
            if with_channels:
                plan.channels[name] = select_channels(w, k).tolist()
        return plan, counts

    # 2 ----------------------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        cfg = self.config
        model = mem.model
        layers = find_decoder_layers(model, cfg.layers_attribute, KEY)
        d = mem.dtype_bytes
        slice_bytes = 4 if cfg.quantized else d
        tokens = mem.batch_size * mem.seq_len
        if cfg.budget is not None:
            plan, counts = self._budget_plan(model, layers, tokens, d, slice_bytes, None, None, False)
            note = f"budget {cfg.budget.mb} MiB (upper bound: the plan is chosen from data at train start)"
        else:
            plan, counts = self._manual_plan(model, layers, False)
            note = ""
        mem.freeze_all()
        trainable = bias_norm_parameters(model, layers, plan.bias_layers)
        trainable += [f"{n}.weight" for n in plan.full]
        if cfg.train_head:
            trainable += sorted(role_parameters(model, layers, "lm_head"))
        for n in trainable:
            if mem.param(n) is not None:
                mem.param(n).trainable = True
        extra_weights = saved = 0
        for name, k in counts.items():
            out_f, c_in = model.get_submodule(name).weight.shape
            pname = f"{name}.sparse_update_weight"
            mem.add_param(pname, (out_f, k), trainable=True, category="weights")
            extra_weights += 8 * k  # the index buffer
            if cfg.quantized:
                mem.set_storage(pname, 4 * out_f * k, "fp32 int8-unit slice")
                if d != 4:
                    mem.add("gradients", (4 - d) * out_f * k, self.name, "fp32 slice gradients")
                extra_weights += out_f * c_in + 4 * out_f  # int8 weight + fp32 scales
            saved += tokens * k * d
        if extra_weights:
            mem.add("weights", extra_weights, self.name, "channel indices" + (", int8 weights + scales"
                                                                              if cfg.quantized else ""))
        if saved and not mem.gradient_checkpointing:  # under checkpointing they are recomputed, not kept
            mem.add("activations", saved, self.name, "selected input channels of the updated weights")
        over = frozen_prefix_correction(mem, model.config, set(counts))
        if over:
            mem.add("activations", -over, self.name, "layers below the lowest trainable one save nothing")
        if note:
            mem.add("gradients", 0, self.name, note)

    # 3 ----------------------------------------------------------------------------------------------------------
    def patch_model(self, model: Any) -> PatchHandle:
        from .linear import LinearPatch

        cfg = self.config
        layers = find_decoder_layers(model, cfg.layers_attribute, KEY)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        names = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        self._model, self._layers, self._patches = model, layers, {}
        try:
            if cfg.budget is not None:
                modules, self._bias_candidates = self._budget_candidates(model, layers)
                for _, name, m in modules:
                    self._patches[name] = LinearPatch(m, cfg.quantized is not None, cfg.qas)
                for n in self._bias_candidates:
                    names[n].requires_grad_(True)
                self._plan = None
            else:
                plan, _ = self._manual_plan(model, layers, True)
                for name in plan.channels:
                    self._patches[name] = LinearPatch(model.get_submodule(name), cfg.quantized is not None, cfg.qas)
                self._apply_plan(plan)
            if cfg.train_head:
                for n in role_parameters(model, layers, "lm_head"):
                    names[n].requires_grad_(True)
            if not any(p.requires_grad for p in model.parameters()):
                raise IncompatibleModelError(
                    f"{KEY}: the settings select nothing to train in {type(model).__name__} (bias_layers=0 and no "
                    "weight channels); raise bias_layers or weight_ratio"
                )
        except Exception:
            self._undo(model, flags)
            raise

        return PatchHandle(model, lambda: self._undo(model, flags))

    def _undo(self, model: Any, flags: dict[str, bool]) -> Any:
        for patch in self._patches.values():
            patch.remove()
        self._patches = {}
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        self._model, self._frozen_to_plan = None, False
        return model

    def _apply_plan(self, plan: Plan) -> None:
        """Make the plan's parameters trainable and fill its slices (nothing is frozen here: see
        :meth:`_freeze_to_plan`)."""
        names = dict(self._model.named_parameters())
        for n in bias_norm_parameters(self._model, self._layers, plan.bias_layers):
            names[n].requires_grad_(True)
        for n in plan.full:
            names[f"{n}.weight"].requires_grad_(True)
        for n, idx in plan.channels.items():
            if n not in self._patches:
                raise CheckpointError(f"{KEY}: the plan updates {n}, which this run did not patch; resume with "
                                      "the recipe the checkpoint was written with")
            self._patches[n].set_channels(idx)
            if n in self._restored_slices:
                self._patches[n].slice.data.copy_(self._restored_slices[n])
                self._patches[n].restored_slice = self._restored_slices[n]
        self._plan = plan

    def _freeze_to_plan(self) -> None:
        """Budget mode, at train start: freeze the candidates the plan did not choose and unpatch their
        Linear modules (their empty slices stay in the optimizer, which skips them)."""
        plan = self._plan
        keep = set(bias_norm_parameters(self._model, self._layers, plan.bias_layers))
        names = dict(self._model.named_parameters())
        for n in self._bias_candidates:
            if n not in keep:
                names[n].requires_grad_(False)
        for n in [n for n in self._patches if n not in plan.channels]:
            patch = self._patches.pop(n)
            patch.slice.requires_grad_(False)
            patch.remove()
        self._frozen_to_plan = True

    @property
    def plan(self) -> Plan | None:
        return self._plan

    # 6 ----------------------------------------------------------------------------------------------------------
    def callbacks(self) -> list:
        from .callback import SparseUpdateCallback

        return [SparseUpdateCallback(self)]

    def on_train_begin(self, args: Any, model: Any, optimizer: Any, train_dataloader: Any) -> None:
        if self._model is None:
            raise IncompatibleModelError(
                f"{KEY}: the model was not patched by this technique; apply the recipe with "
                "MemkitTrainer(..., recipe=...) or hf_memkit.apply_recipe(trainer, recipe)"
            )
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise RecipeError("a sparse update cannot run under DeepSpeed or FSDP (flat parameters)", key=KEY,
                              fix="train without --deepspeed/--fsdp, or drop sparse_update")
        if self.config.budget is not None and not self._frozen_to_plan:
            if self._plan is None:
                self._plan_from_data(args, train_dataloader)
            self._freeze_to_plan()
        if optimizer is not None:
            held = optimized_parameters(optimizer)
            missing = [n for n, p in self._model.named_parameters() if p.requires_grad and id(p) not in held]
            if missing:
                raise RecipeError(
                    f"the optimizer does not hold {len(missing)} parameters the sparse update trains (e.g. "
                    f"{missing[0]}); it was built before the recipe was applied",
                    key=KEY, fix="let the Trainer or the recipe's optimizer technique build the optimizer",
                )

    def _plan_from_data(self, args: Any, dataloader: Any) -> None:
        from .budget import calibration_batches, measure_contributions

        if dataloader is None:
            raise RecipeError("budget mode needs the training data to measure contributions, and the Trainer "
                              "passed no train_dataloader", key=f"{KEY}.budget",
                              fix="train with a train_dataset, or set bias_layers/weight_layers/weight_ratio")
        model = self._model
        device = next(model.parameters()).device
        batches = calibration_batches(dataloader, self.config.budget.batches, args.per_device_train_batch_size,
                                      device)
        tokens = max(int(b["input_ids"].numel()) for b in batches) if "input_ids" in batches[0] else 0
        modules = {n: p.module for n, p in self._patches.items()}
        names = dict(model.named_parameters())
        bias = {n: names[n] for n in self._bias_candidates}
        scores, bias_scores = measure_contributions(model, batches, modules, bias)
        dtype = next(iter(modules.values())).weight.dtype if modules else next(model.parameters()).dtype
        import torch

        d = torch.finfo(dtype).bits // 8
        plan, _ = self._budget_plan(model, self._layers, tokens, d, 4 if self.config.quantized else d,
                                    scores, bias_scores, True)
        self._apply_plan(plan)
        logger.info("hf_memkit: sparse_update budget %.2f MiB: bias_layers=%d, weights %s", self.config.budget.mb,
                    plan.bias_layers, {n: len(c) for n, c in plan.channels.items()})

    # 7 ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"plan": self._plan.to_json() if self._plan is not None else None}
        if self.config.quantized and self._plan is not None:
            for n in self._plan.channels:
                if n in self._patches:
                    state[f"slice/{n}"] = self._patches[n].slice.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ...state_schema import StateReader

        r = StateReader(state, self.name)
        raw = r.get("plan")
        if raw is None:
            return
        if self._model is None:
            raise CheckpointError(f"{KEY}: load the state after the model is patched (the Trainer wiring does)")
        plan = self._read_plan(r, r.mapping("plan"))
        slices = {k[len("slice/"):]: v for k, v in state.items() if k.startswith("slice/")}
        r.unknown_keys(["plan", *(f"slice/{n}" for n in plan.channels)])
        if self.config.quantized:  # the int8 slices cannot be re-derived from the weights: each must be there
            for n in plan.channels:
                r.get(f"slice/{n}")
        for n, v in slices.items():
            m = self._patches[n].module
            r.tensor(f"slice/{n}", shape=(m.out_features, len(plan.channels[n])), floating=True, value=v)
        self._restored_slices = slices
        self._apply_plan(plan)

    def _read_plan(self, r: Any, raw: dict[str, Any]) -> Plan:
        """Every entry of the saved plan checked against this model: layer count, patched modules, channel
        indices within each module's inputs."""
        for field in ("bias_layers", "channels"):
            if field not in raw:
                raise r.missing(f"plan.{field}")
        n_layers = len(self._layers) if self._layers is not None else None
        bias_layers = r.int("plan.bias_layers", 0, n_layers, value=raw["bias_layers"])
        channels = r.mapping("plan.channels", value=raw["channels"])
        out: dict[str, list[int]] = {}
        for name, idx in channels.items():
            if name not in self._patches:
                raise r.error(f"plan.channels.{name}", idx, "names a module this run did not patch (another "
                              "model or recipe)")
            out[name] = r.int_list(f"plan.channels.{name}", 0, self._patches[name].module.in_features, value=idx)
        weights = {n[: -len(".weight")] for n, _ in self._model.named_parameters() if n.endswith(".weight")}
        full = r.str_list("plan.full", weights, value=raw.get("full", []))
        return Plan(bias_layers, out, full)

    # 8 ----------------------------------------------------------------------------------------------------------
    def finalize(self, model: Any, output_dir: str) -> None:
        """Fold the trained slices into the weights, so that anything reading ``weight`` directly sees the
        trained model (saving already does, through the state-dict hooks)."""
        for patch in self._patches.values():
            patch.merge_()
