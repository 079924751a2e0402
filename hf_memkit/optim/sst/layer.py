"""The SST layer: an ``nn.Linear`` re-parameterised as W = U·diag(Σ)·Vᵀ, and the reversible patch.

Layout (memory-efficient, as the paper's "time-sharing"): Σ (k = min(m, n) values, spectral order) is one
trainable vector; the r active singular-vector pairs are trainable ``u_active`` (m×r) and ``v_active`` (n×r);
the other k−r pairs sit in non-persistent buffers ``u_frozen``/``v_frozen``; ``perm`` lists the spectral
indices of the active columns first. Only the active pairs and Σ have gradients and optimizer state.

The backward pass (a custom autograd function that saves only the input, like ``nn.Linear``) returns the
*enhanced* gradients of the paper: ∂̃U_i = G·V_i and ∂̃V_i = Gᵀ·U_i, i.e. without the Σ_i factor, where
G = ∂L/∂W; and ∂Σ_i = U_iᵀ·G·V_i for every i.

Saving: ``state_dict()`` of an :class:`SSTLinear` yields the merged ``weight`` (and ``bias``), so
``save_pretrained`` and every Trainer checkpoint write a plain model that ``from_pretrained`` loads without
hf_memkit. Loading a ``weight`` keeps the factors when it equals their product (the resume path: the
technique's checkpoint state restored them first), else re-factorises it by SVD.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import IncompatibleModelError
from ...technique import PatchHandle


class _SSTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sigma, u_a, v_a, u_f, v_f, idx_a, idx_f):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xc = x.to(dt)
            s = sigma.to(dt)
            out = ((xc @ v_a.to(dt)) * s[idx_a]) @ u_a.to(dt).mT
            if u_f.shape[1]:
                out = out + ((xc @ v_f.to(dt)) * s[idx_f]) @ u_f.to(dt).mT
        ctx.save_for_backward(xc, sigma, u_a, v_a, u_f, v_f, idx_a, idx_f)
        ctx.dt = dt
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        xc, sigma, u_a, v_a, u_f, v_f, idx_a, idx_f = ctx.saved_tensors
        dt = ctx.dt
        need_x, need_s, need_u, need_v = ctx.needs_input_grad[:4]
        with torch.autocast(dout.device.type, enabled=False):
            g = dout.to(dt).reshape(-1, dout.shape[-1])
            x = xc.reshape(-1, xc.shape[-1])
            s = sigma.to(dt)
            ua, va = u_a.to(dt), v_a.to(dt)
            za, ba = x @ va, g @ ua
            dx = (ba * s[idx_a]) @ va.mT if need_x else None
            d_sigma = torch.zeros(sigma.shape, dtype=dt, device=sigma.device) if need_s else None
            if need_s:
                d_sigma[idx_a] = (za * ba).sum(0)
            if u_f.shape[1] and (need_x or need_s):
                uf, vf = u_f.to(dt), v_f.to(dt)
                zf, bf = x @ vf, g @ uf
                if need_s:
                    d_sigma[idx_f] = (zf * bf).sum(0)
                if need_x:
                    dx = dx + (bf * s[idx_f]) @ vf.mT
            du = (g.mT @ za).to(u_a.dtype) if need_u else None  # enhanced: G·V_a (no Σ factor)
            dv = (x.mT @ ba).to(v_a.dtype) if need_v else None  # enhanced: Gᵀ·U_a
        if dx is not None:
            dx = dx.reshape(*dout.shape[:-1], x.shape[-1]).to(ctx.x_dtype)
        if d_sigma is not None:
            d_sigma = d_sigma.to(sigma.dtype)
        return dx, d_sigma, du, dv, None, None, None, None


class SSTLinear(nn.Module):
    """y = x·V·diag(Σ)·Uᵀ + b with the active/frozen split described in the module docstring."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: nn.Parameter | None = None,
                 dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        k = min(in_features, out_features)
        r = min(rank, k)
        kw = dict(dtype=dtype, device=device)
        self.sigma = nn.Parameter(torch.zeros(k, **kw))
        self.u_active = nn.Parameter(torch.zeros(out_features, r, **kw))
        self.v_active = nn.Parameter(torch.zeros(in_features, r, **kw))
        self.register_buffer("u_frozen", torch.zeros(out_features, k - r, **kw), persistent=False)
        self.register_buffer("v_frozen", torch.zeros(in_features, k - r, **kw), persistent=False)
        self.register_buffer("perm", torch.arange(k, device=device), persistent=False)
        self.bias = bias
        #: set by the optimizer's first step; until then remove() gives back the untouched original Linear
        self.trained = False
        object.__setattr__(self, "_original", None)

    @property
    def rank(self) -> int:
        return self.u_active.shape[1]

    @property
    def k(self) -> int:
        return self.sigma.shape[0]

    # --- factors ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def full_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U m×k, Σ k, V n×k) in spectral order, fp32."""
        r, perm = self.rank, self.perm
        u = torch.empty(self.out_features, self.k, dtype=torch.float32, device=self.sigma.device)
        v = torch.empty(self.in_features, self.k, dtype=torch.float32, device=self.sigma.device)
        u[:, perm[:r]] = self.u_active.float()
        u[:, perm[r:]] = self.u_frozen.float()
        v[:, perm[:r]] = self.v_active.float()
        v[:, perm[r:]] = self.v_frozen.float()
        return u, self.sigma.float(), v

    @torch.no_grad()
    def set_factors_(self, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor,
                     active: torch.Tensor | None = None) -> None:
        """Write spectral-order factors; ``active`` (r spectral indices) defaults to the current active set.
        Parameters keep their identity (the optimizer holds them)."""
        k, r = self.k, self.rank
        active = (self.perm[:r] if active is None else active).to(self.perm.device)
        mask = torch.ones(k, dtype=torch.bool, device=self.perm.device)
        mask[active] = False
        rest = torch.arange(k, device=self.perm.device)[mask]
        self.perm.copy_(torch.cat([active, rest]))
        self.sigma.copy_(sigma)
        self.u_active.copy_(u[:, active])
        self.v_active.copy_(v[:, active])
        self.u_frozen.copy_(u[:, rest])
        self.v_frozen.copy_(v[:, rest])

    @torch.no_grad()
    def set_active_(self, active: torch.Tensor) -> None:
        """Swap columns so that the spectral indices ``active`` become the trainable pairs."""
        u, s, v = self.full_factors()
        self.set_factors_(u, s, v, active)

    @torch.no_grad()
    def factorize_(self, weight: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """(U, Σ, V) = SVD(weight) in fp32."""
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        self.set_factors_(u, s, vh.mT, active)

    @torch.no_grad()
    def resvd_(self) -> None:
        """Re-orthogonalise: (U, Σ, V) ← SVD(U·diag(Σ)·Vᵀ), keeping the active spectral positions."""
        self.factorize_(self.merged_weight(torch.float32))

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        r = self.rank
        s = self.sigma.float()
        w = (self.u_active.float() * s[self.perm[:r]]) @ self.v_active.float().mT
        if self.k > r:
            w += (self.u_frozen.float() * s[self.perm[r:]]) @ self.v_frozen.float().mT
        return w.to(dtype or self.sigma.dtype)

    def mark_trained_(self) -> None:
        """The factors now differ from the original weight: release its storage (remove() will merge)."""
        if self.trained:
            return
        self.trained = True
        original = self._original
        if original is not None:
            original.weight.data = torch.empty(0, dtype=original.weight.dtype, device=original.weight.device)

    # --- nn.Module -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        out = _SSTFunction.apply(x, self.sigma, self.u_active, self.v_active, self.u_frozen, self.v_frozen,
                                 self.perm[:r], self.perm[r:])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.merged_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias is not None:
            shapes["bias"] = tuple(self.bias.shape)
        for name, shape in shapes.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the SST layer stands for shape {shape}")
            elif name == "bias":
                with torch.no_grad():
                    self.bias.copy_(value)
            else:
                self.load_merged_weight_(value)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in shapes:
                    unexpected_keys.append(key)

    @torch.no_grad()
    def load_merged_weight_(self, weight: torch.Tensor) -> None:
        """Keep the factors if their product equals ``weight`` (to the checkpoint's precision), else SVD it."""
        weight = weight.to(self.sigma.device)
        current = self.merged_weight(torch.float32).to(weight.dtype)
        scale = float(current.abs().max()) if current.numel() else 0.0
        tol = (1e-6 if weight.dtype == torch.float32 else 1e-2) * max(scale, 1e-30)
        if torch.equal(current, weight) or float((current - weight).abs().max()) <= tol:
            return
        self.factorize_(weight)
        self.mark_trained_()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"active_rank={self.rank}, bias={self.bias is not None}")


def sampling_probabilities(sigma: torch.Tensor, distribution: str) -> torch.Tensor:
    """p(i) over the k singular values (fp32, on sigma's device).

    * ``mixed``: ½·(1/k + Σ_i/ΣΣ_j), the uniform/proportional mixture of the detailed summary of the paper;
    * ``proportional``: Σ_i/ΣΣ_j ("multinomial weighted by singular-value magnitude", the abstract);
    * ``uniform``: 1/k.
    Σ is clamped at 0; an all-zero Σ falls back to uniform.
    """
    s = sigma.detach().float().clamp_min(0)
    k = s.numel()
    uniform = torch.full_like(s, 1.0 / k)
    total = s.sum()
    proportional = s / total if float(total) > 0 else uniform
    if distribution == "uniform":
        return uniform
    if distribution == "proportional":
        return proportional
    if distribution == "mixed":
        return 0.5 * (uniform + proportional)
    raise ValueError(f"unknown SST sampling distribution {distribution!r}; use mixed, proportional or uniform")


def sample_active(sigma: torch.Tensor, r: int, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """r distinct spectral indices drawn by multinomial sampling without replacement (on CPU, ``generator``).
    Zero-probability values get a floor of 1e-12 of the mass so that r can always be drawn."""
    p = sampling_probabilities(sigma, distribution).cpu().double()
    p = p.clamp_min(1e-12 * float(p.sum()))
    return torch.multinomial(p, r, replacement=False, generator=generator)


def factorize_linears_(model: nn.Module, target_modules: "str | list[str]" = "all-linear", rank: int = 64, *,
                       distribution: str = "mixed", seed: int = 0, key: str = "optimizer.sst") -> PatchHandle:
    """Replace the selected ``nn.Linear`` layers of ``model`` by :class:`SSTLinear` (SVD-initialised, r active
    pairs drawn from ``distribution``). The handle's ``remove()`` puts the original Linear modules back:
    untouched (bit for bit) if no optimizer step ran, else holding the merged trained weight."""
    from ...integrations.patching import parent_of, swap_module, unswap_module
    from ..common.targets import resolve_target_linears

    if rank < 1:
        raise ValueError(f"SST rank must be at least 1 (got {rank})")
    sampling_probabilities(torch.ones(1), distribution)  # validates the name
    if any(isinstance(m, SSTLinear) for m in model.modules()):
        raise IncompatibleModelError(
            f"{key}: the model already carries SST layers; remove the earlier patch (handle.remove()) first")
    targets = resolve_target_linears(model, target_modules, key=key, exact_type=True)
    generator = torch.Generator().manual_seed(seed)
    records: list[tuple[nn.Module, str, nn.Linear, SSTLinear]] = []
    seen: set[int] = set()
    for name, linear in targets:
        if id(linear) in seen:
            continue
        seen.add(id(linear))
        w = linear.weight
        layer = SSTLinear(linear.in_features, linear.out_features, rank, bias=linear.bias, dtype=w.dtype,
                          device=w.device)
        layer.factorize_(w)
        layer.set_active_(sample_active(layer.sigma, layer.rank, distribution, generator))
        object.__setattr__(layer, "_original", linear)
        parent, attr = parent_of(model, name)
        swap_module(parent, attr, layer, "sst")
        records.append((parent, attr, linear, layer))

    def undo() -> nn.Module:
        for parent, attr, linear, layer in reversed(records):
            if layer.trained:
                linear.weight.data = layer.merged_weight(linear.weight.dtype).detach()
            elif linear.weight.device != layer.sigma.device:
                linear.to(layer.sigma.device)
            object.__setattr__(layer, "_original", None)
            unswap_module(parent, attr, linear, "sst")
        return model

    handle = PatchHandle(model, undo)
    handle.layers = sst_layers(model)
    return handle


def sst_layers(model: nn.Module) -> dict[str, SSTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SSTLinear)}


#: what a resume needs beyond the merged weights: the factors, their active/frozen split and the perm
FACTOR_FIELDS = ("sigma", "u_active", "v_active", "u_frozen", "v_frozen", "perm")


def factor_state_dict(layers: dict[str, SSTLinear]) -> dict[str, torch.Tensor]:
    """``{"<layer>.<field>": tensor}`` for every layer (the model's own state_dict holds merged weights)."""
    return {f"{name}.{f}": getattr(layer, f).detach() for name, layer in layers.items() for f in FACTOR_FIELDS}


def load_factor_state_dict_(layers: dict[str, SSTLinear], state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`factor_state_dict` output in place (parameter identities kept); raises CheckpointError
    when a layer's entry is missing or shaped differently."""
    from ...errors import CheckpointError

    for name, layer in layers.items():
        for f in FACTOR_FIELDS:
            key = f"{name}.{f}"
            if key not in state:
                raise CheckpointError(
                    f"the SST state lacks {key!r}: it was written with other target_modules or rank. Resume with "
                    "the checkpoint's recipe (memkit_state/state.json holds it)")
            target = getattr(layer, f)
            if tuple(state[key].shape) != tuple(target.shape):
                raise CheckpointError(
                    f"SST state {key!r} has shape {tuple(state[key].shape)} but the layer needs "
                    f"{tuple(target.shape)}; resume with the rank and target_modules the checkpoint used")
            with torch.no_grad():
                target.copy_(state[key])
        layer.mark_trained_()
