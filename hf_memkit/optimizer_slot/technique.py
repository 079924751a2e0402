"""What every optimizer technique shares: the recipe's optimizer slot replaces TrainingArguments.optim,
parameters are grouped as the Trainer groups them (no weight decay on biases and norms), and the
``gradient_release`` option (:mod:`hf_memkit.optimizer_slot.release`) for configs that declare it."""

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

    #: why gradient release cannot drive this optimizer (its math is not per parameter); None: it can
    release_refusal: ClassVar[str | None] = None

    @property
    def releases(self) -> bool:
        """``gradient_release: true`` in this technique's config."""
        return bool(getattr(self.config, "gradient_release", False))

    def validate(self, ctx: ValidationContext) -> None:
        if self.releases:
            from .release.wiring import validate_release

            validate_release(self, ctx)
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

        if not self.releases:
            return optimizer_line(optimizer, self.state_description)
        from .release.optimizer import find_release
        from .release.wiring import describe_release

        release = find_release(optimizer)
        inner = release.optimizer if release is not None else optimizer
        return optimizer_line(inner, self.state_description) + describe_release(optimizer)

    # gradient release ----------------------------------------------------------------------------------------
    def bind_trainer(self, trainer: Any) -> None:
        if self.releases:
            from .release.wiring import bind_release

            bind_release(self, trainer)

    def wrap_optimizer(self, optimizer: Any, model: Any, args: Any) -> Any:
        if not self.releases:
            return optimizer
        from .release.wiring import wrap_release

        return wrap_release(self, optimizer, args)

    def estimate_gradient_release(self, mem: Any) -> None:
        """Called at the end of each ``estimate``: with release, gradients alive at once are one tensor's."""
        if self.releases:
            from .release.wiring import estimate_release

            estimate_release(self, mem)

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
