"""The entry points that make the shipped models (`papa.pretrain`, `papa.oracle`) on a slice of the data: fp16 weights
that load, and a JSON sidecar naming the file's sha256, the command and the training steps."""
import json

import numpy as np
import pytest

from papa import checkpoint
from papa.models import load_classifier, load_unet
from testutil import ROOT

TINY = ["model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]", "model.time_emb_dim=16"]


@pytest.fixture
def small_data(monkeypatch):
    def fake(name, split, root=None, verbose=False):
        g = np.random.default_rng(0 if split == "train" else 1)
        return g.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64, dtype=np.uint8) % 10
    import papa.oracle
    import papa.pretrain
    monkeypatch.setattr(papa.pretrain, "load_dataset", fake)
    monkeypatch.setattr(papa.oracle, "load_dataset", fake)


def _args(*sets):
    out = ["--config", str(ROOT / "configs" / "mnist.yaml")]
    for s in sets:
        out += ["--set", s]
    return out


def test_pretrain_writes_fp16_base_with_sidecar(tmp_path, small_data):
    from papa.config import load_config
    from papa.pretrain import main
    base = tmp_path / "base.pt"
    sets = TINY + ["pretrain.steps=4", "pretrain.batch_size=8", "pretrain.checkpoint_every=2",
                   "pretrain.warmup_steps=1", f"checkpoints.base={base}"]
    assert main(_args(*sets) + ["--out", str(tmp_path / "pre"), "--threads", "1"]) == 0
    side = json.loads(base.with_suffix(".json").read_text())
    assert side["sha256"] == checkpoint.sha256_file(base) and side["kind"] == "base_ddpm"
    assert side["training_steps"] == 4 and side["command"].startswith("python -m papa.pretrain --config")
    assert all(v.dtype.is_floating_point is False or str(v.dtype) == "torch.float16"
               for v in checkpoint.load(base)["state_dict"].values())
    load_unet(load_config(ROOT / "configs" / "mnist.yaml", TINY).model, base)  # loads into the configured UNet


def test_oracle_writes_both_classifiers_with_sidecars(tmp_path, small_data):
    from papa.oracle import main
    o, e = tmp_path / "oracle.pt", tmp_path / "evaluator.pt"
    sets = [f"checkpoints.oracle={o}", f"checkpoints.evaluator={e}", "oracle.epochs=1", "evaluator.epochs=1"]
    assert main(_args(*sets) + ["--threads", "1"]) == 0
    for kind, path in (("oracle", o), ("evaluator", e)):
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["sha256"] == checkpoint.sha256_file(path) and side["kind"] == kind
        assert 0.0 <= side["test_accuracy"] <= 1.0 and side["training_steps"] == 1  # 64 images, batch 64
        load_classifier(kind, path)
