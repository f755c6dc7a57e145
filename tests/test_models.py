import pytest
import torch

from papa import checkpoint
from papa.config import load_config
from papa.models import OracleCNN, UNet, build_unet, load_classifier, load_unet
from papa.models.unet import REFERENCE_KWARGS
from testutil import ROOT, reference_layout


def _layout(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def test_reference_unet_matches_reference_layout_key_for_key():
    m = UNet(**REFERENCE_KWARGS)
    ref = reference_layout("unet_state_dict.tsv")
    assert sorted(_layout(m)) == sorted(ref)
    assert sum(p.numel() for p in m.parameters()) == 10_188_081


def test_oracle_matches_reference_layout():
    assert _layout(OracleCNN()) == reference_layout("oracle_classifier_state_dict.tsv")


def test_reference_checkpoint_with_module_prefix_loads(tmp_path):
    cfg = load_config(ROOT / "configs" / "mnist_paper.yaml")
    src = build_unet(cfg.model)
    # a reference checkpoint: a bare state dict saved from a DDP wrapper
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddpm_ckpt.pth")
    dst = load_unet(cfg.model, tmp_path / "ddpm_ckpt.pth")
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(src.eval()(x, t), dst(x, t))
    torch.save({"module." + k: v for k, v in OracleCNN().state_dict().items()}, tmp_path / "mnist_classifier.pt")
    assert isinstance(load_classifier("oracle", tmp_path / "mnist_classifier.pt"), OracleCNN)


def test_fast_unet_shapes_and_timestep_forms():
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    m = build_unet(cfg.model).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a = m(x, torch.tensor([5, 5, 5]))
        b = m(x, torch.tensor(5))
    assert a.shape == x.shape and torch.allclose(a, b)


def test_checkpoint_round_trip_fp16(tmp_path):
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    m = build_unet(cfg.model)
    sd = {k: v.half() for k, v in m.state_dict().items()}
    checkpoint.atomic_save({"state_dict": sd, "kind": "unet"}, tmp_path / "m.pt")
    m2 = load_unet(cfg.model, tmp_path / "m.pt")
    for k, v in m2.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float())
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_corrupt_truncated_and_mismatched_checkpoints_are_refused(tmp_path):
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    checkpoint.atomic_save({"state_dict": build_unet(cfg.model).state_dict()}, tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        load_unet(cfg.model, tmp_path / "trunc.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        load_unet(cfg.model, tmp_path / "missing.pt")
    ref_cfg = load_config(ROOT / "configs" / "mnist_paper.yaml")
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        load_unet(ref_cfg.model, tmp_path / "ok.pt")
