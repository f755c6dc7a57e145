"""Newcomers from prototype adapters (scripts/new_users.py, papa.adapters.UserAdapters.mix, adapter.init): the mixture
is the SVD-cut weighted sum of the adapters' weight changes, a run starts from it exactly, and the script's three
steps run end to end and resume."""
import json
import sys

import pytest
import torch

pytest.importorskip("peft")

from papa.config import load_config  # noqa: E402
from papa.models.unet import build_unet  # noqa: E402
from test_train import TINY_MODEL, overrides, tiny  # noqa: E402,F401 - tiny: the module fixture
from testutil import ROOT  # noqa: E402


def delta(sd: dict, scale: float) -> dict:
    """Per adapted layer: (α / r) · B A, flattened to (out, in · kh · kw)."""
    out = {}
    for ka in (k for k in sd if ".lora_A." in k):
        a, b = sd[ka], sd[ka.replace(".lora_A.", ".lora_B.")]
        out[ka] = scale * b.flatten(1) @ a.flatten(1)
    return out


def adapters(n, rank=2, alpha=8.0):
    from papa.adapters import UserAdapters
    cfg = load_config(ROOT / "configs" / "mnist.yaml", TINY_MODEL + [f"adapter.rank={rank}", f"adapter.alpha={alpha}"])
    torch.manual_seed(0)
    ua = UserAdapters(build_unet(cfg.model), cfg.adapter, [f"p{i}" for i in range(n)])
    gen = torch.Generator().manual_seed(1)
    for u in ua.users:   # B = 0 would make every ΔW zero: give each adapter a B of its own
        sd = ua.state(u)
        ua.load(u, {k: torch.randn(v.shape, generator=gen) if ".lora_B." in k else v for k, v in sd.items()})
    return ua, cfg.adapter.alpha / cfg.adapter.rank


def test_mix_of_one_adapter_is_that_adapter_and_a_mix_is_the_best_low_rank_sum():
    ua, scale = adapters(3)
    one = delta(ua.mix({"p1": 1.0}), scale)
    for k, v in delta(ua.state("p1"), scale).items():
        torch.testing.assert_close(one[k], v, rtol=1e-4, atol=1e-5)
    w = {"p0": 0.5, "p1": 0.3, "p2": 0.2}
    got = delta(ua.mix(w), scale)
    each = [delta(ua.state(u), scale) for u in w]
    for k in got:
        full = sum(wi * d[k] for wi, d in zip(w.values(), each))
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        torch.testing.assert_close(got[k], (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    sd = ua.mix(w)   # balanced factors: each B column and A row carry the same norm
    ka = next(k for k in sd if ".lora_A." in k)
    a, b = sd[ka].flatten(1), sd[ka.replace(".lora_A.", ".lora_B.")].flatten(1)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-4, atol=1e-6)
    assert "__mix__" not in str(list(ua.model.peft_config))   # the scratch adapter is gone


def test_script_runs_prototypes_and_newcomers_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import new_users
    users = tmp_path / "users.yaml"
    users.write_text("dataset: mnist\nusers:\n  - {id: a, like: [1, 4]}\n  - {id: b, like: [0, 3]}\n"
                     "  - {id: c, like: [1, 7], new: true}\n")
    sets = overrides(tiny, tmp_path / "unused", rounds=1, extra=["adapter.rank=2", "adapter.alpha=8",
                                                                 f"users.population={users}"])
    argv = ["--config", str(ROOT / "configs" / "mnist.yaml"), "--k", "2", "--seen-labels", "20", "--proto-rounds", "1",
            "--warmup", "4", "--budget", "8", "--scratch-rounds", "2", "--threads", "1", "--out", str(tmp_path / "o")]
    for s in sets:
        argv += ["--set", s]
    monkeypatch.chdir(tmp_path)
    assert new_users.main(argv) == 0
    out = tmp_path / "o" / "mnist"
    summ = json.loads((out / "new_users.json").read_text())
    (row,) = summ["users"]
    assert row["user"] == "c" and abs(sum(row["weights"].values()) - 1) < 1e-5
    assert [n for n, _ in row["mixture"]] == [4, 8] and [n for n, _ in row["scratch"]] == [0, 8]   # eval.every=2
    assert (out / "new_users.png").is_file() and "| c | [1, 7] |" in (out / "new_users.md").read_text()
    # adapter.init: a run built from the mixture run's config starts from the mixture file's adapter exactly
    from papa.checkpoint import CheckpointError, load
    from papa.config import ConfigError
    from papa.engine import Engine
    mcfg = load_config(out / "newcomers" / "c" / "mixture" / "config.yaml")
    mix = load(out / "newcomers" / "c" / "mixture.pt")["model"]
    eng = Engine.from_config(mcfg, tmp_path / "fresh")
    got = eng.policy.module_state(eng.policy.module)
    assert set(got) == set(mix) and all(torch.equal(got[k], mix[k]) for k in mix)
    # its round 0 is the mixture's evaluation, never read from (or written to) the base's cache entry
    scratch = Engine.from_config(load_config(out / "newcomers" / "c" / "scratch" / "config.yaml"), tmp_path / "s")
    assert eng.base_eval.path != scratch.base_eval.path
    assert row["mixture"][0][1] == json.loads((out / "newcomers" / "c" / "mixture" / "metrics.jsonl").read_text()
                                              .splitlines()[0])["legible_preferred_rate"]
    mcfg.adapter.init = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="adapter.init.*not found"):
        Engine.from_config(mcfg, tmp_path / "fresh3")
    mcfg.adapter.init = str(tiny / "base.pt")                  # a whole UNet is no adapter: one line, no run
    with pytest.raises(CheckpointError, match="holds a whole UNet, not a low-rank adapter"):
        Engine.from_config(mcfg, tmp_path / "fresh2")
    with pytest.raises(ConfigError, match="adapter.init.*needs adapter.rank > 0"):
        load_config(ROOT / "configs" / "mnist.yaml", [f"adapter.init={tiny / 'base.pt'}"])
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("round_*.pt")}
    assert new_users.main(argv) == 0                       # everything done: nothing trained again
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("round_*.pt")} == before
    with pytest.raises(SystemExit, match="holds runs made with other settings \\(seed"):
        new_users.main(argv + ["--seed", "1"])                 # never another seed's runs reported as this one's
