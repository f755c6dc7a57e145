import subprocess
import sys

import pytest

from papa.config import ConfigError, load_config
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
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "mnist.yaml", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_papa_only_settings_are_named_together_for_other_methods():
    """Switching train.algo away from papa with PAPA-only settings on fails in one line that gives the whole fix."""
    on = ["train.algo=d3po", "train.epapa_k=350", "train.replay=true", "train.replay_size=10",
          "train.liked_balance=0.6"]
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "mnist.yaml", on)
    msg = str(e.value)
    assert "\n" not in msg and "train.algo=d3po" in msg
    fix = msg.split(" add ", 1)[1].split()
    assert fix[1::2] == ["train.epapa_k=0", "train.replay=false", "train.replay_size=0", "train.liked_balance=0"]
    assert load_config(ROOT / "configs" / "mnist.yaml", on + fix[1::2]).train.algo == "d3po"  # the fix works


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
