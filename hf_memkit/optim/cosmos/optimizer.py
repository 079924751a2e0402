"""COSMOS (Liu et al. 2025, lliu606/COSMOS): SOAP in the leading eigensubspace of EMA(GᵀG), Muon on the rest.

Pure update functions first (tensors in, tensors out, no optimizer bookkeeping), then :class:`Cosmos`.

For a hidden m×n matrix with gradient G, state M (m×n), P (n×r, orthonormal), S (r×r), Vsq (m×r):

1. M ← β1·M + (1−β1)·G                                              (first moment, an EMA)
2. P, S track the top-r eigenpairs of EMA(GᵀG): SVD at step 1; afterwards one power iteration
   P ← QR(β2·P_old·S + (1−β2)·Gᵀ(G·P_old)) and S rotated into the new basis.
3. Vsq ← β2·Vsq + (1−β2)·(G·P)²                                     (Adam's second moment inside the subspace)
4. G̃ = (β1·M + (1−β1)·G)/(1−β1^{t+1}) with Nesterov, else M/(1−β1^t)
5. U₁ = [(G̃P) / (sqrt(Vsq/(1−β2^t)) + ε)]·Pᵀ                         (SOAP inside the subspace)
6. R = G̃ − G̃PPᵀ; U₂ = sqrt(mn)·NS5(R)/‖NS5(R)‖                        (Muon outside it)
7. U = U₁ + γ·U₂;  W ← W·(1 − lr·wd) − lr·lr_ratio·sqrt(mn)·U/‖U‖_F

so every matrix step has per-element RMS exactly ``lr·lr_ratio`` (before weight decay).

Differences from the reference code, all deliberate:

* Matrices are chosen by role (:func:`~hf_memkit.optim.common.targets.hidden_matrix_names`), not by
  ``size(0) <= 10000``.
* The non-Nesterov path uses the bias-corrected momentum M/(1−β1^t); the reference rescales the raw gradient
  instead, so its momentum is silently unused.
* The AdamW branch uses (1−β1) and 1−β1^t for the configured β1; the reference hard-codes 0.1 and 1−0.9^t.
* The reference keeps M as an un-normalised sum (β1·M + G) and divides by (1−β1^t)/(1−β1); the EMA form here
  is the same quantity and makes its Nesterov formula read as the standard one (identical values).
* Division by ‖NS5(R)‖ and ‖U‖ is guarded: when rank ≥ min(m, n) the residual is exactly zero and the
  reference divides 0 by 0.
* Vsq stays in the coordinates of the current P (as in the reference; P moves slowly, one power step per
  iteration). Not a slip, but worth knowing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...optimizer_slot.fp32_adamw import FP32StateOptimizer, as_fp32, write_back_

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_TINY = 1e-30


def newton_schulz5(x: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quintic Newton–Schulz iteration towards the orthogonal polar factor of ``x`` (Muon's NS5), in ``dtype``,
    after Frobenius normalisation. Returns fp32. A zero input returns zeros."""
    a, b, c = NS_COEFFICIENTS
    y = x.to(dtype)
    tall = y.shape[0] > y.shape[1]
    if tall:
        y = y.mT
    y = y / (y.norm() + 1e-7)
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    if tall:
        y = y.mT
    return y.float()


def init_subspace(grad: torch.Tensor, rank: int, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: P = top-``rank`` right singular vectors of G (eigenvectors of GᵀG), S = (1−β2)·PᵀGᵀGP."""
    _, sv, vh = torch.linalg.svd(grad, full_matrices=False)
    p = vh[:rank].mT.contiguous()
    s = torch.diag((1 - beta2) * sv[:rank] ** 2)
    return p, s


def update_subspace(grad: torch.Tensor, p_old: torch.Tensor, s: torch.Tensor, beta2: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One power iteration of EMA(GᵀG) ≈ β2·P S Pᵀ + (1−β2)·GᵀG on the old basis, QR, and S rotated into
    the new basis: returns (P, S) with PᵀP = I."""
    y = beta2 * (p_old @ s) + (1 - beta2) * (grad.mT @ (grad @ p_old))
    p, _ = torch.linalg.qr(y)
    t = p_old.mT @ p
    gp = grad @ p
    s_new = beta2 * (t.mT @ s @ t) + (1 - beta2) * (gp.mT @ gp)
    return p, s_new


def cosmos_direction(grad: torch.Tensor, state: dict[str, Any], *, step: int, beta1: float, beta2: float,
                     eps: float, gamma: float, nesterov: bool, ns_steps: int = 5,
                     ns_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Update the state ``{m, p, s, v}`` in place for gradient ``grad`` (fp32, m×n) at ``step`` (from 1) and
    return the direction sqrt(mn)·U/‖U‖_F (Frobenius norm sqrt(mn), i.e. per-element RMS 1)."""
    m, n = grad.shape
    state["m"].lerp_(grad, 1 - beta1)
    if step == 1:
        p, s = init_subspace(grad, state["p"].shape[1], beta2)
    else:
        p, s = update_subspace(grad, state["p"], state["s"], beta2)
    state["p"].copy_(p)
    state["s"].copy_(s)
    gp = grad @ p
    state["v"].mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
    if nesterov:
        g = (beta1 * state["m"] + (1 - beta1) * grad) / (1 - beta1 ** (step + 1))
    else:
        g = state["m"] / (1 - beta1**step)
    a = g @ p
    soap = (a / ((state["v"] / (1 - beta2**step)).sqrt() + eps)) @ p.mT
    residual = g - a @ p.mT
    scale = math.sqrt(m * n)
    ortho = newton_schulz5(residual, ns_steps, ns_dtype)
    update = soap + gamma * scale * ortho / ortho.norm().clamp_min(_TINY)
    return scale * update / update.norm().clamp_min(_TINY)


def cosmos_state_numel(m: int, n: int, rank: int) -> int:
    """Elements of state per m×n matrix: M + P + S + Vsq = mn + nr + r² + mr, with r = min(rank, m, n)."""
    r = min(rank, m, n)
    return m * n + n * r + r * r + m * r


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Cosmos(FP32StateOptimizer):
    """COSMOS for hidden matrices, AdamW for everything else.

    ``params``: an ``nn.Module`` (split by role: :func:`cosmos_param_groups`) or parameter groups. A group's
    ``"cosmos"`` key says whether its 2-D parameters take the COSMOS path; a group without the key sends 2-D
    parameters to COSMOS and the rest to AdamW, so pass the model (or mark embedding and head groups
    ``cosmos: False``) rather than ``model.parameters()``.

    Hidden matrices step by per-element RMS ``lr·lr_ratio``; the AdamW parameters use ``lr``. Weight decay is
    decoupled (``W ← W·(1 − lr·weight_decay)``) in both paths. State is fp32 for any parameter dtype.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 64, gamma: float = 0.2, lr_ratio: float = 0.1,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: str = "auto"):
        if isinstance(params, torch.nn.Module):
            params = cosmos_param_groups(params, weight_decay)
        for name, value in (("lr", lr), ("eps", eps), ("rank", rank), ("lr_ratio", lr_ratio), ("ns_steps", ns_steps)):
            if not value > 0:
                raise ValueError(f"Cosmos: {name} must be positive (got {value!r})")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Cosmos: betas must lie in [0, 1) (got {betas!r})")
        if ns_dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"Cosmos: ns_dtype must be auto, bfloat16, float16 or float32 (got {ns_dtype!r})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, gamma=gamma,
                        lr_ratio=lr_ratio, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, cosmos=None)
        super().__init__(params, defaults)

    @staticmethod
    def uses_cosmos(group: dict[str, Any], p: torch.Tensor) -> bool:
        flag = group.get("cosmos")
        return p.dim() == 2 and (flag is None or bool(flag))

    def param_step_(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if self.uses_cosmos(group, p):
            self._cosmos_param(p, state, group)
        else:
            self.adamw_param_(p, state, group)

    def _cosmos_param(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        m, n = p.shape
        r = min(group["rank"], m, n)
        if not state:
            f32 = dict(dtype=torch.float32, device=p.device)
            state.update(step=0, m=torch.zeros(m, n, **f32), p=torch.zeros(n, r, **f32),
                         s=torch.zeros(r, r, **f32), v=torch.zeros(m, r, **f32))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        direction = cosmos_direction(
            p.grad.float(), state, step=state["step"], beta1=beta1, beta2=beta2, eps=group["eps"],
            gamma=group["gamma"], nesterov=group["nesterov"], ns_steps=group["ns_steps"],
            ns_dtype=_ns_dtype(group["ns_dtype"], p.device),
        )
        w = as_fp32(p)
        if group["weight_decay"]:
            w.mul_(1 - group["lr"] * group["weight_decay"])
        w.add_(direction, alpha=-group["lr"] * group["lr_ratio"])
        write_back_(p, w)


def cosmos_param_groups(model: torch.nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` grouped as the Trainer groups them (no decay on biases and norms),
    each group split into hidden matrices (``cosmos: True``) and the rest (``cosmos: False``, AdamW)."""
    from ...integrations.trainer_utils import decay_parameter_groups
    from ..common.targets import hidden_matrix_names, split_by_identity

    names = hidden_matrix_names(model)
    hidden = {id(p) for n, p in model.named_parameters() if n in names}
    groups = []
    for g in decay_parameter_groups(model, weight_decay):
        inside, outside = split_by_identity(g["params"], hidden)
        if inside:
            groups.append({**g, "params": inside, "cosmos": True})
        if outside:
            groups.append({**g, "params": outside, "cosmos": False})
    return groups
