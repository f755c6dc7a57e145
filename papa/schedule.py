"""The DDPM noise schedule, its identities, forward noising, and the ancestral and DDIM(η) steps.

Notation follows Ho et al. (2020) and Song et al. (2021): β_t linear from β_1 to β_T, α_t = 1 − β_t, ᾱ_t = Π_{s≤t} α_s
(0-based t = 0 … T−1 as in the reference code), ᾱ_{−1} := 1. Images live in [−1, 1].

Both steps accept a *previous* timestep per sample, so the same code runs the full chain (t_prev = t − 1) and a respaced
(strided) chain. For a stride the ancestral step uses the respaced β'_t = 1 − ᾱ_t/ᾱ_prev (Nichol & Dhariwal 2021), which
is exactly β_t when t_prev = t − 1. Every step returns a `StepOutput` with the log-probability of the previous sample
under the step's Gaussian, as a MEAN over pixels (ALGORITHMS.md §3); a step with σ = 0 (the last ancestral step,
DDIM with η = 0) has no density and reports NaN there, so callers must exclude it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # ½ log 2π, the one copy (the Triton kernels import it too)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor   # x_{t_prev}
    pred_x0: torch.Tensor       # x̂0 clamped to [−1, 1] (reported, not used by the step)
    mean: torch.Tensor          # μ_θ(x_t, t)
    std: torch.Tensor           # σ_t, shape (B,)
    log_prob: torch.Tensor      # log π(x_{t_prev} | x_t), mean over pixels, shape (B,); NaN where σ = 0


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] reshaped to broadcast over a (B, …) tensor of `ndim` dims."""
    return table.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Per-sample log N(x; mean, std² I): mean (default) or sum over non-batch dims. std: (B,).

    log N(x; μ, σ²) = −(x − μ)²/(2σ²) − log σ − ½ log 2π per pixel. The one torch writing of it: the schedule's steps
    and `papa.ops_ref` (the fused ops' references and torch fallbacks) call this function; the tests check it against
    float64 torch.distributions."""
    s = std.reshape(-1, *([1] * (x.ndim - 1)))
    lp = -((x - mean) ** 2) / (2 * s ** 2) - torch.log(s) - HALF_LOG_2PI
    lp = lp.flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


class NoiseSchedule:
    """Linear-β schedule with the tables every identity needs (float64 computed, stored float32)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.T = num_timesteps
        self._ab_tables: dict = {}
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alpha_bars = torch.cumprod(alphas, 0)
        self.betas64, self.alpha_bars64 = betas, alpha_bars
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alpha_bars = alpha_bars.float()
        # ᾱ_{t-1} with ᾱ_{-1} = 1 (the reference wraps to ᾱ_{T-1} at t = 0: see papa_weights)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]]).float()
        self.posterior_variance = (betas * torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
                                   .neg().add(1) / (1 - alpha_bars)).float()

    @classmethod
    def from_config(cls, d) -> "NoiseSchedule":
        return cls(d.num_timesteps, d.beta_start, d.beta_end)

    # ---------------------------------------------------------------- one-line identities
    def alpha_bar(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ᾱ_t with ᾱ_{−1} = 1, per-sample t (B,) -> (B,)."""
        key = (t.device, dtype)
        if key not in self._ab_tables:  # [ᾱ_{−1} = 1, ᾱ_0, …], cached per device so a sampling step moves nothing
            self._ab_tables[key] = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars64]).to(*key)
        return self._ab_tables[key][t + 1]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
        ab = extract(self.alpha_bars, t, x0.ndim)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t."""
        ab = extract(self.alpha_bars, t, x_t.ndim)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def sampling_timesteps(self, steps: int) -> list[int]:
        """`steps` descending timesteps evenly spaced over [0, T−1], always ending at 0 (T−1 first when steps = T)."""
        if steps >= self.T:
            return list(range(self.T - 1, -1, -1))
        ts = torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long().tolist()
        return sorted(set(ts), reverse=True)

    # ---------------------------------------------------------------- coefficients of a (possibly strided) step
    def step_coefficients(self, t: torch.Tensor, t_prev: torch.Tensor, sampler: str = "ancestral",
                          eta: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-sample scalars (B,) so that μ = c_xt·x_t + c_eps·ε̂ and σ = std, for either sampler.

        ancestral: μ = (x_t − β'/√(1−ᾱ_t) ε̂)/√α',  σ² = β'(1−ᾱ_prev)/(1−ᾱ_t),  β' = 1 − ᾱ_t/ᾱ_prev,  α' = 1 − β'
        ddim(η):   μ = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂,  σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)
        """
        ab_t, ab_prev = self.alpha_bar(t, torch.float64), self.alpha_bar(t_prev, torch.float64)
        if sampler == "ancestral":
            alpha_t = ab_t / ab_prev                 # α' (= α_t for an unstrided step)
            beta_t = 1 - alpha_t
            c_xt = 1 / alpha_t.sqrt()
            c_eps = -beta_t / ((1 - ab_t).sqrt() * alpha_t.sqrt())
            var = beta_t * (1 - ab_prev) / (1 - ab_t)
            std = var.clamp_min(0).sqrt()
        elif sampler == "ddim":
            std = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp_min(0).sqrt()
            # μ = √ᾱ_prev (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t + √(1−ᾱ_prev−σ²) ε̂
            c_xt = (ab_prev / ab_t).sqrt()
            c_eps = -(ab_prev / ab_t).sqrt() * (1 - ab_t).sqrt() + (1 - ab_prev - std ** 2).clamp_min(0).sqrt()
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use 'ancestral' or 'ddim'")
        return {"c_xt": c_xt.float(), "c_eps": c_eps.float(), "std": std.float()}

    def fused_coefficients(self, t: torch.Tensor, t_prev: torch.Tensor, sampler: str = "ancestral",
                           eta: float = 1.0) -> torch.Tensor:
        """(B, 5) float32 [c_xt, c_eps, σ, a0, b0] for `papa.ops.fused_step`, with x̂0 = a0·x_t − b0·ε̂."""
        c = self.step_coefficients(t, t_prev, sampler, eta)
        ab = self.alpha_bar(t, torch.float64)
        a0, b0 = 1 / ab.sqrt(), (1 - ab).sqrt() / ab.sqrt()
        return torch.stack([c["c_xt"], c["c_eps"], c["std"], a0.float(), b0.float()], 1)

    def step(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None,
             sampler: str = "ancestral", eta: float = 1.0, noise: torch.Tensor | None = None,
             prev_sample: torch.Tensor | None = None) -> StepOutput:
        """One reverse step for a batch with per-sample t (B,). Give `noise` to sample x_{t_prev} = μ + σ z, or
        `prev_sample` to score a stored x_{t_prev} (its log-prob, gradients flowing through μ via ε̂)."""
        if t_prev is None:
            t_prev = t - 1
        c = self.step_coefficients(t, t_prev, sampler, eta)
        b = lambda v: v.reshape(-1, *([1] * (x_t.ndim - 1)))
        mean = b(c["c_xt"]) * x_t + b(c["c_eps"]) * eps
        std = c["std"]
        if prev_sample is None:
            z = torch.zeros_like(x_t) if noise is None else noise
            prev_sample = mean + b(std) * z
        safe = torch.where(std > 0, std, torch.ones_like(std))
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, safe)
        log_prob = torch.where(std > 0, log_prob, torch.full_like(log_prob, float("nan")))
        pred_x0 = self.predict_x0(x_t, eps, t).clamp(-1, 1)
        return StepOutput(prev_sample, pred_x0, mean, std, log_prob)

    def ancestral_step(self, x_t, eps, t, noise=None, prev_sample=None) -> StepOutput:
        """The reference DDPM step (t_prev = t − 1; at t = 0 the mean, with no noise)."""
        return self.step(x_t, eps, t, t - 1, "ancestral", noise=noise, prev_sample=prev_sample)

    def ddim_step(self, x_t, eps, t, t_prev, eta=1.0, noise=None, prev_sample=None) -> StepOutput:
        return self.step(x_t, eps, t, t_prev, "ddim", eta, noise=noise, prev_sample=prev_sample)
