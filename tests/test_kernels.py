"""Triton kernels against float64 formulas written here (interpreter on CPU, real kernels on a GPU).

Outputs are NaN-poisoned before each run; shapes are one realistic (1×28×28) and one odd (1×5×7); gradcheck runs in
float64 on tiny shapes. Interpreter runs cost ~2.5 ms per program instance, so batch sizes stay small.
"""
import math

import pytest
import torch

import papa_kernels.dpo as dpo
import papa_kernels.logprob as lpk
from testutil import DEVICE

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
SHAPES = [(6, (1, 28, 28)), (3, (1, 5, 7))]


def logprob64(x_t, eps, x_prev, coef, reduce="mean"):
    """log N(x_prev; c_xt x_t + c_eps ε̂, σ² I) per row in float64 by torch.distributions (coef rows [c_xt, c_eps, σ])."""
    c = coef.double().cpu()
    col = lambda i: c[:, i].reshape(-1, *([1] * (x_t.ndim - 1)))
    mu = col(0) * x_t.double().cpu() + col(1) * eps.double().cpu()
    lp = torch.distributions.Normal(mu, col(2)).log_prob(x_prev.double().cpu()).flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def d3po64(x_t, eps_policy, eps_ref, x_prev, coef, h, beta, clip, reduce="mean"):
    """D3PO on pairs (N, 2, …) as the paper writes it: r_i = clamp(exp(lp_θ − lp_ref), 1 − ε, 1 + ε),
    L = −log σ(β Σ_i h_i log r_i). Returns (loss, lp_θ, lp_ref), float64."""
    N = x_t.shape[0]
    flat = lambda v: v.reshape(N * 2, *v.shape[2:])
    c = coef.reshape(N * 2, 3)
    lp = logprob64(flat(x_t), flat(eps_policy), flat(x_prev), c, reduce).view(N, 2)
    lr = logprob64(flat(x_t), flat(eps_ref), flat(x_prev), c, reduce).view(N, 2)
    r = torch.exp(lp - lr).clamp(1 - clip, 1 + clip)
    return -torch.nn.functional.logsigmoid(beta * (h.double().cpu() * torch.log(r)).sum(1)), lp, lr


def _step(B, shape, dtype, sigma_lo=0.05):
    x, e, p = (torch.randn(B, *shape, dtype=torch.float64) for _ in range(3))
    coef = torch.stack([1 + torch.rand(B, dtype=torch.float64) * 0.1, -torch.rand(B, dtype=torch.float64) * 0.2,
                        sigma_lo + torch.rand(B, dtype=torch.float64)], 1)
    return [v.to(DEVICE, dtype) for v in (x, e, p)] + [coef.to(DEVICE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, shape", SHAPES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_logprob_forward_backward(dtype, B, shape, reduce, poison):
    poison(lpk)
    x, e, p, c = _step(B, shape, dtype)
    e1 = e.clone().requires_grad_(True)
    got = lpk.gaussian_step_logprob(x, e1, p, c, reduce)
    g = torch.randn(B, dtype=got.dtype, device=DEVICE)
    got.backward(g)
    e64 = e.double().cpu().requires_grad_(True)
    want = logprob64(x, e64, p, c, reduce)
    want.backward(g.double().cpu())
    assert torch.isfinite(got).all() and torch.isfinite(e1.grad).all()
    scale = 1.0 if reduce == "mean" else float(torch.tensor(shape).prod())
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10 * scale)
    torch.testing.assert_close(e1.grad.double().cpu(), e64.grad, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


def test_logprob_grads_to_xt_and_xprev_and_gradcheck(poison):
    poison(lpk)
    x, e, p, c = _step(2, (1, 3, 3), torch.float64)
    for v in (x, e, p):
        v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, d: lpk.gaussian_step_logprob(a, b, d, c), (x, e, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N, shape", [(3, (1, 28, 28)), (2, (1, 5, 7))])
def test_fused_d3po_matches_reference(dtype, N, shape, poison):
    poison(dpo, lpk)
    x, ep, er, p = (torch.randn(N, 2, *shape, dtype=torch.float64) for _ in range(4))
    er = ep + 0.01 * er  # policy near the reference, so the clip is exercised on both sides across pairs
    coef = torch.stack([torch.ones(N, 2), -0.1 * torch.ones(N, 2), 0.05 + torch.rand(N, 2)], 2).double()
    h = torch.tensor([[1, -1], [0, 0], [-1, 1]][:N], dtype=torch.float64)
    a = ep.to(DEVICE, dtype).clone().requires_grad_(True)
    loss, lp, lr = dpo.fused_d3po_loss(*(v.to(DEVICE, dtype) for v in (x,)), a, er.to(DEVICE, dtype),
                                       p.to(DEVICE, dtype), coef.to(DEVICE), h.to(DEVICE), beta=3.0, clip=0.1)
    loss.sum().backward()
    b = ep.clone().requires_grad_(True)
    wl, wlp, wlr = d3po64(x, b, er, p, coef, h, beta=3.0, clip=0.1)
    wl.sum().backward()
    tol = TOL[dtype] * 10
    for g, w in ((loss, wl), (lp, wlp), (lr, wlr)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double().cpu(), w.detach(), rtol=tol, atol=tol)
    if dtype != torch.bfloat16:  # bf16 inputs may flip a clip decision; the loss check above still holds
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=tol * 10, atol=tol * 10)


def test_fused_d3po_gradcheck(poison):
    poison(dpo, lpk)
    x, ep, er, p = (torch.randn(2, 2, 1, 2, 3, dtype=torch.float64) for _ in range(4))
    ep = ep.requires_grad_(True)
    er = ep.detach() + 0.001 * er
    coef = torch.stack([torch.ones(2, 2), -0.1 * torch.ones(2, 2), 0.5 + torch.rand(2, 2)], 2).double()
    h = torch.tensor([[1, -1], [-1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: dpo.fused_d3po_loss(x, v, er, p, coef, h, 2.0, 0.1)[0], (ep,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_d3po_ties_and_clipped_pairs_get_no_gradient(dtype, poison):
    """Pair 0 inside the clip, pair 1 a tie, pair 2 with the policy far off the reference (both members' log-ratios
    beyond log(1 − ε)): only pair 0 has a gradient; the tie and the clipped pair lose ln 2 exactly (z = 0)."""
    poison(dpo, lpk)
    shape = (1, 5, 7)
    x, er, n, z = (torch.randn(3, 2, *shape, dtype=torch.float64) for _ in range(4))
    coef = torch.tensor([1.0, -0.1, 0.5], dtype=torch.float64).expand(3, 2, 3).contiguous()
    p = x - 0.1 * er + 0.5 * z  # sampled under the reference: x_prev = μ_ref + σ z
    ep = er + torch.tensor([0.01, 0.01, 10.0], dtype=torch.float64).view(3, 1, 1, 1, 1) * n
    h = torch.tensor([[1, -1], [0, 0], [-1, 1]], dtype=torch.float64)
    a = ep.to(DEVICE, dtype).clone().requires_grad_(True)
    loss, lp, lr = dpo.fused_d3po_loss(x.to(DEVICE, dtype), a, er.to(DEVICE, dtype), p.to(DEVICE, dtype),
                                       coef.to(DEVICE), h.to(DEVICE), beta=5.0, clip=0.1)
    loss.sum().backward()
    want, wlp, wlr = d3po64(x, ep, er, p, coef, h, beta=5.0, clip=0.1)
    assert ((wlp - wlr)[2] < math.log(0.9) - 0.5).all(), "pair 2 is not clipped: the test lost its point"
    tol = TOL[dtype] * 10
    torch.testing.assert_close(loss.double().cpu(), want, rtol=tol, atol=tol)
    assert loss[1].item() == pytest.approx(math.log(2), abs=tol) and loss[2].item() == pytest.approx(math.log(2), abs=tol)
    g = a.grad.cpu()
    assert torch.isfinite(g).all() and (g[1:] == 0).all() and (g[0] != 0).any()
