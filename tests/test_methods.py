"""D3PO, Diffusion-DPO, DDPO and SDPO losses against plain-torch references written from docs/ALGORITHMS.md §3–7: values and
gradients through a model, ties, clip edges, all-negative / all-equal rounds; and the trajectory recorder."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from papa.algos.base import Items
from papa.algos.d3po import D3PO
from papa.algos.ddpo import DDPO, normalized_advantages, ppo_loss
from papa.algos.diffusion_dpo import DiffusionDPO
from papa.algos.sdpo import SDPO, interpolate_rewards, query_steps, sdpo_loss, stepwise_advantages
from papa.config import load_config
from papa.sampling import sample_trajectories
from papa.schedule import NoiseSchedule
from papa.policy import FullPolicy
from testutil import ROOT


class TinyEps(torch.nn.Module):
    """A cheap denoiser stand-in that keeps trajectories bounded: ε̂ = √(1−ᾱ_t)·x + 0.1·conv(x) (for x_t of pure noise
    scale this predicts x̂0 = √ᾱ_t x, so the chain shrinks toward 0 instead of exploding like a random network)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.sched = NoiseSchedule()

    def forward(self, x, t):
        s = (1 - self.sched.alpha_bar(t)).sqrt().view(-1, 1, 1, 1)
        return s * x + 0.1 * self.conv(x)


def fake_engine(algo, **settings):
    """What a method sees: the config (its own section set from `settings`) and a policy seam over tiny models."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml", [f"train.algo={algo}"] +
                      [f"{algo}.{k}={v}" for k, v in settings.items()])
    policy = FullPolicy(TinyEps(0))
    with torch.no_grad():  # a policy a little away from the reference
        for p in policy.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return SimpleNamespace(cfg=cfg, sched=NoiseSchedule(), policy=policy, model=policy.module,
                           base=policy.reference_module)


def method(cls, e):
    return cls(e.cfg, e.policy, e.sched)


def gauss_lp(x_t, eps, x_prev, coef):
    """log N(x_prev; c_xt x_t + c_eps ε̂, σ²), pixel mean, float64."""
    c = coef.double()
    b = lambda i: c[:, i].view(-1, 1, 1, 1)
    mu = b(0) * x_t.double() + b(1) * eps.double()
    return (-(x_prev.double() - mu) ** 2 / (2 * b(2) ** 2) - torch.log(b(2)) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


@pytest.fixture(scope="module")
def traj():
    """Two pairs of recorded 5-step DDIM trajectories of a tiny model."""
    return sample_trajectories(TinyEps(1), NoiseSchedule(), 4, steps=5, sampler="ddim", eta=1.0, seed=3, paired=True,
                               image_shape=(1, 8, 8))


# ----------------------------------------------------------------------------- the recorder


def test_trajectories_record_consistent_steps(traj):
    x, lp, coef = traj["x"], traj["log_prob"], traj["coef"]
    assert x.shape == (4, 6, 1, 8, 8) and lp.shape == (4, 5) and coef.shape == (5, 5)
    assert torch.equal(x[0, 0], x[1, 0]) and torch.equal(x[2, 0], x[3, 0]) and not torch.equal(x[0, 0], x[2, 0])
    assert not torch.equal(x[0, -1], x[1, -1])  # same start, different step noise
    assert torch.isnan(lp[:, -1]).all() and torch.isfinite(lp[:, :-1]).all()  # the last DDIM step has σ = 0
    assert traj.trained_steps().tolist() == [0, 1, 2, 3]
    # the recorded log-prob is the density of the recorded step under the sampling model (recomputing it from the
    # float32 x_{t-1} loses ~1e-7·|x|/σ per pixel: the tiny model's |x| reaches ~10 and the last σ is 0.01)
    model = TinyEps(1)
    for j in range(4):
        eps = model(x[:, j], traj["t"][j].expand(4))
        want = gauss_lp(x[:, j], eps, x[:, j + 1], coef[j].expand(4, 5))
        assert torch.allclose(lp[:, j].double(), want, rtol=1e-3, atol=1e-5), j


def test_trajectories_do_not_depend_on_sharding():
    m, s = TinyEps(1), NoiseSchedule()
    whole = sample_trajectories(m, s, 4, steps=4, seed=5, paired=True, image_shape=(1, 8, 8))
    half = sample_trajectories(m, s, 2, steps=4, seed=5, paired=True, first_index=2, image_shape=(1, 8, 8))
    assert torch.allclose(whole["x"][2:], half["x"], atol=1e-6)
    with pytest.raises(ValueError, match="whole pairs"):
        sample_trajectories(m, s, 3, steps=4, seed=5, paired=True, image_shape=(1, 8, 8))


# ----------------------------------------------------------------------------- D3PO


def d3po_reference(model, base, data, units, beta, clip):
    """Loop over decisive pairs and trained steps, as docs/ALGORITHMS.md §4."""
    steps = [j for j in range(len(data["t"])) if data["coef"][j, 2] > 0]
    total = 0.0
    for p in units.tolist():
        h0 = float(data["h"][p])
        if h0 == 0:
            continue
        for j in steps:
            logr = []
            for i in (2 * p, 2 * p + 1):
                x_t, x_prev = data["x"][i, j][None], data["x"][i, j + 1][None]
                t = data["t"][j].view(1)
                lp = gauss_lp(x_t, model(x_t, t), x_prev, data["coef"][j][None])
                lr = gauss_lp(x_t, base(x_t, t), x_prev, data["coef"][j][None]).detach()
                logr.append(torch.log(torch.clamp(torch.exp(lp - lr), 1 - clip, 1 + clip)))
            total = total - F.logsigmoid(beta * (h0 * logr[0] - h0 * logr[1])) / (len(units) * len(steps))
    return total.sum() if torch.is_tensor(total) else torch.tensor(total)


@pytest.mark.parametrize("h", [[1.0, -1.0], [-1.0, 0.0], [0.0, 0.0]])
def test_d3po_loss_and_gradient_match_the_formula(traj, h):
    e = fake_engine("d3po", beta=0.1, clip=0.1)
    m = method(D3PO, e)
    data = {"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "h": torch.tensor(h)}
    units = torch.arange(2)
    _, items = m.step_items(data, units, torch.Generator())
    want = d3po_reference(e.model, e.base, data, units, 0.1, 0.1)
    if all(v == 0 for v in h):  # all ties: nothing to train, not even a UNet call
        assert len(items) == 0 and want.item() == 0
        return
    assert len(items) == sum(v != 0 for v in h) * 4
    got, stats = m.loss(None, items)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(grads(e.model, got), grads(e.model, want), rtol=1e-4, atol=1e-9)
    assert stats["acc_den"] == len(items) and 0 <= stats["acc_num"] <= len(items)


def test_d3po_clip_edges_stop_the_gradient(traj):
    data = {"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "h": torch.tensor([1.0, -1.0])}
    e = fake_engine("d3po", clip=1e-9)  # every ratio of the perturbed policy is outside [1 − ε, 1 + ε]
    m = method(D3PO, e)
    _, items = m.step_items(data, torch.arange(2), torch.Generator())
    loss, _ = m.loss(None, items)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert grads(e.model, loss).abs().max() == 0
    e.model.load_state_dict(e.base.state_dict())  # policy = reference: log r = 0 sits on no edge, gradient flows
    loss, stats = m.loss(None, items)
    assert grads(e.model, loss).abs().max() > 0 and stats["acc_num"] == 0.5 * stats["acc_den"]


# ----------------------------------------------------------------------------- Diffusion-DPO


def test_diffusion_dpo_matches_the_formula_and_ignores_ties():
    e = fake_engine("diffusion_dpo", beta=50.0, timesteps_per_sample=3)
    m = method(DiffusionDPO, e)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    data = {"x": x, "h": torch.tensor([1.0, 0.0, -1.0])}
    units = torch.arange(3)
    _, items = m.step_items(data, units, torch.Generator().manual_seed(1))
    assert len(items) == 2 * 3  # the tie contributes nothing
    got, _ = m.loss(None, items)
    # reference from the formula, item by item
    want = 0.0
    for k in range(len(items)):
        xw, xl, t, eps = items.x_w[k:k + 1], items.x_l[k:k + 1], items.t[k:k + 1], items.eps[k:k + 1]
        se = lambda net, x0: (eps - net(e.sched.add_noise(x0, eps, t), t)).square().mean()
        inside = -0.5 * 50.0 * ((se(e.model, xw) - se(e.model, xl)) - (se(e.base, xw) - se(e.base, xl)).detach())
        want = want - F.logsigmoid(inside) / (3 * 3)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(grads(e.model, got), grads(e.model, want), rtol=1e-4, atol=1e-9)
    # the winner of pair 2 is its second image
    assert torch.equal(items.x_w[3], x[5]) and torch.equal(items.x_l[3], x[4])


# ----------------------------------------------------------------------------- DDPO


def test_ppo_loss_formula_and_clip_edges():
    lp_old = torch.zeros(4, dtype=torch.float64)
    lp = torch.tensor([0.0, 0.5, -0.5, 1e-5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    c = 1e-4
    loss = ppo_loss(lp, lp_old, adv, c)
    rho = lp.detach().exp()
    want = torch.maximum(-adv * rho, -adv * rho.clamp(1 - c, 1 + c))
    assert torch.allclose(loss, want)
    loss.sum().backward()
    # inside the clip: d/dlp (−A ρ) = −A ρ; beyond it on the side the advantage favours: no gradient
    assert lp.grad[0].item() == pytest.approx(-1.0) and lp.grad[3].item() == pytest.approx(-2 * math.exp(1e-5))
    assert lp.grad[1].item() == 0 and lp.grad[2].item() == 0


def test_advantages_of_an_all_equal_round_are_zero():
    assert torch.equal(normalized_advantages(torch.full((5,), 0.3), 5.0), torch.zeros(5))
    a = normalized_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), 1.5)
    assert a.max().item() == pytest.approx(1.5) and a[:3].allclose(torch.full((3,), -1 / math.sqrt(3)), atol=1e-5)


def test_ddpo_loss_matches_the_formula(traj):
    e = fake_engine("ddpo", ppo_clip=0.2)
    m = method(DDPO, e)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0])[:, None].expand(4, 5).contiguous()
    data = {"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "log_prob": traj["log_prob"], "adv": adv}
    units = torch.tensor([2, 0])
    _, items = m.step_items(data, units, torch.Generator())
    got, stats = m.loss(None, items)
    want = 0.0
    for i in units.tolist():
        for j in range(4):
            x_t, x_prev, t = traj["x"][i, j][None], traj["x"][i, j + 1][None], traj["t"][j].view(1)
            lp = gauss_lp(x_t, e.model(x_t, t), x_prev, traj["coef"][j][None])
            want = want + ppo_loss(lp, traj["log_prob"][i, j].double(), adv[i, j].double(), 0.2).sum() / 8
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert torch.allclose(grads(e.model, got), grads(e.model, want).float(), rtol=1e-3, atol=1e-8)
    assert stats["count"] == 8


# ----------------------------------------------------------------------------- SDPO


def test_sdpo_queries_interpolation_and_returns():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 6, 1, 4, 4, generator=g)
    q = query_steps(x0)
    assert (q[:, 0] == 0).all() and (q[:, 2] == 5).all() and ((q[:, 1] > 0) & (q[:, 1] < 5)).all()
    f = x0.flatten(2)
    for n in range(3):  # the anchor minimises the summed similarity to the first and last predictions
        score = [float(F.cosine_similarity(f[n, j], f[n, 0], 0) + F.cosine_similarity(f[n, j], f[n, 5], 0))
                 for j in range(1, 5)]
        assert int(q[n, 1]) == 1 + min(range(4), key=score.__getitem__)
    rq = torch.rand(3, 3, generator=g)
    dense = interpolate_rewards(x0, q, rq)
    for n in range(3):
        assert torch.allclose(dense[n, q[n]], rq[n])
        for j in range(6):  # every interpolated reward lies between its two queried neighbours
            seg = 0 if j <= q[n, 1] else 1
            lo, hi = sorted((float(rq[n, seg]), float(rq[n, seg + 1])))
            assert lo - 1e-6 <= float(dense[n, j]) <= hi + 1e-6
    adv = stepwise_advantages(dense, 0.9, 5.0)
    G = torch.zeros_like(dense)
    for j in range(5, -1, -1):
        G[:, j] = dense[:, j] + (0.9 * G[:, j + 1] if j < 5 else 0)
    assert torch.allclose(adv, (G - G.mean(0)) / (G.std(0, unbiased=False) + 1e-6), atol=1e-5)


def test_sdpo_loss_formula_and_clip():
    delta = torch.tensor([[0.3, 0.1], [1e-5, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.99, 0.98], dtype=torch.float64)
    c = 1e-4
    loss = sdpo_loss(delta, adv, w, c)
    d, target = delta[:, 0] - delta[:, 1], adv[:, 0] - adv[:, 1]
    want = torch.maximum((w * d - target) ** 2, (w * d.clamp(-c, c) - target) ** 2)
    assert torch.allclose(loss, want)
    assert loss[2].item() == 0  # equal advantages and no change: nothing to regress
    loss.sum().backward()
    # item 0: d = 0.2 beyond the clip; the clipped branch (w·c − 2)² is the larger one and is constant: no gradient
    assert delta.grad[0].abs().max().item() == 0
    assert delta.grad[1, 0].item() == pytest.approx(2 * 0.99 * (0.99 * 1e-5 - 0.5))


def test_sdpo_method_loss_matches_the_formula(traj):
    e = fake_engine("sdpo", ppo_clip=0.05, lam=0.9)
    m = method(SDPO, e)
    adv = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    data = {"x": traj["x"], "t": traj["t"], "coef": traj["coef"], "log_prob": traj["log_prob"], "adv": adv}
    units = torch.tensor([1, 0])
    _, items = m.step_items(data, units, torch.Generator())
    got, _ = m.loss(None, items)
    want = 0.0
    for p in units.tolist():
        for j in range(4):
            dl = []
            for i in (2 * p, 2 * p + 1):
                x_t, x_prev, t = traj["x"][i, j][None], traj["x"][i, j + 1][None], traj["t"][j].view(1)
                dl.append(gauss_lp(x_t, e.model(x_t, t), x_prev, traj["coef"][j][None]) - traj["log_prob"][i, j])
            delta = torch.stack(dl, 1)
            a = torch.tensor([[adv[2 * p, j], adv[2 * p + 1, j]]], dtype=torch.float64)
            want = want + sdpo_loss(delta, a, torch.tensor([0.9 ** j], dtype=torch.float64), 0.05).sum() / 8
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert torch.allclose(grads(e.model, got), grads(e.model, want).float(), rtol=1e-3, atol=1e-8)


def test_items_slice_and_move():
    it = Items(a=torch.arange(5), b=torch.zeros(5, 2))
    assert len(it) == 5 and len(it.slice(slice(1, 3))) == 2 and it.slice(slice(1, 3)).a.tolist() == [1, 2]
    assert len(Items()) == 0
    with pytest.raises(AttributeError):
        it.missing
