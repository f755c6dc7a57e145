"""The one dispatch point for papa's fused ops: C++/CUDA extension, Triton, or the plain-torch reference.

Each public op has a `*_ref` twin written in plain torch from the formula; it is the test oracle and the fallback.
The backend is decided lazily at the first call (never at import time, so importing papa touches no GPU):
`PAPA_OPS=torch|cpp|triton` forces one (for tests and debugging); otherwise CUDA tensors use the extension's CUDA
kernels, CPU tensors the extension's vectorised CPU kernels, and anything the extension cannot take the reference.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from papa.schedule import LOG_SQRT_2PI

BACKENDS = ("torch", "cpp", "triton")


@functools.lru_cache(maxsize=1)
def extension_available() -> bool:
    try:
        import papa._C  # noqa: F401  (registers torch.ops.papa.*)
    except ImportError:
        return False
    torch.library.register_fake("papa::fused_step")(_fused_step_fake)
    torch.library.register_fake("papa::fused_step_out")(_fused_step_out_fake)
    torch.library.register_fake("papa::step_log_prob")(_step_log_prob_fake)
    torch.library.register_fake("papa::step_log_prob_backward")(_step_log_prob_backward_fake)
    torch.library.register_autograd("papa::step_log_prob", _step_log_prob_backward,
                                    setup_context=_step_log_prob_setup)
    return True


def forced_backend() -> str | None:
    b = os.environ.get("PAPA_OPS", "").strip().lower()
    if b and b not in BACKENDS:
        raise ValueError(f"PAPA_OPS={b!r} is not one of {BACKENDS}")
    return b or None


def fused_step_ref(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, coef: torch.Tensor):
    """Reference: μ = c_xt x + c_eps ε̂; x_prev = μ + σ z; x̂0 = clamp(a0 x − b0 ε̂); log π = mean(−z²/2) − log σ − ½log2π."""
    c = coef.to(torch.float64 if x_t.dtype == torch.float64 else torch.float32)
    b = lambda i: c[:, i].reshape(-1, *([1] * (x_t.ndim - 1)))
    xf, ef, zf = (v.to(c.dtype) for v in (x_t, eps, noise))
    x_prev = b(0) * xf + b(1) * ef + b(2) * zf
    x0 = (b(3) * xf - b(4) * ef).clamp(-1, 1)
    sigma = c[:, 2]
    lp = -0.5 * zf.flatten(1).square().mean(1) - torch.log(sigma.clamp_min(1e-30)) - LOG_SQRT_2PI
    lp = torch.where(sigma > 0, lp, torch.full_like(lp, math.nan)).float()
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype), lp


def _use_extension() -> bool:
    backend = forced_backend()
    if backend == "torch" or (backend is None and not extension_available()):
        return False
    if backend == "triton":
        raise NotImplementedError("fused_step has no Triton kernel: use PAPA_OPS=cpp or torch")
    if not extension_available():
        raise RuntimeError("PAPA_OPS=cpp but papa._C is not built: run `pip install --no-build-isolation -e .`")
    return True


def fused_step(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, coef: torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """One sampling step in one pass: returns (x_prev, x̂0, log_prob (B,) float32). coef: (B, 5) float32, one row per
    sample, so every row may sit at its own timestep (a batch of trajectories advanced at once).

    `out=(x_prev, x0, log_prob)`: preallocated contiguous buffers (e.g. one step's slice of a trajectory recorder) that
    receive the results without allocating; they are returned."""
    if not _use_extension():
        res = fused_step_ref(x_t, eps, noise, coef)
        if out is None:
            return res
        for buf, r in zip(out, res):
            buf.copy_(r)
        return out
    if out is None:
        return torch.ops.papa.fused_step(x_t, eps, noise, coef.float())
    torch.ops.papa.fused_step_out(x_t, eps, noise, coef.float(), *out)
    return out


def _fused_step_fake(x_t, eps, noise, coef):
    return torch.empty_like(x_t), torch.empty_like(x_t), x_t.new_empty((x_t.shape[0],), dtype=torch.float32)


def _fused_step_out_fake(x_t, eps, noise, coef, x_prev, x0, log_prob):
    return None


# ----------------------------------------------------------------------------- step log-prob and the D3PO loss


def _use_triton(t: torch.Tensor) -> bool:
    b = forced_backend()
    if b == "triton":
        return True
    return b is None and t.is_cuda


def _logprob_backend(t: torch.Tensor) -> str:
    """Triton on CUDA tensors, the C++ extension on CPU ones, the reference where neither is there (or forced)."""
    b = forced_backend()
    if b:
        return b
    if t.is_cuda:
        return "triton"
    return "cpp" if extension_available() else "torch"


def _step_log_prob_fake(x_t, eps, x_prev, coef, mean):
    return x_t.new_empty((x_t.shape[0],), dtype=torch.float64 if x_t.dtype == torch.float64 else torch.float32)


def _step_log_prob_backward_fake(grad, x_t, eps, x_prev, coef, mean):
    return torch.empty_like(x_t), torch.empty_like(x_t), torch.empty_like(x_t)


def _step_log_prob_setup(ctx, inputs, output):
    x_t, eps, x_prev, coef, mean = inputs
    ctx.save_for_backward(x_t, eps, x_prev, coef)
    ctx.mean = mean


def _step_log_prob_backward(ctx, grad):
    x_t, eps, x_prev, coef = ctx.saved_tensors
    g_x, g_eps, g_prev = torch.ops.papa.step_log_prob_backward(grad, x_t, eps, x_prev, coef, ctx.mean)
    need = ctx.needs_input_grad
    return (g_x if need[0] else None, g_eps if need[1] else None, g_prev if need[2] else None, None, None)


def step_log_prob_ref(x_t, eps, x_prev, coef, reduce: str = "mean"):
    """Plain-torch twin of `step_log_prob` (see papa_kernels.logprob)."""
    from papa_kernels.logprob import gaussian_step_logprob_ref
    return gaussian_step_logprob_ref(x_t, eps, x_prev, coef, reduce)


def step_log_prob(x_t: torch.Tensor, eps: torch.Tensor, x_prev: torch.Tensor, coef: torch.Tensor,
                  reduce: str = "mean") -> torch.Tensor:
    """log π(x_prev | x_t) per sample under N(c_xt x_t + c_eps ε̂, σ²), differentiable in ε̂. coef: (B, 3) or (B, 5)
    (the first three columns are used). Pixel mean by default (ALGORITHMS.md §3), `reduce='sum'` on request."""
    coef = coef[:, :3]
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    backend = _logprob_backend(x_t)
    if backend == "triton":
        from papa_kernels.logprob import gaussian_step_logprob
        return gaussian_step_logprob(x_t, eps, x_prev, coef, reduce)
    if backend == "cpp":
        if not extension_available():
            raise RuntimeError("PAPA_OPS=cpp but papa._C is not built: run `pip install --no-build-isolation -e .`")
        return torch.ops.papa.step_log_prob(x_t, eps, x_prev, coef, reduce == "mean")
    return step_log_prob_ref(x_t, eps, x_prev, coef, reduce)


def d3po_loss_ref(lp_policy, lp_ref, h, beta: float = 0.1, clip: float = 0.1):
    from papa_kernels.dpo import dpo_ratio_loss_ref
    return dpo_ratio_loss_ref(lp_policy, lp_ref.detach(), h.to(lp_policy.dtype), beta, clip)


def d3po_loss(lp_policy: torch.Tensor, lp_ref: torch.Tensor, h: torch.Tensor, beta: float = 0.1,
              clip: float = 0.1) -> torch.Tensor:
    """D3PO loss per pair (N,) from log-probs (N, 2) and preferences h (N, 2) ∈ {(1,−1), (−1,1), (0,0)}."""
    if _use_triton(lp_policy):
        from papa_kernels.dpo import dpo_ratio_loss
        return dpo_ratio_loss(lp_policy, lp_ref, h, beta, clip)
    return d3po_loss_ref(lp_policy, lp_ref, h, beta, clip)


def fused_d3po_loss(x_t, eps_policy, eps_ref, x_prev, coef, h, beta: float = 0.1, clip: float = 0.1,
                    reduce: str = "mean"):
    """Log-probs of both pair members under policy and reference, and the D3PO loss, in one pass where Triton runs.
    Tensors (N, 2, …), coef (N, 2, ≥3). Returns (loss (N,), lp_policy (N, 2), lp_ref (N, 2))."""
    coef = coef[..., :3]
    if _use_triton(x_t):
        from papa_kernels.dpo import fused_d3po_loss as k
        return k(x_t, eps_policy, eps_ref, x_prev, coef, h, beta, clip, reduce)
    from papa_kernels.dpo import fused_d3po_loss_ref
    return fused_d3po_loss_ref(x_t, eps_policy, eps_ref, x_prev, coef, h, beta, clip, reduce)
