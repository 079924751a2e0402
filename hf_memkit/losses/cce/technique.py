"""``loss: {cce: {...}}`` — the recipe technique around
:func:`hf_memkit.ops.linear_cross_entropy.linear_cross_entropy`.

``patch_model`` replaces ``forward`` on the *ForCausalLM instance (inside a PeftModel if there is one; see
:mod:`hf_memkit.integrations.causal_lm`), so that a call with labels returns the fused loss and, in training, no
logits. ``loss`` then calls the (possibly DDP/PEFT-wrapped) model as the Trainer would, passing
``num_items_in_batch`` so gradient accumulation keeps Hugging Face's token-weighted semantics.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...errors import IncompatibleModelError, RecipeError
from ...technique import PatchHandle, Technique, ValidationContext
from .config import CCEConfig
from ...integrations.versions import TRANSFORMERS

MiB = 2**20


_SHARDED_HEAD = (
    "ZeRO-3/FSDP shard lm_head's weight and gather it only inside lm_head.forward, which the fused loss bypasses "
    "(it reads lm_head.weight directly); ZeRO-1/2 and DDP keep the whole weight on every rank"
)


class CCETechnique(Technique):
    name: ClassVar[str] = "cce"
    slot: ClassVar[str] = "loss"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS}
    config_cls = CCEConfig
    summary: ClassVar[str] = "Cut Cross-Entropy: causal-LM loss from hidden states + lm_head, no N×V logits"
    reference: ClassVar[str] = "Wijmans et al. 2024; apple/ml-cross-entropy"
    unsupported_engines: ClassVar[dict[str, str]] = {
        "zero3": _SHARDED_HEAD,
        "fsdp": _SHARDED_HEAD,
    }
    patches: ClassVar[dict[str, str]] = {"causal_lm.forward": "the *ForCausalLM forward (loss from hidden states)"}
    conflicts: ClassVar[dict[str, str]] = {
        "training_args:label_smoothing_factor": "label smoothing is applied by the Trainer to materialised logits, "
        "which loss.cce never builds",
        "training_args:use_liger_kernel": "Liger replaces the model's forward with its own fused loss",
    }

    def __init__(self, config: CCEConfig | None = None):
        super().__init__(config)
        self._patch = None
        self._loss_scale = 1  # the Trainer's multi-process factor for token-averaged losses (see callbacks)
        self._sink = None  # a host that logs token metrics from its loss (TRL's SFTTrainer), see bind_trainer
        self._stats = None  # the TokenStats the fused loss fills during one loss() call

    # 1 ----------------------------------------------------------------------------------------------------------
    def validate(self, ctx: ValidationContext) -> None:
        if ctx.model_config is None:
            return
        from ...integrations.causal_lm import logit_transform

        logit_transform(ctx.model_config, f"loss.{self.name}")

    # 2 ----------------------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        """No N×V tensor is saved (``logits`` drops to 0). What the fused forward keeps for backward is dE (the
        gradient of the final hidden states, the size of lm_head's input that the plain path saves instead);
        dC/dbias of a trained lm_head are its gradient buffers (counted under gradients); the transient
        ``loss_buffers`` become O(N) + one logit chunk + O(V). A 16-bit lm_head (a bf16 model, or
        ``precision: {bf16: {}}``) is upcast block by block with dC rounded per block
        (:mod:`hf_memkit.ops.linear_cross_entropy.blocked`): its terms are two fp32 weight blocks and one logit
        tile, no fp32 copy of lm_head and no (V, D) fp32 dC."""
        import torch

        from ...integrations.causal_lm import base_and_head, logit_transform
        from ...ops.linear_cross_entropy.problem import default_budget
        from ...ops.linear_cross_entropy.reference import chunk_bytes

        key = f"loss.{self.name}"
        model = mem.model
        _, head = base_and_head(model, key)
        head_name = next((n for n, m in model.named_modules() if m is head), "lm_head")
        vocab, hidden = head.weight.shape
        d = mem.dtype_bytes
        tokens = mem.batch_size * mem.seq_len
        softcap = logit_transform(model.config, key).softcap is not None
        budget = int(self.config.memory_budget_mb * MiB) if self.config.memory_budget_mb else default_budget(
            torch.device("cpu"), vocab, hidden)
        p = mem.param(head_name + ".weight")
        head_trains = bool(p and p.trainable)
        bias = mem.param(head_name + ".bias")

        mem.replace_category("logits", 0, self.name, "no tensor of tokens x vocabulary elements is saved")
        # the activation model counts lm_head's input when lm_head trains: the same bytes as dE, which replaces it
        # dC (and dbias) of a trained lm_head are formed in the forward too, but their storage becomes the
        # parameter's .grad: they are the `gradients` term already, not a saved activation (memory/tags.py)
        saved = 0 if (head_trains or head_name in mem.needs_input) else tokens * hidden * d
        saved = max(saved - 8 * tokens, 0)  # the labels the plain cross-entropy saves: the fused loss keeps none
        mem.add("activations", saved, self.name, "dE formed in the fused forward, held until backward")

        per_token = 4 + 4 + 8 + 8  # log-sum-exp, target logit (fp32), row index and shifted target (int64)
        transient = tokens * per_token + vocab * (4 + 4 + 8)  # + per-vocabulary logit sums, sort order (Triton)
        head_16 = p is not None and p.storage_bytes < 4 * p.numel  # a bf16 model, or precision.bf16's storage
        if head_16 or d < 4:
            # 16-bit lm_head: weight blocks upcast one at a time, dC rounded block by block, dE in fp32
            # (ops/linear_cross_entropy/blocked.py): no fp32 copy of lm_head and no (V, D) fp32 dC
            from ...ops.linear_cross_entropy.blocked import transient_bytes

            # dE is the saved activation counted above when the hidden states are fp32; a transient fp32 buffer
            # (cast to the hidden states' dtype) otherwise
            transient += transient_bytes(tokens, vocab, hidden, torch.float32, budget, softcap, need_e=d < 4,
                                         need_c=head_trains)
            note = "transient: O(N) buffers + one logit tile + fp32 weight blocks"
        else:
            transient += chunk_bytes(tokens, vocab, torch.float32, budget, softcap)
            note = "transient: O(N) buffers + one logit chunk + O(V) sort"
        mem.replace_category("loss_buffers", transient, self.name, note)

    # 3 ----------------------------------------------------------------------------------------------------------
    def patch_model(self, model: Any) -> PatchHandle:
        from ...integrations.causal_lm import CausalLMLossPatch

        patch = CausalLMLossPatch(model, self._loss_fn, key=f"loss.{self.name}")
        if self.config.verify_head:
            try:
                patch.probe()
            except Exception:
                patch.remove()
                raise
        self._patch = patch

        def undo():
            patch.remove()
            self._patch = None
            return model

        return PatchHandle(model, undo)

    def _loss_fn(self, e, c, targets, **kw):
        from ...ops.linear_cross_entropy import linear_cross_entropy

        cfg = self.config
        budget = int(cfg.memory_budget_mb * MiB) if cfg.memory_budget_mb else None
        return linear_cross_entropy(e, c, targets, z_loss=cfg.z_loss, filter_eps=cfg.filter_eps, impl=cfg.impl,
                                    memory_budget=budget, vocab_sort=cfg.vocab_sort, token_stats=self._stats, **kw)

    # wired ------------------------------------------------------------------------------------------------------
    def bind_trainer(self, trainer: Any) -> None:
        """Once the Trainer is built: refuse hosts whose loss this technique must not replace (TRL's DPO, GRPO, ...,
        ``use_liger_kernel``), and feed the token metrics a TRL SFTTrainer logs from its own loss."""
        from ...integrations.trl import check_loss_host, metrics_sink

        check_loss_host(trainer, f"loss.{self.name}")
        self._sink = metrics_sink(trainer)

    # 5 ----------------------------------------------------------------------------------------------------------
    def loss(self, model: Any, inputs: dict, num_items_in_batch: Any = None, return_outputs: bool = False):
        patch = self._patch
        if patch is None:
            raise IncompatibleModelError(
                f"loss.{self.name}: the model was not patched by this technique; apply the recipe with "
                "MemkitTrainer(..., recipe=...) or hf_memkit.apply_recipe(trainer, recipe)"
            )
        inputs = dict(inputs)
        skip_logits = bool(inputs.pop("skip_logits", False))
        if inputs.get("labels") is None:
            raise RecipeError(
                "the batch has no `labels`, so there is no loss to compute",
                key=f"loss.{self.name}",
                fix="use a collator that sets labels, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)",
            )
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        stats = None
        if self._sink is not None:  # entropy / accuracy are computed only for a host that logs them
            from ...ops.linear_cross_entropy import TokenStats

            stats = TokenStats()
        self._stats = stats
        try:
            with patch.request_logits(self._wants_logits(patch, skip_logits)):
                outputs = model(**inputs)
        finally:
            self._stats = None
        if stats is not None:
            self._sink.record(stats, inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if num_items_in_batch is not None and self._loss_scale != 1:
            loss = loss * self._loss_scale
        return (loss, outputs) if return_outputs else loss

    def _wants_logits(self, patch: Any, skip_logits: bool) -> bool:
        if patch.causal_lm.training:
            return False
        mode = self.config.eval_logits
        if mode != "auto":
            return mode == "always"
        if skip_logits:
            return False
        from ...integrations.causal_lm import prediction_loss_only_of_caller

        loss_only = prediction_loss_only_of_caller()
        return True if loss_only is None else not loss_only

    # 6 ----------------------------------------------------------------------------------------------------------
    def callbacks(self) -> list:
        from transformers import TrainerCallback

        technique = self

        class CCEArgsCallback(TrainerCallback):
            """Reads the TrainingArguments the loss hook cannot see: the Trainer multiplies a token-averaged loss
            by the number of processes when ``average_tokens_across_devices`` (num_items_in_batch is then the global
            count), and label smoothing would need logits."""

            def on_train_begin(self, args, state, control, **kwargs):
                if getattr(args, "label_smoothing_factor", 0):
                    raise RecipeError(
                        f"TrainingArguments.label_smoothing_factor={args.label_smoothing_factor} needs the logits, "
                        "which loss.cce never builds",
                        key=f"loss.{technique.name}",
                        fix="set label_smoothing_factor=0, or remove the loss slot from the recipe",
                    )
                ds = getattr(args, "hf_deepspeed_config", None)
                if getattr(args, "fsdp", None) or (ds is not None and ds.is_zero3()):
                    raise RecipeError(
                        "FSDP and DeepSpeed ZeRO-3 shard lm_head's weight and gather it only inside lm_head.forward, "
                        "which loss.cce bypasses",
                        key=f"loss.{technique.name}",
                        fix="use DDP or ZeRO stage 1/2, or remove the loss slot from the recipe",
                    )
                scale = 1
                if getattr(args, "average_tokens_across_devices", False):  # as Trainer.compute_loss does
                    scale = args.n_gpu if getattr(args, "n_gpu", 1) > 1 else args.world_size
                technique._loss_scale = scale

        return [CCEArgsCallback()]
