"""Scheduler identities against values derived by hand from the definitions (float64)."""
import math

import pytest
import torch

from papa.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule(1000, 1e-4, 0.02)


def test_tables_by_hand(sched):
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    assert sched.betas64[0].item() == pytest.approx(b0, rel=1e-12)
    assert sched.betas64[1].item() == pytest.approx(b1, rel=1e-12)
    assert sched.betas64[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert sched.alpha_bars64[1].item() == pytest.approx((1 - b0) * (1 - b1), rel=1e-12)
    # posterior variance: β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); zero at t = 0
    t = 1
    want = b1 * (1 - (1 - b0)) / (1 - (1 - b0) * (1 - b1))
    assert sched.posterior_variance[t].item() == pytest.approx(want, rel=1e-6)
    assert sched.posterior_variance[0].item() == 0
    assert sched.alpha_bar(torch.tensor([-1])).item() == 1.0


def test_add_noise_and_predict_x0_invert(sched):
    x0, eps = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, eps, t)
    ab = sched.alpha_bars64[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(xt.double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double(), atol=1e-5)
    assert torch.allclose(sched.predict_x0(xt, eps, t)[:3], x0[:3], atol=1e-4)


def test_ancestral_step_matches_the_reference_formula(sched):
    x, eps, z = torch.randn(3, 2, 1, 5, 5, dtype=torch.float64).unbind(0)
    t = torch.tensor([7, 999])
    out = sched.ancestral_step(x.float(), eps.float(), t, noise=z.float())
    for i, ti in enumerate(t.tolist()):
        beta, ab, ab_prev = sched.betas64[ti], sched.alpha_bars64[ti], sched.alpha_bars64[ti - 1]
        mean = (x[i] - beta * eps[i] / math.sqrt(1 - ab)) / math.sqrt(1 - beta)
        var = beta * (1 - ab_prev) / (1 - ab)
        prev = mean + math.sqrt(var) * z[i]
        assert torch.allclose(out.mean[i].double(), mean, atol=1e-5)
        assert out.std[i].item() == pytest.approx(math.sqrt(var), rel=1e-5)
        assert torch.allclose(out.prev_sample[i].double(), prev, atol=1e-5)
        lp = torch.distributions.Normal(mean, math.sqrt(var)).log_prob(prev).mean()
        assert out.log_prob[i].item() == pytest.approx(lp.item(), abs=1e-4)


def test_last_ancestral_step_is_the_mean_without_density(sched):
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    out = sched.ancestral_step(x, eps, torch.tensor([0, 0]), noise=torch.randn(2, 1, 4, 4))
    assert torch.equal(out.prev_sample, out.mean) and torch.isnan(out.log_prob).all()
    assert (out.std == 0).all()


def test_ddim_eta1_equals_ancestral_posterior(sched):
    """DDIM with η = 1 is the ancestral posterior (same μ and σ), for unit and strided steps."""
    x, eps = torch.randn(2, 2, 1, 6, 6).unbind(0)
    for t, tp in ((torch.tensor([5, 800]), torch.tensor([4, 799])), (torch.tensor([500, 990]), torch.tensor([400, 10]))):
        a = sched.step(x, eps, t, tp, "ancestral")
        d = sched.ddim_step(x, eps, t, tp, eta=1.0)
        assert torch.allclose(a.mean, d.mean, atol=1e-4) and torch.allclose(a.std, d.std, rtol=1e-4)


def test_ddim_eta0_is_deterministic_and_consistent(sched):
    """η = 0: σ = 0 and x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev) ε̂ (noise ignored, no density)."""
    x, eps = torch.randn(2, 2, 1, 4, 4).unbind(0)
    t, tp = torch.tensor([600, 300]), torch.tensor([500, 100])
    out = sched.ddim_step(x, eps, t, tp, eta=0.0, noise=torch.randn_like(x))
    ab, abp = sched.alpha_bars64[t].reshape(-1, 1, 1, 1), sched.alpha_bars64[tp].reshape(-1, 1, 1, 1)
    x0 = (x.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()
    want = abp.sqrt() * x0 + (1 - abp).sqrt() * eps.double()
    assert torch.allclose(out.prev_sample.double(), want, atol=1e-4) and torch.isnan(out.log_prob).all()


def test_scoring_a_stored_sample_gives_gradients_through_eps(sched):
    x = torch.randn(2, 1, 4, 4)
    eps = torch.randn(2, 1, 4, 4, requires_grad=True)
    t = torch.tensor([50, 60])
    prev = sched.ancestral_step(x, eps.detach(), t, noise=torch.randn(2, 1, 4, 4)).prev_sample
    out = sched.ancestral_step(x, eps, t, prev_sample=prev)
    out.log_prob.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def test_sampling_timesteps(sched):
    assert sched.sampling_timesteps(1000) == list(range(999, -1, -1))
    ts = sched.sampling_timesteps(100)
    assert len(ts) == 100 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
