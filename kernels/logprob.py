"""Triton kernel: per-step Gaussian log-probability fused with the step mean, forward and backward.

For a stochastic step x_{t−1} ~ N(μ, σ² I) with μ = c_xt · x_t + c_eps · ε̂ (DDPM ancestral or DDIM(η) coefficients
from `papa.schedule.NoiseSchedule.step_coefficients`, one row per sample so timesteps may differ per sample):

    log π(x_{t−1} | x_t) = reduce_j [ −(x_{t−1,j} − μ_j)² / (2σ²) − log σ − ½ log 2π ]      reduce = mean (default) or sum

Gradients flow to ε̂ (and x_t, x_{t−1} if they require grad) through r_j = (x_{t−1,j} − μ_j)/σ²:
∂/∂ε̂_j = s·r_j·c_eps, ∂/∂x_t,j = s·r_j·c_xt, ∂/∂x_{t−1,j} = −s·r_j, with s = 1/D (mean) or 1 (sum).

Why fused: eager torch materialises μ, the residual, its square and the per-pixel log-density (four B×D tensors kept
for backward); this kernel reads x_t, ε̂, x_{t−1} once and keeps only (B,) outputs, recomputing the residual in the
backward pass. Inputs fp32/fp16/bf16, accumulation and outputs fp32 (fp64 for fp64 inputs). The plain-torch twin
is `papa.ops_ref.step_log_prob_ref` (kept out of this module so that the torch fallback imports without triton);
`papa.ops.step_log_prob` is the public op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from papa.schedule import HALF_LOG_2PI as _HALF_LOG_2PI_FLOAT

HALF_LOG_2PI = tl.constexpr(_HALF_LOG_2PI_FLOAT)  # a constexpr global: the kernels see it as the literal it replaced


@triton.jit
def _logprob_fwd(X, E, P, C, OUT, D, scale, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    c_xt = tl.load(C + row * 3 + 0).to(ACC)
    c_eps = tl.load(C + row * 3 + 1).to(ACC)
    sigma = tl.load(C + row * 3 + 2).to(ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(X + row * D + offs, mask=m, other=0.0).to(ACC)
        e = tl.load(E + row * D + offs, mask=m, other=0.0).to(ACC)
        p = tl.load(P + row * D + offs, mask=m, other=0.0).to(ACC)
        r = p - (c_xt * x + c_eps * e)
        acc += tl.where(m, r * r, 0.0)
    sq = tl.sum(acc, axis=0)
    lp = -sq / (2.0 * sigma * sigma) - D * (tl.log(sigma) + HALF_LOG_2PI)
    tl.store(OUT + row, lp * scale)


@triton.jit
def _logprob_bwd(X, E, P, C, G, GE, GX, GP, D, scale, BLOCK: tl.constexpr, WANT_X: tl.constexpr,
                 WANT_P: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    c_xt = tl.load(C + row * 3 + 0).to(ACC)
    c_eps = tl.load(C + row * 3 + 1).to(ACC)
    sigma = tl.load(C + row * 3 + 2).to(ACC)
    g = tl.load(G + row).to(ACC) * scale / (sigma * sigma)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(X + row * D + offs, mask=m, other=0.0).to(ACC)
        e = tl.load(E + row * D + offs, mask=m, other=0.0).to(ACC)
        p = tl.load(P + row * D + offs, mask=m, other=0.0).to(ACC)
        r = (p - (c_xt * x + c_eps * e)) * g
        tl.store(GE + row * D + offs, (r * c_eps).to(GE.dtype.element_ty), mask=m)
        if WANT_X:
            tl.store(GX + row * D + offs, (r * c_xt).to(GX.dtype.element_ty), mask=m)
        if WANT_P:
            tl.store(GP + row * D + offs, (-r).to(GP.dtype.element_ty), mask=m)


def _block(D: int) -> int:
    return min(4096, triton.next_power_of_2(D))


def _acc(dtype: torch.dtype):
    """fp32 accumulation, fp64 for fp64 inputs (so float64 gradcheck is meaningful): (torch dtype, triton dtype)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


class _GaussianStepLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, eps, x_prev, coef, reduce):
        B = x_t.shape[0]
        x, e, p = (v.reshape(B, -1).contiguous() for v in (x_t, eps, x_prev))
        acc, tl_acc = _acc(x.dtype)
        c = coef.to(acc).contiguous()
        D = x.shape[1]
        scale = 1.0 / D if reduce == "mean" else 1.0
        out = torch.empty(B, device=x.device, dtype=acc)
        _logprob_fwd[(B,)](x, e, p, c, out, D, scale, BLOCK=_block(D), ACC=tl_acc)
        ctx.save_for_backward(x, e, p, c)
        ctx.scale, ctx.shape = scale, x_t.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, e, p, c = ctx.saved_tensors
        B, D = x.shape
        want_x, want_e, want_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ge = torch.empty_like(e)
        gx = torch.empty_like(x) if want_x else ge
        gp = torch.empty_like(p) if want_p else ge
        _logprob_bwd[(B,)](x, e, p, c, grad.contiguous(), ge, gx, gp, D, ctx.scale, BLOCK=_block(D),
                           WANT_X=want_x, WANT_P=want_p, ACC=_acc(x.dtype)[1])
        shp = ctx.shape
        return (gx.view(shp) if want_x else None, ge.view(shp) if want_e else None,
                gp.view(shp) if want_p else None, None, None)


def gaussian_step_logprob(x_t, eps, x_prev, coef, reduce: str = "mean"):
    """Triton log π(x_prev | x_t) per row, differentiable in ε̂ (and x_t, x_prev). coef: (B, 3) [c_xt, c_eps, σ]."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    return _GaussianStepLogProb.apply(x_t, eps, x_prev, coef, reduce)
