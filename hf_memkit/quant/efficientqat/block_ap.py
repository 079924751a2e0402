"""Block-AP driver: train one decoder block at a time against its full-precision outputs.

Two streams of hidden states run through the blocks: ``fp`` (what the unquantized model computes; block ``l``'s
fp outputs are its training targets and block ``l+1``'s fp inputs) and ``quant`` (what the already-quantized
blocks produce; the block being trained reads these, so it learns to correct its predecessors' errors too).
Blocks whose parameters are not fp32 train in fp32 and are cast back (the reference trains an fp32 master copy
under AMP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..progress import blocks_progress
from ...compress.layerwise import BlockInputs, block_outputs, capture_block_inputs, find_blocks, run_block
from ...compress.linear import set_quantized_
from ...integrations.patching import stand_ins
from .quantizer import FakeQuantLinear, quant_params

if TYPE_CHECKING:  # pragma: no cover
    from ...compress.calibration import CalibrationData
    from ...compress.passes import PassReport

logger = logging.getLogger("hf_memkit")


def _slice(value: Any, i: int, j: int, rows: int) -> Any:
    """A keyword argument restricted to batch rows ``i:j`` (tensors whose first dim is the batch)."""
    if isinstance(value, torch.Tensor):
        return value[i:j] if value.dim() and value.shape[0] == rows and rows > 1 else value
    if isinstance(value, tuple):
        return tuple(_slice(v, i, j, rows) for v in value)
    return value


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _cosine(total: int, floor: float = 1 / 20) -> Callable[[int], float]:
    return lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total) / max(total, 1)))


def _block_mse(block: Any, xs: list, kws: list, ys: list) -> float:
    with torch.no_grad():
        err = sum(F.mse_loss(run_block(block, x, kw), y, reduction="sum").item() for x, kw, y in zip(xs, kws, ys))
    return err / max(sum(y.numel() for y in ys), 1)


def block_ap_(model: Any, targets: dict[str, Any], config: Any, calibration: "CalibrationData",
              report: "PassReport", on_layer: Callable | None, key: str) -> None:
    spec = config.spec()
    prefix, blocks = find_blocks(model, key)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # no dropout: the targets are deterministic
    model.requires_grad_(False)
    rng = random.Random(config.seed)
    try:
        captured = capture_block_inputs(model, blocks[0], calibration)
        fp_in = captured.hidden
        quant_in = list(fp_in)
        kwargs = captured.kwargs
        for bi, block in enumerate(blocks_progress(blocks, "Block-AP", len(blocks))):
            mine = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{bi}.")}
            fp_out = block_outputs(block, BlockInputs(fp_in, kwargs))
            if mine:
                entry = _train_block(model, block, mine, spec, config, quant_in, kwargs, fp_out, rng, on_layer,
                                     report)
                entry["block"] = bi
                report.blocks.append(entry)
                logger.debug("hf_memkit: %s: block %d/%d: mse %.3g (RTN init) -> %.3g", key, bi + 1, len(blocks),
                             entry["mse_rtn_init"], entry["mse_trained_fakequant"])
            quant_in = block_outputs(block, BlockInputs(quant_in, kwargs))
            fp_in = fp_out
        rest = [n for n in targets if not any(n.startswith(f"{prefix}.{bi}.") for bi in range(len(blocks)))]
        if rest:
            from ..pipeline import _rtn_pass_

            _rtn_pass_({n: targets[n] for n in rest}, _RTNView(config), report, on_layer)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


class _RTNView:
    """Block-AP's grid settings as RTN sees them (for Linear layers outside the decoder blocks)."""

    def __init__(self, config: Any):
        self._c = config
        self.mse = False

    def spec(self):
        return self._c.spec()


def _train_block(model, block, mine, spec, config, quant_in, kwargs, fp_out, rng, on_layer, report) -> dict:
    dtype = next(block.parameters()).dtype
    w0 = {n: m.weight.detach().clone() for n, m in mine.items()} if on_layer else {}
    if dtype != torch.float32:
        block.float()
    fq = {n: FakeQuantLinear(m, spec) for n, m in mine.items()}
    # the block trains with fake-quantized stand-ins of its Linears (they read the Linear's weight, not its
    # forward: another technique's patches on it do not take part in the pass) and gets its Linears back after it
    swap = contextlib.ExitStack()
    swap.enter_context(stand_ins(model, fq))
    xs = [h.float() for h in quant_in]
    ys = [y.float() for y in fp_out]
    kws = [{k: _cast(v, torch.float32) for k, v in kw.items()} for kw in kwargs]
    try:
        weights = [f.weight for f in fq.values()]
        if config.train_norms:
            fq_params = {id(p) for f in fq.values() for p in f.parameters()}
            weights += [p for n, p in block.named_parameters() if "weight" in n.split(".")[-1]
                        and id(p) not in fq_params]
        lr_w = config.weight_lr()
        groups = [{"params": quant_params(list(fq.values())), "lr": config.lr_quant}]
        if lr_w > 0:
            groups.append({"params": weights, "lr": lr_w})
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        init = _block_mse(block, xs, kws, ys)
        steps = [(k, i, min(i + config.batch_size, xs[k].shape[0]))
                 for k in range(len(xs)) for i in range(0, xs[k].shape[0], config.batch_size)]
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        total = config.epochs * len(steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total))
        last = []
        with torch.enable_grad():
            for epoch in range(config.epochs):
                rng.shuffle(steps)
                for k, i, j in steps:
                    rows = xs[k].shape[0]
                    kw = {a: _slice(v, i, j, rows) for a, v in kws[k].items()}
                    loss = F.mse_loss(run_block(block, xs[k][i:j], kw), ys[k][i:j])
                    loss.backward()
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    if epoch == config.epochs - 1:
                        last.append(loss.item())
        for p in block.parameters():
            p.requires_grad_(False)
        final = _block_mse(block, xs, kws, ys)
        codes = {n: f.final_weight(dtype) for n, f in fq.items()}  # before any cast back: round the fp32 weights
    finally:
        swap.close()
        if dtype != torch.float32:
            block.to(dtype)
    for n, m in mine.items():
        set_quantized_(m, codes[n])
        report.layers[n] = {"shape": list(m.weight.shape)}
        if on_layer:
            on_layer(n, m, w0[n])
    return {"mse_rtn_init": init, "mse_trained_fakequant": final, "mean_loss_last_epoch": sum(last) / max(len(last), 1)}
