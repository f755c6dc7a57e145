"""The online trainer end to end on tiny models: records, resume after SIGKILL, corrupt checkpoints, bad configs,
NaN losses, and two ranks against one. Tiny UNets and few steps keep each run to seconds."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from papa import checkpoint
from papa.config import load_config
from papa.models import EvaluatorCNN, OracleCNN, build_unet
from testutil import ROOT, assert_same_metrics, metrics

TINY_MODEL = ["model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]", "model.time_emb_dim=16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = load_config(ROOT / "configs" / "mnist.yaml", TINY_MODEL)
    torch.manual_seed(0)
    checkpoint.atomic_save({"state_dict": build_unet(cfg.model).state_dict()}, d / "base.pt")
    # an 11-output oracle whose class rows are the 10-class random one's (the reject row zero): under the argmax-only
    # user it answers as the 10-class oracle did
    sd = OracleCNN().state_dict()
    sd["fc2.weight"], sd["fc2.bias"] = torch.cat([sd["fc2.weight"], torch.zeros(1, 128)]), torch.cat([sd["fc2.bias"], torch.zeros(1)])
    checkpoint.atomic_save({"state_dict": sd}, d / "oracle.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, d / "evaluator.pt")
    return d


def overrides(tiny, out, rounds=3, extra=()):
    return TINY_MODEL + [
        f"checkpoints.base={tiny / 'base.pt'}", f"checkpoints.oracle={tiny / 'oracle.pt'}",
        f"checkpoints.evaluator={tiny / 'evaluator.pt'}", f"train.output_dir={out}", f"train.rounds={rounds}",
        "train.samples_per_round=4", "train.batch_size=2", "papa.timesteps_per_sample=6", "train.timestep_chunk=5",
        "train.lr=0.001", "diffusion.sample_steps=4", "eval.num=6", "eval.final_num=8", "eval.every=2",
        "eval.real_max=200",  # 200 real test images for the FID and fidelity statistics (all: seconds per run)
        "feedback.preference=[0,1,2,3,4]", "train.sample_path=run",
        # the engine's mechanics under the argmax-only user: a random tiny oracle is unsure of everything (the
        # realistic user would skip it all) and its reject class takes an unknown share of the likes
        "feedback.reject=false", "feedback.skip_below=0", "feedback.flip_prob=0", *extra]


def args_for(ovs, *more):
    out = ["--config", str(ROOT / "configs" / "mnist.yaml")]
    for o in ovs:
        out += ["--set", o]
    return out + list(more)


def cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "papa.train", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def run_dir(out):
    return Path(out) / "mnist" / "run"


def test_run_writes_the_whole_story(tiny, tmp_path):
    from papa.train import main
    assert main(args_for(overrides(tiny, tmp_path))) == 0
    rd = run_dir(tmp_path)
    for f in ("config.yaml", "log.txt", "metrics.jsonl", "metrics.csv", "summary.md", "curves.png",
              "rounds/001/grid.png", "rounds/001/labels.json", "rounds/000/eval_grid.png"):
        assert (rd / f).is_file(), f
    rows = metrics(rd)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["eval_num"] == 8 and rows[2]["eval_num"] == 6 and rows[3]["eval_num"] == 8
    assert rows[3]["labels_used"] == 12 and "preferred_rate" in rows[3] and "fid_preferred" in rows[3]
    assert {"precision", "recall", "density", "coverage", "ink_drift", "stroke_drift"} <= rows[3].keys()
    labels = json.loads((rd / "rounds/002/labels.json").read_text())
    assert sorted(labels) == [f"r002_{i:03d}" for i in range(4)] and set(labels.values()) <= {1, -1}
    assert len(list((rd / "checkpoints").glob("round_*.pt"))) == 2  # latest and last good


def test_resume_after_sigkill_matches_uninterrupted(tiny, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    assert cli(args_for(overrides(tiny, ref_out, rounds=4))).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "papa.train", *args_for(overrides(tiny, out, rounds=4))], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the kill lands inside round 3, between two events the run writes: round 2's checkpoint, then round 3's
    # labels (written atomically after its feedback, before its update and its checkpoint)
    marks = (run_dir(out) / "checkpoints" / "round_002.pt", run_dir(out) / "rounds" / "003" / "labels.json")
    deadline = time.monotonic() + 300
    try:
        while not all(m.exists() for m in marks):
            assert p.poll() is None, f"the run exited ({p.returncode}) before round 3's labels were written"
            assert time.monotonic() < deadline, "no round 3 labels within 300 s"
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (run_dir(out) / "checkpoints" / "round_004.pt").exists(), "the run finished before it was killed"
    r = cli(["--resume", str(run_dir(out))])
    assert r.returncode == 0, r.stderr
    assert_same_metrics(metrics(run_dir(ref_out)), metrics(run_dir(out)))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tiny, tmp_path):
    ovs = overrides(tiny, tmp_path, rounds=3)
    assert cli(args_for(ovs)).returncode == 0
    rd = run_dir(tmp_path)
    before = metrics(rd)
    newest = rd / "checkpoints" / "round_003.pt"
    raw = newest.read_bytes()
    newest.write_bytes(raw[: len(raw) // 3])  # truncated
    r = cli(["--resume", str(rd)])
    assert r.returncode == 0, r.stderr
    assert "round_003.pt is unusable" in (rd / "log.txt").read_text()
    assert_same_metrics(before, metrics(rd))  # round 3 was redone from round 2 and gave the same numbers


@pytest.mark.parametrize("bad, key", [
    ("train.nope=1", "train.nope"),
    ("train.rounds=many", "train.rounds"),
    ("feedback.preference=[1,12]", "feedback.preference"),
    ("checkpoints.base=/nonexistent/base.pt", "checkpoints.base"),
    ("papa.epapa_k=1000", "papa.epapa_k"),
    (("papa.replay=false", "papa.replay_size=4"), "papa.replay_size"),  # a replay size would be silently ignored
])
def test_bad_config_fails_before_any_work(tiny, tmp_path, bad, key):
    r = cli(args_for(overrides(tiny, tmp_path, extra=bad if isinstance(bad, tuple) else [bad])))
    assert r.returncode == 2
    assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(tmp_path.iterdir()), "something was written"


def test_resume_with_changed_config_is_refused_naming_keys(tiny, tmp_path):
    assert cli(args_for(overrides(tiny, tmp_path, rounds=1))).returncode == 0
    r = cli(args_for(overrides(tiny, tmp_path, rounds=2, extra=["train.lr=0.5"]), "--resume", str(run_dir(tmp_path))))
    assert r.returncode == 2 and "train.lr" in r.stderr and "train.rounds" in r.stderr


def test_nan_loss_stops_the_round_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    from papa.algos import papa as algo
    from papa.train import main
    real = algo.chunk_loss
    calls = {"n": 0}

    def poisoned(model, base, x0, items, sched):
        loss = real(model, base, x0, items, sched)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(algo, "chunk_loss", poisoned)
    assert main(args_for(overrides(tiny, tmp_path, rounds=3))) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "last good checkpoint" in err
    kept = sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").glob("round_*.pt"))
    assert kept and all(torch.isfinite(v).all() for v in
                        checkpoint.load(run_dir(tmp_path) / "checkpoints" / kept[-1])["model"].values())


def test_two_ranks_give_the_metrics_of_one(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(args_for(overrides(tiny, one, rounds=2))).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "papa.train", *args_for(overrides(tiny, two, rounds=2))], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    # gradients are summed in another order and convolutions see other batch sizes: equal up to float rounding
    assert_same_metrics(metrics(run_dir(one)), metrics(run_dir(two)), tol=1e-3)


def test_lr_decay_sets_each_rounds_learning_rate(tiny, tmp_path):
    from papa.engine import round_lr
    from papa.train import main
    assert [round_lr(1.0, "linear", r, 4) for r in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [round(round_lr(1.0, "cosine", r, 4), 6) for r in range(4)] == [1.0, 0.853553, 0.5, 0.146447]
    assert round_lr(3e-4, "none", 3, 4) == 3e-4
    assert main(args_for(overrides(tiny, tmp_path, rounds=3, extra=["train.lr_decay=linear"]))) == 0
    last = checkpoint.load(run_dir(tmp_path) / "checkpoints" / "round_003.pt")
    assert last["opt"]["param_groups"][0]["lr"] == pytest.approx(0.001 / 3)


def test_ema_is_evaluated_saved_and_resumed(tiny, tmp_path):
    """train.ema_decay: evaluations judge the EMA (so they differ from the plain run's while the feedback rounds,
    sampled from the live policy, stay the same), the checkpoint holds it, and a resumed run continues it exactly."""
    from papa.train import main
    plain, ema, cut = tmp_path / "plain", tmp_path / "ema", tmp_path / "cut"
    assert main(args_for(overrides(tiny, plain, rounds=2, extra=["train.ema_decay=0"]))) == 0  # the MNIST default has one
    assert main(args_for(overrides(tiny, ema, rounds=2, extra=["train.ema_decay=0.5"]))) == 0
    a, b = metrics(run_dir(plain)), metrics(run_dir(ema))
    assert a[1]["round_positive"] == b[1]["round_positive"] and a[1]["loss"] == b[1]["loss"]
    assert a[2]["fid_preferred"] != b[2]["fid_preferred"] or a[2]["kl_to_base"] != b[2]["kl_to_base"]
    assert "ema" not in checkpoint.load(run_dir(plain) / "checkpoints" / "round_002.pt")
    ck = checkpoint.load(run_dir(ema) / "checkpoints" / "round_002.pt")
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])
    # interrupted after round 1 (the newest checkpoint removed), then resumed: the same metrics as the whole run
    assert main(args_for(overrides(tiny, cut, rounds=2, extra=["train.ema_decay=0.5"]))) == 0
    (run_dir(cut) / "checkpoints" / "round_002.pt").unlink()
    assert main(["--resume", str(run_dir(cut))]) == 0
    assert_same_metrics(b, metrics(run_dir(cut)))


def test_replay_trains_on_earlier_feedback_and_resumes(tiny, tmp_path):
    """papa.replay: round r trains on its own units plus all earlier ones, or (replay_size N) N of the earlier ones
    drawn without replacement, the same draw in a resumed run."""
    from types import SimpleNamespace

    from papa.algos.papa import PAPA, PAPASettings
    from papa.train import main
    history = [{"x": torch.full((4, 1), float(r)), "y": torch.arange(4) + 10 * r} for r in range(3)]
    m = PAPA.__new__(PAPA)
    m.t, m.s = SimpleNamespace(seed=0), PAPASettings(replay=True, replay_size=5)
    got = m.training_set(history[-1], history, 2)
    assert torch.equal(got["y"][:4], history[-1]["y"]) and len(got["y"]) == 9
    drawn = got["y"][4:].tolist()
    assert len(set(drawn)) == 5 and all(v < 20 for v in drawn)            # distinct units of rounds 1-2 (0-based 0-1)
    assert torch.equal(got["x"][4:, 0], torch.tensor([v // 10 for v in drawn], dtype=torch.float))  # x, y paired
    assert torch.equal(m.training_set(history[-1], history, 2)["y"], got["y"])  # seeded by (seed, round)
    m.s.replay_order = "first"  # the same draw, trained on before round r's answers; then round r's units alone
    assert torch.equal(m.replayed(history[:-1], 2)["y"], got["y"][4:]) and m.replayed([], 0) is None
    assert m.training_set(history[-1], history, 2) is history[-1]
    m.s.replay_order, m.s.replay_size = "mixed", 0
    assert len(m.training_set(history[-1], history, 2)["y"]) == 12              # 0: everything so far
    m.s.replay = False
    assert m.training_set(history[-1], history, 2) is history[-1]

    full = tmp_path / "full"
    assert main(args_for(overrides(tiny, full, rounds=3, extra=["papa.replay=true", "papa.replay_size=0"]))) == 0
    assert [r["optimizer_steps"] for r in metrics(run_dir(full))[1:]] == [2, 4, 6]   # 4, 8, 12 units, batch 2
    whole = {}
    for order in ("mixed", "first"):  # each run cut after round 2 and resumed: the same metrics as the whole run
        out = tmp_path / order
        assert main(args_for(overrides(tiny, out, rounds=3, extra=["papa.replay=true", "papa.replay_size=3",
                                                                   f"papa.replay_order={order}"]))) == 0
        whole[order] = metrics(run_dir(out))
        assert [r["optimizer_steps"] for r in whole[order][1:]] == [2, 4, 4]    # 4, 4 + 3, 4 + 3
        (run_dir(out) / "checkpoints" / "round_003.pt").unlink()
        assert main(["--resume", str(run_dir(out))]) == 0
        assert_same_metrics(whole[order], metrics(run_dir(out)))
    assert whole["first"][2]["loss"] != whole["mixed"][2]["loss"]  # the same units, in another order


@pytest.mark.parametrize("weighting", [
    ["papa.liked_balance=0.4", "papa.balance_space=features", "papa.balance_power=2"],
    ["papa.liked_balance=0", "papa.base_ratio=2", "papa.base_ratio_num=6"],      # no pool: the rounds' own samples
    ["papa.liked_balance=0", "papa.base_ratio=1", "papa.base_ratio_estimate=elbo", "papa.base_ratio_steps=3"],
])
def test_liked_balance_keeps_the_feedback_and_resumes(tiny, tmp_path, weighting):
    """papa.liked_balance weighs liked samples by all liked images so far, papa.base_ratio by the base's density over
    the policy's: the run keeps every round's feedback in its checkpoint (without replay too), its losses differ from
    the plain run's, and a resumed run matches; here on the base UNet's features (the weights themselves:
    test_papa_loss)."""
    from papa.train import main
    plain, bal, cut = tmp_path / "plain", tmp_path / "bal", tmp_path / "cut"
    ovs = [*weighting, "train.samples_per_round=8", "train.batch_size=8"]
    assert main(args_for(overrides(tiny, plain, rounds=3, extra=["papa.liked_balance=0", *ovs[len(weighting):]]))) == 0
    assert main(args_for(overrides(tiny, bal, rounds=3, extra=ovs))) == 0
    a, b = metrics(run_dir(plain)), metrics(run_dir(bal))
    assert [r["round_positive"] for r in a[1:2]] == [r["round_positive"] for r in b[1:2]]  # same first samples
    assert b[1]["round_positive"] >= 3 and a[1]["loss"] != b[1]["loss"]
    ck = checkpoint.load(run_dir(bal) / "checkpoints" / "round_003.pt")
    assert [len(h["x"]) for h in ck["history"]] == [8, 8, 8]
    assert main(args_for(overrides(tiny, cut, rounds=3, extra=ovs))) == 0
    (run_dir(cut) / "checkpoints" / "round_003.pt").unlink()
    assert main(["--resume", str(run_dir(cut))]) == 0
    assert_same_metrics(b, metrics(run_dir(cut)))


def pair_labels_file(path, rounds, pairs):
    """A labels file of pairwise choices, as a person would write it: alternate first / second preferred."""
    labels = {f"r{r:03d}_p{p:03d}": (1 if (r + p) % 2 else -1) for r in range(1, rounds + 1) for p in range(pairs)}
    path.write_text(json.dumps(labels))
    return path


@pytest.mark.parametrize("algo", ["d3po", "diffusion_dpo", "ddpo", "sdpo"])
def test_every_method_runs_end_to_end(tiny, tmp_path, algo):
    from papa.train import main
    extra = [f"train.algo={algo}", "train.traj_steps=4", "train.timestep_chunk=7"]
    if algo in ("d3po", "diffusion_dpo"):  # choices from a labels file (the random oracle calls every pair a tie)
        extra += ["feedback.source=file", f"feedback.labels_file={pair_labels_file(tmp_path / 'pairs.json', 2, 4)}"]
    assert main(args_for(overrides(tiny, tmp_path / "out", rounds=2, extra=extra))) == 0
    rd = run_dir(tmp_path / "out")
    rows = metrics(rd)
    per_round = 4 * (6 if algo == "sdpo" else 1)
    assert [r["labels_used"] for r in rows] == [0, per_round, 2 * per_round]
    assert all(r["optimizer_steps"] == 2 for r in rows[1:])  # 4 units, batch 2
    assert rows[-1]["kl_to_base"] > 0 and rows[0]["kl_to_base"] == 0  # the policy moved away from the base
    diag = {"d3po": "implicit_accuracy", "diffusion_dpo": "implicit_accuracy", "ddpo": "clip_fraction",
            "sdpo": "clip_fraction"}[algo]
    assert all(0 <= r[diag] <= 1 for r in rows[1:])
    labels = json.loads((rd / "rounds/001/labels.json").read_text())
    assert len(labels) == 4 and (rd / "summary.md").is_file()
    if algo in ("d3po", "sdpo"):
        assert torch.load(rd / "rounds/001/images.pt").shape == (8, 1, 28, 28)


def test_d3po_on_two_ranks_matches_one(tiny, tmp_path):
    extra = ["train.algo=d3po", "train.traj_steps=4", "train.timestep_chunk=3",
             "feedback.source=file", f"feedback.labels_file={pair_labels_file(tmp_path / 'pairs.json', 2, 4)}"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(args_for(overrides(tiny, one, rounds=2, extra=extra))).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "papa.train", *args_for(overrides(tiny, two, rounds=2, extra=extra))],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_metrics(metrics(run_dir(one)), metrics(run_dir(two)), tol=1e-3)


def test_reward_methods_refuse_a_labels_file(tiny, tmp_path):
    f = pair_labels_file(tmp_path / "pairs.json", 1, 1)
    r = cli(args_for(overrides(tiny, tmp_path, extra=["train.algo=ddpo", "feedback.source=file",
                                                      f"feedback.labels_file={f}"])))
    assert r.returncode == 2 and "feedback.source" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mnist").exists()


def test_bounds_met():
    from papa.evaluation import bounds_met, within
    assert bounds_met({"legible_preferred_rate": 0.95, "min_liked_share": 0.2, "precision": 0.7, "fid_preferred": 9.0,
                       "rejected_rate": 0.05}, {"precision": 0.75, "fid_preferred": 6.0, "rejected_rate": 0.032}, 4,
                      0.9) == {"rate": True, "liked": True, "rejected": False, "precision": True, "fid": True}
    # a metric missing from either row does not apply (None); the argmax rate stands in for the legible one
    assert bounds_met({"preferred_rate": 0.5, "min_liked_share": 0.1, "fid_preferred": 9.1}, {"fid_preferred": 6.0},
                      4, 0.9) == {"rate": False, "liked": False, "rejected": None, "precision": None, "fid": False}
    # a collapsed model (too few preferred samples: FID, precision and the liked share NaN) fails those bounds
    nan = float("nan")
    met = bounds_met({"legible_preferred_rate": 0.02, "min_liked_share": nan, "precision": nan, "fid_preferred": nan,
                      "rejected_rate": 0.01}, {"precision": 0.75, "fid_preferred": 6.0, "rejected_rate": 0.03}, 4, 0.9)
    assert met == {"rate": False, "liked": False, "rejected": True, "precision": False, "fid": False}
    assert not within(met, ("rejected", "precision", "fid"))
    # a base value that is not finite cannot bound anything
    assert bounds_met({"fid_preferred": 9.0}, {"fid_preferred": nan}, 4, 0.9)["fid"] is None


def test_calibration_reads_the_asked_images_and_bins_them_by_hand(tmp_path):
    """scripts/preference_sets.py calibration: each asked image's p(like) paired with the answer in round order,
    skips left out, rounds without a model skipped; the bins, ECE, accuracy and Brier by hand."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("preference_sets", ROOT / "scripts" / "preference_sets.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    run = tmp_path / "set_s0"
    for r, p, y in (("001", None, [1, -1]), ("002", [0.95, 0.05, 0.6], [1, 1, 0]), ("003", [0.92, 0.2], [-1, -1])):
        (run / "rounds" / r).mkdir(parents=True)
        (run / "rounds" / r / "pool.json").write_text(json.dumps({"p_like": p} if p else {}))
        (run / "rounds" / r / "labels.json").write_text(json.dumps({f"r{r}_{i:03d}": v for i, v in enumerate(y)}))
    pairs = ps.asked_answers(run)
    assert pairs == [(0.95, 1), (0.05, 1), (0.92, 0), (0.2, 0)]      # the skip (0) and the model-less round left out
    c = ps.calibration_rows(pairs)
    by = {b["lo"]: b for b in c["bins"]}
    assert set(by) == {0.0, 0.1, 0.9} and by[0.9]["n"] == 2 and by[0.9]["p"] == pytest.approx(0.935)
    assert by[0.9]["liked"] == 0.5 and by[0.0]["liked"] == 1.0
    # ECE: 2/4 * |0.935 - 0.5| + 1/4 * |0.05 - 1| + 1/4 * |0.2 - 0|
    assert c["ece"] == pytest.approx(0.5 * 0.435 + 0.25 * 0.95 + 0.25 * 0.2)
    assert c["acc"] == 0.5 and c["brier"] == pytest.approx((0.05 ** 2 + 0.95 ** 2 + 0.92 ** 2 + 0.2 ** 2) / 4)
    (run / "rounds" / "003" / "labels.json").write_text(json.dumps({"r003_000": 1}))
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        ps.asked_answers(run)


def test_reach_counts_the_first_evaluation_inside_every_bound():
    """scripts/preference_sets.py reach: the first evaluation at or above the target where every bound holds, no
    interpolation; one that reaches the rate while breaking a bound does not count."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("preference_sets", ROOT / "scripts" / "preference_sets.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    base = {"labels_used": 0, "legible_preferred_rate": 0.4, "min_liked_share": 0.1, "precision": 0.7,
            "fid_preferred": 6.0, "rejected_rate": 0.02}
    ev = lambda n, rate, **kw: {**base, "labels_used": n, "legible_preferred_rate": rate, "min_liked_share": 0.2, **kw}
    rows = [base, {"labels_used": 10, "loss": 1.0}, ev(50, 0.92, fid_preferred=9.5),  # the rate, FID 1.58x: no
            ev(100, 0.88), ev(150, 0.91), ev(200, 0.95)]
    n, row = ps.first_inside(rows, 4, 0.9, 150)
    assert n == 150 and row["legible_preferred_rate"] == 0.91
    n, row = ps.first_inside(rows, 4, 0.9, 100)        # within 100 labels: never, and the last row is 100's
    assert math.isnan(n) and row["labels_used"] == 100
    rows[2]["fid_preferred"] = 8.9                      # inside the bound now: the 50-label evaluation counts
    assert ps.first_inside(rows, 4, 0.9, 150)[0] == 50
    rows[2]["min_liked_share"] = 0.1                    # a liked class under half its fair share (0.125 of four)
    assert ps.first_inside(rows, 4, 0.9, 150)[0] == 150
    # held to the base judged on as many samples (`--same-n`): a base FID of 7.0 at the evaluation lets FID 9.5 pass
    rows[2].update(min_liked_share=0.2, fid_preferred=9.5)
    same_n = lambda row: {**base, "fid_preferred": 7.0 if row["labels_used"] == 50 else 6.0}
    assert ps.first_inside(rows, 4, 0.9, 150)[0] == 150 and ps.first_inside(rows, 4, 0.9, 150, same_n)[0] == 50


def test_compare_runs_reuses_and_reports(tiny, tmp_path):
    import yaml
    common = dict(o.split("=", 1) for o in overrides(tiny, tmp_path, rounds=2))
    common = {k: yaml.safe_load(v) for k, v in common.items() if k not in ("train.output_dir", "train.sample_path")}
    spec = {"base_config": str(ROOT / "configs" / "mnist.yaml"), "output_dir": str(tmp_path / "cmp"), "seeds": [0, 1],
            "budget": 8, "common": {**common, "train.traj_steps": 4},
            "methods": {"epapa": {"papa.epapa_k": 500},
                        "ddpo": {"train.algo": "ddpo"}}}
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    run = lambda *a: subprocess.run([sys.executable, "-m", "papa.compare", "--config", str(cfg), *a],
                                    capture_output=True, text=True, cwd=ROOT)
    r = run("--jobs", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]

    def run(*a):  # what follows launches no run: papa.compare's main in this process (no interpreter start each)
        import contextlib
        import io
        import types
        from papa.compare import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--config", str(cfg), *a])
        return types.SimpleNamespace(returncode=code, stdout=out.getvalue())
    md = (tmp_path / "cmp" / "mnist" / "compare.md").read_text()
    assert "| epapa | 2 |" in md and "| ddpo | 2 |" in md and "Highest final legible preferred rate" in md
    assert ("Most label-efficient within the quality bounds (rejected" in md) or \
        ("No method kept every seed within the quality bounds (rejected" in md) or \
        ("No method inside the quality bounds (rejected, precision, FID) on every seed" in md)
    # the bounds table counts, per method, the seeds meeting each bound: recomputed here from the runs' metrics
    from papa.evaluation import bounds_met
    for m in ("epapa", "ddpo"):
        met = [bounds_met(rows[-1], rows[0], 4, 0.9) for rows in
               (metrics(tmp_path / "cmp" / "mnist" / f"{m}_seed{s}") for s in (0, 1))]
        want = ["n/a" if all(b[k] is None for b in met) else f"{sum(b[k] is not False for b in met)}/2"
                for k in ("rate", "liked", "rejected", "precision", "fid")]
        row = next(line for line in md.splitlines() if line.startswith(f"| {m} | ") and line.endswith("/2 |"))
        assert row.strip("| ").split(" | ")[1:6] == want, row
    assert (tmp_path / "cmp" / "mnist" / "compare.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "mnist" / "compare_grids.png").stat().st_size > 1000 and "compare_grids.png" in md
    for m in ("epapa", "ddpo"):
        for s in (0, 1):
            rows = metrics(tmp_path / "cmp" / "mnist" / f"{m}_seed{s}")
            assert rows[-1]["labels_used"] == 8 and rows[0].get("eval_cached") in (None, True)
    # a second call reuses every finished run
    r = run()
    assert r.returncode == 0 and "4 finished and reused, 0 to run" in r.stdout
    # with `records`, each finished run's small files are kept apart; on another machine (no run directories) the
    # comparison restores them instead of rerunning, and reports the same table
    spec["records"] = str(tmp_path / "rec")
    cfg.write_text(yaml.safe_dump(spec))
    assert run("--report-only").returncode == 0
    rec = tmp_path / "rec" / "mnist"
    assert {p.name for p in (rec / "ddpo_seed0").iterdir()} == {"config.yaml", "metrics.jsonl", "summary.md", "rounds"}
    assert len(list(rec.glob("ddpo_seed0/rounds/*/eval_grid.png"))) == 2    # the first seed's grids: the report's
    assert {p.name for p in (rec / "ddpo_seed1").iterdir()} == {"config.yaml", "metrics.jsonl", "summary.md"}
    # ... and the whole report beside them, as it was written
    for name in ("compare.md", "compare.png", "compare_grids.png", "compare.json"):
        assert (tmp_path / "rec" / name).read_bytes() == (tmp_path / "cmp" / "mnist" / name).read_bytes(), name
    recorded_md = (tmp_path / "rec" / "compare.md").read_text()
    shutil.rmtree(tmp_path / "cmp")
    r = run("--no-restore", "--report-only")
    assert r.returncode == 0 and "restored" not in r.stdout and "0 finished and reused" in r.stdout
    r = run()
    assert r.returncode == 0 and "restored from" in r.stdout and "4 finished and reused, 0 to run" in r.stdout
    assert (tmp_path / "cmp" / "mnist" / "compare.md").read_text().split("Command:")[1].split("\n", 1)[1] == \
        md.split("Command:")[1].split("\n", 1)[1]
    # a record made with another config than the planned one is not restored
    shutil.rmtree(tmp_path / "cmp")
    cfg.write_text(yaml.safe_dump({**spec, "common": {**spec["common"], "train.lr": 0.002}}))
    r = run("--report-only")
    assert r.returncode == 0 and "restored" not in r.stdout and "0 finished and reused" in r.stdout
    assert (tmp_path / "rec" / "compare.md").read_text() == recorded_md   # a partial report does not replace it
    cfg.write_text(yaml.safe_dump(spec))
    assert "restored from" in run("--report-only").stdout
    # a finished run made with another config is not reused (the default changed, say), and the keys are named
    from papa.compare import config_changes, finished, load_compare, plan
    spec2 = {**spec, "common": {**spec["common"], "train.lr": 0.002}}
    cfg.write_text(yaml.safe_dump(spec2))
    runs = plan(load_compare(cfg))
    assert not any(finished(c) for _, _, c, _ in runs) and config_changes(runs[0][2]) == ["train.lr"]
    # a budget mismatch is refused before any work, naming the method
    spec["methods"]["ddpo"]["train.rounds"] = 3
    cfg.write_text(yaml.safe_dump(spec))
    r = subprocess.run([sys.executable, "-m", "papa.compare", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and "compare method 'ddpo'" in r.stderr and "budget 8" in r.stderr


def test_a_reject_user_with_a_ten_class_oracle_is_one_line_before_any_work(tiny, tmp_path):
    ten = tmp_path / "oracle10.pt"
    checkpoint.atomic_save({"state_dict": OracleCNN().state_dict()}, ten)
    r = cli(args_for(overrides(tiny, tmp_path, extra=[f"checkpoints.oracle={ten}", "feedback.reject=true"])))
    assert r.returncode == 2 and "feedback.reject" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mnist").exists()
    r = cli(args_for(overrides(tiny, tmp_path, rounds=1, extra=[f"checkpoints.oracle={ten}", "feedback.reject=false",
                                                                 "feedback.flip_prob=0", "feedback.skip_below=0"])))
    assert r.returncode == 0, r.stderr[-2000:]   # the argmax-only user runs on a 10-class oracle


def test_compare_in_process_never_reuses_a_stale_directory(tiny, tmp_path, monkeypatch):
    """The torchrun path of papa.compare (run_in_process): a directory made with another config and no checkpoints
    (a restored record, say) is cleared before the new run writes anything, so a run that then dies cannot pass as
    finished with the old run's metrics beside the new config."""
    import yaml
    from papa import compare
    from papa.config import dump_yaml
    from papa.engine import Engine
    common = dict(o.split("=", 1) for o in overrides(tiny, tmp_path, rounds=2))
    common = {k: yaml.safe_load(v) for k, v in common.items() if k not in ("train.output_dir", "train.sample_path")}
    spec = {"base_config": str(ROOT / "configs" / "mnist.yaml"), "output_dir": str(tmp_path / "cmp"), "seeds": [0],
            "budget": 8, "common": common, "methods": {"epapa": {}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    [run] = compare.plan(compare.load_compare(tmp_path / "c.yaml"))
    cfg = run[2]
    old = load_config(ROOT / "configs" / "mnist.yaml", [f"{k}={json.dumps(v)}" for k, v in
                                                         {**common, "train.lr": 0.002}.items()])
    d = compare.run_dir(cfg)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(dump_yaml(old))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "labels_used": 4 * r}) + "\n" for r in (0, 1, 2)))
    (d / "summary.md").write_text("old run\n")
    assert compare.config_changes(cfg) == ["train.lr"] and not compare.finished(cfg)
    assert compare.start_mode(cfg, say=False) == "overwrite"

    def dies(self):
        raise RuntimeError("killed in round 0")
    monkeypatch.setattr(Engine, "_round0", dies)
    with pytest.raises(RuntimeError, match="killed in round 0"):
        compare.run_in_process(spec, [run])
    assert not (d / "metrics.jsonl").exists() and not (d / "summary.md").exists() and not compare.finished(cfg)
    # a record of the planned config replaces such a stale directory (the copies under `records` are restored),
    # but never a finished run of the planned config or an interrupted one that can resume
    rec = tmp_path / "rec"
    spec["records"] = str(rec)
    src = compare.record_dir(spec, cfg)
    src.mkdir(parents=True)
    (src / "config.yaml").write_text(dump_yaml(cfg))
    (src / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "labels_used": 4 * r, "recorded": True}) + "\n"
                                               for r in (0, 1, 2)))
    (src / "summary.md").write_text("recorded run\n")
    (d / "config.yaml").write_text(dump_yaml(old))
    (d / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    assert compare.restore_record(spec, cfg) and compare.finished(cfg)
    assert (d / "summary.md").read_text() == "recorded run\n"
    (d / "summary.md").write_text("the local finished run\n")
    assert not compare.restore_record(spec, cfg) and (d / "summary.md").read_text() == "the local finished run\n"
    # an interrupted run of the planned config resumes; with --force, as its values all equal the planned ones (a
    # checkpoint's config hash differs only when papa gained a key since, which takes its default)
    (d / "config.yaml").write_text(dump_yaml(cfg))
    (d / "checkpoints").mkdir(exist_ok=True)
    (d / "checkpoints" / "round_001.pt").write_bytes(b"")
    (d / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    assert compare.start_mode(cfg, say=False) == "resume"
    args = compare.train_args(spec, cfg, run[3], 1)
    assert args[-3:] == ["--resume", str(d), "--force"]
    assert not compare.restore_record(spec, cfg)   # an interrupted run that can resume is not replaced


def test_rejudge_reproduces_the_recorded_evaluation_and_judges_anew(tiny, tmp_path):
    """Each run keeps its first and last evaluations' images (also through the base-evaluation cache); judged again
    by the run's own evaluator they give the recorded metrics exactly, by another evaluator other ones."""
    from papa.config import ConfigError
    from papa.rejudge import main as rejudge_main, rejudge
    from papa.train import main
    assert main(args_for(overrides(tiny, tmp_path, rounds=2))) == 0
    assert main(args_for(overrides(tiny, tmp_path, rounds=2, extra=["train.sample_path=second", "train.seed=1"]))) == 0
    first, second = run_dir(tmp_path), run_dir(tmp_path).with_name("second")
    base_row = json.loads((second / "metrics.jsonl").read_text().splitlines()[0])
    assert base_row.get("eval_cached") is True                         # its base evaluation came from the cache
    for rd in (first, second):
        for tag in ("000", "002"):
            assert torch.load(rd / "rounds" / tag / "eval_images.pt").shape == (8, 1, 28, 28)
    res = rejudge(second)
    rows = metrics(second)
    for name, row in (("base", rows[0]), ("final", rows[-1])):
        for k, v in res[name].items():
            assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), (name, k)
    torch.manual_seed(5)
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, tmp_path / "other.pt")
    other = rejudge(second, str(tmp_path / "other.pt"))
    assert other["final"]["class_fraction"] != res["final"]["class_fraction"]
    assert rejudge_main([str(first), str(second), "--evaluator", str(tmp_path / "other.pt"),
                         "--out", str(tmp_path / "r.json"), "--grids", str(tmp_path / "grids")]) == 0
    assert [r["run"] for r in json.loads((tmp_path / "r.json").read_text())] == [str(first), str(second)]
    # the grids hold what the new evaluator rejects / accepts as preferred, and nothing else
    from papa.models import load_classifier
    from papa.models.classifier import REJECT_CLASS
    from papa.oracle import predict
    from papa.rejudge import grid_name
    cfg = load_config(second / "config.yaml")
    dec = predict(load_classifier("evaluator", tmp_path / "other.pt", cfg.data.dataset),
                  torch.load(second / "rounds" / "002" / "eval_images.pt"))
    wanted = {"rejected": bool((dec == REJECT_CLASS).any()),
              "accepted": bool(torch.isin(dec, torch.tensor(list(cfg.feedback.preference))).any())}
    for what, present in wanted.items():
        assert (tmp_path / "grids" / f"{grid_name(second)}_{what}.png").is_file() == present, what
    (first / "rounds" / "002" / "eval_images.pt").unlink()
    with pytest.raises(ConfigError, match="eval_images.pt is missing"):
        rejudge(first)


def test_preference_sets_keeps_records_and_reports_from_them(tiny, tmp_path):
    """scripts/preference_sets.py: a finished run's record (config, metrics, summary, wall time, first and last grids)
    goes under --records; a recorded run is not run again; `report --out <records>` makes the table from records."""
    torch.manual_seed(3)   # the report reads the legible preferred rate: an evaluator with the reject output
    checkpoint.atomic_save({"state_dict": EvaluatorCNN(num_classes=11).state_dict()}, tmp_path / "evaluator11.pt")
    mine = [o for o in overrides(tiny, tmp_path, rounds=2, extra=[f"checkpoints.evaluator={tmp_path / 'evaluator11.pt'}"])
            if not o.startswith(("train.output_dir=", "train.sample_path=", "feedback.preference="))]
    script = [sys.executable, str(ROOT / "scripts" / "preference_sets.py")]
    run = script + ["run", "--dataset", "mnist", "--tag", "t", "--sets", "single", "--seeds", "0", "--threads", "1",
                    "--out", str(tmp_path / "runs"), "--records", str(tmp_path / "rec")]
    run += [a for o in mine for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = tmp_path / "rec" / "t" / "mnist" / "single_s0"
    for f in ("config.yaml", "metrics.jsonl", "summary.md", "wall.json", "rounds/000/eval_grid.png",
              "rounds/002/eval_grid.png"):
        assert (rec / f).is_file(), f
    assert (rec / "metrics.jsonl").read_bytes() == (tmp_path / "runs/t/mnist/single_s0/metrics.jsonl").read_bytes()
    # `asked`: the likes it counts are the run's +1 answers; `user`: every base sample is counted once
    done = tmp_path / "runs/t/mnist/single_s0"
    likes = [sum(v == 1 for v in json.loads((done / "rounds" / f"{r:03d}" / "labels.json").read_text()).values())
             for r in (1, 2)]
    asked = subprocess.run(script + ["asked", "--dataset", "mnist", "--tag", "t", "--out", str(tmp_path / "runs")],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert [int(line.split("|")[3]) for line in asked.stdout.splitlines() if line.startswith("| single_s0")] == likes
    user = subprocess.run(script + ["user", str(done)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert user.returncode == 0, user.stderr[-2000:]
    n_base = len(torch.load(done / "rounds" / "000" / "eval_images.pt", weights_only=True))
    assert sum(int(line.split("|")[2]) for line in user.stdout.splitlines() if line.startswith("| ")
               and line.split("|")[2].strip().isdigit()) == n_base
    last = subprocess.run(script + ["user", str(done), "--round", "2"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert last.returncode == 0, last.stderr[-2000:]
    rows = [line.split("|") for line in last.stdout.splitlines() if line.startswith("| ") and line.split("|")[2].strip().isdigit()]
    assert sum(int(r[2]) for r in rows) == len(torch.load(done / "rounds" / "002" / "eval_images.pt", weights_only=True))
    assert {r[1].strip() for r in rows if "*" in r[1]} <= {"2*"}  # only the run's preferred class is starred
    assert all(0 <= float(r[6]) <= 1 for r in rows)
    bad = subprocess.run(script + ["user", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    shutil.rmtree(tmp_path / "runs")
    again = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "recorded already" in again.stdout and not (tmp_path / "runs").exists()
    rep = subprocess.run(script + ["report", "--dataset", "mnist", "--tag", "t", "--out", str(tmp_path / "rec")],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "| single | [2] | 1 |" in (tmp_path / "rec" / "t" / "mnist.md").read_text()
