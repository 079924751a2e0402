"""TRL trainers as hosts of a recipe: what hf_memkit must know about TRL lives here and nowhere else.

TRL's trainers are ``transformers.Trainer`` subclasses, so the ordinary wiring (``apply_recipe``,
``MemkitTrainer``-style via the launcher's ``recipe_installed``) reaches them. Three things are TRL's own:

* **Which trainers a ``loss:`` technique may replace.** A loss technique computes the causal-LM next-token
  cross-entropy instead of the host's ``compute_loss``. Only ``SFTTrainer`` trains with that loss; DPO, GRPO,
  KTO, RLOO, reward and distillation trainers have objectives of their own, which the loss slot would silently
  replace. They are refused (:func:`check_loss_host`) when the trainer is wired, before training starts.
* **Flags that collide with the recipe.** ``use_liger_kernel=True`` swaps in Liger's fused linear cross-entropy,
  a second replacement of the LM-head loss; a TRL ``peft_config`` wraps the model in a PEFT adapter that a
  recipe ``adapter:`` slot would stack a second one onto (:func:`check_adapter_host`).
* **The metrics SFTTrainer logs.** Its ``compute_loss`` appends ``entropy`` and ``mean_token_accuracy`` per
  micro-batch to ``trainer._metrics[mode]`` and sets ``num_tokens``; a loss technique replaces that method, so
  :class:`SFTMetricsSink` appends the same values, computed by the fused loss (see
  :class:`hf_memkit.ops.linear_cross_entropy.TokenStats`), in the same structure. Verified against TRL 1.16.

Nothing here imports ``trl``: a trainer is recognised by the module of the classes in its MRO, so a run without
TRL installed never pays for it.
"""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError

#: TRL trainers whose training loss is the next-token cross-entropy over the labels (a ``loss:`` technique
#: computes exactly that). Subclasses of these count too.
NEXT_TOKEN_CE_TRAINERS = ("SFTTrainer",)

#: what the other TRL trainers optimise instead, for the refusal message
_OBJECTIVES = {
    "DPOTrainer": "a preference loss on the log-probability ratios of chosen and rejected completions against a "
                  "reference model",
    "GRPOTrainer": "a policy-gradient loss on the per-token log-probabilities of sampled completions",
    "RLOOTrainer": "a policy-gradient (REINFORCE leave-one-out) loss on the log-probabilities of sampled completions",
    "KTOTrainer": "a prospect-theoretic loss on the log-probability ratios of desirable and undesirable completions",
    "RewardTrainer": "a pairwise ranking loss on the scores of a sequence-classification head",
    "DistillationTrainer": "a divergence between the student's and the teacher's token distributions",
}


def trl_trainer_name(trainer: Any) -> str | None:
    """The name of the first TRL class in the trainer's MRO (``SFTTrainer`` for a user subclass of it), or None
    when the trainer is not a TRL trainer."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "trl" and klass.__name__.endswith("Trainer"):
            return klass.__name__
    return None


def check_loss_host(trainer: Any, key: str) -> None:
    """Refuse a ``loss:`` technique the host cannot take: a TRL trainer whose objective is not next-token
    cross-entropy, or ``use_liger_kernel=True`` (any host: Liger replaces the same loss)."""
    name = trl_trainer_name(trainer)
    if name is not None and name not in NEXT_TOKEN_CE_TRAINERS:
        objective = _OBJECTIVES.get(name, "an objective of its own")
        raise RecipeError(
            f"{key} replaces the trainer's loss with the next-token cross-entropy of the labels, but TRL's {name} "
            f"trains with {objective}; the recipe would silently train a different objective",
            key=key,
            fix=f"remove the loss slot from the recipe for {name} (the adapter, optimizer and other slots still "
                f"apply); a loss slot fits {', '.join(NEXT_TOKEN_CE_TRAINERS)} and the stock Trainer",
        )
    args = getattr(trainer, "args", None)
    if getattr(args, "use_liger_kernel", False):
        raise RecipeError(
            f"use_liger_kernel=True and the recipe's {key} both replace the LM-head cross-entropy (Liger with its own "
            "fused linear cross-entropy); only one can compute the loss",
            key=key,
            fix=f"set use_liger_kernel=False in the trainer's arguments, or remove the loss slot ({key}) from the "
                "recipe",
        )


def check_adapter_host(model: Any, recipe: Any, peft_config: Any = None) -> None:
    """Refuse a recipe ``adapter:`` on a model that already carries a PEFT adapter, or that a TRL trainer will
    wrap with its ``peft_config=...``: two adapters would stack. Called before the recipe patches the model."""
    adapters = recipe.slot("adapter") if recipe is not None else []
    if not adapters or (peft_config is None and not _is_peft_model(model)):
        return
    name = adapters[0].name
    configs = getattr(model, "peft_config", {}) if peft_config is None else {"": peft_config}
    have = ", ".join(sorted(type(c).__name__ for c in configs.values())) or "a PEFT adapter"
    raise RecipeError(
        f"the model already carries a PEFT adapter ({have}: the TRL trainer's peft_config=..., or a PeftModel passed "
        f"in) and the recipe's adapter.{name} would stack a second adapter on it",
        path=getattr(recipe, "source", None),
        key=f"adapter.{name}",
        fix=f"drop peft_config from the TRL trainer and let the recipe's adapter.{name} add the adapter, or remove "
            "the adapter slot from the recipe and keep TRL's peft_config",
    )


def _is_peft_model(model: Any) -> bool:
    import sys

    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


class SFTMetricsSink:
    """Appends what ``SFTTrainer.compute_loss`` logs per micro-batch, from a fused loss's TokenStats: the same
    keys, the same gathering across processes and the same arithmetic (TRL 1.16, sft_trainer.py)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def record(self, stats: Any, inputs: dict) -> None:
        import torch

        trainer = self.trainer
        if not hasattr(trainer, "_metrics") or not hasattr(trainer, "_total_train_tokens"):
            return  # a TRL version that keeps its metrics elsewhere: nothing to feed
        mode = "train" if trainer.model.training else "eval"
        gather = trainer.accelerator.gather_for_metrics
        num_valid = gather(stats.count).sum()
        # TRL sums fp32 per-token entropies; the statistics are fp32 already (fp64 only for fp64 models)
        entropy_sum = gather(stats.entropy_sum.detach().float()).sum()
        num_correct = gather(stats.correct).sum()
        metrics = trainer._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:  # padding-free batches carry no attention mask
                ids = inputs["position_ids"]
                tokens = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
            else:
                raise RecipeError(
                    "the batch has neither attention_mask nor position_ids, so SFTTrainer's num_tokens cannot be "
                    "counted",
                    fix="use SFTTrainer's own data collator (it sets one of them)",
                )
            trainer._total_train_tokens += tokens // getattr(trainer, "_tp_size", 1)
        metrics["num_tokens"] = [trainer._total_train_tokens]


def metrics_sink(trainer: Any) -> SFTMetricsSink | None:
    """The sink for a host that logs token metrics from its loss (TRL's SFTTrainer and subclasses), else None."""
    # by class only: under the launcher the wiring runs inside Trainer.__init__, before SFTTrainer creates
    # `_metrics`, so the sink looks for it when it records
    if trl_trainer_name(trainer) not in NEXT_TOKEN_CE_TRAINERS:
        return None
    return SFTMetricsSink(trainer)
