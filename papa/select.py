"""Choosing what to ask: a pool of candidates, an online preference model, and the selectors that pick the k images a
person labels.

Each round with `select.selector` set, the engine draws a pool of `select.pool_size` candidates from the policy (the
same per-sample seeds as a round without a pool: candidate i of the pool is image i of that round), reads features of
every candidate from the frozen base UNet, and the selector picks the `train.samples_per_round` the feedback source is
asked about; only those count against the label budget and only they reach the update.

The preference model p(like | image) is fitted online from the person's answers so far (never from the oracle or the
evaluator): an ensemble of L2-regularised logistic regressions on the features, each on a bootstrap resample of the
labels, so the members disagree where the labels do not pin the answer down. Skipped images (label 0) are left out.
Until both a like and a dislike have been seen it is not fitted, and the selectors that need it pick at random
(`fallback` in the round's pool record says so).

Selectors (`select.selector`), each one small class in `SELECTORS`:
- `random`: k uniformly from the pool: the control every other selector is measured against.
- `exploit`: the k with the highest mean p(like).
- `uncertainty`: the k with the highest BALD, H[mean_e p_e] − mean_e H[p_e]: high where the members disagree.
- `diversity`: greedy k-center on the features, the labelled images counting as centres already chosen.
- `uncertainty_diversity`: greedy, BALD plus `select.diversity_weight` × the distance to the nearest chosen or
  labelled image, each scaled to [0, 1] over the pool (the BAL-PM recipe: uncertain and unlike what was asked).
- `exploit_diversity`: greedy, mean p(like) plus `select.diversity_weight` × the distance to the nearest image
  picked this round: the likely liked, spread over the liked classes rather than the surest one.
- `thompson`: for each of the k picks, one ensemble member drawn at random, and its most likely liked candidate.
- `balanced`: Thompson sampling only as far as likes are rare. With s the share of likes and τ = `select.like_share`,
  n = ⌈k (τ − s) / (1 − s)⌉ picks (0 when s ≥ τ) are Thompson sampling's and the other k − n are random, so about
  τ k of the images asked about are likes: where the policy seldom draws a liked image the person still sees some,
  and where it often does the choice is random picks, which do not narrow what PAPA is shown to the model's surest
  class. s is the share of likes among the person's answers to the last 30 random picks (`select.like_share_from:
  answers`; random picks are a fair sample of the policy), or the share of the pool the model calls liked (`model`,
  which a model fitted on a few labels underestimates). With `select.model_min_precision` > 0 the model picks
  nothing in a round after one where fewer than that share of its picks were liked.

Pseudo-labels (`select.pseudo_labels`, off by default; `pseudo_labels` below): after the person answers, the
preference model labels the pool candidates it is surest of among those not asked about, and the update trains on
them beside the person's labels, each at `select.pseudo_weight`. They cost no label, and they are never used to fit
the preference model itself. This makes the preference model steer the update, so it is a separate option from the
selectors and reported apart from them.

Everything random derives from (train.seed, round), so a resumed run selects exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from papa.sampling import draw_noise, sample_generators

SELECTORS: dict[str, type["Selector"]] = {}


def register(cls):
    SELECTORS[cls.name] = cls
    return cls


# --------------------------------------------------------------------------- features


@torch.no_grad()
def unet_features(unet: torch.nn.Module, sched, images: torch.Tensor, t: int, seed: int = 0, pool: int = 3,
                  batch_size: int = 256, shared_noise: bool = False) -> torch.Tensor:
    """(N, D) features of images in [−1, 1]: the frozen UNet's bottleneck (after its middle blocks) on the image noised
    to step t with noise fixed by `seed` and the image's position, average-pooled to pool × pool and flattened.
    `shared_noise`: one noise draw for every image instead, so an image's feature does not depend on its position."""
    out = []
    for b0 in range(0, len(images), batch_size):
        x0 = images[b0:b0 + batch_size]
        # the samplers' per-index seeding, or index 0's draw, drawn once, for every image
        gens = sample_generators(seed, [0] if shared_noise else range(b0, b0 + len(x0)))
        noise = draw_noise(gens, 1, tuple(x0.shape[1:]))[:, 0].expand(len(x0), *x0.shape[1:]).to(x0.device)
        xt = sched.add_noise(x0, noise, torch.full((len(x0),), t, device=x0.device))
        out.append(F.adaptive_avg_pool2d(unet.features(xt, t), pool).flatten(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


# --------------------------------------------------------------------------- the preference model


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy (nats), elementwise."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@dataclass
class PreferenceModel:
    """An ensemble of logistic regressions p_e(like | f) = σ(w_e·z + b_e) on standardised features z."""
    w: torch.Tensor            # (E, D)
    b: torch.Tensor            # (E,)
    mean: torch.Tensor         # (D,) feature standardisation
    std: torch.Tensor

    def probs(self, feats: torch.Tensor) -> torch.Tensor:
        """(E, N) each member's p(like) of each image."""
        z = (feats - self.mean) / self.std
        return torch.sigmoid(z @ self.w.T + self.b).T

    @classmethod
    def fit(cls, feats: torch.Tensor, y: torch.Tensor, members: int, l2: float, seed: int,
            steps: int = 100) -> "PreferenceModel | None":
        """Fit on the labelled features `feats` (N, D) and answers `y` (+1 like, −1 dislike, 0 skipped: left out);
        None until both a like and a dislike are among them. Each member sees a bootstrap resample (the first member
        all labels), classes weighted to equal mass; L-BFGS on the mean log-loss + l2·|w|²/2."""
        keep = y != 0
        f, t = feats[keep].double(), (y[keep] > 0).double()
        if len(t) == 0 or t.min() == t.max():
            return None
        mean, std = f.mean(0), f.std(0, unbiased=False).clamp_min(1e-6)
        z = (f - mean) / std
        gen = torch.Generator().manual_seed(seed)
        ws, bs = [], []
        for e in range(members):
            idx = torch.arange(len(t)) if e == 0 else torch.randint(len(t), (len(t),), generator=gen)
            ze, te = z[idx], t[idx]
            pos = te.sum().clamp_min(1.0)
            neg = (len(te) - te.sum()).clamp_min(1.0)
            wt = torch.where(te > 0, 0.5 / pos, 0.5 / neg)   # each class half the loss
            w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
            b = torch.zeros((), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = (wt * F.binary_cross_entropy_with_logits(ze @ w + b, te, reduction="none")).sum() \
                    + 0.5 * l2 * w.square().sum()
                loss.backward()
                return loss
            opt.step(closure)
            ws.append(w.detach())
            bs.append(b.detach())
        return cls(torch.stack(ws).float(), torch.stack(bs).float(), mean.float(), std.float())


# --------------------------------------------------------------------------- selectors


@dataclass
class Pool:
    """What a selector sees: the candidates' features, the preference model's members' p(like) of each (None before
    it is fitted), the features of the images labelled so far, and the round's generator."""
    feats: torch.Tensor                    # (M, D)
    probs: torch.Tensor | None             # (E, M)
    labelled: torch.Tensor                 # (L, D), L may be 0
    gen: torch.Generator
    answers: torch.Tensor | None = None    # (L,) the answers to the labelled images (+1, -1, 0 skipped)
    model_picked: torch.Tensor | None = None   # (L,) bool: asked because the model picked it (not a random pick)
    asked_round: torch.Tensor | None = None    # (L,) the round each was asked in


class Selector:
    """Picks k of a pool's M candidates (indices, in pick order). `needs_model`: it falls back to random until the
    preference model is fitted."""
    name = "?"
    needs_model = True

    def __init__(self, settings):
        self.s = settings
        self.info: dict = {}          # anything the round's pool record should show about this choice

    def pick(self, pool: Pool, k: int) -> list[int]:
        raise NotImplementedError


@register
class Random(Selector):
    name, needs_model = "random", False

    def pick(self, pool, k):
        return torch.randperm(len(pool.feats), generator=pool.gen)[:k].tolist()


@register
class Exploit(Selector):
    name = "exploit"

    def pick(self, pool, k):
        return pool.probs.mean(0).topk(k).indices.tolist()


def bald(probs: torch.Tensor) -> torch.Tensor:
    """(M,) BALD of an ensemble's (E, M) probabilities: the entropy of the mean minus the mean entropy."""
    return entropy(probs.mean(0)) - entropy(probs).mean(0)


@register
class Uncertainty(Selector):
    name = "uncertainty"

    def pick(self, pool, k):
        return bald(pool.probs).topk(k).indices.tolist()


def _greedy(feats: torch.Tensor, labelled: torch.Tensor, k: int, score: torch.Tensor | None, weight: float,
            first: int) -> list[int]:
    """Greedy picks maximising score + weight · (distance to the nearest chosen or labelled image), both scaled to
    [0, 1] over the pool; score None: pure k-center (the first pick `first` when nothing is labelled yet)."""
    mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
    z, zl = (feats - mean) / std, (labelled - mean) / std
    d = torch.cdist(z, zl).min(1).values if len(zl) else torch.full((len(z),), math.inf)
    s = torch.zeros(len(z)) if score is None else score / score.max().clamp_min(1e-12)
    chosen: list[int] = []
    for _ in range(k):
        if not torch.isfinite(d).any():
            i = first if score is None else int(s.argmax())
        else:
            dn = torch.where(torch.isfinite(d), d, 0.0)
            dn = dn / dn.max().clamp_min(1e-12)
            total = s + weight * dn
            total[chosen] = -math.inf
            i = int(total.argmax())
        chosen.append(i)
        d = torch.minimum(d, torch.cdist(z, z[i:i + 1]).squeeze(1))
        d[chosen] = 0.0
    return chosen


@register
class Diversity(Selector):
    name, needs_model = "diversity", False

    def pick(self, pool, k):
        first = int(torch.randint(len(pool.feats), (1,), generator=pool.gen))
        return _greedy(pool.feats, pool.labelled, k, None, 1.0, first)


@register
class UncertaintyDiversity(Selector):
    name = "uncertainty_diversity"

    def pick(self, pool, k):
        return _greedy(pool.feats, pool.labelled, k, bald(pool.probs), self.s.diversity_weight, 0)


@register
class ExploitDiversity(Selector):
    """The likely liked, spread out: greedy, mean p(like) plus `diversity_weight` × the distance to the nearest image
    picked this round (each scaled to [0, 1] over the pool). Exploit alone asks about the surest likes, mostly of one
    class; here a second pick from the same cluster loses to a likely like from another, so the likes asked about
    (and trained on) cover the liked classes, and once they are covered the far, unlikely ones (dislikes that teach
    what is not wanted) come in. Earlier rounds' images do not count as picked, unlike `uncertainty_diversity`'s."""
    name = "exploit_diversity"

    def pick(self, pool, k):
        none = torch.zeros(0, pool.feats.shape[1])
        return _greedy(pool.feats, none, k, pool.probs.mean(0), self.s.diversity_weight, 0)


@register
class Thompson(Selector):
    name = "thompson"

    def pick(self, pool, k):
        chosen: list[int] = []
        for _ in range(k):
            e = int(torch.randint(len(pool.probs), (1,), generator=pool.gen))
            p = pool.probs[e].clone()
            p[chosen] = -1.0
            chosen.append(int(p.argmax()))
        return chosen


SHARE_WINDOW = 30   # balanced: the share of likes is counted over the answers to this many latest random picks


@register
class Balanced(Selector):
    name = "balanced"

    def pick(self, pool, k):
        share, seen = float((pool.probs.mean(0) > 0.5).float().mean()), pool.answers is not None
        if self.s.like_share_from == "answers" and seen:
            y = pool.answers[~pool.model_picked & (pool.answers != 0)][-SHARE_WINDOW:]
            share = float((y > 0).float().mean()) if len(y) else share
        tau, trusted = self.s.like_share, True
        if self.s.model_min_precision > 0 and seen and len(pool.answers):
            last = (pool.asked_round == pool.asked_round.max()) & pool.model_picked & (pool.answers != 0)
            trusted = not last.any() or float((pool.answers[last] > 0).float().mean()) >= self.s.model_min_precision
        n = 0 if share >= tau or not trusted else min(k, math.ceil(k * (tau - share) / (1.0 - share) - 1e-9))
        chosen = Thompson(self.s).pick(pool, n) if n else []
        rest = torch.ones(len(pool.feats), dtype=torch.bool)
        rest[chosen] = False
        others = rest.nonzero().flatten()
        chosen += others[torch.randperm(len(others), generator=pool.gen)[:k - n]].tolist()
        self.info = {"like_share": round(share, 4), "trusted": trusted, "model_picks": n}
        return chosen


# --------------------------------------------------------------------------- the round's choice


def choose(settings, feats: torch.Tensor, labelled: torch.Tensor, y: torch.Tensor, k: int, seed: int,
           model_picked: torch.Tensor | None = None, asked_round: torch.Tensor | None = None) -> tuple[list[int], dict]:
    """The k candidates of a pool (features `feats`) that round seed `seed` asks about, given the labelled features
    and answers so far (and, for each, whether the model picked it and in which round), and a record: the selector,
    whether it fell back to random, how many of the chosen (the first ones) the model picked, p(like) of the chosen."""
    gen = torch.Generator().manual_seed(seed * 7 + 3)
    model = PreferenceModel.fit(labelled, y, settings.ensemble, settings.l2, seed)
    probs = model.probs(feats) if model is not None else None
    sel = SELECTORS[settings.selector](settings)
    fallback = sel.needs_model and probs is None
    if fallback:
        sel = Random(settings)
    history = (y, model_picked.bool(), asked_round) if model_picked is not None else (None, None, None)
    idx = sel.pick(Pool(feats, probs, labelled, gen, *history), min(k, len(feats)))
    rec = {"selector": settings.selector, "fallback": "random" if fallback else None, "pool_size": len(feats),
           "chosen": idx, "model_picks": 0 if isinstance(sel, Random) else len(idx), **sel.info}
    if probs is not None:
        rec["p_like"] = [round(float(v), 4) for v in probs.mean(0)[idx]]
        rec["pool_p_like_mean"] = round(float(probs.mean()), 4)
    return idx, rec


def pseudo_labels(settings, feats: torch.Tensor, asked: list[int], labelled: torch.Tensor, y: torch.Tensor,
                  seed: int) -> tuple[list[int], torch.Tensor, list[float]]:
    """The pool's candidates the preference model labels in the person's stead (`select.pseudo_labels`): the model
    is refitted on every answer so far (this round's included; never the oracle's or the evaluator's), and of the
    candidates not asked about, those with mean p(like) >= `pseudo_confidence` become likes (+1) and those with
    p <= 1 − it dislikes (−1), at most `pseudo_labels` of them, the surest (farthest from 1/2) first, ties by index.
    Returns (pool indices, labels, their p(like)); nothing while the model cannot be fitted (no like or no dislike)."""
    model = PreferenceModel.fit(labelled, y, settings.ensemble, settings.l2, seed * 11 + 5)
    if model is None:
        return [], torch.zeros(0), []
    p = model.probs(feats).mean(0)
    c = settings.pseudo_confidence
    rest = torch.ones(len(p), dtype=torch.bool)
    rest[asked] = False
    sure = rest & ((p >= c) | (p <= 1 - c))
    cand = sure.nonzero().flatten()
    order = torch.argsort((p[cand] - 0.5).abs(), descending=True, stable=True)
    idx = cand[order][:settings.pseudo_labels]
    return idx.tolist(), torch.where(p[idx] >= 0.5, 1.0, -1.0), [round(float(v), 4) for v in p[idx]]


def prediction_stats(p_like: list[float] | None, y: torch.Tensor) -> dict:
    """How well the preference model foresaw the answers it had not seen: accuracy of p > 0.5 and the Brier score on
    the answered (non-skipped) images of a round; empty before it is fitted."""
    keep = y != 0
    if p_like is None or not keep.any():
        return {}
    p, t = torch.tensor(p_like)[keep], (y[keep] > 0).float()
    return {"pref_acc": round(float(((p > 0.5).float() == t).float().mean()), 4),
            "pref_brier": round(float((p - t).square().mean()), 4)}
