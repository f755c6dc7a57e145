"""The sampler and `python -m papa.sample`: output files, determinism, batch independence, ePAPA switch."""
import json

import pytest
import torch

from papa import checkpoint
from papa.config import load_config
from papa.models import EvaluatorCNN, build_unet
from papa.sampling import sample
from papa.schedule import NoiseSchedule
from testutil import ROOT


def _tiny_model():
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    return build_unet(cfg.model).eval()


class OneByOne(torch.nn.Module):
    """The UNet applied to one sample at a time: batch-invariant by construction. A batched convolution's float
    rounding depends on the batch size on some CPUs (measured: 1e-6 per call, 1e-4 after four steps of a random
    UNet), which says nothing about the property tested here: every sample's noise comes from its own seed."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        t = torch.as_tensor(t).expand(len(x)) if torch.as_tensor(t).ndim == 0 else t
        return torch.cat([self.net(x[i:i + 1], t[i:i + 1]) for i in range(len(x))])


def test_samples_do_not_depend_on_batch_size():
    m, s = OneByOne(_tiny_model()), NoiseSchedule()
    a = sample(m, s, 5, steps=4, seed=3, batch_size=5, progress=False)
    b = torch.cat([sample(m, s, 2, steps=4, seed=3, batch_size=2, progress=False),
                   sample(m, s, 3, steps=4, seed=3, first_index=2, batch_size=3, progress=False)])
    assert a.shape == (5, 1, 28, 28) and torch.equal(a, b)
    c = sample(m, s, 5, steps=4, seed=4, batch_size=5, progress=False)
    assert not torch.allclose(a, c)


def test_epapa_switch_uses_base_model_below_k():
    m, s = _tiny_model(), NoiseSchedule()
    base = _tiny_model()  # other random weights
    plain = sample(m, s, 2, steps=5, seed=0, progress=False)
    same = sample(m, s, 2, steps=5, seed=0, base_model=m, epapa_k=400, progress=False)
    mixed = sample(m, s, 2, steps=5, seed=0, base_model=base, epapa_k=400, progress=False)
    assert torch.allclose(plain, same) and not torch.allclose(plain, mixed)
    with pytest.raises(ValueError, match="base model"):
        sample(m, s, 1, steps=2, epapa_k=10, progress=False)


def test_bf16_precision_stays_near_fp32_and_checks_its_argument():
    """bf16 autocast moves ε̂ by bf16 rounding only (relative error ~1e-2 on a random UNet), the sampler runs it (its
    images differ from float32's), and the step and noise stay float32 (same seed → same images on a rerun)."""
    from papa.sampling import autocast_bf16
    m, s = _tiny_model(), NoiseSchedule()
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        e32, e16 = m(x, t), autocast_bf16(m, "cpu")(x, t)
    assert e16.dtype == torch.float32 and 0 < float((e16 - e32).norm() / e32.norm()) < 3e-2
    assert autocast_bf16(m, "cpu") is autocast_bf16(m, "cpu")
    a = sample(m, s, 4, steps=4, seed=0, progress=False)
    b = sample(m, s, 4, steps=4, seed=0, progress=False, precision="bf16")
    assert b.dtype == torch.float32 and torch.isfinite(b).all() and not torch.equal(a, b)
    assert torch.equal(b, sample(m, s, 4, steps=4, seed=0, progress=False, precision="bf16"))
    with pytest.raises(ValueError, match="precision"):
        sample(m, s, 1, steps=2, progress=False, precision="fp8")


def test_sample_cli_writes_grid_tensor_and_stats(tmp_path):
    from papa.sample import main
    unet = _tiny_model()
    checkpoint.atomic_save({"state_dict": unet.state_dict()}, tmp_path / "u.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, tmp_path / "e.pt")
    out = tmp_path / "out"
    rc = main(["--config", str(ROOT / "configs" / "mnist.yaml"), "--checkpoint", str(tmp_path / "u.pt"),
               "--set", f"checkpoints.evaluator={tmp_path / 'e.pt'}", "--set", f"checkpoints.base={tmp_path / 'u.pt'}",
               "--set", "diffusion.sample_steps=3", "--num", "6", "--seed", "1", "--epapa-k", "300",
               "--out", str(out), "--quiet"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num"] == 6 and len(stats["class_fraction"]) == 10
    assert abs(sum(stats["class_fraction"]) - 1) < 1e-3 and 0 < stats["mean_confidence"] <= 1
    assert stats["epapa_k"] == 300 and stats["seed"] == 1 and stats["precision"] == "fp32"
    assert stats["fid_vs_test"] is None or stats["fid_vs_test"] >= 0
    imgs = torch.load(out / "samples.pt", weights_only=True)
    assert imgs.shape == (6, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()


def test_sample_cli_takes_a_trainer_round_checkpoint(tmp_path):
    """A finetuned model straight from a run's checkpoints/round_NNN.pt ({'model': …, 'opt': …, …})."""
    from papa.sample import main
    unet = _tiny_model()
    opt = torch.optim.Adam(unet.parameters())
    checkpoint.atomic_save({"model": unet.state_dict(), "opt": opt.state_dict(), "round": 3, "metrics": []},
                           tmp_path / "round_003.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, tmp_path / "e.pt")
    rc = main(["--config", str(ROOT / "configs" / "mnist.yaml"), "--checkpoint", str(tmp_path / "round_003.pt"),
               "--set", f"checkpoints.evaluator={tmp_path / 'e.pt'}", "--set", "diffusion.sample_steps=2",
               "--num", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0 and json.loads((tmp_path / "o" / "stats.json").read_text())["weights"] == "policy"  # no EMA kept


def test_round_checkpoint_weights_default_to_the_ema_the_run_evaluated(tmp_path):
    """A round checkpoint of a run with train.ema_decay > 0 holds 'model' (the policy) and 'ema'; loading takes the EMA
    (what the run's evaluations judged) unless told 'policy'; asking for an EMA that is not there is a clear error."""
    from papa.models import load_unet
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    policy, ema = _tiny_model(), _tiny_model()
    checkpoint.atomic_save({"model": policy.state_dict(), "ema": ema.state_dict(), "round": 3}, tmp_path / "r.pt")
    checkpoint.atomic_save({"model": policy.state_dict(), "round": 3}, tmp_path / "no_ema.pt")
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not same(policy, ema)
    assert same(load_unet(cfg.model, tmp_path / "r.pt"), ema)
    assert same(load_unet(cfg.model, tmp_path / "r.pt", "ema"), ema)
    assert same(load_unet(cfg.model, tmp_path / "r.pt", "policy"), policy)
    assert same(load_unet(cfg.model, tmp_path / "no_ema.pt"), policy)
    assert [checkpoint.resolved_weights(tmp_path / "r.pt", w) for w in ("auto", "ema", "policy")] == ["ema", "ema", "policy"]
    assert checkpoint.resolved_weights(tmp_path / "no_ema.pt") == "policy"
    with pytest.raises(checkpoint.CheckpointError, match="no EMA weights"):
        load_unet(cfg.model, tmp_path / "no_ema.pt", "ema")


def _sample_args(tmp_path, *extra):
    """A tiny, fast `python -m papa.sample` command line: random UNet and evaluator saved under tmp_path."""
    if not (tmp_path / "u.pt").is_file():
        checkpoint.atomic_save({"state_dict": _tiny_model().state_dict()}, tmp_path / "u.pt")
        checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, tmp_path / "e.pt")
    return ["--config", str(ROOT / "configs" / "mnist.yaml"), "--checkpoint", str(tmp_path / "u.pt"),
            "--set", f"checkpoints.evaluator={tmp_path / 'e.pt'}", "--set", "diffusion.sample_steps=2", "--quiet",
            *extra]


def test_frechet_distance_refuses_what_it_cannot_judge():
    """One sample has no covariance (torch.cov gives NaN, eigh then a LinAlgError) and non-finite features no Gaussian:
    both are a clear ValueError naming the problem; ordinary inputs still give the Fréchet distance."""
    from papa.evaluate import frechet_distance
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.tensor([3.0, 0, 0, 0])
    assert abs(frechet_distance(a, a + shift) - 9.0) < 1e-6  # same covariance: the squared mean shift alone
    assert frechet_distance(a, b) > 0
    for f1, f2, which in ((a[:1], b, "first has 1"), (a, b[:1], "second has 1"), (a[:0], b, "first has 0")):
        with pytest.raises(ValueError, match=f"at least 2 samples in each set; the {which}"):
            frechet_distance(f1, f2)
    bad = a.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(b, bad)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(a.clone().fill_(float("inf")), b)


def test_sample_cli_one_image_records_no_fid_and_says_why(tmp_path, monkeypatch):
    """`--num 1` is a legitimate request: the image is written and stats.json has fid_vs_test null with a note (it used
    to die in the FID with a LinAlgError whenever the test set was available; a stand-in test set makes it so here)."""
    import numpy as np

    import papa.data
    import papa.sample
    from papa.sample import main
    fake = lambda name, split, root=None, **k: (np.random.default_rng(0).integers(0, 256, (8, 28, 28), np.uint8),
                                               np.arange(8, dtype=np.uint8))
    monkeypatch.setattr(papa.data, "load_dataset", fake)
    monkeypatch.setattr(papa.sample, "load_dataset", fake, raising=False)
    assert main(_sample_args(tmp_path, "--num", "1", "--out", str(tmp_path / "o"))) == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["num"] == 1 and stats["fid_vs_test"] is None
    assert "at least 2 samples" in stats["fid_note"]
    assert torch.load(tmp_path / "o" / "samples.pt", weights_only=True).shape == (1, 1, 28, 28)
    assert main(_sample_args(tmp_path, "--num", "3", "--out", str(tmp_path / "o3"))) == 0  # two or more: an FID
    stats = json.loads((tmp_path / "o3" / "stats.json").read_text())
    assert stats["fid_vs_test"] >= 0 and "fid_note" not in stats


def test_sample_cli_unusable_data_root_fails_before_sampling(tmp_path, monkeypatch):
    """With data.root set the user named the test set: an unusable directory is a DataError before any sampling (not a
    silent 'test set unavailable' note after it), and nothing is written."""
    import papa.sampling
    from papa.data import DataError
    from papa.sample import main
    monkeypatch.setattr(papa.sampling, "sample", lambda *a, **k: pytest.fail("sampled before checking data.root"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"'{tmp_path / 'empty'}'"):
        main(_sample_args(tmp_path, "--num", "2", "--set", f"data.root={tmp_path / 'empty'}", "--out",
                          str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_identity_probe_finish_replays_the_sampler_from_any_step():
    """scripts/identity_probe.py restarts a trajectory at step j and finishes it: from step 0 with the deterministic
    sampler that is the sampler's own image; from the last state it only clamps; fresh noise changes the finish."""
    import importlib.util
    from papa.sampling import sample_trajectories
    spec = importlib.util.spec_from_file_location("identity_probe", ROOT / "scripts" / "identity_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    m, s = _tiny_model(), NoiseSchedule()
    tr = sample_trajectories(m, s, 2, steps=4, sampler="ddim", eta=0.0, seed=1)
    ts = tr["t"].tolist()
    gen = torch.Generator().manual_seed(0)
    again = probe.finish(m, s, tr["x"][:, 0], ts, 0, "ddim", 0.0, gen)
    assert torch.allclose(again, tr.images.clamp(-1, 1), atol=1e-5)
    assert torch.equal(probe.finish(m, s, tr["x"][:, -1], ts, len(ts), "ddim", 0.0, gen), tr.images.clamp(-1, 1))
    a = probe.finish(m, s, tr["x"][:, 1], ts, 1, "ancestral", 1.0, torch.Generator().manual_seed(0))
    b = probe.finish(m, s, tr["x"][:, 1], ts, 1, "ancestral", 1.0, torch.Generator().manual_seed(0))
    c = probe.finish(m, s, tr["x"][:, 1], ts, 1, "ancestral", 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
