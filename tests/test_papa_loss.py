"""PAPA loss against a plain loop written from the formula (docs/ALGORITHMS.md §2), its weights, and its estimator."""
import math

import pytest
import torch

from papa.algos.papa import chunk_loss, papa_weights, plan_items
from papa.algos.papa import PAPASettings
from papa.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule()


def test_weights_match_the_reference_values(sched):
    lam = papa_weights(sched, "reference")
    assert lam[1].item() == pytest.approx(1.2, abs=0.05)
    assert lam[10].item() == pytest.approx(0.16, abs=0.01)
    assert lam[999].item() == pytest.approx(0.020, abs=0.001)
    assert lam.sum().item() == pytest.approx(20.3, abs=0.1)
    assert 0 < lam[0].item() < 2e-4                      # the wrap-around: ᾱ_{−1} read as ᾱ_{T−1}
    assert 300 < int(lam[1:].argmin()) + 1 < 400 and lam[1:].min() == pytest.approx(0.010, abs=0.001)
    assert papa_weights(sched, "skip")[0] == 0 and papa_weights(sched, "clamp")[0] == lam[1]


class TinyEps(torch.nn.Module):
    """A cheap stand-in for the UNet with t-dependence, so the loop reference stays fast."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.float()[:, None, None, None] / 1000)


def _reference_loss(model, base, x0, y, eps, sched, lam, steps, cfg):
    """The reference's loop: for every sample, every trained t (the same ε), then QPDE at the last step."""
    total = 0.0
    for i in range(len(x0)):
        pref = 0.0
        for t in steps.tolist():
            tt = torch.tensor([t])
            x_t = sched.add_noise(x0[i:i + 1], eps[i:i + 1], tt)
            pref = pref + lam[t] * (model(x_t, tt) - eps[i:i + 1]).square().mean()
        qpde = 0.0
        if y[i] > 0:
            tt = torch.tensor([steps[-1].item()])
            x_t = sched.add_noise(x0[i:i + 1], eps[i:i + 1], tt)
            qpde = (model(x_t, tt) - base(x_t, tt).detach()).square().mean()
        total = total + y[i] * pref * cfg.pref_loss_coef + qpde * cfg.model_loss_coef
    return total / len(x0)


@pytest.mark.parametrize("epapa_k", [0, 990])
def test_full_sum_matches_the_reference_loop(sched, epapa_k):
    cfg = PAPASettings(epapa_k=epapa_k, timesteps_per_sample=0)
    sched_small = sched
    lam = papa_weights(sched_small, cfg.t0_weight).float()
    model, base = TinyEps(), TinyEps()
    x0 = torch.rand(3, 1, 6, 6) * 2 - 1
    y = torch.tensor([1.0, -1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    items = plan_items(x0, y, sched_small, cfg, lam.double(), gen)
    eps = torch.randn((3, 1, 6, 6), generator=torch.Generator().manual_seed(0))  # the per-sample draw plan_items made
    steps = torch.arange(epapa_k, 1000)
    if epapa_k == 0:
        # check the work list itself on the shortened case only: full T = 1000 loop is slow; use k = 990 for values
        assert len(items) == 3 * 1000 + 2  # every step for each sample + QPDE at t = T−1 for the two positives
        return
    got = sum(chunk_loss(model, base, x0, items.slice(slice(c, c + 7)), sched_small) for c in range(0, len(items), 7))
    want = _reference_loss(model, base, x0, y, eps, sched_small, lam, steps, cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # chunking changes nothing: one big chunk gives the same gradient as many small ones
    g1 = torch.autograd.grad(got, model.conv.weight)[0]
    g2 = torch.autograd.grad(chunk_loss(model, base, x0, items, sched_small), model.conv.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)


def test_stratified_subsample_is_unbiased(sched):
    """E[Σ_k w_k f(t_k)] over the stratified draw equals the full Σ_t λ_t f(t) (here f(t) = cos(t/50) + 2)."""
    cfg = PAPASettings(timesteps_per_sample=20, pref_loss_coef=1.0)
    lam = papa_weights(sched, cfg.t0_weight)
    f = lambda t: torch.cos(t.double() / 50) + 2
    full = (lam * f(torch.arange(1000))).sum().item()
    gen = torch.Generator().manual_seed(1)
    x0, y = torch.zeros(1, 1, 2, 2), torch.tensor([1.0])
    ests = []
    for _ in range(400):
        it = plan_items(x0, y, sched, cfg, lam, gen)
        pref = it.w_pref != 0
        ests.append((it.w_pref[pref].double() * f(it.t[pref])).sum().item())
    est = torch.tensor(ests)
    assert abs(est.mean().item() - full) < 4 * est.std().item() / 20 + 1e-6
    assert len(it.t[pref]) == 20


def test_labels_zero_and_negatives_without_qpde(sched):
    cfg = PAPASettings(timesteps_per_sample=5)
    lam = papa_weights(sched, cfg.t0_weight)
    it = plan_items(torch.zeros(3, 1, 2, 2), torch.tensor([0.0, -1.0, 1.0]), sched, cfg, lam,
                    torch.Generator().manual_seed(0))
    assert set(it.sample.tolist()) == {1, 2}                        # the 0-labelled sample is skipped
    assert (it.w_pref[it.sample == 1] < 0).all() and (it.w_qpde[it.sample == 1] == 0).all()
    assert (it.w_qpde[it.sample == 2] > 0).sum() == 1 and it.t[(it.w_qpde > 0)].item() == 999
    cfg2 = PAPASettings(timesteps_per_sample=5, qpde_on_negatives=True, qpde_placement="every")
    it2 = plan_items(torch.zeros(3, 1, 2, 2), torch.tensor([0.0, -1.0, 1.0]), sched, cfg2, lam,
                     torch.Generator().manual_seed(0))
    assert (it2.w_qpde[it2.sample == 1] > 0).all() and len(it2) == 10


def test_uniform_weighting_spreads_the_elbo_total_evenly(sched):
    lam = papa_weights(sched, "reference")
    uni = papa_weights(sched, "reference", "uniform")
    assert uni.sum().item() == pytest.approx(lam.sum().item(), rel=1e-12)
    assert torch.allclose(uni, torch.full_like(uni, lam.sum().item() / 1000))
    skip = papa_weights(sched, "skip", "uniform")
    assert skip[0] == 0 and torch.allclose(skip[1:], torch.full_like(skip[1:], lam[1:].sum().item() / 999))


def test_negative_cap_bounds_the_unlikelihood_term(sched):
    """κ > 0: a disliked sample's term is −w·min(err_θ, (1 + κ)·err_base); its gradient stops beyond the cap, while a
    liked sample's term is untouched. Written from the formula, item by item."""
    cfg = PAPASettings(timesteps_per_sample=4, epapa_k=500, negative_cap=0.5, qpde_on_negatives=False)
    lam = papa_weights(sched, cfg.t0_weight)
    base = TinyEps()
    model = TinyEps()
    with torch.no_grad():
        model.conv.weight.add_(0.3 * torch.randn_like(model.conv.weight))
    x0 = torch.rand(2, 1, 6, 6) * 2 - 1
    y = torch.tensor([-1.0, 1.0])
    items = plan_items(x0, y, sched, cfg, lam, torch.Generator().manual_seed(0))
    assert items.cap is not None and (items.cap[items.sample == 0] == 1.5).all() and (items.cap[items.sample == 1] == 0).all()
    got = chunk_loss(model, base, x0, items, sched)
    want = 0.0
    for k in range(len(items)):
        i, t = int(items.sample[k]), items.t[k:k + 1]
        x_t = sched.add_noise(x0[i:i + 1], items.eps[k:k + 1], t)
        err = (model(x_t, t) - items.eps[k:k + 1]).square().mean()
        if y[i] < 0:
            err = torch.minimum(err, 1.5 * (base(x_t, t) - items.eps[k:k + 1]).square().mean().detach())
        want = want + items.w_pref[k] * err
        if items.w_qpde[k] != 0:
            want = want + items.w_qpde[k] * (model(x_t, t) - base(x_t, t).detach()).square().mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # a policy far worse than the base on the disliked sample: its term is capped, so it contributes no gradient
    neg = items.slice(slice(0, int((items.sample == 0).sum())))
    with torch.no_grad():
        model.conv.bias.add_(5.0)
    g = torch.autograd.grad(chunk_loss(model, base, x0, neg, sched), model.conv.weight, allow_unused=True)[0]
    assert g is None or g.abs().max() == 0
    # κ = 0 (the reference) leaves the term unbounded: the same items then do have a gradient
    items0 = plan_items(x0, y, sched, PAPASettings(timesteps_per_sample=4, epapa_k=500, qpde_on_negatives=False), lam,
                        torch.Generator().manual_seed(0))
    assert items0.cap is None
    g0 = torch.autograd.grad(chunk_loss(model, base, x0, items0.slice(slice(0, len(neg))), sched),
                             model.conv.weight)[0]
    assert g0.abs().max() > 0


def test_liked_balance_weights_crowded_likes_down(sched):
    """`liked_balance`: liked samples weighted by inverse kernel density among all liked images so far, mean 1; a tight
    cluster of near-copies (the class a drifting policy over-draws) weighs less per sample than the spread-out rest,
    disliked and unlabeled samples keep 1, the clip holds, and the weight scales exactly that sample's likelihood term."""
    from papa.algos.papa import liked_weights
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4, 1, 6, 6, generator=g) * 3
    crowd = torch.randn(1, 1, 6, 6, generator=g) + 0.05 * torch.randn(4, 1, 6, 6, generator=g)
    x = torch.cat([spread, crowd, torch.zeros(2, 1, 6, 6)])
    y = torch.tensor([1.0] * 8 + [-1.0, 0.0])
    pool = torch.cat([x[:8], crowd + 0.05 * torch.randn(4, 1, 6, 6, generator=g)])  # earlier rounds: more of the crowd
    w = liked_weights(x, y, pool, 0.5)
    assert w[:8].mean().item() == pytest.approx(1.0) and (w[8:] == 1).all()
    assert w[4:8].max() < w[:4].min()
    loose, tight = liked_weights(x, y, pool, 0.5, max_weight=100.0), liked_weights(x, y, pool, 0.5, max_weight=1.2)
    top = loose[:8] > 1.2
    assert top.any() and tight.max() < loose.max()
    assert torch.allclose(tight[:8][top], tight[:8][top][0].expand(int(top.sum())))  # clipped: tied
    assert (liked_weights(x, y, pool, 0.0) == 1).all()                 # off
    assert (liked_weights(x, y, pool[:2], 0.5) == 1).all()             # a pool too small to estimate a density
    cfg = PAPASettings(timesteps_per_sample=4, epapa_k=500)
    lam = papa_weights(sched, cfg.t0_weight)
    plain = plan_items(x, y, sched, cfg, lam, torch.Generator().manual_seed(0))
    weighted = plan_items(x, y, sched, cfg, lam, torch.Generator().manual_seed(0), w)
    torch.testing.assert_close(weighted.w_pref, plain.w_pref * w[plain.sample].float())
    torch.testing.assert_close(weighted.w_qpde, plain.w_qpde)


def test_liked_balance_power_and_standardising_follow_the_formula():
    """weight ∝ (Σ_j k(x_i, p_j))^−power, normalised to mean 1: power 2 squares the unnormalised power-1 weights, so a
    class that took over (three times as many liked as the other) loses more of its share; `standardise` equals
    scaling each dimension by the pool's statistics by hand."""
    from papa.algos.papa import liked_weights
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    cls = torch.tensor([0] * 12 + [1] * 4)
    x = centres[cls] + 0.5 * torch.randn(16, 2, generator=g)
    y = torch.ones(16)
    one = liked_weights(x, y, x, 0.5, max_weight=100.0)
    two = liked_weights(x, y, x, 0.5, max_weight=100.0, power=2.0)
    torch.testing.assert_close(two, one.square() / one.square().mean())
    share = [float(w[cls == 0].sum() / w.sum()) for w in (torch.ones(16), one, two)]
    assert share[0] == pytest.approx(0.75) and share[0] > share[1] > share[2]
    scaled = torch.stack([x[:, 0] * 10, x[:, 1]], 1)  # one dimension in other units
    mu, sd = scaled.mean(0), scaled.std(0)
    torch.testing.assert_close(liked_weights(scaled, y, scaled, 0.5, standardise=True),
                               liked_weights((scaled - mu) / sd, y, (scaled - mu) / sd, 0.5))


def test_balance_features_depend_on_the_image_alone(sched):
    """The features for balancing share one noise draw, so an image gets the same vector wherever it stands in a batch
    (this round's liked image and its copy in the pool match); different images differ."""
    from papa.algos.papa import balance_features
    from papa.models import build_unet
    from papa.config import ModelConfig
    torch.manual_seed(0)
    net = build_unet(ModelConfig(down_channels=[8, 16, 16], mid_channels=[16, 16, 16], time_emb_dim=16,
                                 num_heads=2)).eval()
    imgs = torch.rand(3, 1, 28, 28) * 2 - 1
    a = balance_features(net, sched, imgs, 200)
    b = balance_features(net, sched, imgs.flip(0), 200)
    assert a.shape == (3, 16 * 9)
    torch.testing.assert_close(a, b.flip(0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[0], a[1], atol=1e-3)
    from papa.select import unet_features  # per-position noise, as the selectors draw it: the order matters
    by_position = unet_features(net, sched, imgs.flip(0), 200).flip(0)
    assert not torch.allclose(unet_features(net, sched, imgs, 200), by_position, atol=1e-3)


def test_noise_per_timestep_draws_independent_noise_and_lowers_the_estimator_variance(sched):
    """`noise_per_timestep`: every (sample, t) item gets its own ε (the reference reuses one ε per sample for every t).
    Both estimate the same ELBO-weighted sum; independent draws decorrelate the terms, so the per-sample loss varies
    less from draw to draw (the reason the MNIST default turns it on, docs/ALIGNMENT.md)."""
    x0 = torch.rand(1, 1, 6, 6) * 2 - 1
    y = torch.tensor([1.0])
    model = TinyEps()
    per_t = PAPASettings(timesteps_per_sample=10, epapa_k=350, noise_per_timestep=True, model_loss_coef=0.0,
                       qpde_placement="every")
    shared = PAPASettings(timesteps_per_sample=10, epapa_k=350, noise_per_timestep=False, model_loss_coef=0.0,
                        qpde_placement="every")
    lam = papa_weights(sched, per_t.t0_weight)
    it = plan_items(x0, y, sched, per_t, lam, torch.Generator().manual_seed(0))
    assert len(it) == 10 and len({tuple(e.flatten().tolist()) for e in it.eps}) == 10
    it_ref = plan_items(x0, y, sched, shared, lam, torch.Generator().manual_seed(0))
    assert all(torch.equal(e, it_ref.eps[0]) for e in it_ref.eps)
    again = plan_items(x0, y, sched, per_t, lam, torch.Generator().manual_seed(0))
    assert torch.equal(it.eps, again.eps) and torch.equal(it.t, again.t)          # deterministic given the generator

    def losses(cfg):
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return torch.stack([chunk_loss(model, None, x0, plan_items(x0, y, sched, cfg, lam, gen), sched)
                                for _ in range(200)]).double()
    a, b = losses(per_t), losses(shared)
    print(f"\nloss variance, noise per timestep / one noise per sample: {(a.var() / b.var()).item():.3f}")  # -s shows it
    assert abs(a.mean() - b.mean()) < 4 * (a.var() / 200 + b.var() / 200).sqrt()  # the same expectation
    assert a.var() < 0.5 * b.var()                                                 # at lower variance


def test_label_weights_give_likes_and_dislikes_half_the_weight_each():
    from papa.algos.papa import label_weights
    y = torch.tensor([1, -1, -1, -1, 0])
    w = label_weights(y)  # n = 4 labelled: the like 4 / 2 = 2, each dislike 4 / 6
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3, 1.0], dtype=torch.float64))
    assert w[y > 0].sum() == pytest.approx(w[y < 0].sum())
    rare = label_weights(torch.tensor([1] + [-1] * 9))  # one like in ten: 5, clipped to 3
    assert rare[0] == 3.0 and rare[1:].allclose(torch.full((9,), 10 / 18, dtype=torch.float64))
    assert torch.equal(label_weights(torch.tensor([1, 1, 0])), torch.ones(3, dtype=torch.float64))  # one kind: as is


def test_base_ratio_weights_pull_the_liked_back_to_the_base_proportions():
    from papa.algos.papa import base_ratio_weights
    a, b = torch.zeros(2), torch.tensor([10.0, 0.0])          # two far-apart clusters (classes)
    base = torch.stack([a] * 5 + [b] * 5)                       # the base draws them evenly
    policy = torch.stack([a] * 9 + [b] * 3)                     # the policy over-draws the first 3 to 1
    x, y = torch.stack([a, b, a, b]), torch.tensor([1, 1, -1, 0])
    w = base_ratio_weights(x, y, base, policy, f=0.05)
    # by hand, narrow kernel: ratio (5/10)/(9/12) = 2/3 in the first cluster, (5/10)/(3/12) = 2 in the second,
    # normalised to mean 1 over the liked: 0.5 and 1.5; the disliked and the skipped keep 1
    assert torch.allclose(w, torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64))
    w2 = base_ratio_weights(x, y, base, policy, f=0.05, power=2.0)  # (2/3)^2 and 4, mean 1: 0.2 and 1.8
    assert torch.allclose(w2, torch.tensor([0.2, 1.8, 1.0, 1.0], dtype=torch.float64))
    skewed = torch.stack([a] * 30 + [b])                      # 30 to 1: ratios 1 : 30, mean 1 (0.065, 1.935)
    free = base_ratio_weights(x, y, base, skewed, f=0.05, max_weight=100.0)
    assert torch.allclose(free[:2], torch.tensor([2 / 31, 60 / 31], dtype=torch.float64))
    clipped = base_ratio_weights(x, y, base, skewed, f=0.05, max_weight=1.5)   # clipped at 1.5, then mean 1 again
    assert clipped[:2].mean() == pytest.approx(1.0) and clipped[0] < clipped[1] < free[1]
    assert torch.equal(base_ratio_weights(x, y, base, policy, f=0.0), torch.ones(4, dtype=torch.float64))  # off


def test_elbo_log_ratio_against_the_sum_written_from_the_formula():
    """log p_base − log p_policy ≈ Σ_{t ≥ k} (λ_t / 2) · D · (mse(ε_policy, ε) − mse(ε_base, ε)); with every step
    (steps ≥ the trained ones) the estimate is that sum, here for two toy 'models' that predict constant noise."""
    from papa.algos.papa import elbo_log_ratio, papa_weights
    from papa.schedule import NoiseSchedule
    sched = NoiseSchedule(20, 1e-4, 0.2)
    lam = papa_weights(sched)
    policy = lambda x, t: torch.full_like(x, 0.5)
    base = lambda x, t: torch.zeros_like(x)
    x0 = torch.randn(3, 1, 2, 2)
    k = 12
    got = elbo_log_ratio(policy, base, sched, x0, lam, k, steps=100, gen=torch.Generator().manual_seed(0))
    # the draws of elbo_log_ratio: the strata's offsets first (all zero here: strata of one step), then ε
    g = torch.Generator().manual_seed(0)
    torch.rand((3, 20 - k), generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    want = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for t in range(k, 20):
            mse_p = float(((0.5 - eps[i]) ** 2).mean())
            mse_b = float((eps[i] ** 2).mean())
            want[i] += float(lam[t]) / 2 * 4 * (mse_p - mse_b)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    same = elbo_log_ratio(base, base, sched, x0, lam, k, steps=3, gen=torch.Generator().manual_seed(1))
    assert torch.equal(same, torch.zeros(3, dtype=torch.float64))      # one model against itself: no ratio
    a = elbo_log_ratio(policy, base, sched, x0, lam, k, steps=3, gen=torch.Generator().manual_seed(2))
    b = elbo_log_ratio(policy, base, sched, x0, lam, k, steps=3, gen=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)                                            # deterministic given the generator


def test_tempered_weights_by_hand():
    from papa.algos.papa import tempered_weights
    y = torch.tensor([1, 1, -1, 0])
    log_r = torch.tensor([0.0, math.log(3.0), 5.0, -5.0], dtype=torch.float64)
    # ratios 1 and 3 over the liked, mean 1: 0.5 and 1.5; the disliked and the skipped keep 1, whatever their ratio
    assert torch.allclose(tempered_weights(log_r, y), torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64))
    # power 2: 1 and 9, mean 1: 0.2 and 1.8
    assert torch.allclose(tempered_weights(log_r, y, 2.0), torch.tensor([0.2, 1.8, 1.0, 1.0], dtype=torch.float64))
    big = tempered_weights(torch.tensor([0.0, 0.0, 0.0, 50.0], dtype=torch.float64), torch.ones(4), max_weight=2.0)
    assert big.mean() == pytest.approx(1.0) and torch.isfinite(big).all() and big[3] > big[0]   # clipped, no overflow
    assert torch.equal(tempered_weights(log_r, torch.tensor([-1, 0, -1, 0])), torch.ones(4, dtype=torch.float64))
