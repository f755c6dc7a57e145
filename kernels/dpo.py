"""Triton kernel: the D3PO loss fused with the per-step log-probabilities of both pair members.

For pair n with stored steps of trajectories i ∈ {0, 1} (ALGORITHMS.md §4), preference h ∈ {(+1,−1), (−1,+1), (0,0)}:

    log r_i = clamp(log π_θ(i) − log π_ref(i), log(1−ε), log(1+ε))        (= log clamp(exp(·), 1−ε, 1+ε))
    z       = β (h_0 log r_0 + h_1 log r_1)
    L_n     = −log σ(z) = softplus(−z)

∂L/∂log π_θ(i) = (σ(z) − 1) · β h_i · 1[inside the clip, edges included, as torch.clamp]. A tie gives no gradient.

`fused_d3po_loss` takes the raw step tensors (x_t, ε̂_θ, ε̂_ref, x_{t−1} of shape (N, 2, …), coefficients (N, 2, 3))
and computes both members' policy and reference log-probs and the loss in one pass per pair; its backward recomputes
the residuals and writes ∂L/∂ε̂_θ directly, so no per-pixel intermediate is ever stored. log-softplus is written with
exp/log (libdevice calls fail in the Triton interpreter). The plain-torch twin is `papa.ops_ref.fused_d3po_loss_ref`;
`papa.ops.fused_d3po_loss` is the public op. (An unfused Triton loss over precomputed log-probs was removed: nothing in
papa used it.)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from papa_kernels.logprob import HALF_LOG_2PI, _acc, _block


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow, from exp/log only
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _pair_terms(lp0, lr0, lp1, lr1, h0, h1, beta, lo, hi):
    d0 = lp0 - lr0
    d1 = lp1 - lr1
    z = beta * (h0 * tl.minimum(tl.maximum(d0, lo), hi) + h1 * tl.minimum(tl.maximum(d1, lo), hi))
    loss = _softplus(-z)
    dz = 1.0 / (1.0 + tl.exp(-z)) - 1.0  # σ(z) − 1
    g0 = tl.where((d0 >= lo) & (d0 <= hi), dz * beta * h0, 0.0)
    g1 = tl.where((d1 >= lo) & (d1 <= hi), dz * beta * h1, 0.0)
    return loss, g0, g1


# ----------------------------------------------------------------------------------------- fused log-prob + loss


@triton.jit
def _member_sums(X, EP, ER, P, C, base, cbase, D, BLOCK: tl.constexpr, ACC: tl.constexpr):
    c_xt = tl.load(C + cbase + 0).to(ACC)
    c_eps = tl.load(C + cbase + 1).to(ACC)
    acc_p = tl.zeros([BLOCK], dtype=ACC)
    acc_r = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(X + base + offs, mask=m, other=0.0).to(ACC)
        ep = tl.load(EP + base + offs, mask=m, other=0.0).to(ACC)
        er = tl.load(ER + base + offs, mask=m, other=0.0).to(ACC)
        p = tl.load(P + base + offs, mask=m, other=0.0).to(ACC)
        rp = p - (c_xt * x + c_eps * ep)
        rr = p - (c_xt * x + c_eps * er)
        acc_p += tl.where(m, rp * rp, 0.0)
        acc_r += tl.where(m, rr * rr, 0.0)
    return tl.sum(acc_p, axis=0), tl.sum(acc_r, axis=0)


@triton.jit
def _fused_fwd(X, EP, ER, P, C, H, LOSS, LP, LR, GLP, D, scale, beta, lo, hi, BLOCK: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0)
    s0 = tl.load(C + n * 6 + 2).to(ACC)
    s1 = tl.load(C + n * 6 + 5).to(ACC)
    sp0, sr0 = _member_sums(X, EP, ER, P, C, n * 2 * D, n * 6, D, BLOCK, ACC)
    sp1, sr1 = _member_sums(X, EP, ER, P, C, (n * 2 + 1) * D, n * 6 + 3, D, BLOCK, ACC)
    k0 = D * (tl.log(s0) + HALF_LOG_2PI)
    k1 = D * (tl.log(s1) + HALF_LOG_2PI)
    lp0 = (-sp0 / (2.0 * s0 * s0) - k0) * scale
    lr0 = (-sr0 / (2.0 * s0 * s0) - k0) * scale
    lp1 = (-sp1 / (2.0 * s1 * s1) - k1) * scale
    lr1 = (-sr1 / (2.0 * s1 * s1) - k1) * scale
    h0 = tl.load(H + n * 2).to(ACC)
    h1 = tl.load(H + n * 2 + 1).to(ACC)
    loss, g0, g1 = _pair_terms(lp0, lr0, lp1, lr1, h0, h1, beta, lo, hi)
    tl.store(LOSS + n, loss)
    tl.store(LP + n * 2, lp0)
    tl.store(LP + n * 2 + 1, lp1)
    tl.store(LR + n * 2, lr0)
    tl.store(LR + n * 2 + 1, lr1)
    tl.store(GLP + n * 2, g0)
    tl.store(GLP + n * 2 + 1, g1)


@triton.jit
def _fused_bwd(X, EP, P, C, GLP, G, GE, D, scale, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # program (n, i): ∂L/∂ε̂_θ for member i of pair n = g_n · ∂L/∂lp_i · s · r · c_eps / σ²
    n = tl.program_id(0)
    i = tl.program_id(1)
    row = n * 2 + i
    c_xt = tl.load(C + row * 3 + 0).to(ACC)
    c_eps = tl.load(C + row * 3 + 1).to(ACC)
    sigma = tl.load(C + row * 3 + 2).to(ACC)
    coef = tl.load(G + n).to(ACC) * tl.load(GLP + row).to(ACC) * scale * c_eps / (sigma * sigma)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(X + row * D + offs, mask=m, other=0.0).to(ACC)
        ep = tl.load(EP + row * D + offs, mask=m, other=0.0).to(ACC)
        p = tl.load(P + row * D + offs, mask=m, other=0.0).to(ACC)
        r = p - (c_xt * x + c_eps * ep)
        tl.store(GE + row * D + offs, (r * coef).to(GE.dtype.element_ty), mask=m)


class _FusedD3PO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, eps_policy, eps_ref, x_prev, coef, h, beta, clip, reduce):
        N = x_t.shape[0]
        x, ep, er, p = (v.reshape(N, 2, -1).contiguous() for v in (x_t, eps_policy, eps_ref, x_prev))
        D = x.shape[2]
        acc, tl_acc = _acc(x.dtype)
        c = coef.reshape(N, 2, 3).to(acc).contiguous()
        scale = 1.0 / D if reduce == "mean" else 1.0
        dev = x.device
        loss = torch.empty(N, device=dev, dtype=acc)
        lp, lr, glp = (torch.empty(N, 2, device=dev, dtype=acc) for _ in range(3))
        _fused_fwd[(N,)](x, ep, er, p, c, h.to(acc).contiguous(), loss, lp, lr, glp, D, scale, beta,
                         math.log(1 - clip), math.log(1 + clip), BLOCK=_block(D), ACC=tl_acc)
        ctx.save_for_backward(x, ep, p, c, glp)
        ctx.scale, ctx.shape = scale, eps_policy.shape
        ctx.mark_non_differentiable(lp, lr)
        return loss, lp, lr

    @staticmethod
    def backward(ctx, g, _glp, _glr):
        x, ep, p, c, glp = ctx.saved_tensors
        N, _, D = x.shape
        ge = torch.empty_like(ep)
        _fused_bwd[(N, 2)](x, ep, p, c, glp, g.contiguous(), ge, D, ctx.scale, BLOCK=_block(D), ACC=_acc(x.dtype)[1])
        return None, ge.view(ctx.shape), None, None, None, None, None, None, None


def fused_d3po_loss(x_t, eps_policy, eps_ref, x_prev, coef, h, beta: float = 0.1, clip: float = 0.1,
                    reduce: str = "mean"):
    """D3PO loss per pair from raw step tensors (N, 2, …): returns (loss (N,), lp_policy, lp_ref) with gradient to
    eps_policy only (x_t, x_prev are stored samples; the reference model is frozen). coef: (N, 2, 3) [c_xt, c_eps, σ]."""
    if not 0 < clip < 1:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    return _FusedD3PO.apply(x_t, eps_policy, eps_ref.detach(), x_prev, coef, h, float(beta), float(clip), reduce)
