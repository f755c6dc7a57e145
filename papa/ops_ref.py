"""Plain-torch references of papa's fused ops: the test oracles and the fallback where no fast backend runs.

This module imports torch and `papa.schedule` only (never triton, never the C++ extension), so papa trains and samples
on a machine that has neither. Each function is written from its formula; the Gaussian log-density in all of them is
`papa.schedule.gaussian_log_prob` (one writing, one ½ log 2π). `papa.ops` dispatches each op to its C++/CUDA or Triton
kernel (csrc/, kernels/) or to the twin here.
"""
from __future__ import annotations

import math

import torch

from papa.schedule import gaussian_log_prob


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_row(c: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-sample column (B,) shaped to broadcast over a (B, …) tensor of `ndim` dims."""
    return c.reshape(-1, *([1] * (ndim - 1)))


def fused_step_ref(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, coef: torch.Tensor):
    """Twin of `papa.ops.fused_step`. coef (B, 5) = [c_xt, c_eps, σ, a0, b0]:

    1. x_prev = μ + σ z with μ = c_xt x_t + c_eps ε̂
    2. x̂0 = clamp(a0 x_t − b0 ε̂, −1, 1)
    3. log π(x_prev | x_t) = mean_j log N(z_j; 0, 1) − log σ   (change of variables: (x_prev − μ)/σ = z exactly, so
       no cancellation at small σ); NaN where σ = 0, which has no density.
    Returns (x_prev, x̂0) in x_t's dtype and log_prob (B,) float32."""
    c = coef.to(_acc_dtype(x_t))
    b = lambda i: _per_row(c[:, i], x_t.ndim)
    xf, ef, zf = (v.to(c.dtype) for v in (x_t, eps, noise))
    x_prev = b(0) * xf + b(1) * ef + b(2) * zf
    x0 = (b(3) * xf - b(4) * ef).clamp(-1, 1)
    sigma = c[:, 2]
    std_normal = torch.ones_like(sigma)
    lp = gaussian_log_prob(zf, torch.zeros_like(zf), std_normal) - torch.log(sigma.clamp_min(1e-30))
    lp = torch.where(sigma > 0, lp, torch.full_like(lp, math.nan)).float()
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype), lp


def step_log_prob_ref(x_t: torch.Tensor, eps: torch.Tensor, x_prev: torch.Tensor, coef: torch.Tensor,
                      reduce: str = "mean") -> torch.Tensor:
    """Twin of `papa.ops.step_log_prob`: log N(x_prev; c_xt x_t + c_eps ε̂, σ² I) per sample, pixel mean or sum.
    coef (B, ≥3) = [c_xt, c_eps, σ, …]. Returns (B,) float32 (float64 for float64 inputs), differentiable."""
    acc = _acc_dtype(x_t)
    c = coef[:, :3].to(acc)
    mean = _per_row(c[:, 0], x_t.ndim) * x_t.to(acc) + _per_row(c[:, 1], x_t.ndim) * eps.to(acc)
    return gaussian_log_prob(x_prev.to(acc), mean, c[:, 2], reduce)


def d3po_loss_ref(lp_policy: torch.Tensor, lp_ref: torch.Tensor, h: torch.Tensor, beta: float = 0.1,
                  clip: float = 0.1) -> torch.Tensor:
    """The D3PO loss per pair (N,) from log-probs (N, 2) and preferences h (N, 2) (ALGORITHMS.md §4):
    L = −log σ(β Σ_i h_i log r_i), log r_i = clamp(log π_θ(i) − log π_ref(i), log(1 − ε), log(1 + ε)). D3PO writes
    log(clamp(exp(Δ), 1 − ε, 1 + ε)); the clamp is taken in log space, so a large Δ cannot overflow exp into an inf
    whose zero gradient times inf is NaN. No gradient flows to lp_ref."""
    log_r = torch.clamp(lp_policy - lp_ref.detach(), math.log(1 - clip), math.log(1 + clip))
    h = h.to(lp_policy.dtype)
    z = beta * (h[:, 0] * log_r[:, 0] + h[:, 1] * log_r[:, 1])
    return -torch.nn.functional.logsigmoid(z)


def fused_d3po_loss_ref(x_t, eps_policy, eps_ref, x_prev, coef, h, beta: float = 0.1, clip: float = 0.1,
                        reduce: str = "mean"):
    """Twin of `papa.ops.fused_d3po_loss`: both pair members' log-probs under policy and reference, then the loss.
    Tensors (N, 2, …), coef (N, 2, ≥3). Returns (loss (N,), lp_policy (N, 2), lp_ref (N, 2))."""
    N = x_t.shape[0]
    flat = lambda v: v.reshape(N * 2, *v.shape[2:])
    c = coef[..., :3].reshape(N * 2, 3)
    lp_pol = step_log_prob_ref(flat(x_t), flat(eps_policy), flat(x_prev), c, reduce).view(N, 2)
    lp_ref = step_log_prob_ref(flat(x_t), flat(eps_ref), flat(x_prev), c, reduce).view(N, 2)
    return d3po_loss_ref(lp_pol, lp_ref, h, beta, clip), lp_pol, lp_ref
