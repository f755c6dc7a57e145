"""Diffusion-KTO (docs/ALGORITHMS.md §13): per-image likes and dislikes, trajectory-free, no pairs, no reward model.

Li et al. (NeurIPS 2024), after KTO (Ethayarajh et al., 2024); the exact loss follows the authors' code
(jacklishufan/diffusion-kto, `train_kto_sd_v1.5.py`, `--loss kto --halo sigmoid`, default `--bce_offset none`).

Round: N images from the current model (the configured sampler), one label each as PAPA asks it: y = +1 (like),
−1 (dislike) or 0 (skip). For each labelled image x0 and M draws (t, ε), t ~ U{0, …, T−1}, ε ~ N(0, I)
(M = `diffusion_kto.timesteps_per_sample`), x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε:

    r_θ(x0, t, ε) = −(‖ε − ε_θ(x_t, t)‖² − ‖ε − ε_ref(x_t, t)‖²)          implicit reward (pixel-mean squared norms)
    z_ref         = max(0, mean of r_θ over the step's items or the round's)   reference point, detached (below)
    L(x0, t, ε)   = λ_D · (1 − σ(β (r_θ − z_ref)))                         liked
                    λ_U · (1 − σ(β (z_ref − r_θ)))                         disliked

averaged over the step's images (skipped ones count as zero and are never run through the UNet) and their M draws;
β = `diffusion_kto.beta`, λ_D, λ_U = `diffusion_kto.desirable_weight`, `undesirable_weight`, ref = the frozen base
model. As in the code there is no time weighting: the paper's T·ω(λ_t) is absorbed into β, as Diffusion-DPO's is.

The reference point. The code's default takes the mean implicit reward of the whole batch (every image on every GPU,
liked and disliked alike: KTO's estimate of KL(π_θ ‖ π_ref), of which r_θ is the one-sample ELBO proxy), clips it at
0 (a KL is never negative) and detaches it. The images are the policy's own samples here (online), so this is an
estimate of the KL under the policy's distribution, which KTO intends and the offline code only approximates.
Skipped images are not in the mean. Over which images (`diffusion_kto.reference_over`):

    step    the optimiser step's own items: the code's estimator, whose batch held 8 images (4 GPUs × 2). With
            `train.batch_size: 1` that is one image's own M draws, so z_ref moves with the very image it judges:
            whether an image is past the reference point no longer says whether the policy favours it over its
            typical sample, and the implicit accuracy measures only how r_θ spreads over t within one image.
    round   every labelled image of the round, D = `diffusion_kto.reference_draws` fresh (t, ε) draws each, under the
            current policy at every optimiser step: the code's batch mean over several images, for steps of one.
            Measured against `step` on MNIST (one seed, docs/COMPARE.md, "The sweeps"): rates and FIDs within about
            the spread between seeds, so the comparisons keep the code's `step`.

Either way z_ref is computed over the whole work list before the engine splits it into chunks and ranks, so it, and
with it the maths, does not depend on the chunk size or the world size.

How it is chunked. Each item (x0, t, ε) has its own sigmoid: like Diffusion-DPO, the paper moves the expectation over
the chain outside the utility (Jensen), and its code draws one t per image per step; papa's M draws per image are that
estimator with the image repeated M times in the batch. Given z_ref, the step's loss is a sum over items, which the
engine splits exactly. z_ref itself needs every item's r_θ before any gradient is taken, so `step_items` runs the
policy (without gradients) and the reference over the step's items once, in chunks of `train.timestep_chunk`, and
keeps the reference errors in the work list, so `loss` runs the policy alone. The price is one extra no-gradient policy
evaluation per item (and, on several ranks, every rank computes the whole pre-pass, so that z_ref needs no
collective); a z_ref lagged by one step would avoid it but is not the code's estimator. With `reference_over: round`
the step's items need only the reference's errors, and z_ref costs a policy and a reference evaluation of the round's
n·D draws instead.

Logged: `implicit_accuracy`, the share of items on the label's side of the reference point (y·(r_θ − z_ref) > 0, ties
½, the code's `acc`), and `reference_point`, the mean z_ref over the round's items.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from papa.algos import register
from papa.algos.base import ImageLabels, Items, Method, ratio


def denoising_error(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """‖ε − ε̂‖², pixel mean, per row."""
    return (eps_hat - eps).square().flatten(1).mean(1)


def implicit_reward(err: torch.Tensor, err_ref: torch.Tensor) -> torch.Tensor:
    """r_θ = −(‖ε − ε_θ‖² − ‖ε − ε_ref‖²): positive where the policy denoises better than the reference."""
    return -(err - err_ref)


def reference_point(r: torch.Tensor) -> torch.Tensor:
    """z_ref = max(0, mean r), detached: the batch KL estimate, clipped at 0."""
    return r.detach().mean().clamp_min(0.0)


def kto_loss(r: torch.Tensor, z_ref: float | torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """1 − σ(y·β·(r − z_ref)) per item, y = +1 (liked) or −1 (disliked); the λ weights are applied by the caller."""
    return 1.0 - torch.sigmoid(y * beta * (r - z_ref))


@dataclass
class DiffusionKTOSettings:
    """The `diffusion_kto:` config section."""
    beta: float = 1000.0              # the code's default (--beta_dpo) for a pixel-mean MSE, which absorbs T·ω(λ_t)
    desirable_weight: float = 1.0     # λ_D, the code's --lambda_d_kto
    undesirable_weight: float = 1.0   # λ_U, the code's --lambda_u_kto
    timesteps_per_sample: int = 100   # M (t, ε) draws per labelled image and optimiser step (as diffusion_dpo's)
    reference_over: str = "step"      # z_ref over the step's items (the code's) or the round's labelled images
    reference_draws: int = 10         # D (t, ε) draws per image for z_ref with reference_over: round

    def check(self, cfg, require) -> None:
        require(self.reference_over in ("step", "round"), "reference_over", "must be step or round")
        require(self.reference_draws >= 1, "reference_draws", "must be >= 1")
        require(self.beta > 0, "beta", "must be > 0")
        require(self.desirable_weight >= 0, "desirable_weight", "must be >= 0")
        require(self.undesirable_weight >= 0, "undesirable_weight", "must be >= 0")
        require(self.timesteps_per_sample >= 1, "timesteps_per_sample", "must be >= 1")


@register
class DiffusionKTO(ImageLabels, Method):
    """Diffusion-KTO: one label per image (+1 / −1 / 0); the utility loss above over (image, t, ε) items."""
    name = "diffusion_kto"
    draws, feedback = "images", "label"
    Settings = DiffusionKTOSettings
    diagnostics = ("implicit_accuracy", "reference_point")
    stat_keys = ("acc_num", "acc_den", "z_num")

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator):
        y = data["y"][units].float()
        decided, yd = units[y != 0], y[y != 0].sign()
        if len(decided) == 0:
            return None, Items()
        M, n = self.s.timesteps_per_sample, len(decided)
        x = data["x"][decided].repeat_interleave(M, 0)
        t = torch.randint(0, self.sched.T, (n * M,), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        sign = yd.repeat_interleave(M)
        lam = torch.where(sign > 0, self.s.desirable_weight, self.s.undesirable_weight)
        if "trust" in data:  # pseudo-labels (select.pseudo_labels) at their weight
            lam = lam * data["trust"][decided].float().repeat_interleave(M)
        items = Items(x=x, t=t, eps=eps, y=sign, w=lam / (len(units) * M))
        if self.s.reference_over == "step":
            # 1. every item's denoising error under the policy and the reference, 2. the reference point from them
            err, err_ref = self._errors(items)
            items["err_ref"] = err_ref
            return float(reference_point(implicit_reward(err, err_ref))), items
        items["err_ref"] = self._errors(items, policy=False)[1]
        return float(reference_point(self.round_rewards(data, gen))), items

    def round_rewards(self, data: dict, gen: torch.Generator) -> torch.Tensor:
        """r_θ of every labelled image of the round at D fresh (t, ε) draws each, under the current policy."""
        labelled = (data["y"] != 0).nonzero().flatten()
        D = self.s.reference_draws
        x = data["x"][labelled].repeat_interleave(D, 0)
        ref_items = Items(x=x, t=torch.randint(0, self.sched.T, (len(x),), generator=gen),
                          eps=torch.randn(x.shape, generator=gen))
        return implicit_reward(*self._errors(ref_items))

    @torch.no_grad()
    def _errors(self, items: Items, policy: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(‖ε − ε_θ‖², ‖ε − ε_ref‖²) of every item, in chunks of `train.timestep_chunk`, on the engine's device;
        the first None without `policy`."""
        err, err_ref = [], []
        for c in range(0, len(items), self.t.timestep_chunk):
            ch = items.slice(slice(c, c + self.t.timestep_chunk)).to(self.device)
            x_t = self.sched.add_noise(ch.x, ch.eps, ch.t)
            if policy:
                err.append(denoising_error(self.policy.policy(x_t, ch.t), ch.eps).float().cpu())
            err_ref.append(denoising_error(self.policy.reference(x_t, ch.t), ch.eps).float().cpu())
        return (torch.cat(err) if policy else None), torch.cat(err_ref)

    def loss(self, z_ref: float, c: Items):
        x_t = self.sched.add_noise(c.x, c.eps, c.t)
        r = implicit_reward(denoising_error(self.policy.policy(x_t, c.t), c.eps), c.err_ref)
        loss = (c.w * kto_loss(r, z_ref, c.y, self.s.beta)).sum()
        with torch.no_grad():
            side = c.y * (r - z_ref)
            acc = (side > 0).float() + 0.5 * (side == 0).float()
        return loss, {"acc_num": float(acc.sum()), "acc_den": float(len(c)), "z_num": z_ref * len(c)}

    def summarize(self, stats: dict) -> dict:
        return {"implicit_accuracy": ratio(stats, "acc_num", "acc_den"),
                "reference_point": ratio(stats, "z_num", "acc_den")}
