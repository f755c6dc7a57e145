"""D3PO (docs/ALGORITHMS.md §4): pairwise preferences on trajectories from shared noise, no reward model.

Round: P pairs of trajectories (2p and 2p+1 start from the same x_T) are sampled with the training sampler
(`train.traj_*`, DDIM η = 1 by default) and recorded; the user answers one choice per pair, h = (+1, −1), (−1, +1) or a
tie (0, 0). For every recorded step j with a density (σ_j > 0) of a decisive pair:

    r_i = clamp(exp(log π_θ(x^i_{j+1} | x^i_j) − log π_ref(x^i_{j+1} | x^i_j)), 1 − ε, 1 + ε)      (pixel-mean log-probs)
    L   = −log σ(β (h_0 log r_0 + h_1 log r_1))                    β = d3po.beta, ε = d3po.clip, ref = frozen base

averaged over the optimiser step's pairs and steps, gradients accumulated over the trajectory. Ties give no gradient
(they are not even pushed through the UNet). Both members of a step go through the UNet in one call, and the
log-probs of both under policy and reference plus the loss come from `papa.ops.fused_d3po_loss` (Triton on CUDA).

Logged: the implicit accuracy (the share of decisive (pair, step) items whose policy/reference log-ratio ranks the
preferred member higher, ties 1/2), since the loss itself stays near ln 2.
"""
from __future__ import annotations

import torch

from papa import ops
from dataclasses import dataclass

from papa.algos import register
from papa.algos.base import Items, Method, ratio


def pair_trajectory_items(traj: dict, pairs: torch.Tensor, steps: torch.Tensor, per_member: dict | None = None,
                          **per_pair) -> Items:
    """Items (pair, step) in pair-major order: x_t and x_prev (K, 2, C, H, W), t (K,), coef (K, 5); `per_member`
    tensors (2P, S) recorded per trajectory and step become (K, 2); `per_pair` tensors (P', …) are repeated per step."""
    x = traj["x"].view(-1, 2, *traj["x"].shape[1:])[pairs]  # (P', 2, S+1, C, H, W)
    P, S = len(pairs), len(steps)
    items = Items(x_t=x[:, :, steps].transpose(1, 2).reshape(P * S, 2, *x.shape[3:]),
                  x_prev=x[:, :, steps + 1].transpose(1, 2).reshape(P * S, 2, *x.shape[3:]),
                  t=traj["t"][steps].repeat(P), coef=traj["coef"][steps].repeat(P, 1))
    for k, v in (per_member or {}).items():
        items[k] = v.view(-1, 2, v.shape[1])[pairs][:, :, steps].transpose(1, 2).reshape(P * S, 2)
    for k, v in per_pair.items():
        items[k] = v.repeat_interleave(S, 0)
    return items


@dataclass
class D3POSettings:
    """The `d3po:` config section."""
    beta: float = 0.1                 # beta of the DPO logit
    clip: float = 0.1                 # the ratio is clipped to [1 - clip, 1 + clip]

    def check(self, cfg, require) -> None:
        require(self.beta > 0, "beta", "must be > 0")
        require(0 < self.clip < 1, "clip", "must be in (0, 1) (the ratio is clipped to [1 - clip, 1 + clip])")


def pair_stats(h: torch.Tensor) -> dict:
    return {"round_decisive": int((h != 0).sum()), "round_ties": int((h == 0).sum())}


@register
class D3PO(Method):
    name = "d3po"
    draws, feedback = "trajectory_pairs", "pair"
    Settings = D3POSettings
    diagnostics = ("implicit_accuracy",)
    stat_keys = ("acc_num", "acc_den")

    def build(self, samples, h, query):
        traj = samples.traj
        return {"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "h": h}, pair_stats(h)

    def num_units(self, data: dict) -> int:
        return len(data["h"])

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator):
        h = data["h"][units]
        decisive = units[h != 0]
        steps = torch.nonzero(data["coef"][:, 2] > 0).flatten()
        if len(decisive) == 0:
            return None, Items()
        hh = torch.stack([data["h"][decisive], -data["h"][decisive]], 1).float()
        w = torch.full((len(decisive),), 1.0 / (len(units) * len(steps)))
        return None, pair_trajectory_items(data, decisive, steps, h=hh, w=w)

    def loss(self, ctx, c: Items):
        K = len(c)
        x = c.x_t.flatten(0, 1)
        tt = c.t.repeat_interleave(2)
        eps = self.policy.policy(x, tt).view_as(c.x_t)
        eps_ref = self.policy.reference(x, tt).view_as(c.x_t)
        coef = c.coef[:, None, :].expand(K, 2, 5)
        loss, lp, lr = ops.fused_d3po_loss(c.x_t, eps, eps_ref, c.x_prev, coef, c.h, self.s.beta, self.s.clip)
        with torch.no_grad():
            d = (lp - lr) * c.h  # winner's log-ratio positive, loser's negated
            margin = d.sum(1)
            acc = (margin > 0).float() + 0.5 * (margin == 0).float()
        return (loss * c.w).sum(), {"acc_num": float(acc.sum()), "acc_den": float(K)}

    def summarize(self, stats: dict) -> dict:
        return {"implicit_accuracy": ratio(stats, "acc_num", "acc_den")}
