"""Low-rank adapters on the shared base UNet (papa.adapters): they start at the base, stay small, save and load every
key (a missing or renamed key is an error, not a partial load), keep the base as the reference, and a tiny adapter run
trains, resumes exactly and samples through papa.sample."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from papa.adapters import AdapterPolicy, adapter_state, is_adapter_state, load_adapter_state, wrap  # noqa: E402
from papa.config import AdapterConfig, load_config  # noqa: E402
from papa.models import build_unet  # noqa: E402
from test_train import TINY_MODEL, args_for, overrides, run_dir, tiny  # noqa: E402,F401 - tiny: the module fixture
from testutil import ROOT, assert_same_metrics, metrics  # noqa: E402

TINY = load_config(ROOT / "configs" / "mnist.yaml", TINY_MODEL).model


def unet(seed=0, mcfg=TINY):
    torch.manual_seed(seed)
    return build_unet(mcfg).eval()


def xt(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.tensor([5, 400, 900][:n])


def perturb(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_a_fresh_adapter_is_the_base_and_the_default_is_under_two_percent():
    base = unet()
    x, t = xt()
    with torch.no_grad():
        want = base(x, t)
        pol = AdapterPolicy(base, AdapterConfig(rank=2))
        assert torch.equal(pol.module(x, t), want)
    full = sum(p.numel() for p in build_unet(load_config(ROOT / "configs" / "mnist.yaml").model).parameters())
    big = AdapterPolicy(build_unet(load_config(ROOT / "configs" / "mnist.yaml").model), AdapterConfig(rank=2))
    assert 0 < big.n_trainable <= 0.02 * full, (big.n_trainable, full)
    assert all(not p.requires_grad for n, p in big.module.named_parameters() if "lora_" not in n)


def test_adapter_weights_round_trip_and_bad_keys_are_named():
    a = wrap(unet(), AdapterConfig(rank=2))
    perturb(a)
    sd = adapter_state(a)
    assert sd and is_adapter_state(sd) and all("default" not in k for k in sd)
    b = wrap(unet(), AdapterConfig(rank=2))
    load_adapter_state(b, sd)
    x, t = xt()
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))
    k = next(iter(sd))
    with pytest.raises(ValueError, match="1 missing"):
        load_adapter_state(b, {n: v for n, v in sd.items() if n != k})
    with pytest.raises(ValueError, match="1 unexpected"):
        load_adapter_state(b, {**{n: v for n, v in sd.items() if n != k}, k.replace("lora_A", "lora_Q"): sd[k]})
    with pytest.raises(ValueError, match="another adapter.rank"):
        load_adapter_state(wrap(unet(), AdapterConfig(rank=3)), sd)


def test_the_reference_is_the_base_while_the_adapter_trains():
    base = unet()
    x, t = xt()
    with torch.no_grad():
        want = base(x, t).clone()
    pol = AdapterPolicy(base, AdapterConfig(rank=2))
    opt = torch.optim.SGD(pol.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        pol.policy(x, t).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(pol.policy(x, t), want)
        assert torch.equal(pol.reference(x, t), want)
        assert torch.equal(pol.reference_module.features(x, t), unet().features(x, t))


def test_no_layer_matched_is_a_clear_error():
    with pytest.raises(ValueError, match="matches no Conv2d or Linear layer"):
        wrap(unet(), AdapterConfig(rank=2, targets="nothing_by_this_name"))


def test_a_tiny_adapter_run_trains_resumes_and_samples(tiny, tmp_path):
    from papa import checkpoint
    from papa.sample import main as sample_main
    from papa.train import main
    extra = ["adapter.rank=2", "adapter.alpha=8"]
    ref, out = tmp_path / "ref", tmp_path / "cut"
    assert main(args_for(overrides(tiny, ref, rounds=2, extra=extra))) == 0
    assert main(args_for(overrides(tiny, out, rounds=2, extra=extra))) == 0
    (run_dir(out) / "checkpoints" / "round_002.pt").unlink()      # cut after round 1, resumed from its adapter
    assert main(["--resume", str(run_dir(out))]) == 0
    assert_same_metrics(metrics(run_dir(ref)), metrics(run_dir(out)))
    st = checkpoint.load(run_dir(ref) / "checkpoints" / "round_002.pt")
    assert is_adapter_state(st["model"]) and is_adapter_state(st["ema"])
    assert any(float(v.abs().max()) > 0 for k, v in st["model"].items() if "lora_B" in k)   # it trained
    # papa.sample merges the adapter into the base, given the run's config; without it, one clear line
    cfg = run_dir(ref) / "config.yaml"
    ck = run_dir(ref) / "checkpoints" / "round_002.pt"
    assert sample_main(["--config", str(cfg), "--checkpoint", str(ck), "--num", "4", "--out", str(tmp_path / "s"),
                        "--quiet", "--set", "sample.batch_size=4", "--set", "diffusion.sample_steps=4"]) == 0
    assert torch.load(tmp_path / "s" / "samples.pt").shape[0] == 4
    with pytest.raises(checkpoint.CheckpointError, match=r"trained with adapter.alpha=8.0, the config says 4.0"):
        sample_main(["--config", str(cfg), "--checkpoint", str(ck), "--num", "4", "--out", str(tmp_path / "u"),
                     "--quiet", "--set", "adapter.alpha=4"])
    with pytest.raises(checkpoint.CheckpointError, match="holds a low-rank adapter") as e:
        sample_main(["--checkpoint", str(ck), "--num", "4", "--out", str(tmp_path / "t"), "--quiet"])
    assert "\n" not in str(e.value) and not (tmp_path / "t").exists()
    # loading the adapter run's checkpoint reads it once (its weights and its saved settings from the same read)
    import papa.models as models
    from papa.config import load_config
    reads, real = [], models.load
    models.load = lambda path, *a, **k: (reads.append(Path(path).name), real(path, *a, **k))[1]
    try:
        c = load_config(cfg)
        models.load_unet(c.model, ck, adapter=c.adapter, base=c.checkpoints.base)
    finally:
        models.load = real
    assert reads.count("round_002.pt") == 1, reads


@pytest.mark.parametrize("bad,key", [(["adapter.rank=-1"], "adapter.rank"), (["adapter.rank=2", "adapter.alpha=0"],
                                     "adapter.alpha"), (["adapter.targets=("], "adapter.targets"),
                                    (["adapter.rank=2", "adapter.targets=nothing"], "adapter.targets")])
def test_adapter_settings_are_checked_before_any_work(bad, key):
    from papa.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "mnist.yaml", bad)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_a_batch_that_mixes_users_equals_sampling_each_user_alone():
    from papa.adapters import BASE, UserAdapters
    from papa.sampling import sample
    from papa.schedule import NoiseSchedule
    cfg = load_config(ROOT / "configs" / "mnist.yaml", TINY_MODEL)
    users = UserAdapters(unet(), AdapterConfig(rank=2), ["ann", "bo", "2"], seed=0)   # '2' is in every layer name
    for i, u in enumerate(users.users):                       # three different trained-looking adapters
        perturb_named(users.model, users._known(u), seed=10 + i)
    n = users.numbers_per_user()
    assert n > 0 and all(sum(v.numel() for v in users.state(u).values()) == n for u in users.users)
    sched = NoiseSchedule.from_config(cfg.diffusion)
    who = ["ann", "bo", BASE, "2", "ann"]
    kw = dict(steps=8, seed=3, batch_size=len(who), progress=False)
    mixed = sample(users.for_users(who), sched, len(who), **kw)
    alone = torch.cat([sample(users.for_users([u]), sched, 1, first_index=i, **kw) for i, u in enumerate(who)])
    # peft runs each user's rows as a sub-batch, and a convolution's float32 rounding depends on its batch size
    # (oneDNN picks its algorithm by shape, per CPU): over 8 steps that is up to a few 1e-4, so 2e-3 is the bound,
    # against differences between users of 1e-2 and more (checked next)
    assert torch.allclose(mixed, alone, atol=2e-3), (mixed - alone).abs().max()
    base = sample(unet(), sched, len(who), **kw)
    assert torch.allclose(mixed[2], base[2], atol=2e-3) and not torch.allclose(mixed[0], base[0], atol=1e-2)
    # a user's adapter saved and loaded into another user's slot makes the two sample alike
    users.load("bo", users.state("ann"))
    same = sample(users.for_users(["ann", "bo"]), sched, 2, **{**kw, "batch_size": 2})
    both = sample(users.for_users(["ann", "ann"]), sched, 2, **{**kw, "batch_size": 2})
    assert torch.allclose(same, both, atol=2e-3)
    with pytest.raises(KeyError, match="no adapter for user 'dee'"):
        users.forward(torch.zeros(1, 1, 28, 28), torch.tensor([1]), ["dee"])


def perturb_named(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".lora_B.{name}." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
