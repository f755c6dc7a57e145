"""Diffusion-DPO (docs/ALGORITHMS.md §7): pairwise preferences, trajectory-free: the closest relative of PAPA.

Round: 2P images from the current model (the configured sampler, pairs 2p and 2p+1), one choice per pair. For each
decisive pair (winner x^w, loser x^l) and M timesteps t ~ U{0, …, T−1} (`diffusion_dpo.timesteps_per_sample`), with
the same t and ε for both images:

    L = −log σ(−½ β [(‖ε − ε_θ(x^w_t, t)‖² − ‖ε − ε_θ(x^l_t, t)‖²) − (‖ε − ε_ref(x^w_t, t)‖² − ‖ε − ε_ref(x^l_t, t)‖²)])

with pixel-mean squared norms, β = `diffusion_dpo.beta` (5000 in the paper), ref = the frozen base model, averaged over
the step's pairs and timesteps. Ties give no gradient. Logged: implicit accuracy (the share of items whose logit is
positive: the policy improved the winner's denoising more than the loser's, relative to the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass

from papa.algos import register
from papa.algos.base import Items, Method, ratio
from papa.algos.d3po import pair_stats


@dataclass
class DiffusionDPOSettings:
    """The `diffusion_dpo:` config section."""
    beta: float = 5000.0              # the paper's value for pixel-mean MSE
    timesteps_per_sample: int = 100   # M noise levels drawn per decisive pair and optimiser step

    def check(self, cfg, require) -> None:
        require(self.beta > 0, "beta", "must be > 0")
        require(self.timesteps_per_sample >= 1, "timesteps_per_sample", "must be >= 1")


@register
class DiffusionDPO(Method):
    name = "diffusion_dpo"
    draws, feedback = "image_pairs", "pair"
    Settings = DiffusionDPOSettings
    diagnostics = ("implicit_accuracy",)
    stat_keys = ("acc_num", "acc_den")

    def build(self, samples, h, query):
        return {"x": samples.images.cpu(), "h": h}, pair_stats(h)

    def num_units(self, data: dict) -> int:
        return len(data["h"])

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator):
        h = data["h"][units]
        decisive, hd = units[h != 0], h[h != 0]
        if len(decisive) == 0:
            return None, Items()
        first, second = data["x"][2 * decisive], data["x"][2 * decisive + 1]
        win = torch.where(hd.view(-1, 1, 1, 1) > 0, first, second)
        lose = torch.where(hd.view(-1, 1, 1, 1) > 0, second, first)
        M = self.s.timesteps_per_sample
        n = len(decisive)
        t = torch.randint(0, self.sched.T, (n * M,), generator=gen)
        eps = torch.randn((n * M, *win.shape[1:]), generator=gen)
        w = torch.full((n * M,), 1.0 / (len(units) * M))
        return None, Items(x_w=win.repeat_interleave(M, 0), x_l=lose.repeat_interleave(M, 0), t=t, eps=eps, w=w)

    def loss(self, ctx, c: Items):
        x = torch.cat([self.sched.add_noise(c.x_w, c.eps, c.t), self.sched.add_noise(c.x_l, c.eps, c.t)])
        tt = torch.cat([c.t, c.t])
        eps2 = torch.cat([c.eps, c.eps])
        mse = lambda pred: (pred - eps2).square().flatten(1).mean(1).view(2, -1)
        m = mse(self.policy.policy(x, tt))
        ref = mse(self.policy.reference(x, tt))
        inside = -0.5 * self.s.beta * ((m[0] - m[1]) - (ref[0] - ref[1]))
        loss = -F.logsigmoid(inside)
        with torch.no_grad():
            acc = (inside > 0).float() + 0.5 * (inside == 0).float()
        return (loss * c.w).sum(), {"acc_num": float(acc.sum()), "acc_den": float(len(c))}

    def summarize(self, stats: dict) -> dict:
        return {"implicit_accuracy": ratio(stats, "acc_num", "acc_den")}
