"""papa's promises under bad input and faults (docs/RELIABILITY.md lists each with its test): one line on stderr and
exit 2 for bad input, exit 3 for non-finite training, nothing written or nothing lost, no hang under torchrun."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from papa import checkpoint
from papa.config import ConfigError, load_config
from papa.feedback import FileFeedback
from test_train import ROOT, args_for, cli, overrides, run_dir, tiny  # noqa: F401 - tiny is a fixture
from testutil import metrics

MNIST = str(ROOT / "configs" / "mnist.yaml")


def one_error_line(r, *needles):
    """stderr holds one line, 'error: …' (besides progress bars of work done before the error), naming the needles."""
    lines = [l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip() and "it/s" not in l and " update:" not in l]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- bad config values and overrides

@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.ema_decay=-.inf", "train.ema_decay"),
    ("papa.pref_loss_coef=-1", "papa.pref_loss_coef"), ("papa.model_loss_coef=-0.5", "papa.model_loss_coef"),
    ("model.num_heads=3", "model.num_heads"), ("train.sample_path=/tmp/elsewhere", "train.sample_path"),
    ("train.sample_path=../up", "train.sample_path"), ("task_name=a/b", "task_name"),
    ("train.rounds=[1", "train.rounds=[1"), ("task_name=@x", "task_name=@x"), ("train..rounds=1", "train..rounds"),
])
def test_bad_values_and_malformed_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(MNIST, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_unreadable_config_files_are_one_line(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / "empty.yaml").write_text("")
    for name, needle in (("binary.yaml", "not a text file"), ("empty.yaml", "is empty")):
        r = cli(["--config", str(tmp_path / name), "--set", f"train.output_dir={tmp_path / 'out'}"])
        assert r.returncode == 2
        one_error_line(r, needle)
    assert not (tmp_path / "out").exists()


def test_output_dir_under_a_file_fails_before_any_work(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli(args_for(overrides(tiny, tmp_path / "file" / "x")))
    assert r.returncode == 2
    one_error_line(r, "is a file, not a directory")


# ----------------------------------------------------------------------------- labels files

@pytest.mark.parametrize("content, needle", [
    ("[1, -1]", "must hold one JSON object"), ("7", "must hold one JSON object"), ("{", "not valid JSON"),
    ('{"r001_000": true, "r001_001": 1}', "must be 1, -1 or 0"), ('{"r001_000": 1.0, "r001_001": 1}', "must be 1"),
    ('{"r001_000": 1}', "no label for image 'r001_001'"),
])
def test_labels_file_shapes_are_refused_in_one_line(tmp_path, content, needle):
    f = tmp_path / "labels.json"
    f.write_text(content)
    with pytest.raises(ConfigError) as e:
        FileFeedback(f)(torch.zeros(2, 1, 28, 28), 1)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_labels_are_asked_after_the_images_are_saved(tiny, tmp_path):
    """The error names rounds/001/, and the images a person would label are there when it is raised."""
    labels = tmp_path / "labels.json"
    labels.write_text("{}")
    r = cli(args_for(overrides(tiny, tmp_path / "out", extra=["feedback.source=file", f"feedback.labels_file={labels}"])))
    assert r.returncode == 2
    one_error_line(r, "r001_000", "rounds/001/")
    shown = run_dir(tmp_path / "out") / "rounds" / "001"
    assert (shown / "grid.png").is_file() and torch.load(shown / "images.pt").shape[0] == 4


# ----------------------------------------------------------------------------- torchrun: no hang, one line, papa's code

def _two_rank_labels_run(tiny, tmp_path, launcher):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({f"r001_{i:03d}": 1 for i in range(4)}))  # round 2's ids are missing
    ovs = overrides(tiny, tmp_path / "out", extra=["feedback.source=file", f"feedback.labels_file={labels}"])
    t0 = time.time()
    r = subprocess.run([*launcher, *args_for(ovs)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r, time.time() - t0


def test_rank0_only_error_on_two_ranks_ends_in_seconds_with_papas_code(tiny, tmp_path):
    r, seconds = _two_rank_labels_run(tiny, tmp_path, [sys.executable, "-m", "papa.train", "--nproc-per-node", "2"])
    assert r.returncode == 2 and seconds < 60, (r.returncode, seconds)
    one_error_line(r, "no label for image 'r002_000'")


def test_rank0_only_error_under_torchrun_ends_in_seconds(tiny, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "papa.train"]
    r, seconds = _two_rank_labels_run(tiny, tmp_path, torchrun)
    assert r.returncode != 0 and seconds < 60, (r.returncode, seconds)
    assert r.stderr.count("error: labels file") == 1, r.stderr[-3000:]  # papa's line once, not once per rank
    assert "exitcode  : 2" in r.stderr  # torchrun exits 1 for any failure; the ranks' code is papa's


# ----------------------------------------------------------------------------- non-finite training

def test_non_finite_weights_are_never_checkpointed(tiny, tmp_path, monkeypatch, capsys):
    """Finite loss and gradients, but an optimiser step that leaves NaN weights (what train.lr=inf did): exit 3,
    and every checkpoint left is finite."""
    from papa.train import main
    real, calls = torch.optim.Adam.step, {"n": 0}

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] > 2:  # round 1 has two optimiser steps; round 2's first poisons the weights
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    assert main(args_for(overrides(tiny, tmp_path, rounds=3))) == 3
    assert "non-finite weights" in capsys.readouterr().err
    kept = checkpoint.round_files(run_dir(tmp_path) / "checkpoints")
    assert [n for n, _ in kept] == [1]
    st = checkpoint.load(kept[0][1])
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in st.get(part, {}).values())


# ----------------------------------------------------------------------------- checkpoints on resume

def test_every_checkpoint_unusable_refuses_to_resume_and_changes_nothing(tiny, tmp_path):
    assert cli(args_for(overrides(tiny, tmp_path, rounds=2))).returncode == 0
    rd = run_dir(tmp_path)
    for _, p in checkpoint.round_files(rd / "checkpoints"):
        p.write_bytes(b"junk")
    before = {k: v for k, v in snapshot(rd).items() if k not in ("log.txt", ".lock")}
    r = cli(["--resume", str(rd)])
    assert r.returncode == 2
    one_error_line(r, "no usable checkpoint", "round_002.pt", "round_001.pt")
    assert {k: v for k, v in snapshot(rd).items() if k not in ("log.txt", ".lock")} == before


def test_records_without_checkpoints_refuse_to_resume(tiny, tmp_path):
    assert cli(args_for(overrides(tiny, tmp_path, rounds=2))).returncode == 0
    rd = run_dir(tmp_path)
    for _, p in checkpoint.round_files(rd / "checkpoints"):
        p.unlink()
    r = cli(["--resume", str(rd)])
    assert r.returncode == 2
    one_error_line(r, "metrics.jsonl records 2 round(s)")
    assert len(metrics(rd)) == 3


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """One finished 2-round run that the damage cases share: each damages its newest checkpoint, and the resume that
    falls back to round 1 rewrites round 2, which leaves the run finished again for the next case."""
    out = tmp_path_factory.mktemp("finished")
    assert cli(args_for(overrides(tiny, out, rounds=2))).returncode == 0
    return run_dir(out)


@pytest.mark.parametrize("damage", ["list", "no_history", "optimiser_groups", "nan_weights", "wrong_round"])
def test_wrong_structure_newest_checkpoint_falls_back(finished_run, damage):
    rd = finished_run
    (rd / "log.txt").write_text("")
    before = metrics(rd)
    newest = rd / "checkpoints" / "round_002.pt"
    st = checkpoint.load(newest)
    if damage == "list":
        st = [1, 2, 3]
    elif damage == "no_history":
        del st["history"]
    elif damage == "optimiser_groups":
        st["opt"]["param_groups"].append(dict(st["opt"]["param_groups"][0]))
    elif damage == "nan_weights":
        next(iter(st["model"].values())).fill_(float("nan"))
    else:
        st["round"] = 7
    torch.save(st, newest)
    r = cli(["--resume", str(rd)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "round_002.pt is unusable" in (rd / "log.txt").read_text()
    assert [m["round"] for m in metrics(rd)] == [m["round"] for m in before]


def test_round_files_sort_by_number_and_pruning_keeps_the_newest_two(tmp_path):
    for n in (2, 999, 1000, 10):
        (tmp_path / f"round_{n:03d}.pt").write_bytes(b"")
    (tmp_path / "round_x.pt").write_bytes(b"")
    assert [n for n, _ in checkpoint.round_files(tmp_path)] == [2, 10, 999, 1000]
    checkpoint.prune_rounds(tmp_path, 1000)
    assert [n for n, _ in checkpoint.round_files(tmp_path)] == [999, 1000] and (tmp_path / "round_x.pt").exists()


def test_hand_edited_config_is_refused_on_resume_unless_forced(tiny, tmp_path):
    assert cli(args_for(overrides(tiny, tmp_path, rounds=1))).returncode == 0
    rd = run_dir(tmp_path)
    text = (rd / "config.yaml").read_text()
    (rd / "config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.1"))
    r = cli(["--resume", str(rd), "--set", "train.rounds=2"])  # rounds is checked by --resume's own diff: not here
    r = cli(["--resume", str(rd)])
    assert r.returncode == 2
    one_error_line(r, "another config")
    assert cli(["--resume", str(rd), "--force"]).returncode == 0


def test_checkpoint_of_another_dataset_is_refused(tiny, tmp_path):
    from papa.models import load_unet
    cfg = load_config(MNIST, overrides(tiny, tmp_path))
    sd = checkpoint.load(tiny / "base.pt")
    checkpoint.atomic_save({**sd, "dataset": "fashion_mnist"}, tmp_path / "fashion_base.pt")
    with pytest.raises(checkpoint.CheckpointError, match="trained on fashion_mnist"):
        load_unet(cfg.model, tmp_path / "fashion_base.pt", dataset="mnist")
    load_unet(cfg.model, tmp_path / "fashion_base.pt")  # asked no question: loads
    r = cli(args_for(overrides(tiny, tmp_path / "out") + [f"checkpoints.base={tmp_path / 'fashion_base.pt'}"]))
    assert r.returncode == 2
    one_error_line(r, "trained on fashion_mnist")


def test_pickled_objects_and_mismatched_architectures_get_short_clear_errors(tiny, tmp_path):
    from papa.models import load_unet
    import pickle
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Path("/"), protocol=2))
    torch.save({"x": Path("/")}, tmp_path / "obj.pt")
    (tmp_path / "cut.pt").write_bytes((tiny / "base.pt").read_bytes()[:999])
    for name, needle in (("evil.pt", "refuses to unpickle"), ("obj.pt", "refuses to unpickle"),
                         ("cut.pt", "corrupt or truncated")):
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_unet(load_config(MNIST).model, tiny / "base.pt")  # the tiny UNet under the full-size config
    assert "does not match the configured architecture" in str(e.value) and len(str(e.value)) < 400


# ----------------------------------------------------------------------------- the run directory

def test_a_second_trainer_on_a_locked_run_directory_stops_at_once(tiny, tmp_path):
    rd = run_dir(tmp_path)
    lock = checkpoint.RunLock(rd).acquire()  # another papa process holds it
    try:
        r = cli(args_for(overrides(tiny, tmp_path)))
    finally:
        lock.release()
    assert r.returncode == 2
    one_error_line(r, "in use by another papa process", str(os.getpid()))
    assert sorted(p.name for p in rd.iterdir()) == [".lock"]


def test_overwrite_only_after_validation_and_never_with_resume(tiny, tmp_path):
    assert cli(args_for(overrides(tiny, tmp_path, rounds=3))).returncode == 0
    rd = run_dir(tmp_path)
    before = snapshot(rd)
    r = cli(args_for(overrides(tiny, tmp_path, rounds=1, extra=["train.lr=inf"]), "--overwrite"))
    assert r.returncode == 2 and snapshot(rd) == before  # refused config: the old run is intact
    r = cli(["--resume", str(rd), "--overwrite"])
    assert r.returncode == 2 and "not allowed with" in r.stderr and snapshot(rd) == before
    (rd / "checkpoints" / ".round_009.pt.abc.tmp").write_bytes(b"half")  # what a killed writer leaves
    assert cli(args_for(overrides(tiny, tmp_path, rounds=1), "--overwrite")).returncode == 0
    assert sorted(p.name for p in (rd / "rounds").iterdir()) == ["000", "001"]  # no stale rounds 002, 003
    assert [m["round"] for m in metrics(rd)] == [0, 1]
    assert not list((rd / "checkpoints").glob(checkpoint.TEMP_GLOB))


def test_forged_or_truncated_base_evaluation_cache_is_not_trusted(tiny, tmp_path):
    assert cli(args_for(overrides(tiny, tmp_path, rounds=1))).returncode == 0
    (cache,) = (tmp_path / "mnist" / ".base_eval").glob("*.json")
    true_rate = metrics(run_dir(tmp_path))[0]["preferred_rate"]
    rec = json.loads(cache.read_text())
    rec["metrics"]["preferred_rate"] = 0.99
    for forged in (json.dumps(rec), cache.read_text()[:20]):
        cache.write_text(forged)
        r = cli(args_for(overrides(tiny, tmp_path, rounds=1), "--overwrite"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert metrics(run_dir(tmp_path))[0]["preferred_rate"] == true_rate
        assert "not a valid base-model evaluation" in (run_dir(tmp_path) / "log.txt").read_text()


def test_sampling_a_checkpoint_of_the_other_dataset_is_refused(tmp_path):
    """The shipped Fashion-MNIST base says so in its sidecar: under the MNIST config it is refused before sampling."""
    r = subprocess.run([sys.executable, "-m", "papa.sample", "--config", MNIST, "--num", "2", "--out", str(tmp_path / "s"),
                        "--checkpoint", str(ROOT / "checkpoints" / "fashion_mnist" / "base_ddpm.pt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r, "trained on fashion_mnist")
    assert not (tmp_path / "s").exists()


def test_shipped_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(MNIST)
    for key in ("base", "oracle", "evaluator"):
        assert Path(getattr(cfg.checkpoints, key)).is_file(), key
    monkeypatch.chdir(ROOT)  # from the checkout the config keeps its paths as written (and its hash)
    assert load_config(MNIST).checkpoints.base == "checkpoints/mnist/base_ddpm.pt"


def test_non_finite_training_on_two_ranks_exits_3_once(tiny, tmp_path):
    """A learning rate that blows the weights up: every rank sees the same all-reduced loss and weights, so all stop
    with exit 3 and rank 0 says so once; no checkpoint with non-finite weights is left."""
    ovs = overrides(tiny, tmp_path, rounds=3, extra=["train.lr=1e30"])
    r = subprocess.run([sys.executable, "-m", "papa.train", "--nproc-per-node", "2", *args_for(ovs)], capture_output=True,
                       text=True, cwd=ROOT, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 3, r.stderr[-2000:]
    one_error_line(r, "non-finite", "last good checkpoint")
    for _, p in checkpoint.round_files(run_dir(tmp_path) / "checkpoints"):
        checkpoint.check_round(checkpoint.load(p), p)  # raises on non-finite weights
