"""PAL-B on images: one personalised preference model shared by many users, and new users fitted from a few labels.

PAL (Chen et al. 2024, "PAL: Pluralistic Alignment Framework for Learning from Heterogeneous Preferences") gives every
user a point on the simplex over K shared prototypes. On images, with z(x) the frozen base UNet's features
(papa.select.unet_features, standardised over the training images):

    f(x)     = P z(x) + c                         the shared projector (D → d)
    u        = Σ_k softmax(W_u)_k g_k              user u's ideal point: a mixture of the K prototypes g_k ∈ R^d
    r_u(x)   = s · cos(f(x), u),  s = min(exp(σ), 100)     PAL-B's reward, σ the learnt log-scale (init log 1/0.07)
    likes:   p(like | x, u)   = sigmoid(r_u(x) + b)        logistic loss, b one shared offset
    pairs:   p(x_a ≻ x_b | u) = sigmoid(r_u(x_a) − r_u(x_b))   Bradley–Terry cross-entropy

PAL-A (`variant="A"`, the ideal-point model): the prototypes p_k live in the (standardised) feature space, the user's
ideal point is the projection of their mixture, and the reward falls with the distance to it:

    a_u      = P (Σ_k softmax(W_u)_k p_k) + c          r_u(x) = −s · ‖(P z(x) + c) − a_u‖,  s = min(exp(σ), 100)

(σ initialised at 0). Likes and pairs take the same two losses as PAL-B (PAL's own PAL-A uses a hinge on pairs).

Losses are class-balanced per user (a user's likes and dislikes each carry half of that user's weight, every user the
same weight), so a user who likes one class in ten is not fitted as "dislikes everything". A new user gets only their
own K logits W_u, fitted with every shared part frozen: K numbers per user, against D + 1 for an independent logistic
model on the same features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_SCALE = 100.0


class PAL(nn.Module):
    """PAL-B: projector P, prototypes g (K, d), user logits W (U, K), log-scale and offset b. Deterministic given
    `seed` (its own generator; the global one is untouched)."""

    def __init__(self, d_in: int, n_users: int, k: int = 4, d: int = 32, seed: int = 0, variant: str = "B"):
        super().__init__()
        if variant not in ("A", "B"):
            raise ValueError(f"PAL variant must be 'A' (ideal point) or 'B' (linear), got {variant!r}")
        self.variant = variant
        gen = torch.Generator().manual_seed(seed)
        self.proj = nn.utils.skip_init(nn.Linear, d_in, d)   # initialised below from `gen`
        with torch.no_grad():
            bound = 1 / math.sqrt(d_in)
            self.proj.weight.copy_(torch.rand(d, d_in, generator=gen) * 2 * bound - bound)
            self.proj.bias.copy_(torch.rand(d, generator=gen) * 2 * bound - bound)
        self.prototypes = nn.Parameter(torch.randn(k, d if variant == "B" else d_in, generator=gen))
        self.W = nn.Parameter(torch.randn(n_users, k, generator=gen) * 0.1)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07) if variant == "B" else 0.0))
        self.offset = nn.Parameter(torch.zeros(()))
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))

    @property
    def k(self) -> int:
        return self.prototypes.shape[0]

    def set_standardisation(self, feats: torch.Tensor) -> None:
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0, unbiased=False).clamp_min(1e-6))

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """f(x): (N, d); unit length for PAL-B."""
        f = self.proj((feats - self.mean) / self.std)
        return F.normalize(f, dim=1) if self.variant == "B" else f

    def ideal_points(self, logits: torch.Tensor) -> torch.Tensor:
        """u for user logits (U, K): (U, d); PAL-B's unit length, PAL-A's the projected mixture a_u."""
        mix = logits.softmax(-1) @ self.prototypes
        return F.normalize(mix, dim=-1) if self.variant == "B" else self.proj(mix)

    def reward(self, feats: torch.Tensor, users: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """r_u(x) for each row: feats (N, D), users (N,) indices into W (or into `logits`, a stand-in for W)."""
        u = self.ideal_points(self.W if logits is None else logits)[users]
        s = self.log_scale.exp().clamp(max=MAX_SCALE)
        if self.variant == "B":
            return s * (self.embed(feats) * u).sum(1)
        return -s * (self.embed(feats) - u).norm(dim=1)

    def p_like(self, feats: torch.Tensor, users: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.reward(feats, users, logits) + self.offset)


def balanced_weights(users: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: each user's positives and negatives each carry half of that user's weight, each user the same
    (weights sum to 1). y > 0 is the positive class."""
    w = torch.zeros(len(y), dtype=torch.float64)
    uniq = users.unique()
    for u in uniq:
        m = users == u
        pos, neg = m & (y > 0), m & (y <= 0)
        halves = (pos.any().item(), neg.any().item())
        for mask, present in ((pos, halves[0]), (neg, halves[1])):
            if present:
                w[mask] = 1.0 / (mask.sum() * sum(halves))
    return (w / len(uniq)).to(torch.float32)


def like_loss(model: PAL, feats: torch.Tensor, users: torch.Tensor, y: torch.Tensor,
              logits: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced logistic loss on per-image answers y (+1 like, −1 dislike; skips, 0, are left out)."""
    keep = y != 0
    feats, users, y = feats[keep], users[keep], y[keep]
    z = model.reward(feats, users, logits) + model.offset
    return (balanced_weights(users, y) * F.binary_cross_entropy_with_logits(z, (y > 0).float(), reduction="none")).sum()


def pair_loss(model: PAL, first: torch.Tensor, second: torch.Tensor, users: torch.Tensor, y: torch.Tensor,
              logits: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry cross-entropy on pairs: y +1 when the first image is preferred, −1 the second (0, a tie: left
    out); every user the same weight."""
    keep = y != 0
    first, second, users, y = first[keep], second[keep], users[keep], y[keep]
    margin = model.reward(first, users, logits) - model.reward(second, users, logits)
    w = balanced_weights(users, torch.ones_like(y))
    return (w * F.softplus(-y.float() * margin)).sum()


def fit(model: PAL, feats: torch.Tensor, users: torch.Tensor, y: torch.Tensor, steps: int = 400, lr: float = 1e-2,
        weight_decay: float = 1e-3) -> list[float]:
    """Fit every part of the model on per-image answers (full batch, Adam); the standardisation from `feats`.
    Returns the loss per step."""
    model.set_standardisation(feats)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = like_loss(model, feats, users, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fit_user(model: PAL, feats: torch.Tensor, y: torch.Tensor, steps: int = 200, lr: float = 0.1,
             prior: float = 0.01) -> torch.Tensor:
    """A new user's K logits from their answers, everything shared frozen: Adam on the class-balanced logistic loss
    + prior · |w|² / 2 (which pulls an undecided user to the uniform mixture). Returns (K,); the uniform mixture
    (zeros) when no answer is a like or dislike."""
    w = torch.zeros(1, model.k, requires_grad=True)
    keep = y != 0
    if not keep.any():
        return w.detach()[0]
    feats, y = feats[keep], y[keep]
    users = torch.zeros(len(y), dtype=torch.long)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = like_loss(model, feats, users, y, logits=w) + 0.5 * prior * w.square().sum()
            loss.backward()
            opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return w.detach()[0]


def prototype_logits(model: PAL, k: int) -> torch.Tensor:
    """User logits (1, K) whose mixture is prototype k alone (softmax one-hot to within e^-50)."""
    w = torch.zeros(1, model.k)
    w[0, k] = 50.0
    return w


class PrototypeUser:
    """A simulated user who has prototype k's taste: they like an image when PAL's p(like) for prototype k alone is
    above one half and the oracle calls it a legible member of some class (PAL was fitted on real images only, so it
    cannot see a malformed one). Noiseless and never unsure: the prototype adapters' teacher (scripts/new_users.py).
    Answers labels only; features as PAL was fitted on (papa.select.unet_features of the frozen base at `feature_t`)."""
    kinds = ("label",)

    def __init__(self, model: PAL, k: int, base: nn.Module, sched, feature_t: int, oracle: nn.Module):
        from papa.feedback import OracleFeedback
        self.model, self.k, self.base, self.sched, self.t = model.eval(), k, base, sched, feature_t
        self.legible = OracleFeedback(oracle, list(range(10)), reject=True)

    @torch.no_grad()
    def p_like(self, images: torch.Tensor) -> torch.Tensor:
        from papa.select import unet_features
        feats = unet_features(self.base, self.sched, images, self.t)
        return self.model.p_like(feats, torch.zeros(len(feats), dtype=torch.long),
                                 logits=prototype_logits(self.model, self.k))

    @torch.no_grad()
    def ask(self, query) -> torch.Tensor:
        x = query.images
        like = (self.p_like(x) > 0.5) & self.legible.likes(x).cpu()
        return torch.where(like, 1.0, -1.0)
