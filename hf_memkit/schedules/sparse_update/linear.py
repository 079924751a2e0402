"""The channel-sparse Linear: ``y = x · W_effᵀ (+ b)`` where ``W_eff`` is the frozen weight with the selected input
columns replaced by a small trainable slice.

Only the slice (out × k) gets a gradient and optimizer state; only the selected input channels ``x[..., idx]``
(tokens × k) are saved for backward — the frozen weight is a parameter (saved by reference) and ``W_eff`` is
rebuilt in backward instead of being kept. With ``quantized`` the frozen part is the int8 weight ``s ⊙ W̄`` and
the slice holds int8 units (fp32, rounded straight-through in the forward), its gradient rescaled by QAS.

:class:`LinearPatch` installs this on an ``nn.Linear`` reversibly: a parameter ``sparse_update_weight``, buffers
for the indices (and the int8 weight and scales), an instance ``forward``, and state-dict hooks so that the model
still saves and loads as the plain model with the slice folded into ``weight`` (checkpoints stay loadable by
``from_pretrained``; resuming refills the slice from the saved weight).
"""

from __future__ import annotations

from typing import Any

from .quantize import dequantize, qas_scale_, quantize_per_channel, round_to_grid

SLICE = "sparse_update_weight"
INDEX = "sparse_update_index"
QWEIGHT = "sparse_update_qweight"
SCALE = "sparse_update_scale"


def _effective_weight(weight, index, slice_, qweight, scale, dtype):
    import torch

    with torch.no_grad():
        if qweight is None:
            w = weight.detach().to(dtype, copy=True)
            w[:, index] = slice_.detach().to(dtype)
        else:
            w = dequantize(qweight, scale)
            w[:, index] = round_to_grid(slice_.detach().float()) * scale[:, None]
            w = w.to(dtype)
    return w


def _compute_dtype(x):
    import torch

    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _function():
    import torch

    class SparseChannelLinear(torch.autograd.Function):
        """Inputs: x, weight (frozen), index (k,), slice (out×k, trainable), qweight, scale, qas."""

        @staticmethod
        def forward(ctx, x, weight, index, slice_, qweight, scale, qas):
            dtype = _compute_dtype(x)
            with torch.autocast(x.device.type, enabled=False):
                w = _effective_weight(weight, index, slice_, qweight, scale, dtype)
                y = torch.nn.functional.linear(x.to(dtype), w)
                x_sel = x.index_select(-1, index).to(dtype)
            ctx.save_for_backward(x_sel, weight, index, slice_, qweight, scale)
            ctx.qas = qas
            return y

        @staticmethod
        def backward(ctx, grad_y):
            x_sel, weight, index, slice_, qweight, scale = ctx.saved_tensors
            grad_x = grad_slice = None
            if ctx.needs_input_grad[0]:
                w = _effective_weight(weight, index, slice_, qweight, scale, grad_y.dtype)
                grad_x = grad_y @ w
            if ctx.needs_input_grad[3]:
                out = grad_y.shape[-1]
                g = grad_y.reshape(-1, out).t().float() @ x_sel.reshape(-1, x_sel.shape[-1]).float()  # G_W[:, idx]
                if qweight is not None:
                    g.mul_(scale[:, None])  # chain rule through W = s ⊙ W̄: G_W̄ = s · G_W
                    if ctx.qas:
                        qas_scale_(g, scale)
                grad_slice = g.to(slice_.dtype)
            return grad_x, None, None, grad_slice, None, None, None

    return SparseChannelLinear


_FN = None


def sparse_channel_linear(x, weight, index, slice_, qweight=None, scale=None, qas=True):
    global _FN
    if _FN is None:
        _FN = _function()
    return _FN.apply(x, weight, index, slice_, qweight, scale, qas)


def _forward(module, x):
    y = sparse_channel_linear(x, module.weight, getattr(module, INDEX), getattr(module, SLICE),
                              getattr(module, QWEIGHT, None), getattr(module, SCALE, None), module._sparse_update_qas)
    return y + module.bias if module.bias is not None else y


def select_channels(weight: Any, k: int) -> Any:
    """Indices (sorted, int64) of the ``k`` input channels with the largest L2 norm (the paper's ``magnitude+``)."""
    import torch

    norms = weight.detach().float().norm(dim=0)
    top = torch.topk(norms, k, largest=True, sorted=False).indices if k > 0 else norms.new_zeros(0, dtype=torch.long)
    return torch.sort(top).values.to(torch.long)


class LinearPatch:
    """The reversible patch of one ``nn.Linear``. ``set_channels`` (re)selects the update columns (an empty
    selection is allowed: the budget planner fills it later), ``merge_`` folds the slice into ``weight``."""

    def __init__(self, module: Any, quantized: bool, qas: bool):
        import torch

        self.module = module
        self.quantized = quantized
        w = module.weight
        if quantized:
            q, s = quantize_per_channel(w)
            module.register_buffer(QWEIGHT, q, persistent=False)
            module.register_buffer(SCALE, s, persistent=False)
        module.register_buffer(INDEX, torch.zeros(0, dtype=torch.long, device=w.device), persistent=False)
        slice_dtype = torch.float32 if quantized else w.dtype
        # empty until set_channels; trainable already, so that an optimizer built before the selection (budget
        # mode chooses it at on_train_begin) holds the Parameter object
        module.register_parameter(SLICE, torch.nn.Parameter(torch.zeros(w.shape[0], 0, dtype=slice_dtype,
                                                                         device=w.device)))
        module._sparse_update_qas = qas
        from ...integrations.patching import Part, claim

        claim(module, "forward", Part("sparse_update", fn=_forward))  # the patching layer: refuses a second owner
        # plain functions: torch tags hooks with attributes, which bound methods do not take
        self._hooks = [module.register_state_dict_post_hook(lambda *a: self._save_hook(*a)),
                       module.register_load_state_dict_pre_hook(lambda *a: self._load_hook(*a))]
        self.restored_slice: Any = None  # exact slice restored from technique state (quantized resume)

    # selection --------------------------------------------------------------------------------------------
    @property
    def index(self) -> Any:
        return getattr(self.module, INDEX)

    @property
    def slice(self) -> Any:
        return getattr(self.module, SLICE)

    def set_channels(self, index: Any) -> None:
        import torch

        m = self.module
        index = torch.as_tensor(index, dtype=torch.long, device=m.weight.device)
        setattr(m, INDEX, index)
        with torch.no_grad():
            init = (getattr(m, QWEIGHT).float() if self.quantized else m.weight.detach())[:, index].clone()
        # .data keeps the Parameter object: an optimizer built before the selection still holds it
        self.slice.data = init.to(self.slice.dtype)
        self.slice.requires_grad_(index.numel() > 0)

    # folding ------------------------------------------------------------------------------------------------
    def merged_weight(self) -> Any:
        """The weight of the trained model, or ``None`` while it equals ``weight``. Float: the slice copied into
        its columns (exact). int8: the whole int8 layer ``s ⊙ W̄'`` once any integer moved (that is the model
        that was trained), else the untouched float weight."""
        import torch

        m = self.module
        w = m.weight.detach()
        idx = self.index
        if idx.numel() == 0:
            return None
        with torch.no_grad():
            if not self.quantized:
                cols = self.slice.detach().to(w.dtype)
                if torch.equal(cols, w[:, idx]):
                    return None
                out = w.clone()
                out[:, idx] = cols
                return out
            q = getattr(m, QWEIGHT)
            new = round_to_grid(self.slice.detach().float())
            if torch.equal(new, q[:, idx].float()):
                return None
            full = q.float()
            full[:, idx] = new
            return dequantize(full, getattr(m, SCALE), w.dtype)

    def merge_(self) -> None:
        """Write the trained slice into ``weight``. The int8 buffers stay as they are: the slice remains the
        source of its columns, so training can go on after a merge."""
        import torch

        merged = self.merged_weight()
        if merged is not None:
            with torch.no_grad():
                self.module.weight.copy_(merged)

    def remove(self) -> None:
        """Fold the slice into ``weight`` and restore the plain ``nn.Linear``."""
        self.merge_()
        m = self.module
        for h in self._hooks:
            h.remove()
        for name in (SLICE,):
            delattr(m, name)
        for name in (INDEX, QWEIGHT, SCALE):
            if name in m._buffers:
                del m._buffers[name]
        del m._sparse_update_qas
        from ...integrations.patching import unclaim

        unclaim(m, "forward", "sparse_update")

    # state dict ---------------------------------------------------------------------------------------------
    def _save_hook(self, module, state_dict, prefix, local_metadata):
        state_dict.pop(prefix + SLICE, None)
        merged = self.merged_weight()
        if merged is not None and prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = merged

    def _load_hook(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs):
        """A plain (merged) checkpoint: refill the slice from the loaded weight's selected columns."""
        import torch

        if prefix + SLICE in state_dict or prefix + "weight" not in state_dict:
            return
        idx = self.index
        if self.restored_slice is not None:
            state_dict[prefix + SLICE] = self.restored_slice
            return
        w = state_dict[prefix + "weight"]
        with torch.no_grad():
            if self.quantized:
                cols = round_to_grid(w.float()[:, idx.to(w.device)] / getattr(module, SCALE).to(w.device)[:, None])
            else:
                cols = w[:, idx.to(w.device)]
        state_dict[prefix + SLICE] = cols.to(self.slice.dtype).clone()
