"""Diffusion-KTO against a plain-torch loop written from the formula (docs/ALGORITHMS.md §13): liked only, disliked
only, mixed with skips, the reference point and its clipping at 0, chunking, the direction of a step, and a tiny run."""
import json
from types import SimpleNamespace

import pytest
import torch

from papa.algos.diffusion_kto import DiffusionKTO, reference_point
from papa.config import ConfigError, load_config
from papa.policy import FullPolicy
from papa.schedule import NoiseSchedule
from testutil import ROOT, metrics

SCHED = NoiseSchedule()


class TinyEps(torch.nn.Module):
    """A cheap denoiser stand-in with t-dependence."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        s = (1 - SCHED.alpha_bar(t)).sqrt().view(-1, 1, 1, 1)
        return s * x + 0.1 * self.conv(x)


class Template(torch.nn.Module):
    """The exact denoiser of a point mass at the template m: ε̂ = (x_t − √ᾱ_t m) / √(1 − ᾱ_t), so ε̂ − ε =
    √(ᾱ_t / (1 − ᾱ_t)) (x0 − m) and the denoising error of x0 is SNR_t · mean (x0 − m)², with no noise term: a
    template nearer x0 denoises it better at every (t, ε), whose sign of r_θ a test can then choose."""

    def __init__(self, m):
        super().__init__()
        self.m = torch.nn.Parameter(m.clone())

    def forward(self, x, t):
        ab = SCHED.alpha_bar(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.m) / (1 - ab).sqrt()


def kto(policy_net, reference_net=None, perturb=0.0, chunk=100, **settings):
    """The method as the engine builds it, over a FullPolicy: the reference a frozen copy of `policy_net` (or
    `reference_net`), the policy then moved `perturb` (seeded Gaussian steps on every weight) away from it."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml", ["train.algo=diffusion_kto", f"train.timestep_chunk={chunk}"] +
                      [f"diffusion_kto.{k}={v}" for k, v in settings.items()])
    policy = FullPolicy(policy_net)
    if reference_net is not None:
        policy.reference_module = reference_net.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.module.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g))
    return DiffusionKTO(cfg, policy, SCHED)


def images(n, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_loss(m, data, units, items, z=None):
    """The formula, item by item, from the work list's draws, with the reference point from those items (or `z`):
    which images, labels and weights the work list should hold is checked separately
    (`test_work_list_holds_the_labelled_images`)."""
    s, net, ref = m.s, m.policy.module, m.policy.reference_module
    rs, ys = [], []
    for k in range(len(items)):
        x0, t, eps = items.x[k:k + 1], items.t[k:k + 1], items.eps[k:k + 1]
        x_t = SCHED.add_noise(x0, eps, t)
        se = lambda f: (eps - f(x_t, t)).square().mean()
        rs.append(-(se(net) - se(ref).detach()))
        ys.append(float(items.y[k]))
    r = torch.stack(rs)
    z = torch.clamp(r.detach().mean(), min=0) if z is None else torch.tensor(z)
    total = 0.0
    for r_k, y in zip(r, ys):
        lam = s.desirable_weight if y > 0 else s.undesirable_weight
        total = total + lam * (1 - torch.sigmoid(y * s.beta * (r_k - z))) / (len(units) * s.timesteps_per_sample)
    return total, z


def chunked_loss(m, ctx, items, size):
    """Σ over chunks of the method's loss, as the engine accumulates it."""
    out = [m.loss(ctx, items.slice(slice(c, c + size))) for c in range(0, len(items), size)]
    return sum(l for l, _ in out), out


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


# ----------------------------------------------------------------------------- the loss against the formula


@pytest.mark.parametrize("y", [[1, 1, 1], [-1, -1, -1], [1, -1, 0, 1]], ids=["liked", "disliked", "mixed"])
def test_loss_and_gradient_match_the_formula(y):
    m = kto(TinyEps(), perturb=0.3, beta=200.0, desirable_weight=1.5, undesirable_weight=0.5, timesteps_per_sample=3)
    data = {"x": images(len(y)), "y": torch.tensor(y, dtype=torch.float)}
    units = torch.arange(len(y))
    z, items = m.step_items(data, units, torch.Generator().manual_seed(1))
    assert len(items) == 3 * sum(v != 0 for v in y)
    want, want_z = reference_loss(m, data, units, items)
    assert z == pytest.approx(want_z.item(), rel=1e-5, abs=1e-9)
    got, out = chunked_loss(m, z, items, 2)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grads(m.policy.module, got), grads(m.policy.module, want), rtol=1e-4, atol=1e-7)
    assert sum(s["acc_den"] for _, s in out) == len(items) and 0 <= sum(s["acc_num"] for _, s in out) <= len(items)


def test_work_list_holds_the_labelled_images():
    m = kto(TinyEps(), desirable_weight=1.5, undesirable_weight=0.5, timesteps_per_sample=2)
    x = images(5)
    data = {"x": x, "y": torch.tensor([0.0, 1.0, -1.0, 0.0, 1.0])}
    units = torch.tensor([4, 0, 2, 3, 1])  # a shuffled step
    _, items = m.step_items(data, units, torch.Generator())
    assert torch.equal(items.x, torch.stack([x[4], x[4], x[2], x[2], x[1], x[1]]))
    assert items.y.tolist() == [1, 1, -1, -1, 1, 1]
    # a skipped image counts in the average but is never run: 1/(5 units × 2 draws) per item, times λ_y
    assert torch.allclose(items.w, torch.tensor([1.5, 1.5, 0.5, 0.5, 1.5, 1.5]) / 10)
    assert ((items.t >= 0) & (items.t < SCHED.T)).all()


def test_skipped_images_contribute_nothing():
    m = kto(TinyEps(), perturb=0.3, beta=20.0, timesteps_per_sample=4)
    x = images(3)
    y = torch.tensor([1.0, 0.0, -1.0])
    z1, it1 = m.step_items({"x": x, "y": y}, torch.arange(3), torch.Generator().manual_seed(5))
    other = x.clone()
    other[1] = -x[1]  # the skipped image changes: neither the reference point nor the loss may notice
    z2, it2 = m.step_items({"x": other, "y": y}, torch.arange(3), torch.Generator().manual_seed(5))
    assert z1 == z2 and torch.equal(m.loss(z1, it1)[0], m.loss(z2, it2)[0])
    # a step of skips only is empty: the engine skips it, without a UNet call
    z, items = m.step_items({"x": x, "y": torch.zeros(3)}, torch.arange(3), torch.Generator())
    assert len(items) == 0 and z is None


# ----------------------------------------------------------------------------- the reference point


def test_reference_point_is_the_clipped_detached_batch_mean():
    assert reference_point(torch.tensor([-1.0, -2.0])).item() == 0
    assert reference_point(torch.tensor([1.0, 3.0])).item() == 2
    assert reference_point(torch.tensor([-1.0, 3.0])).item() == 1
    assert not reference_point(torch.tensor([1.0, 3.0], requires_grad=True)).requires_grad
    x0 = images(1)[0]
    x = torch.stack([x0, x0 + 0.002 * images(1, seed=3)[0]])  # a liked and a disliked image, close together
    near, far = x0 + 0.01 * images(1, seed=1)[0], x0 + 0.03 * images(1, seed=2)[0]
    data = {"x": x, "y": torch.tensor([1.0, -1.0])}
    for policy_m, ref_m, positive in ((near, far, True), (far, near, False)):
        m = kto(Template(policy_m), Template(ref_m), beta=5.0, timesteps_per_sample=8)
        z, items = m.step_items(data, torch.arange(2), torch.Generator().manual_seed(3))
        want, want_z = reference_loss(m, data, torch.arange(2), items)
        if positive:  # the policy's template is nearer: r_θ > 0 on average, z_ref is that mean
            assert z > 0 and z == pytest.approx(want_z.item(), rel=1e-5)
        else:         # the reference denoises better: the KL estimate is negative and clipped at 0
            assert z == 0 and want_z.item() == 0
        got, out = chunked_loss(m, z, items, 3)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(grads(m.policy.module, got), grads(m.policy.module, want), rtol=1e-4, atol=1e-12)
        stats = {k: sum(s[k] for _, s in out) for k in out[0][1]}
        assert m.summarize(stats)["reference_point"] == pytest.approx(z)


def test_chunk_size_changes_nothing():
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    runs = []
    for chunk in (1, 7, 100):  # the pre-pass's chunks, and the loss's
        torch.manual_seed(0)
        m = kto(TinyEps(), perturb=0.3, chunk=chunk, beta=200.0, timesteps_per_sample=5)
        z, items = m.step_items({"x": images(4), "y": y}, torch.arange(4), torch.Generator().manual_seed(2))
        loss, _ = chunked_loss(m, z, items, chunk)
        runs.append((z, loss, grads(m.policy.module, loss)))
    for z, loss, g in runs[1:]:
        assert z == pytest.approx(runs[0][0], rel=1e-6)
        torch.testing.assert_close(loss, runs[0][1], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(g, runs[0][2], rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- the direction of a step


@pytest.mark.parametrize("label", [1.0, -1.0])
def test_a_step_lowers_a_liked_images_error_and_raises_a_disliked_ones(label):
    torch.manual_seed(0)
    net = TinyEps()
    m = kto(net, beta=50.0, timesteps_per_sample=16)
    data = {"x": images(1), "y": torch.tensor([label])}
    z, items = m.step_items(data, torch.arange(1), torch.Generator().manual_seed(4))
    err = lambda: m._errors(items)[0].mean()
    before = err()
    loss, _ = m.loss(z, items)
    grads(net, loss)
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(1e-3 * p.grad)
    after = err()
    assert (after < before) if label > 0 else (after > before), (before, after)
    # the reference is frozen: its errors are what they were
    assert torch.equal(m._errors(items)[1], items.err_ref)


def test_settings_are_checked():
    for bad in ("diffusion_kto.beta=0", "diffusion_kto.desirable_weight=-1", "diffusion_kto.timesteps_per_sample=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(ROOT / "configs" / "mnist.yaml", ["train.algo=diffusion_kto", bad])


# ----------------------------------------------------------------------------- a tiny run


TINY_MODEL = ["model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]", "model.time_emb_dim=16"]


def test_a_tiny_run_trains_on_likes_dislikes_and_skips(tmp_path):
    from papa import checkpoint
    from papa.models import EvaluatorCNN, OracleCNN, build_unet
    from papa.train import main
    cfg = load_config(ROOT / "configs" / "mnist.yaml", TINY_MODEL)
    torch.manual_seed(0)
    checkpoint.atomic_save({"state_dict": build_unet(cfg.model).state_dict()}, tmp_path / "base.pt")
    sd = OracleCNN().state_dict()  # an 11-output oracle, unused here but loaded by the run
    sd["fc2.weight"] = torch.cat([sd["fc2.weight"], torch.zeros(1, 128)])
    sd["fc2.bias"] = torch.cat([sd["fc2.bias"], torch.zeros(1)])
    checkpoint.atomic_save({"state_dict": sd}, tmp_path / "oracle.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, tmp_path / "evaluator.pt")
    labels = tmp_path / "labels.json"  # like, dislike, skip, like, as a person might answer
    labels.write_text(json.dumps({f"r{r:03d}_{i:03d}": [1, -1, 0, 1][i] for r in (1, 2) for i in range(4)}))
    out = tmp_path / "out"
    ovs = TINY_MODEL + [
        f"checkpoints.base={tmp_path / 'base.pt'}", f"checkpoints.oracle={tmp_path / 'oracle.pt'}",
        f"checkpoints.evaluator={tmp_path / 'evaluator.pt'}", f"train.output_dir={out}", "train.rounds=2",
        "train.samples_per_round=4", "train.batch_size=2", "train.timestep_chunk=5", "train.lr=0.001",
        "diffusion.sample_steps=4", "eval.num=6", "eval.final_num=8", "eval.every=2", "eval.real_max=200", "train.sample_path=run",
        "train.algo=diffusion_kto", "diffusion_kto.timesteps_per_sample=3", "diffusion_kto.beta=100",
        "feedback.source=file", f"feedback.labels_file={labels}", "feedback.reject=false",
        "feedback.preference=[1]"]  # one class: fewer real test images for the evaluator to featurise
    args = ["--config", str(ROOT / "configs" / "mnist.yaml")]
    for o in ovs:
        args += ["--set", o]
    assert main(args) == 0
    rd = out / "mnist" / "run"
    rows = metrics(rd)
    assert [r["labels_used"] for r in rows] == [0, 4, 8]
    assert all(r["optimizer_steps"] == 2 and r["unet_items"] == 3 * 3 for r in rows[1:])  # the skip is not run
    assert rows[-1]["kl_to_base"] > 0 and rows[0]["kl_to_base"] == 0  # the policy moved away from the base
    assert all(0 <= r["implicit_accuracy"] <= 1 and r["reference_point"] >= 0 for r in rows[1:])
    answers = {f"r001_{i:03d}": [1, -1, 0, 1][i] for i in range(4)}
    assert json.loads((rd / "rounds/001/labels.json").read_text()) == answers


# ----------------------------------------------------------------------------- the reference point over the round


def test_round_reference_point_is_the_rounds_labelled_images_mean():
    """reference_over: round: z_ref is the clipped mean r_θ of every labelled image of the round (skips left out) at
    D fresh draws each, under the current policy, whichever images the step holds; the step's items keep their own
    reference errors and loss. Exact denoisers (Template) make r_θ > 0 on average, so the clip does not hide a
    wrong mean, and the images differ in how much nearer the policy's template is, so the step's own mean (the
    default estimator) differs from the round's."""
    x0 = images(1)[0]
    x = torch.stack([x0 + a * images(1, seed=s)[0] for a, s in ((0.01, 1), (0.02, 2), (0.5, 3), (0.03, 4))])
    y = torch.tensor([1.0, -1.0, 0.0, 1.0])  # image 2, the one far from both templates, is skipped
    data = {"x": x, "y": y}
    m = kto(Template(x0), Template(x0 + 0.05 * images(1, seed=5)[0]), beta=200.0, timesteps_per_sample=3,
            reference_over="round", reference_draws=5)
    step = kto(Template(x0), Template(x0 + 0.05 * images(1, seed=5)[0]), beta=200.0, timesteps_per_sample=3)
    net, ref = m.policy.module, m.policy.reference_module
    for units in (torch.tensor([3]), torch.tensor([1, 0])):
        z, items = m.step_items(data, units, torch.Generator().manual_seed(7))
        # the same draws by hand: the step's items first, then the round's
        g = torch.Generator().manual_seed(7)
        n = int((y[units] != 0).sum())
        torch.randint(0, SCHED.T, (n * 3,), generator=g), torch.randn((n * 3, 1, 8, 8), generator=g)
        xr = x[[0, 1, 3]].repeat_interleave(5, 0)
        t, eps = torch.randint(0, SCHED.T, (15,), generator=g), torch.randn(xr.shape, generator=g)
        with torch.no_grad():
            x_t = SCHED.add_noise(xr, eps, t)
            se = lambda f: (eps - f(x_t, t)).square().flatten(1).mean(1)
            want_z = -(se(net) - se(ref)).mean()
        assert want_z > 0 and z == pytest.approx(want_z.item(), rel=1e-5)
        z_step, _ = step.step_items(data, units, torch.Generator().manual_seed(7))
        assert z_step != pytest.approx(z, rel=1e-3)  # the default estimator is another number here
        got, _ = chunked_loss(m, z, items, 2)
        # the step's loss: the formula's sum over its items with the round's z_ref
        total, _ = reference_loss(m, data, units, items, z=z)
        assert got.item() == pytest.approx(total.item(), rel=1e-5)


def test_reference_settings_are_checked():
    for bad in ("diffusion_kto.reference_over=batch", "diffusion_kto.reference_draws=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(ROOT / "configs" / "mnist.yaml", ["train.algo=diffusion_kto", bad])
