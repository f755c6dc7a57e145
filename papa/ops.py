"""The one dispatch point for papa's fused ops: C++/CUDA extension, Triton, or the plain-torch reference.

Each public op has a `*_ref` twin in `papa.ops_ref`, written in plain torch from the formula: the test oracle and
the fallback. One rule, `backend(op, tensor)`, picks the implementation at each call (never at import time, so
importing papa touches no GPU and imports neither triton nor the extension):

1. an override, `with ops.use_backend("torch"|"cpp"|"triton"):` or else the environment variable
   `PAPA_OPS=torch|cpp|triton`, wins: the op runs on that backend if it has one (an error if that backend is not
   installed), on the torch reference if it has none (so one switch can pin a whole run);
2. otherwise the first backend in the tensor's device preference that implements the op and is installed:
   CUDA tensors Triton, then the extension's CUDA kernels; CPU tensors the extension's vectorised CPU kernels (Triton
   runs CPU tensors only in its slow interpreter, so only when forced); the torch reference last, always there.

    op               implementations
    fused_step       cpp, torch
    step_log_prob    triton, cpp, torch
    fused_d3po_loss  triton, torch

"Installed" is checked once, lazily: the extension by importing `papa._C`, Triton by importing `triton`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

from papa.ops_ref import d3po_loss_ref, fused_d3po_loss_ref, fused_step_ref, step_log_prob_ref

__all__ = ["BACKENDS", "backend", "use_backend", "forced_backend", "extension_available", "triton_available",
           "fused_step", "fused_step_ref", "step_log_prob", "step_log_prob_ref", "fused_d3po_loss",
           "fused_d3po_loss_ref", "d3po_loss_ref"]

BACKENDS = ("torch", "cpp", "triton")

IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "fused_step": ("cpp", "torch"),
    "step_log_prob": ("triton", "cpp", "torch"),
    "fused_d3po_loss": ("triton", "torch"),
}

PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("papa_ops_backend", default=None)


# ----------------------------------------------------------------------------- the dispatch rule


@functools.lru_cache(maxsize=1)
def extension_available() -> bool:
    """Whether papa._C (the C++/CUDA extension) imports; registers its fake and autograd rules on first success."""
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


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton imports (it is optional: papa's torch paths never need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not one of {BACKENDS}")
    return name


def forced_backend() -> str | None:
    """The override: `use_backend(...)` if inside one, else `PAPA_OPS`, else None (read at every call)."""
    b = _OVERRIDE.get()
    if b is not None:
        return b
    env = os.environ.get("PAPA_OPS", "").strip().lower()
    return _check_name(env, "PAPA_OPS") if env else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops in this block on `name` (as PAPA_OPS would, and over it); None restores the automatic choice."""
    token = _OVERRIDE.set(None if name is None else _check_name(name.strip().lower(), "use_backend"))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _installed(b: str) -> bool:
    return b == "torch" or (b == "cpp" and extension_available()) or (b == "triton" and triton_available())


def backend(op: str, t: torch.Tensor) -> str:
    """The backend that runs `op` on tensors on `t`'s device: the rule in this module's docstring."""
    impls = IMPLEMENTATIONS[op]
    forced = forced_backend()
    if forced is not None:
        if forced not in impls:
            return "torch"
        if not _installed(forced):
            raise RuntimeError(f"{op} was forced onto {forced!r}, which is not installed here: " + (
                "build papa._C with `pip install --no-build-isolation -e .`" if forced == "cpp" else
                "install triton"))
        return forced
    return next(b for b in PREFERENCE.get(t.device.type, ("torch",)) if b in impls and _installed(b))


# ----------------------------------------------------------------------------- the fused sampling step


def fused_step(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, coef: torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """One sampling step in one pass: returns (x_prev, x̂0, log_prob (B,) float32). coef: (B, 5) float32, one row per
    sample, so every row may sit at its own timestep (a batch of trajectories advanced at once).

    `out=(x_prev, x0, log_prob)`: preallocated contiguous buffers (e.g. one step's slice of a trajectory recorder) that
    receive the results without allocating; they are returned."""
    if backend("fused_step", x_t) == "torch":
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


def step_log_prob(x_t: torch.Tensor, eps: torch.Tensor, x_prev: torch.Tensor, coef: torch.Tensor,
                  reduce: str = "mean") -> torch.Tensor:
    """log π(x_prev | x_t) per sample under N(c_xt x_t + c_eps ε̂, σ²), differentiable in ε̂. coef: (B, 3) or (B, 5)
    (the first three columns are used). Pixel mean by default (ALGORITHMS.md §3), `reduce='sum'` on request."""
    coef = coef[:, :3]
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    b = backend("step_log_prob", x_t)
    if b == "triton":
        from papa_kernels.logprob import gaussian_step_logprob
        return gaussian_step_logprob(x_t, eps, x_prev, coef, reduce)
    if b == "cpp":
        return torch.ops.papa.step_log_prob(x_t, eps, x_prev, coef, reduce == "mean")
    return step_log_prob_ref(x_t, eps, x_prev, coef, reduce)


def fused_d3po_loss(x_t: torch.Tensor, eps_policy: torch.Tensor, eps_ref: torch.Tensor, x_prev: torch.Tensor,
                    coef: torch.Tensor, h: torch.Tensor, beta: float = 0.1, clip: float = 0.1, reduce: str = "mean"):
    """Log-probs of both pair members under policy and reference, and the D3PO loss (`papa.ops_ref.d3po_loss_ref`),
    in one pass where Triton runs. Tensors (N, 2, …), coef (N, 2, ≥3), h (N, 2). Returns (loss (N,), lp_policy (N, 2),
    lp_ref (N, 2)), with gradient to eps_policy only."""
    coef = coef[..., :3]
    if backend("fused_d3po_loss", x_t) == "triton":
        from papa_kernels.dpo import fused_d3po_loss as kernel
        return kernel(x_t, eps_policy, eps_ref, x_prev, coef, h, beta, clip, reduce)
    return fused_d3po_loss_ref(x_t, eps_policy, eps_ref, x_prev, coef, h, beta, clip, reduce)
