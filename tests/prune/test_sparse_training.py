"""AST/CAST unit properties (spec compression.md §4–§5)."""
import torch

from hf_memkit.prune import sparse_linear as sl
from hf_memkit.prune.ast.optimizer import ASTAdamW
from hf_memkit.prune.cast.optimizer import AdamS
from hf_memkit.prune.masks import nm_mask


def _linear(seed=0, out=8, inp=16):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(inp, out)
    return lin


def test_ste_gradient_to_pruned_weights_equals_dense_gradient():
    lin = _linear()
    mask = nm_mask(lin.weight.abs())
    sl.install_(lin, mask, "ast")
    x = torch.randn(3, 5, 16)
    lin(x).square().sum().backward()
    # the dense-matmul gradient of the effective weight W⊙M
    w_eff = (lin.weight.detach() * mask).requires_grad_(True)
    torch.nn.functional.linear(x, w_eff, lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, w_eff.grad)
    assert (lin.weight.grad[~mask] != 0).any()
    y = lin(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight * mask, lin.bias))
    sl.uninstall_(lin)
    assert "forward" not in vars(lin) and not hasattr(lin, "sparse_mask")


def test_slorb_initial_value():
    lin = _linear(1)
    mask = nm_mask(lin.weight.abs())
    k = 8
    sl.install_(lin, mask, "ast", slorb_k=k)
    x = torch.randn(4, 16)
    branch = lin(x) - torch.nn.functional.linear(x, lin.weight * mask, lin.bias)
    pruned = lin.weight.detach() * (~mask)
    want = sum(pruned[:, g * k:(g + 1) * k].mean(1)[None, :] * x[:, g * k:(g + 1) * k].sum(1, keepdim=True)
               for g in range(16 // k))
    torch.testing.assert_close(branch, want)
    P = sl.slorb_matrix(16, k)
    torch.testing.assert_close(branch, x @ P.T @ lin.slorb_S.detach().T)


def _zero_grad_steps(opt_cls, steps=5, **kw):
    lin = _linear(2)
    mask = nm_mask(lin.weight.abs())
    sl.install_(lin, mask, "ast")
    w0 = lin.weight.detach().clone()
    opt = opt_cls([lin.weight], {id(lin.weight): lin}, lr=1e-3, weight_decay=0.0, **kw)
    history = [w0.abs()]
    for _ in range(steps):
        lin.weight.grad = torch.zeros_like(lin.weight)
        opt.step()
        history.append(lin.weight.detach().abs().clone())
    return mask, w0, lin.weight.detach(), history


def test_ast_decay_only_where_mask_is_zero():
    mask, w0, w, hist = _zero_grad_steps(ASTAdamW, decay=0.1, ramp_steps=1)
    assert torch.equal(w[mask], w0[mask])  # kept weights untouched with zero loss gradient
    big = ~mask & (w0.abs() > 0.1)  # Adam's first steps move ~10·lr: small weights may cross zero
    assert (w[big].abs() < w0[big].abs()).all()
    for a, b in zip(hist, hist[1:]):  # pruned weights shrink monotonically
        assert (b[big] <= a[big] + 1e-12).all()


def test_ast_uses_mask_zero_not_bitwise_not():
    # an int mask with ~ would give -1/-2 everywhere; here decay must vanish on kept entries exactly
    mask, w0, w, _ = _zero_grad_steps(ASTAdamW, steps=1, decay=1.0, ramp_steps=1)
    assert torch.equal(w[mask], w0[mask]) and not torch.equal(w[~mask], w0[~mask])


def test_cast_adams_decay_only_where_mask_is_zero():
    mask, w0, w, hist = _zero_grad_steps(AdamS, steps=5, decay=1e-2, total_steps=5)
    assert torch.equal(w[mask], w0[mask])
    big = ~mask & (w0.abs() > 0.1)
    assert (w[big].abs() < w0[big].abs()).all()


def test_adams_matches_formula():
    from hf_memkit.prune.cast.optimizer import adams_update_

    torch.manual_seed(0)
    w = torch.randn(4, 8)
    g = torch.randn(4, 8)
    mask = nm_mask(w.abs())
    m, v = torch.zeros(4, 8), torch.zeros(4, 8)
    p = w.clone()
    adams_update_(p, g, mask, m, v, step=2, total_steps=4, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.0, decay=0.5)
    mu = 0.1 * g
    mt = torch.where(mask, mu, 0.5 * mu + 0.5 * 0.5 * torch.sign(w))
    vv = 0.01 * mt**2
    want = w - 0.1 * (mt / (1 - 0.9**2)) / ((vv / (1 - 0.99**2)).sqrt() + 1e-8)
    torch.testing.assert_close(p, want)


def test_cast_scaled_forward_and_fold():
    lin = _linear(3)
    sl.install_(lin, nm_mask(lin.weight.abs()), "cast", scale_groups=2)
    with torch.no_grad():
        lin.cast_scale.copy_(torch.rand_like(lin.cast_scale) + 0.5)
    x = torch.randn(2, 16, requires_grad=True)
    y = lin(x)
    w_eff = lin.weight * sl.expand_scale(lin.cast_scale, 16)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w_eff, lin.bias))
    y.sum().backward()
    ref_w = lin.weight.detach().clone().requires_grad_(True)
    ref_s = lin.cast_scale.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x.detach(), ref_w * sl.expand_scale(ref_s, 16), lin.bias.detach()).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref_w.grad)
    torch.testing.assert_close(lin.cast_scale.grad, ref_s.grad)


def test_cast_weight_view_matches_plain_autograd():
    """CAST's weight view (used when a kernel such as Mesa computes the Linear) saves only the parameters; its
    gradients equal autograd's through ``W * expand(A)``."""
    from hf_memkit.prune.sparse_linear import ScaledWeight, expand_scale

    torch.manual_seed(0)
    w = torch.randn(6, 8, requires_grad=True)
    a = torch.rand(6, 2, requires_grad=True)
    g = torch.randn(6, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        view = ScaledWeight.apply(w, a)
    assert all(t is w or t is a for t in saved)  # no weight-sized product kept
    dw, da = torch.autograd.grad(view, (w, a), g)
    w2, a2 = w.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    ref = w2 * expand_scale(a2, 8)
    torch.testing.assert_close(view, ref)
    rw, ra = torch.autograd.grad(ref, (w2, a2), g)
    torch.testing.assert_close(dw, rw)
    torch.testing.assert_close(da, ra)
