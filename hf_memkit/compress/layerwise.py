"""Block-by-block driver: capture what the first decoder block receives, then walk the blocks one at a time.

A pass that needs activations (GPTQ, Block-AP) never runs the whole model on the calibration set more than once:
it records block 0's inputs (hidden states plus the keyword arguments the model passes every block: attention
mask, rotary embeddings, positions), then for each block runs it alone, so the working memory beyond the model
is the calibration hidden states plus one block's statistics. The blocks are found by the one model
anatomy (:mod:`hf_memkit.integrations.anatomy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .calibration import CalibrationData


class _StopForward(Exception):
    """Raised by the capture hook: nothing after block 0 needs to run."""


def find_blocks(model: Any, key: str = "compress") -> tuple[str, list[Any]]:
    """``(dotted path, blocks)`` of the decoder layers, from the one model anatomy."""
    from ..integrations.anatomy import anatomy

    try:
        layers = anatomy(model, key=key).layers
    except IncompatibleModelError as e:
        raise IncompatibleModelError(
            f"{e}. The calibrated passes (gptq, block_ap) walk the decoder blocks one at a time; rtn needs no "
            "calibration and no blocks"
        ) from None
    return layers.path, layers.modules


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block and the keyword arguments of the call."""

    hidden: list["torch.Tensor"] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def model_device(model: Any) -> "torch.device":
    return next(model.parameters()).device


def capture_block_inputs(model: Any, block: Any, calib: "CalibrationData") -> BlockInputs:
    import torch

    captured = BlockInputs()

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        kwargs.pop("hidden_states", None)
        captured.kwargs.append(kwargs)
        raise _StopForward

    device = model_device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calib.batches:
                inputs = {k: v.to(device) for k, v in batch.items()}
                try:
                    model(**inputs, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        model.train(was_training)
    if len(captured.hidden) != len(calib.batches):
        raise IncompatibleModelError(
            f"the model's forward never reached its decoder block {type(block).__name__}; calibrated passes need "
            "a model whose forward runs its blocks in order"
        )
    return captured


def run_block(block: Any, hidden: "torch.Tensor", kwargs: dict[str, Any]) -> "torch.Tensor":
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_outputs(block: Any, inputs: BlockInputs) -> list["torch.Tensor"]:
    import torch

    with torch.no_grad():
        return [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
