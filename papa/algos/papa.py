"""PAPA / ePAPA loss (docs/ALGORITHMS.md §2): an ELBO-weighted signed likelihood term plus QPDE, no reward model.

For a sample x0 with label y ∈ {+1, −1, 0}, noise ε (one draw reused for every t, as the reference, unless
`noise_per_timestep`), x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε:

    pref(x0) = Σ_{t ∈ trained} λ_t · mean_pixels(ε_θ(x_t, t) − ε)²,     λ_t = (1 − α_t) / (α_t (1 − ᾱ_{t−1}))
    QPDE     = mean_pixels(ε_θ(x_t*, t*) − ε_base(x_t*, t*))²             (only for y = +1 unless qpde_on_negatives)
    loss     = mean_batch( y · pref · pref_loss_coef + QPDE · model_loss_coef )

(`negative_weight` scales the y = −1 term; 1.0 is the reference, whose unlikelihood ascent is unbounded.)

Bounded unlikelihood (`negative_cap` = κ > 0): a disliked sample's term uses min(mse(ε_θ, ε), (1 + κ)·mse(ε_base, ε))
instead of mse(ε_θ, ε), so its gradient stops once the policy denoises that sample (1 + κ) times worse than the frozen
base model does. Without it a run whose samples turn all-negative pushes the loss to −∞ and the model collapses
(measured: MNIST seed 1 of the default config went to 100 % eights by round 10, docs/ALIGNMENT.md).

Balanced likes (`liked_balance` = f > 0): each liked sample's term is weighted by its inverse density among every
liked image so far (a Gaussian kernel, bandwidth f × their median distance), raised to `balance_power`, normalised to
mean 1 (clipped at 3). The density is taken on pixels or (`balance_space: features`) on the frozen base UNet's
features, where images of one class lie closer together than on pixels (scripts/balance_probe.py measures both). An
easy liked class that the policy draws ever more often (MNIST's ones: alike, so close together) then gets less weight
per sample, instead of more training the more it is drawn (the rich-get-richer swings of docs/ALIGNMENT.md).

Liked samples get their likelihood bound raised, disliked ones lowered; QPDE keeps liked samples near the base model.
ePAPA trains only t ∈ [k, T−1]. The sum over trained steps may be replaced by an unbiased stratified estimate with M
steps per sample (one uniform draw per stratum, weighted by the stratum's size). Everything is expressed as a flat
list of (sample, t, weights) items so the engine can push chunks of them through the UNet and shard them over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from papa.algos import register
from papa.algos.base import ImageLabels, Method
from papa.schedule import NoiseSchedule


def papa_weights(sched: NoiseSchedule, t0_weight: str = "reference", weighting: str = "elbo") -> torch.Tensor:
    """λ_t for t = 0 … T−1 (float64). t = 0: 'reference' wraps ᾱ_{−1} to ᾱ_{T−1} (≈ 1e-4, as the reference code),
    'skip' gives 0, 'clamp' copies λ_1 (the true value is undefined: 1 − ᾱ_{−1} = 0)."""
    b, ab = sched.betas64, sched.alpha_bars64
    ab_prev = torch.roll(ab, 1)  # ab_prev[0] = ᾱ_{T−1}: the reference's wrap-around
    lam = b / ((1 - b) * (1 - ab_prev))
    if t0_weight == "skip":
        lam[0] = 0.0
    elif t0_weight == "clamp":
        lam[0] = lam[1]
    if weighting == "uniform":  # the ELBO total, spread evenly: class identity is decided at high t, where λ_t is tiny
        lam = torch.where(lam > 0, lam.sum() / (lam > 0).sum(), lam)
    return lam


@dataclass
class WorkItems:
    """A flat list of UNet evaluations for one optimiser step; loss = Σ_k w_pref[k]·mse(ε_θ, ε) + w_qpde[k]·mse(ε_θ, ε_base)."""
    sample: torch.Tensor     # (K,) index into the minibatch
    t: torch.Tensor          # (K,)
    eps: torch.Tensor        # (K, C, H, W) target noise
    w_pref: torch.Tensor     # (K,)
    w_qpde: torch.Tensor     # (K,)
    cap: torch.Tensor | None = None  # (K,) 1 + κ for capped (disliked) items, 0 for uncapped ones

    def __len__(self) -> int:
        return len(self.t)

    def slice(self, sl: slice) -> "WorkItems":
        return WorkItems(self.sample[sl], self.t[sl], self.eps[sl], self.w_pref[sl], self.w_qpde[sl],
                         None if self.cap is None else self.cap[sl])

    def to(self, device) -> "WorkItems":
        return WorkItems(self.sample.to(device), self.t.to(device), self.eps.to(device), self.w_pref.to(device),
                         self.w_qpde.to(device), None if self.cap is None else self.cap.to(device))


def trained_steps(s: PAPASettings, T: int, lam: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(s.epapa_k, T)
    return steps[lam[steps] > 0]


def mean_one_clipped(r: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Positive weights r normalised to mean 1, clipped at `max_weight` (one odd sample must not dominate a step) and
    normalised to mean 1 again: the last step of every per-sample weighting here."""
    r = (r / r.mean()).clamp_max(max_weight)
    return r / r.mean()


def strata(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, size) of m near-equal strata of n steps (each at least one step long): the stratified subsample of the
    trained steps draws one step uniformly in each and weights it by the stratum's size."""
    edges = torch.linspace(0, n, m + 1, dtype=torch.float64).round().long()
    return edges[:-1], (edges[1:] - edges[:-1]).clamp_min(1)


def liked_weights(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, f: float,
                  max_weight: float = 3.0, standardise: bool = False, power: float = 1.0) -> torch.Tensor:
    """Per-sample weights (N,) of a training set x (N, …) with labels y: 1 for disliked and unlabeled samples; for liked
    ones (Σ_j k(x_i, p_j))^−power over the pool of every liked image so far p (k Gaussian, bandwidth f × the pool's
    median pairwise distance), normalised to mean 1 over the liked, clipped at `max_weight` (an isolated, often odd,
    sample must not dominate a step) and normalised again. x and pool are pixels or feature vectors
    (`balance_features`); `standardise` first scales each dimension by the pool's mean and standard deviation."""
    w = torch.ones(len(y), dtype=torch.float64)
    liked = y > 0
    if f <= 0 or len(pool) < 3 or not liked.any():
        return w
    p = pool.flatten(1).double()
    if standardise:
        mu, sd = p.mean(0), p.std(0).clamp_min(1e-6)
        p, x = (p - mu) / sd, (x.flatten(1).double() - mu) / sd
    dp = torch.cdist(p, p)
    h = f * dp[~torch.eye(len(p), dtype=torch.bool)].median().clamp_min(1e-8)
    d = torch.cdist(x[liked].flatten(1).double(), p)
    w[liked] = mean_one_clipped(torch.exp(-d.square() / (2 * h * h)).sum(1).pow(-power), max_weight)
    return w


def base_ratio_weights(x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, policy: torch.Tensor, f: float,
                       power: float = 1.0, max_weight: float = 3.0) -> torch.Tensor:
    """Per-sample weights (N,) that pull the liked samples back to the base model's proportions (`papa.base_ratio`):
    1 for disliked and unlabeled samples; each liked x_i gets (p̂_base(x_i) / p̂_policy(x_i))^power, the two Gaussian-
    kernel density estimates over `base` (the frozen base model's samples) and `policy` (the policy's recent samples),
    bandwidth f × the base set's median pairwise distance; normalised to mean 1 over the liked, clipped at
    `max_weight` and normalised again. Training on liked policy samples weighted so estimates the likelihood of the
    base's liked samples instead: a liked class the policy already over-draws (a takeover) gets less weight, one it
    starves more. x, base and policy are feature vectors (`balance_features`)."""
    w = torch.ones(len(y), dtype=torch.float64)
    liked = y > 0
    if f <= 0 or len(base) < 3 or len(policy) < 3 or not liked.any():
        return w
    b, q, xl = base.flatten(1).double(), policy.flatten(1).double(), x[liked].flatten(1).double()
    db = torch.cdist(b, b)
    h = f * db[~torch.eye(len(b), dtype=torch.bool)].median().clamp_min(1e-8)

    def log_density(pts: torch.Tensor) -> torch.Tensor:  # log of the mean kernel, stable for a narrow bandwidth
        return torch.logsumexp(-torch.cdist(xl, pts).square() / (2 * h * h), 1) - math.log(len(pts))
    w[liked] = mean_one_clipped(((log_density(b) - log_density(q)) * power).clamp(-30, 30).exp(), max_weight)
    return w


def tempered_weights(log_r: torch.Tensor, y: torch.Tensor, power: float = 1.0, max_weight: float = 3.0) -> torch.Tensor:
    """Per-sample weights (N,) from log density ratios log_r (N,): 1 for disliked and unlabeled samples; each liked one
    gets exp(power · log_r), normalised to mean 1 over the liked, clipped at `max_weight` and normalised again (the
    normalisation of `base_ratio_weights`)."""
    w = torch.ones(len(y), dtype=torch.float64)
    liked = y > 0
    if not liked.any():
        return w
    a = log_r[liked].double() * power
    w[liked] = mean_one_clipped((a - a.max()).exp(), max_weight)   # less the largest: no overflow, same after normalising
    return w


@torch.no_grad()
def elbo_log_ratio(policy, base, sched: NoiseSchedule, x0: torch.Tensor, lam: torch.Tensor, k: int, steps: int,
                   gen: torch.Generator, batch_size: int = 256) -> torch.Tensor:
    """(N,) estimates of log p_base(x0) − log p_policy(x0) from the two models' evidence lower bounds:
    Σ_{t ≥ k} (λ_t / 2) · D · (mse(ε_policy(x_t, t), ε) − mse(ε_base(x_t, t), ε)), D the values per image. The steps
    below k cancel (ePAPA samples them with the base model). The sum is estimated on `steps` stratified steps of
    t ≥ k (one uniform draw per stratum, weighted by its size) with one noise draw per sample shared by both models,
    so most of the noise of the two bounds cancels in the difference. `policy` and `base` are callables
    (x, t) -> ε̂; deterministic given `gen`."""
    T = sched.T
    trained = torch.arange(k, T)
    trained = trained[lam[trained] > 0]
    n, N = len(trained), len(x0)
    M = min(steps, n)
    start, size = strata(n, M)
    off = (torch.rand((N, M), generator=gen, dtype=torch.float64) * size).long()
    t = trained[start + off]                                         # (N, M)
    coef = (lam[t] / 2 * size * x0[0].numel()).reshape(-1)           # (N·M,)
    eps = torch.randn(x0.shape, generator=gen)
    sample_of = torch.arange(N).repeat_interleave(M)
    t = t.reshape(-1)
    dev = x0.device
    diff = torch.empty(len(t), dtype=torch.float64)
    for a in range(0, len(t), batch_size):
        sl = slice(a, a + batch_size)
        e = eps[sample_of[sl]].to(dev)
        tt = t[sl].to(dev)
        x_t = sched.add_noise(x0[sample_of[sl]].to(dev), e, tt)
        mse = lambda net: (net(x_t, tt) - e).square().flatten(1).mean(1).double().cpu()
        diff[sl] = mse(policy) - mse(base)
    return torch.zeros(N, dtype=torch.float64).index_add_(0, sample_of, diff * coef)


def label_weights(y: torch.Tensor, max_weight: float = 3.0) -> torch.Tensor:
    """Per-sample weights (N,) that give a round's likes and its dislikes half the total weight each
    (`papa.label_balance`): n / (2 n_+) for every like and n / (2 n_−) for every dislike, n = n_+ + n_−, each clipped
    at `max_weight`; 1 where a round holds only one kind, and for unlabeled samples. A round with one like in ten then
    weighs its like 5× (clipped to 3) and its dislikes 0.56×, one with eight likes weighs its two dislikes 2.5×."""
    w = torch.ones(len(y), dtype=torch.float64)
    pos, neg = y > 0, y < 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos and n_neg:
        n = n_pos + n_neg
        w[pos] = min(n / (2 * n_pos), max_weight)
        w[neg] = min(n / (2 * n_neg), max_weight)
    return w


def balance_features(unet: torch.nn.Module, sched: NoiseSchedule, images: torch.Tensor, t: int) -> torch.Tensor:
    """(N, 576) features for balancing likes: the frozen base UNet's bottleneck at step t, pooled 3 × 3 (the selectors'
    features, papa.select.unet_features), with one noise draw shared by every image so that an image's feature is a
    function of the image alone (the same liked image in this round and in the pool gets the same vector)."""
    from papa.select import unet_features
    dev = next(unet.parameters()).device
    return unet_features(unet, sched, images.to(dev), t, shared_noise=True).double()


def plan_items(x0: torch.Tensor, y: torch.Tensor, sched: NoiseSchedule, cfg_train: PAPASettings, lam: torch.Tensor,
               gen: torch.Generator, weight: torch.Tensor | None = None) -> WorkItems:
    """Build the work list for a minibatch x0 (B, C, H, W) with labels y (B,) and optional per-sample weights of the
    likelihood term (`liked_weights`). Deterministic given `gen`."""
    B = x0.shape[0]
    steps = trained_steps(cfg_train, sched.T, lam)
    n = len(steps)
    M = cfg_train.timesteps_per_sample or n
    samples, ts, wp, wq, caps = [], [], [], [], []
    kappa = cfg_train.negative_cap
    for i in range(B):
        if M >= n:
            t_i, imp = steps, torch.ones(n, dtype=torch.float64)
        else:  # stratified: M strata of the trained steps, one uniform draw in each, weight = stratum size
            start, size = strata(n, M)
            off = (torch.rand(M, generator=gen, dtype=torch.float64) * size).long()
            t_i, imp = steps[start + off], size.double()
        y_i = float(y[i])
        if y_i == 0:
            continue  # an unlabeled (ignored) sample contributes nothing
        w = y_i * cfg_train.pref_loss_coef * lam[t_i] * imp / B
        if weight is not None:
            w = w * float(weight[i])
        if y_i < 0:
            w = w * cfg_train.negative_weight
        q = torch.zeros(len(t_i), dtype=torch.float64)
        wants_qpde = y_i > 0 or (cfg_train.qpde_on_negatives and y_i < 0)
        extra_t = None
        if wants_qpde:
            qc = cfg_train.model_loss_coef / B
            if cfg_train.qpde_placement == "every":
                q[:] = qc / len(t_i)
            else:
                extra_t = steps[-1] if cfg_train.qpde_placement == "last" else \
                    steps[torch.randint(0, n, (1,), generator=gen)].squeeze(0)
        samples.append(torch.full((len(t_i),), i)); ts.append(t_i); wp.append(w); wq.append(q)
        caps.append(torch.full((len(t_i),), 1.0 + kappa if (y_i < 0 and kappa > 0) else 0.0))
        if extra_t is not None:
            samples.append(torch.tensor([i])); ts.append(extra_t.reshape(1))
            wp.append(torch.zeros(1, dtype=torch.float64)); wq.append(torch.tensor([cfg_train.model_loss_coef / B]))
            caps.append(torch.zeros(1))
    if not ts:
        return WorkItems(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), x0.new_zeros((0, *x0.shape[1:])),
                         torch.zeros(0), torch.zeros(0))
    sample, t = torch.cat(samples), torch.cat(ts)
    if cfg_train.noise_per_timestep:
        eps = torch.randn((len(t), *x0.shape[1:]), generator=gen)
    else:
        per_sample = torch.randn((B, *x0.shape[1:]), generator=gen)
        eps = per_sample[sample]
    cap = torch.cat(caps).float()
    return WorkItems(sample, t, eps, torch.cat(wp).float(), torch.cat(wq).float(), cap if (cap > 0).any() else None)


def chunk_loss(model, base, x0: torch.Tensor, items: WorkItems, sched: NoiseSchedule) -> torch.Tensor:
    """Σ over the chunk's items of w_pref·mse(ε_θ(x_t,t), ε) + w_qpde·mse(ε_θ(x_t,t), ε_base(x_t,t)), as one graph.
    `model` and `base` are callables (x, t) -> ε̂: modules, or a Policy's `policy` and `reference`."""
    x_t = sched.add_noise(x0[items.sample], items.eps, items.t)
    eps_hat = model(x_t, items.t)
    mse = lambda a, b: (a - b).square().flatten(1).mean(1)
    err = mse(eps_hat, items.eps)
    q = items.w_qpde != 0
    capped = items.cap > 0 if items.cap is not None else torch.zeros_like(q)
    need_base = q | capped
    eps_base = None
    if need_base.any():
        with torch.no_grad():
            eps_base = base(x_t[need_base], items.t[need_base])
    if capped.any():  # bounded unlikelihood: min(err, (1 + κ)·err_base) on disliked items
        err_base = torch.zeros_like(err)
        err_base[need_base] = mse(eps_base, items.eps[need_base])
        err = torch.where(capped, torch.minimum(err, items.cap * err_base), err)
    loss = (items.w_pref * err).sum()
    if q.any():
        qb = q[need_base]
        loss = loss + (items.w_qpde[q] * mse(eps_hat[q], eps_base[qb])).sum()
    return loss


@dataclass
class PAPASettings:
    """The `papa:` config section. The first group is what the shipped configs set; the second holds the reference's
    choices papa keeps switchable and options measured and not adopted (docs/ALIGNMENT.md, "Options measured and not
    adopted"): experimental, off or at the reference's value by default."""
    epapa_k: int = 0                  # ePAPA: base model for t < k when sampling; train only t in [k, T-1]
    timesteps_per_sample: int = 0     # M: stratified, importance-weighted subsample of the trained steps; 0 = all
    pref_loss_coef: float = 0.1
    model_loss_coef: float = 0.009    # QPDE weight
    qpde_placement: str = "last"      # last (t = T-1, as the reference on one GPU) | random (one trained t) | every
    qpde_on_negatives: bool = False   # also keep disliked samples close to the base model
    negative_cap: float = 0.0         # kappa > 0 bounds it: min(err, (1 + kappa) err_base); 0: unbounded (reference)
    liked_balance: float = 0.0        # f > 0: weight liked samples by inverse kernel density among all liked
                                      # images so far (bandwidth f x median distance), mean 1; 0: off (reference)
    balance_space: str = "pixels"     # where that density is taken: pixels | features (the frozen base UNet's
                                      # bottleneck at balance_t, pooled 3x3: a class lies closer together there)
    balance_t: int = 200              # the noise step of those features
    balance_power: float = 1.0        # weight = density^-power; > 1 makes up for a kernel that blurs classes together
    replay: bool = False              # train on all feedback so far (paper figure) or this round's only (code)
    replay_size: int = 0              # with replay: this round's units plus this many drawn (seeded, without
                                      # replacement) from earlier rounds' feedback; 0: all of them
    replay_order: str = "mixed"       # mixed: replayed and new units shuffled together | first: the replayed units'
                                      # steps run while the answers are awaited (a person's wait halves), then the new
    # experimental: the reference's choices kept switchable, and options measured and not adopted
    weighting: str = "elbo"           # elbo: lambda_t as the reference | uniform: the same total spread evenly over t
    t0_weight: str = "reference"      # lambda_0: reference (alpha_bar_{-1} wraps to alpha_bar_{T-1}) | skip | clamp
    negative_weight: float = 1.0      # scale of the unlikelihood term of disliked samples (reference 1.0: unbounded)
    noise_per_timestep: bool = False  # false: one eps draw reused for every t (reference)
    label_balance: bool = False       # weight a round's likes and dislikes so each kind carries half its weight
                                      # (label_weights); false: every labelled sample alike (reference)
    base_ratio: float = 0.0           # g > 0: weight liked samples by (base density / policy density)^g on the base
                                      # UNet's features (base_ratio_weights), so the liked classes keep the base's
                                      # proportions instead of the one the policy already over-draws growing; 0: off
    base_ratio_bandwidth: float = 0.3  # the kernel's bandwidth, × the base set's median pairwise distance
    base_ratio_num: int = 200         # base-model samples drawn once (seeded by train.seed) for the base density
    base_ratio_rounds: int = 3        # the policy density: the last this many rounds' samples (a pool's every
                                      # candidate where the round drew one)
    base_ratio_estimate: str = "features"  # features: the kernel densities above | elbo: the difference of the two
                                      # models' evidence lower bounds on each sample (elbo_log_ratio), no kernel
    base_ratio_steps: int = 100       # elbo: stratified steps of t >= epapa_k per sample (more: less noise, more cost)

    def check(self, cfg, require) -> None:
        T = cfg.diffusion.num_timesteps
        require(0 <= self.epapa_k < T, "epapa_k", f"must be in [0, diffusion.num_timesteps={T}) (k >= T trains no step)")
        require(0 <= self.timesteps_per_sample <= T - self.epapa_k, "timesteps_per_sample",
                f"must be in [0, T - epapa_k = {T - self.epapa_k}] (0 = all)")
        for k in ("pref_loss_coef", "model_loss_coef", "negative_weight"):
            require(getattr(self, k) >= 0, k, "must be >= 0")
        require(self.negative_cap >= 0, "negative_cap", "must be >= 0 (0: unbounded, as the reference)")
        require(self.liked_balance >= 0, "liked_balance", "must be >= 0 (0: off)")
        require(self.balance_space in ("pixels", "features"), "balance_space", "must be pixels or features")
        require(0 <= self.balance_t < T, "balance_t", f"must be in [0, diffusion.num_timesteps={T})")
        require(self.balance_power > 0, "balance_power", "must be > 0 (1: inverse density)")
        require(self.base_ratio >= 0, "base_ratio", "must be >= 0 (0: off)")
        require(self.base_ratio_bandwidth > 0, "base_ratio_bandwidth", "must be > 0")
        require(self.base_ratio_num >= 3, "base_ratio_num", "must be >= 3")
        require(self.base_ratio_rounds >= 1, "base_ratio_rounds", "must be >= 1")
        require(self.base_ratio_estimate in ("features", "elbo"), "base_ratio_estimate", "must be features or elbo")
        require(self.base_ratio_steps >= 1, "base_ratio_steps", "must be >= 1")
        require(self.replay_size >= 0, "replay_size", "must be >= 0 (0: replay all earlier feedback)")
        require(self.replay or self.replay_size == 0, "replay_size", "applies with papa.replay: true; set it to 0")
        require(self.replay_order in ("mixed", "first"), "replay_order", "must be mixed or first")
        require(self.weighting in ("elbo", "uniform"), "weighting", "must be elbo or uniform")
        require(self.t0_weight in ("reference", "skip", "clamp"), "t0_weight", "must be reference, skip or clamp")
        require(self.qpde_placement in ("last", "random", "every"), "qpde_placement", "must be last, random or every")


@register
class PAPA(ImageLabels, Method):
    """PAPA / ePAPA: one label per image (+1 / −1 / 0); the loss above over (sample, t) items."""
    name = "papa"
    draws, feedback = "images", "label"
    Settings = PAPASettings

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.lam = papa_weights(self.sched, self.s.t0_weight, self.s.weighting)
        self._drawn: tuple[int, torch.Tensor] | None = None   # base_ratio: the latest round's pool (round, images)
        self._base_feats: torch.Tensor | None = None         # base_ratio: features of the base-model samples

    @property
    def base_below(self) -> int:
        return self.s.epapa_k

    @classmethod
    def run_tag(cls, settings) -> str:
        return f"_k{settings.epapa_k}" if settings.epapa_k else ""

    @property
    def keeps_history(self) -> bool:
        return self.s.replay or self.s.liked_balance > 0 or self.s.base_ratio > 0

    def observe_draw(self, images: torch.Tensor, r: int) -> None:
        """Kept as the policy's recent samples for `base_ratio`."""
        self._drawn = (r, images.cpu())

    def training_set(self, data: dict, history: list[dict], r: int) -> dict:
        """Round r's training units: its own feedback; with replay (`replay_order: mixed`), the replayed units too,
        shuffled in with them (`replay_order: first` trains on those before the answers come: `replayed`)."""
        s = self.s
        if not s.replay or len(history) == 1 or s.replay_order == "first":
            return data
        if s.replay_size == 0:
            return self.merge(history)
        return self.merge([data, self._replay_draw(history[:-1], r)])

    def replayed(self, history: list[dict], r: int) -> dict | None:
        if not self.s.replay or self.s.replay_order != "first" or not history:
            return None
        return self._replay_draw(history, r)

    def _replay_draw(self, earlier: list[dict], r: int) -> dict:
        """All earlier feedback, or (replay_size N > 0) N units drawn without replacement from it, seeded by (seed,
        round) so a resumed run draws the same."""
        merged = self.merge(earlier)
        if self.s.replay_size == 0:
            return merged
        gen = torch.Generator().manual_seed(self.t.seed * 104_729 + r)
        return self.select(merged, torch.randperm(self.num_units(merged), generator=gen)[:self.s.replay_size])

    def prepare(self, data: dict, history: list[dict]) -> dict:
        data = self._balance_likes(data, history)
        if self.s.label_balance:
            data = self._weigh(data, label_weights(data["y"]))
        if self.s.base_ratio > 0:
            data = self._weigh(data, self._base_ratio(data, history))
        return data

    @staticmethod
    def _weigh(data: dict, factor: torch.Tensor) -> dict:
        """The training set with its per-sample weights `w` (1 where none yet) multiplied by `factor`."""
        w = data["w"] if "w" in data else torch.ones(len(data["y"]), dtype=torch.float64)
        return {**data, "w": w * factor}

    def _base_ratio(self, data: dict, history: list[dict]) -> torch.Tensor:
        """`base_ratio_weights` of the training set: the base density from `base_ratio_num` base-model samples (drawn
        and featurised once; the same on every rank and after a resume), the policy density from the samples of the
        last `base_ratio_rounds` rounds, each round's whole pool where it drew one. With `base_ratio_estimate: elbo`,
        the log ratio of each sample is the difference of the base model's and the policy's evidence lower bounds
        (`elbo_log_ratio`, seeded by the seed and round) and the weights are `tempered_weights` of it."""
        s, net = self.s, self.policy.reference_module
        if s.base_ratio_estimate == "elbo":
            gen = torch.Generator().manual_seed(self.t.seed * 7_919 + len(history))
            log_r = elbo_log_ratio(self.policy.policy, self.policy.reference, self.sched, data["x"].to(self.device),
                                   self.lam, s.epapa_k, s.base_ratio_steps, gen)
            return tempered_weights(log_r, data["y"], s.base_ratio)
        if self._base_feats is None:
            from papa.sampling import sample
            d = self.cfg.diffusion
            dev = next(net.parameters()).device
            base = sample(net, self.sched, s.base_ratio_num, steps=d.sample_steps, sampler=d.sampler, eta=d.eta,
                          seed=self.t.seed * 31_337 + 17, batch_size=self.cfg.eval.batch_size, device=dev,
                          progress=False)
            self._base_feats = balance_features(net, self.sched, base, s.balance_t)
        rounds = history[-s.base_ratio_rounds:]
        drawn, recent = self._drawn, [h["x"] for h in rounds]
        if drawn is not None and drawn[0] == len(history) - 1:   # this round drew a pool: its every candidate
            recent[-1] = drawn[1]
        feats = balance_features(net, self.sched, torch.cat([data["x"], *recent]), s.balance_t)
        x, policy = feats[:len(data["x"])], feats[len(data["x"]):]
        return base_ratio_weights(x, data["y"], self._base_feats, policy, s.base_ratio_bandwidth, power=s.base_ratio)

    def _balance_likes(self, data: dict, history: list[dict]) -> dict:
        if self.s.liked_balance <= 0:
            return data
        s = self.s
        seen = self.merge(history)
        x, pool = data["x"], seen["x"][seen["y"] > 0]
        if s.balance_space == "features" and len(pool) >= 3 and (data["y"] > 0).any():
            net = self.policy.reference_module
            x, pool = (balance_features(net, self.sched, v, s.balance_t) for v in (x, pool))
        return {**data, "w": liked_weights(x, data["y"], pool, s.liked_balance, power=s.balance_power)}

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator):
        x0 = data["x"][units]
        w = data["w"][units] if "w" in data else None
        if "trust" in data:  # pseudo-labels (select.pseudo_labels) at their weight
            w = data["trust"][units].double() * (1.0 if w is None else w)
        return x0.to(self.device), plan_items(x0, data["y"][units], self.sched, self.s, self.lam, gen, w)

    def loss(self, x0: torch.Tensor, chunk: WorkItems):
        import papa.algos.papa as this  # looked up at call time, so tests can poison it
        return this.chunk_loss(self.policy.policy, self.policy.reference, x0, chunk, self.sched), {}
