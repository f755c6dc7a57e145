import subprocess
import sys

import pytest

from papa.config import dump_yaml, to_dict, ConfigError, load_config
from testutil import ROOT


@pytest.mark.parametrize("cfg", ["mnist", "fashion_mnist", "mnist_paper", "fashion_mnist_paper"])
def test_shipped_configs_load(cfg):
    c = load_config(ROOT / "configs" / f"{cfg}.yaml")
    assert c.diffusion.num_timesteps == 1000


@pytest.mark.parametrize("override, key", [
    ("model.nope=1", "model.nope"),
    ("sample.num=ten", "sample.num"),
    ("sample.num=0", "sample.num"),
    ("diffusion.sampler=euler", "diffusion.sampler"),
    ("sample.epapa_k=1000", "sample.epapa_k"),
    ("model.down_attention=[true]", "model.down_attention"),
    ("pretrain.lr=-1", "pretrain.lr"),
    ("data.dataset=cifar", "data.dataset"),
    ("diffusion.eta=true", "diffusion.eta"),
    ("train.lr_decay=step", "train.lr_decay"),
    ("evaluator.negative_kinds=[noise,smudge]", "evaluator.negative_kinds"),
    ("oracle.negative_kinds=[]", "oracle.negative_kinds"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "mnist.yaml", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_each_method_owns_its_section():
    """A method's settings live in its own section: another method on the same config ignores them, a bad value
    names `<method>.<key>`, and an unknown section or key is refused."""
    c = load_config(ROOT / "configs" / "mnist.yaml", ["train.algo=d3po", "d3po.beta=0.3"])
    assert c.train.algo == "d3po" and c.method().beta == 0.3 and c.method("papa").epapa_k == 350
    for bad, key in (("d3po.clip=1.5", "d3po.clip"), ("papa.epapa_k=1000", "papa.epapa_k"),
                     ("sdpo.lam=0", "sdpo.lam"), ("nosuch.x=1", "nosuch"), ("papa.beta=1", "papa.beta"),
                     ("train.epapa_k=350", "train.epapa_k")):
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "configs" / "mnist.yaml", [bad])
        assert key in str(e.value) and "\n" not in str(e.value), bad
    import yaml
    from papa.config import _build_config, validate
    assert to_dict(validate(_build_config(yaml.safe_load(dump_yaml(c))))) == to_dict(c)  # saved config reads back


def test_override_applies_and_types():
    c = load_config(ROOT / "configs" / "mnist.yaml", ["sample.num=7", "diffusion.eta=0.5", "model.arch=reference"])
    assert c.sample.num == 7 and c.diffusion.eta == 0.5 and c.model.arch == "reference"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "papa.sample", "--config", str(ROOT / "configs" / "mnist.yaml"),
                        "--set", "sample.bogus=1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "sample.bogus" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_extends_merges_over_the_named_config_and_refuses_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntrain:\n  rounds: 7\n")
    (tmp_path / "b.yaml").write_text(f"extends: {ROOT / 'configs' / 'mnist.yaml'}\ntrain:\n  lr: 0.002\n  rounds: 3\n")
    cfg = load_config(tmp_path / "a.yaml")
    shipped = load_config(ROOT / "configs" / "mnist.yaml")
    assert (cfg.train.rounds, cfg.train.lr) == (7, 0.002)                       # the nearer file wins, key by key
    assert cfg.feedback.preference == shipped.feedback.preference and cfg.train.ema_decay == shipped.train.ema_decay
    (tmp_path / "c.yaml").write_text("extends: d.yaml\n")
    (tmp_path / "d.yaml").write_text("extends: c.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "c.yaml")
    assert load_config(ROOT / "configs" / "mnist_users.yaml").users.population.endswith("users_mnist.yaml")


def test_preference_sets_lists_tuned_sets_first_and_refuses_an_unknown_dataset():
    from papa.config import preference_sets
    for ds in ("mnist", "fashion_mnist"):
        sets = preference_sets(ds)
        groups = [g for _, g in sets.values()]
        assert groups[0] == "tuned" and set(groups) == {"tuned", "held_out"}
        assert groups == sorted(groups, key=lambda g: g != "tuned")  # every tuned set before every held-out one
        assert all(p and all(0 <= c <= 9 for c in p) for p, _ in sets.values())
    with pytest.raises(ValueError, match="no dataset 'cifar10'"):
        preference_sets("cifar10")
