"""DDPO (docs/ALGORITHMS.md §5): PPO on recorded trajectories with a reward (here the oracle's preferred-class mass).

Round: N trajectories from the current model with the training sampler (`train.traj_*`), one reward query each on
the final image, R ∈ [0, 1]. Advantages are normalised over the round, A = clip((R − mean)/(std + 1e-6), ±adv_clip).
For every recorded step j with a density, with π_old the log-prob recorded while sampling:

    ρ = exp(log π_θ(x_{j+1} | x_j) − log π_old),      L = max(−A ρ, −A clamp(ρ, 1 − c, 1 + c))     (c = ddpo.ppo_clip)

the trajectory's advantage at every step, averaged over the optimiser step's trajectories and steps. Logged: the mean
reward, the clipped fraction and an approximate KL to π_old (½ mean (log ρ)²).
"""
from __future__ import annotations

import torch

from papa import ops
from dataclasses import dataclass

from papa.algos import register
from papa.algos.base import Items, Method, ratio


@dataclass
class PPOSettings:
    """The `ddpo:` config section (and the base of `sdpo:`)."""
    ppo_clip: float = 1e-4            # clip range of the policy ratio / log-ratio difference
    adv_clip: float = 5.0             # advantages clipped to +-adv_clip

    def check(self, cfg, require) -> None:
        for k in ("ppo_clip", "adv_clip"):
            require(getattr(self, k) > 0, k, "must be > 0")


def normalized_advantages(r: torch.Tensor, clip: float) -> torch.Tensor:
    return ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).clamp(-clip, clip)


def ppo_loss(lp: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-item PPO-clip loss: max(−A ρ, −A clamp(ρ, 1 ± clip))."""
    rho = torch.exp(lp - lp_old)
    return torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip, 1 + clip))


def trajectory_items(traj: dict, idx: torch.Tensor, steps: torch.Tensor, **per_step) -> Items:
    """Items (trajectory, step) in trajectory-major order; per_step tensors are (N, S) indexed like the recording."""
    x = traj["x"][idx]
    n, S = len(idx), len(steps)
    items = Items(x_t=x[:, steps].reshape(n * S, *x.shape[2:]), x_prev=x[:, steps + 1].reshape(n * S, *x.shape[2:]),
                  t=traj["t"][steps].repeat(n), coef=traj["coef"][steps].repeat(n, 1))
    for k, v in per_step.items():
        items[k] = v[idx][:, steps].reshape(n * S)
    return items


@register
class DDPO(Method):
    name = "ddpo"
    draws, feedback = "trajectories", "reward"
    Settings = PPOSettings
    diagnostics = ("clip_fraction", "approx_kl_old")
    stat_keys = ("clipped", "kl", "count")

    def build(self, samples, reward, query):
        traj, n = samples.traj, len(reward)
        adv = normalized_advantages(reward, self.s.adv_clip)
        return ({"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "log_prob": traj["log_prob"],
                 "adv": adv[:, None].expand(n, len(traj["t"])).contiguous()}, {"round_reward": float(reward.mean())})

    def num_units(self, data: dict) -> int:
        return len(data["x"])

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator):
        steps = torch.nonzero(data["coef"][:, 2] > 0).flatten()
        items = trajectory_items(data, units, steps, lp_old=data["log_prob"], adv=data["adv"])
        items["w"] = torch.full((len(items),), 1.0 / len(items))
        return None, items

    def loss(self, ctx, c: Items):
        eps = self.policy.policy(c.x_t, c.t)
        lp = ops.step_log_prob(c.x_t, eps, c.x_prev, c.coef)
        loss = ppo_loss(lp, c.lp_old, c.adv, self.s.ppo_clip)
        with torch.no_grad():
            d = lp - c.lp_old
            clipped = (d.exp() - 1).abs() > self.s.ppo_clip
        return (loss * c.w).sum(), {"clipped": float(clipped.sum()), "kl": float(0.5 * d.square().sum()),
                                    "count": float(len(c))}

    def summarize(self, stats: dict) -> dict:
        return {"clip_fraction": ratio(stats, "clipped", "count"), "approx_kl_old": ratio(stats, "kl", "count")}
