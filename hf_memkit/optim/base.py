"""What every optimizer technique shares: the recipe's optimizer slot replaces TrainingArguments.optim, and
parameters are grouped as the Trainer groups them (no weight decay on biases and norms)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import RecipeError
from ..technique import Technique, ValidationContext


class OptimizerTechnique(Technique):
    slot: ClassVar[str] = "optimizer"
    conflicts: ClassVar[dict[str, str]] = {
        "training_args:optim": "the recipe's optimizer slot already chooses the optimizer; "
        "TrainingArguments.optim would be ignored",
    }

    def validate(self, ctx: ValidationContext) -> None:
        if ctx.trainer_has_optimizer:
            raise RecipeError(
                f"the Trainer was given an optimizer (optimizers=... or optimizer_cls_and_kwargs=...) and the "
                f"recipe names {self.name!r} too",
                path=getattr(ctx.recipe, "source", None),
                key=f"optimizer.{self.name}",
                fix="drop the optimizer slot from the recipe, or stop passing an optimizer to the Trainer",
            )

    #: what the optimizer keeps per parameter, for the start-of-training block
    state_description: ClassVar[str] = "fp32 moments"

    def describe(self, model: Any, optimizer: Any = None) -> str:
        from ..integrations.describe import optimizer_line

        return optimizer_line(optimizer, self.state_description)

    def hyperparameters(self, args: Any) -> dict[str, Any]:
        """lr and weight decay: the config's value when set, else TrainingArguments' (so schedulers and
        `--learning_rate` keep working)."""
        cfg = self.config
        lr = cfg.lr if cfg.lr is not None else getattr(args, "learning_rate", 1e-3)
        wd = cfg.weight_decay if cfg.weight_decay is not None else getattr(args, "weight_decay", 0.0)
        return {"lr": lr, "weight_decay": wd}

    def param_groups(self, model: Any, weight_decay: float) -> list[dict[str, Any]]:
        from ..integrations.trainer_utils import decay_parameter_groups

        return decay_parameter_groups(model, weight_decay)
