"""The engine's seams, exercised from a test file alone: a method defined here runs end to end, an engine is built
from in-memory modules, an adapter-style policy trains without a change to any method, and a feedback source that
answers later makes the run wait, also across a kill and a resume."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from papa.algos import METHODS, register
from papa.algos.base import Items, Method
from papa.config import load_config
from papa.engine import Engine
from papa.evaluation import FIDELITY_KEYS, RunEvaluator
from papa.models import EvaluatorCNN, build_unet
from papa.policy import FullPolicy, Policy
from papa.schedule import NoiseSchedule
from test_train import ROOT, TINY_MODEL, args_for, overrides, run_dir, tiny  # noqa: F401 - tiny: fixture
from testutil import metrics

SMALL = TINY_MODEL + ["train.rounds=2", "train.samples_per_round=4", "train.batch_size=2", "train.lr=0.001",
                      "diffusion.sample_steps=4", "eval.num=6", "eval.final_num=8", "eval.every=1", "eval.real_max=200",
                      "feedback.preference=[0,1,2,3,4]", "train.sample_path=run"]


@dataclass
class ToySettings:
    scale: float = 1.0

    def check(self, cfg, require):
        require(self.scale > 0, "scale", "must be > 0")


class Toy(Method):
    """Pull liked images' denoising error down and disliked ones' up, at one random t per image: a method in 30 lines."""
    name = "toy"
    draws, feedback = "images", "label"
    Settings = ToySettings
    diagnostics = ("toy_items",)
    stat_keys = ("items",)

    def build(self, samples, y, query):
        return {"x": samples.images.cpu(), "y": y}, {"round_liked": int((y > 0).sum())}

    def num_units(self, data):
        return len(data["x"])

    def step_items(self, data, units, gen):
        x = data["x"][units]
        return None, Items(x=x, y=data["y"][units].float(), t=torch.randint(0, self.sched.T, (len(x),), generator=gen),
                           eps=torch.randn(x.shape, generator=gen))

    def loss(self, ctx, c):
        x_t = self.sched.add_noise(c.x, c.eps, c.t)
        err = (self.policy.policy(x_t, c.t) - c.eps).square().flatten(1).mean(1)
        return self.s.scale * (c.y * err).sum() / len(c), {"items": float(len(c))}

    def summarize(self, stats):
        return {"toy_items": stats.get("items", 0.0)}


@pytest.fixture
def toy():
    register(Toy)
    yield Toy
    dict.pop(METHODS, "toy")  # other tests' configs must not carry a section for it


class Brightness:
    """A feedback source written here: likes the brighter half of each round."""
    kinds = ("label",)

    def ask(self, q):
        m = q.images.mean((1, 2, 3))
        return torch.where(m > m.median(), 1.0, -1.0)  # the lower median: the upper half liked


def in_memory_engine(cfg, run_dir, policy=None):
    torch.manual_seed(0)
    policy = policy or FullPolicy(build_unet(cfg.model))
    g = np.random.default_rng(0)
    test_x, test_y = g.integers(0, 256, (80, 28, 28), dtype=np.uint8), np.arange(80, dtype=np.uint8) % 10
    ev = RunEvaluator(EvaluatorCNN(), test_x, test_y, cfg, NoiseSchedule.from_config(cfg.diffusion))
    return Engine(cfg, run_dir, policy, Brightness(), ev)


def test_a_method_defined_in_a_test_file_runs_on_an_in_memory_engine(toy, tmp_path):
    cfg = load_config(ROOT / "configs" / "mnist.yaml", SMALL + ["train.algo=toy", "toy.scale=2",
                                                                f"train.output_dir={tmp_path}"])
    assert cfg.method().scale == 2.0
    state = in_memory_engine(cfg, tmp_path / "run").run()
    rows = metrics(tmp_path / "run")
    assert state.round == 2 and [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["toy_items"] == 4 and rows[2]["labels_used"] == 8 and "preferred_rate" in rows[2]
    assert all(k in rows[2] for k in FIDELITY_KEYS)  # beside the FID in every evaluation (NaN when too few samples)
    labels = json.loads((tmp_path / "run" / "rounds" / "001" / "labels.json").read_text())
    assert sorted(labels) == [f"r001_{i:03d}" for i in range(4)] and sorted(labels.values()) == [-1, -1, 1, 1]
    assert not (tmp_path / "mnist" / ".base_eval").exists()  # no files behind it: the base evaluation is not cached
    with pytest.raises(Exception, match="toy.scale"):
        load_config(ROOT / "configs" / "mnist.yaml", ["train.algo=toy", "toy.scale=0"])


class Adapter(Policy):
    """A frozen base plus a trainable, zero-initialised 1x1 convolution on its output (so it starts as the base)."""

    class Net(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.delta = base, torch.nn.Conv2d(1, 1, 1)
            torch.nn.init.zeros_(self.delta.weight)
            torch.nn.init.zeros_(self.delta.bias)

        def forward(self, x, t):
            e = self.base(x, t)
            return e + self.delta(e)

    def __init__(self, base):
        self.reference_module = base.requires_grad_(False).eval()
        self.module = Adapter.Net(base)


def test_an_adapter_policy_trains_with_an_unchanged_method(tmp_path):
    cfg = load_config(ROOT / "configs" / "mnist.yaml", SMALL + ["papa.timesteps_per_sample=4", "papa.epapa_k=0",
                                                                f"train.output_dir={tmp_path}"])
    base = build_unet(cfg.model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    policy = Adapter(base)
    in_memory_engine(cfg, tmp_path / "run", policy).run()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the shared base is untouched
    assert policy.module.delta.weight.abs().sum() > 0  # the adapter learned
    assert [p.shape for p in policy.parameters()] == [torch.Size([1, 1, 1, 1]), torch.Size([1])]


def test_a_source_that_answers_later_makes_the_run_wait_also_after_a_kill(tiny, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text("{}")
    ovs = overrides(tiny, tmp_path / "out", rounds=2, extra=["feedback.source=file", f"feedback.labels_file={labels}",
                                                             "feedback.wait=true", "feedback.poll_seconds=0.2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rd = run_dir(tmp_path / "out")

    def start(args):
        return subprocess.Popen([sys.executable, "-m", "papa.train", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_for(pred, what, p, timeout=240):
        deadline = time.time() + timeout
        while not pred():
            assert p.poll() is None, f"the run ended while {what}: {p.stderr.read()[-2000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    waiting = lambda r: lambda: (rd / "log.txt").is_file() and f"round {r}: waiting" in (rd / "log.txt").read_text()
    p = start(args_for(ovs))
    try:
        wait_for(waiting(1), "round 1's images", p)
        assert torch.load(rd / "rounds" / "001" / "images.pt").shape[0] == 4  # saved before asking
        p.send_signal(signal.SIGKILL)  # stopped while waiting for the person
        p.wait()
        (rd / "log.txt").write_text("")
        p = start(["--resume", str(rd)])
        wait_for(waiting(1), "round 1 again after the resume", p)
        labels.write_text(json.dumps({f"r001_{i:03d}": 1 if i % 2 else -1 for i in range(4)}))
        wait_for(waiting(2), "round 2", p)
        labels.write_text(json.dumps({f"r{r:03d}_{i:03d}": 1 for r in (1, 2) for i in range(4)}))
        assert p.wait(timeout=240) == 0, p.stderr.read()[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
    assert [r["round"] for r in metrics(rd)] == [0, 1, 2]
    assert json.loads((rd / "rounds" / "001" / "labels.json").read_text())["r001_001"] == 1


class Slow(Brightness):
    """Brightness, answering on the second ask of each round (as a person: "not yet" first); it notes the policy's
    weights at every ask, so a test sees what the engine trained while it waited."""

    def __init__(self):
        self.module, self.weights, self.asked = None, [], set()

    def ask(self, q):
        self.weights.append((q.round, torch.cat([p.detach().flatten() for p in self.module.parameters()]).clone()))
        if q.round not in self.asked:
            self.asked.add(q.round)
            return None
        return super().ask(q)


@pytest.mark.parametrize("order", ["mixed", "first"])
def test_replay_first_trains_the_replayed_units_while_the_answers_are_awaited(tmp_path, order):
    """papa.replay_order: first: round r's replayed units (drawn as with mixed) are trained on between the first
    "not yet" and the answers, then round r's own units; the same number of optimiser steps as mixed."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml", SMALL + [
        "train.rounds=3", "papa.timesteps_per_sample=4", "papa.replay=true", "papa.replay_size=2",
        f"papa.replay_order={order}", "feedback.poll_seconds=0.01", f"train.output_dir={tmp_path}"])
    engine = in_memory_engine(cfg, tmp_path / "run")
    engine.feedback = source = Slow()
    source.module = engine.policy.module
    engine.run()
    moved = {r: not torch.equal(a, b) for (r, a), (_, b) in zip(source.weights[::2], source.weights[1::2])}
    assert moved == {1: False, 2: order == "first", 3: order == "first"}  # round 1 has nothing to replay
    assert [row["optimizer_steps"] for row in metrics(tmp_path / "run")[1:]] == [2, 3, 3]  # 4, 4 + 2, 4 + 2 units


def test_eval_real_max_takes_a_fixed_subset_of_the_preferred_test_images():
    g = np.random.default_rng(0)
    test_x, test_y = g.integers(0, 256, (300, 28, 28), dtype=np.uint8), (np.arange(300) % 10).astype(np.uint8)
    sched = lambda cfg: NoiseSchedule.from_config(cfg.diffusion)
    build = lambda extra: (lambda cfg: RunEvaluator(EvaluatorCNN(), test_x, test_y, cfg, sched(cfg)))(
        load_config(ROOT / "configs" / "mnist.yaml", SMALL + extra))
    torch.manual_seed(0)
    every = build(["eval.real_max=0"])          # preference [0..4]: 150 of the 300
    assert len(every.test_feats) == 150
    torch.manual_seed(0)
    a = build(["eval.real_max=40"])
    torch.manual_seed(0)
    b = build(["eval.real_max=40"])
    assert len(a.test_feats) == 40 and torch.equal(a.test_feats, b.test_feats)   # seeded: the same 40 each time
    assert len(a.fid_real_feats) == 40
