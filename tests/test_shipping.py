"""The entry points that make the shipped models (`papa.pretrain`, `papa.oracle`) on a slice of the data: fp16 weights
that load, and a JSON sidecar naming the file's sha256, the command and the training steps."""
import json

import numpy as np
import pytest

from papa.models.classifier import has_reject
from papa.negatives import KIND_NAMES

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


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
def test_pretrain_refuses_an_unusable_device_before_any_work(tmp_path, device):
    import torch

    from papa.config import ConfigError
    from papa.pretrain import main
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ConfigError, match="--device"):
        main(_args(*TINY) + ["--out", str(tmp_path / "pre"), "--device", device])
    assert not (tmp_path / "pre").exists()


def test_pretrain_resume_checks_the_state_before_writing(tmp_path, small_data):
    """--resume continues a run made with the same config; --force across a model change (weights of another shape)
    is a CheckpointError naming state.pt, raised before config.yaml or log.txt is touched."""
    from papa.checkpoint import CheckpointError
    from papa.pretrain import main
    base, out = tmp_path / "base.pt", tmp_path / "pre"
    sets = TINY + ["pretrain.steps=4", "pretrain.batch_size=8", "pretrain.checkpoint_every=2",
                   "pretrain.warmup_steps=1", f"checkpoints.base={base}"]
    assert main(_args(*sets) + ["--out", str(out), "--threads", "1", "--stop-at", "2"]) == 0
    assert checkpoint.load(out / "state.pt")["step"] == 2
    assert main(_args(*sets) + ["--out", str(out), "--threads", "1", "--resume"]) == 0
    assert checkpoint.load(out / "state.pt")["step"] == 4
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wider = [s for s in sets if not s.startswith("model.down_channels")] + ["model.down_channels=[16,16,16,16]"]
    with pytest.raises(CheckpointError, match="state.pt does not fit this config's model"):
        main(_args(*wider) + ["--out", str(out), "--threads", "1", "--resume", "--force"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_oracle_writes_both_classifiers_with_sidecars(tmp_path, small_data):
    from papa.oracle import main
    o, e = tmp_path / "oracle.pt", tmp_path / "evaluator.pt"
    sets = [f"checkpoints.oracle={o}", f"checkpoints.evaluator={e}", "oracle.epochs=1", "evaluator.epochs=1"]
    assert main(_args(*sets) + ["--threads", "1"]) == 0
    for kind, path in (("oracle", o), ("evaluator", e)):
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["sha256"] == checkpoint.sha256_file(path) and side["kind"] == kind
        assert 0.0 <= side["test_accuracy"] <= 1.0 and side["training_steps"] == 1  # 64 images, batch 64
        # the shipped configs train the reject option: 12 of the 64 images held out to calibrate it, a report
        assert side["reject_calibration"]["held_out_train_images"] == 12 and side["reject_calibration"]["bias_shift"] <= 0
        assert set(side["reject_report"]["rejected_negatives"]) == set(KIND_NAMES)
        assert has_reject(load_classifier(kind, path))


def test_gpu_paper_script_pretrains_then_aligns_and_resumes(tmp_path):
    """scripts/gpu_paper_run.sh (the paper config on a GPU, in calls of <= 10 minutes) on the CPU with a tiny
    model: pretrains, runs the paper config to its summary, copies the records to $OUT; a second call finds both
    phases done and retrains nothing."""
    import os
    import subprocess
    tiny = ["model.arch=fast", "model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]",
            "model.time_emb_dim=16", "model.down_attention=[false,false,true]", "model.down_sample=[true,true,false]",
            "diffusion.sample_steps=4", "eval.num=8", "eval.final_num=8", "eval.batch_size=8", "eval.real_max=200",
            "train.rounds=2", "train.samples_per_round=2", "train.timestep_chunk=500", "pretrain.batch_size=8",
            "papa.timesteps_per_sample=40"]   # the script's mechanics, not the every-timestep update (half its time)
    from papa.data import export_idx
    export_idx("mnist", tmp_path / "data")  # data.root must hold the verified IDX files: it never falls back silently
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": os.sys.executable, "RUNS_DIR": str(tmp_path / "runs"),
           "DATA_ROOT": str(tmp_path / "data"), "PRETRAIN_STEPS": "3", "OMP_NUM_THREADS": "1",
           "EXTRA_SETS": " ".join(f"--set {s}" for s in tiny)}
    run = lambda: subprocess.run(["bash", str(ROOT / "scripts" / "gpu_paper_run.sh")], env=env, capture_output=True,
                                 text=True, timeout=600)
    r = run()
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    side = json.loads((out / "base_ddpm_reference.json").read_text())
    assert side["training_steps"] == 3 and side["device"] == "cpu"
    rows = [json.loads(line) for line in (out / "run_metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2] and rows[-1]["labels_used"] == 4
    assert (out / "run_summary.md").is_file() and (out / "run_curves.png").stat().st_size > 1000
    r = run()
    phases = [line.split(" ", 1)[1].split(":")[0] for line in (out / "timings.txt").read_text().splitlines()
              if line.endswith("exit 0")]
    assert r.returncode == 0 and "DONE" in r.stdout and phases == ["pretrain", "train"], phases
