"""SDPO (docs/ALGORITHMS.md §6): dense stepwise reward differences on paired trajectories, for few-step samplers.

Round: P pairs of trajectories from shared noise, recorded with the training sampler (`train.traj_*`). Each trajectory
queries the reward (the oracle's preferred-class mass) three times, on x̂0 at: the first step, an anchor step
a = argmin_{0<j<S−1} cos(x̂0_j, x̂0_0) + cos(x̂0_j, x̂0_{S−1}) (the most "in between" prediction), and the last step.
Between two queried steps q_l < j < q_r the reward is interpolated by cosine similarity of the x̂0 predictions,

    r̂_j = (s_l r_{q_l} + s_r r_{q_r}) / (s_l + s_r),     s = max(cos(x̂0_j, x̂0_q), 1e-6),

then discounted returns G_j = r̂_j + γ G_{j+1} (γ = `sdpo.gamma`) are normalised per step over the round's
trajectories into advantages A_j (clipped to ±adv_clip). With Δ^i_j = log π_θ − log π_old (π_old recorded while
sampling) for the pair's members i = 1, 2 and w_j = λ^j (λ = `sdpo.lam`):

    L_unc  = (w_j (Δ¹_j − Δ²_j) − (A¹_j − A²_j))²
    L_clip = (w_j clamp(Δ¹_j − Δ²_j, ±c) − (A¹_j − A²_j))²           (c = sdpo.ppo_clip)
    L      = mean over the step's pairs and trained steps of max(L_unc, L_clip)

Budget: 3 reward queries per trajectory, 6 per pair. Logged: mean reward and the fraction of clipped items.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from papa import ops
from dataclasses import dataclass

from papa.algos import register
from papa.algos.base import Items, Method, ratio
from papa.algos.d3po import pair_trajectory_items
from papa.algos.ddpo import PPOSettings

QUERIES_PER_TRAJECTORY = 3


def query_steps(x0_hat: torch.Tensor) -> torch.Tensor:
    """(N, 3) step indices per trajectory: first, anchor, last. x0_hat: (N, S, ...)."""
    N, S = x0_hat.shape[:2]
    if S < 3:
        return torch.tensor([0, 0, S - 1]).expand(N, 3).clone()
    f = x0_hat.flatten(2)
    cos_first = F.cosine_similarity(f, f[:, :1], dim=2)
    cos_last = F.cosine_similarity(f, f[:, -1:], dim=2)
    anchor = (cos_first + cos_last)[:, 1:-1].argmin(1) + 1
    return torch.stack([torch.zeros(N, dtype=torch.long), anchor, torch.full((N,), S - 1)], 1)


def interpolate_rewards(x0_hat: torch.Tensor, q: torch.Tensor, rq: torch.Tensor) -> torch.Tensor:
    """(N, S) dense rewards from the rewards rq (N, 3) queried at steps q (N, 3), by cosine similarity of x̂0."""
    N, S = x0_hat.shape[:2]
    f = x0_hat.flatten(2)
    out = torch.empty(N, S, dtype=rq.dtype)
    for n in range(N):
        for seg in range(2):
            lo, hi = int(q[n, seg]), int(q[n, seg + 1])
            out[n, lo], out[n, hi] = rq[n, seg], rq[n, seg + 1]
            for j in range(lo + 1, hi):
                sl = F.cosine_similarity(f[n, j], f[n, lo], dim=0).clamp_min(1e-6)
                sr = F.cosine_similarity(f[n, j], f[n, hi], dim=0).clamp_min(1e-6)
                out[n, j] = (sl * rq[n, seg] + sr * rq[n, seg + 1]) / (sl + sr)
    return out


def stepwise_advantages(r_dense: torch.Tensor, gamma: float, clip: float) -> torch.Tensor:
    """Discounted returns per trajectory, normalised per step over the trajectories, clipped. (N, S) -> (N, S)."""
    G = torch.zeros_like(r_dense)
    acc = torch.zeros(r_dense.shape[0], dtype=r_dense.dtype)
    for j in range(r_dense.shape[1] - 1, -1, -1):
        acc = r_dense[:, j] + gamma * acc
        G[:, j] = acc
    return ((G - G.mean(0)) / (G.std(0, unbiased=False) + 1e-6)).clamp(-clip, clip)


def sdpo_loss(delta: torch.Tensor, adv: torch.Tensor, w: torch.Tensor, clip: float) -> torch.Tensor:
    """Per item: delta, adv (K, 2) for the two members, w (K,) = λ^j. max of unclipped and clipped squared errors."""
    d = delta[:, 0] - delta[:, 1]
    target = adv[:, 0] - adv[:, 1]
    return torch.maximum((w * d - target).square(), (w * d.clamp(-clip, clip) - target).square())


@dataclass
class SDPOSettings(PPOSettings):
    """The `sdpo:` config section."""
    gamma: float = 0.99               # discount of the stepwise returns
    lam: float = 0.99                 # step weight w_j = lam^j

    def check(self, cfg, require) -> None:
        super().check(cfg, require)
        for k in ("gamma", "lam"):
            require(0 < getattr(self, k) <= 1, k, "must be in (0, 1]")


@register
class SDPO(Method):
    name = "sdpo"
    draws, feedback = "trajectory_pairs", "reward"
    queries_per_unit = 2 * QUERIES_PER_TRAJECTORY  # per pair
    Settings = SDPOSettings
    diagnostics = ("clip_fraction",)
    stat_keys = ("clipped", "count")

    def shown(self, samples):
        """x̂0 at each trajectory's three query steps: (2P · 3, C, H, W), trajectory-major."""
        x0_hat = samples.traj["x0_hat"]
        q = query_steps(x0_hat)
        return torch.gather(x0_hat, 1, q.view(*q.shape, 1, 1, 1).expand(-1, -1, *x0_hat.shape[2:])).flatten(0, 1)

    def build(self, samples, answers, query):
        traj = samples.traj
        rq = answers.view(-1, QUERIES_PER_TRAJECTORY)
        adv = stepwise_advantages(interpolate_rewards(traj["x0_hat"], query_steps(traj["x0_hat"]), rq),
                                  self.s.gamma, self.s.adv_clip)
        return ({"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "log_prob": traj["log_prob"], "adv": adv},
                {"round_reward": float(rq[:, -1].mean())})

    def record(self, query, answers):
        """pair id -> [[3 rewards of the first trajectory], [3 of the second]]."""
        rq = answers.view(-1, 2, QUERIES_PER_TRAJECTORY)
        return {f"r{query.round:03d}_p{p:03d}": [[round(float(v), 4) for v in rq[p, i]] for i in range(2)]
                for p in range(len(rq))}

    def num_units(self, data: dict) -> int:
        return len(data["x"]) // 2

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator):
        steps = torch.nonzero(data["coef"][:, 2] > 0).flatten()
        P, S = len(units), len(steps)
        items = pair_trajectory_items(data, units, steps, {"lp_old": data["log_prob"], "adv": data["adv"]})
        items["wj"] = (self.s.lam ** steps.double()).float().repeat(P)
        items["w"] = torch.full((P * S,), 1.0 / (P * S))
        return None, items

    def loss(self, ctx, c: Items):
        K = len(c)
        x = c.x_t.flatten(0, 1)
        tt = c.t.repeat_interleave(2)
        eps = self.policy.policy(x, tt)
        lp = ops.step_log_prob(x, eps, c.x_prev.flatten(0, 1), c.coef.repeat_interleave(2, 0)).view(K, 2)
        delta = lp - c.lp_old
        loss = sdpo_loss(delta, c.adv, c.wj, self.s.ppo_clip)
        with torch.no_grad():
            clipped = (delta[:, 0] - delta[:, 1]).abs() > self.s.ppo_clip
        return (loss * c.w).sum(), {"clipped": float(clipped.sum()), "count": float(K)}

    def summarize(self, stats: dict) -> dict:
        return {"clip_fraction": ratio(stats, "clipped", "count")}
