"""The browser app's HTTP layer, in-process (Starlette's TestClient) over a served run of a tiny model: the token,
per-click persistence, reload and restart, stale and double submits (409), bad requests (4xx with a message), no path
outside the run, and an export that replays with papa.train to the same weights. Each run is seconds."""
import json
import time
import warnings

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # Starlette 1.10 would rather have httpx2; httpx 0.28 works and is the pinned one
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient  # noqa: E402

from papa import checkpoint  # noqa: E402
from papa.config import ConfigError, load_config  # noqa: E402
from papa.models import EvaluatorCNN, OracleCNN, build_unet  # noqa: E402
from papa.serve import Served, bind, prepare  # noqa: E402
from testutil import ROOT, assert_same_metrics, metrics  # noqa: E402

TINY_MODEL = ["model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]", "model.time_emb_dim=16"]
MNIST = str(ROOT / "configs" / "mnist.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = load_config(MNIST, TINY_MODEL)
    torch.manual_seed(0)
    checkpoint.atomic_save({"state_dict": build_unet(cfg.model).state_dict()}, d / "base.pt")
    checkpoint.atomic_save({"state_dict": OracleCNN(num_classes=11).state_dict()}, d / "oracle.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, d / "evaluator.pt")
    return d


def overrides(tiny, out, rounds=2, extra=()):
    """papa.train's tiny test run (tests/test_train.py), 4 images a round; one preferred class, so the evaluator
    starts fast (it embeds the preferred classes' test images once per run)."""
    return TINY_MODEL + [
        f"checkpoints.base={tiny / 'base.pt'}", f"checkpoints.oracle={tiny / 'oracle.pt'}",
        f"checkpoints.evaluator={tiny / 'evaluator.pt'}", f"train.output_dir={out}", f"train.rounds={rounds}",
        "train.samples_per_round=4", "train.batch_size=2", "papa.timesteps_per_sample=6", "train.timestep_chunk=5",
        "train.lr=0.001", "diffusion.sample_steps=4", "eval.num=6", "eval.final_num=8", "eval.every=2", "eval.real_max=200",
        "feedback.preference=[1]", "train.ema_decay=0", *extra]


class Session:
    """A served run in this process: the engine in a thread, a client holding the token."""

    def __init__(self, cfg, run_dir, resume=False):
        self.served = Served(cfg, run_dir).start(resume=resume)
        self.token = self.served.token
        self.client = TestClient(self.served.app(), headers={"X-Papa-Token": self.token})

    def state(self):
        r = self.client.get("/api/state")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, pred, timeout=180):
        t0 = time.time()
        while time.time() - t0 < timeout:
            s = self.state()
            if pred(s):
                return s
            if self.served.error is not None:
                raise AssertionError(f"the engine stopped: {self.served.error!r}")
            time.sleep(0.05)
        raise AssertionError(f"timed out; last state {s['status']} round {s['round']} {s['progress']}")

    def labelling(self, r):
        return self.wait(lambda s: s["status"] == "labelling" and s["round"] == r)

    def label(self, r, qid, v):
        return self.client.post("/api/label", json={"round": r, "id": qid, "value": v})

    def answer_round(self, r, rule=lambda i: (1, -1, 0)[i % 3]):
        s = self.labelling(r)
        for i, qid in enumerate(s["ids"]):
            assert self.label(r, qid, rule(i)).status_code == 200
        res = self.client.post("/api/submit", json={"round": r})
        assert res.status_code == 200, res.text
        return s

    def close(self):
        self.served.stop()
        self.client.close()


@pytest.fixture
def served(tiny, tmp_path):
    sessions = []

    def make(rounds=2, extra=(), resume=None):
        cfg, run_dir = prepare(MNIST if resume is None else None, [] if resume else overrides(tiny, tmp_path, rounds, extra),
                               resume)
        sessions.append(Session(cfg, run_dir, resume=resume is not None))
        return sessions[-1]
    yield make
    for s in sessions:
        s.close()


@pytest.fixture(scope="module")
def waiting(tiny, tmp_path_factory):
    """A served run waiting for round 1's answers, shared by the tests that never submit."""
    cfg, run_dir = prepare(MNIST, overrides(tiny, tmp_path_factory.mktemp("waiting")), None)
    s = Session(cfg, run_dir)
    s.labelling(1)
    yield s
    s.close()


def test_every_request_needs_the_token(waiting):
    s = waiting
    bare = TestClient(s.served.app())
    for path in ("/", "/api/state", "/static/app.js", "/api/labels.json", "/api/image/1/0.png"):
        r = bare.get(path)
        assert r.status_code == 401 and "token" in r.json()["error"], path
        assert bare.get(path, headers={"X-Papa-Token": "x" * 24}).status_code == 403, path
    assert bare.post("/api/submit", json={"round": 1}).status_code == 401
    page = bare.get(f"/?token={s.token}")  # the printed URL: the page, and a cookie for its images and files
    assert page.status_code == 200 and "papa" in page.text
    assert bare.get("/api/state").status_code == 200 and bare.get("/static/app.js").status_code == 200
    bare.close()


def test_clicks_persist_reload_finds_them_and_a_round_submits_once(served):
    s = served()
    st = s.labelling(1)
    assert len(st["ids"]) == 4 and st["ids"][0] == "r001_000" and st["kind"] == "label"
    png = s.client.get("/api/image/1/0.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert s.label(1, "r001_000", 1).status_code == 200
    assert s.label(1, "r001_001", -1).status_code == 200
    assert s.label(1, "r001_001", None).json()["draft"] == {"r001_000": 1}  # undo clears
    assert s.label(1, "r001_001", 0).status_code == 200
    on_disk = json.loads((s.served.store.dir / "draft.json").read_text())
    assert on_disk == {"round": 1, "labels": {"r001_000": 1, "r001_001": 0}}
    other_tab = TestClient(s.served.app(), headers={"X-Papa-Token": s.token})
    assert other_tab.get("/api/state").json()["draft"] == {"r001_000": 1, "r001_001": 0}
    for qid in ("r001_002", "r001_003"):
        s.label(1, qid, -1)
    assert s.client.post("/api/submit", json={"round": 1}).status_code == 200
    twice = other_tab.post("/api/submit", json={"round": 1})
    assert twice.status_code == 409 and "already submitted" in twice.json()["error"]
    assert other_tab.post("/api/label", json={"round": 1, "id": "r001_000", "value": -1}).status_code == 409
    st = s.labelling(2)
    assert st["history"][0] == {"round": 1, "like": 1, "dislike": 2, "skip": 1, "n": 4, "liked_fraction": 0.25}
    assert st["budget"] == {"used": 4, "total": 8} and st["draft"] == {}
    stale = other_tab.post("/api/submit", json={"round": 1})
    assert stale.status_code == 409 and "not the open round" in stale.json()["error"]
    assert s.client.get("/api/grid/1.png").status_code == 200
    assert s.client.get("/api/checkpoint").status_code == 200
    exported = s.client.get("/api/labels.json")
    assert exported.json() == {"r001_000": 1, "r001_001": 0, "r001_002": -1, "r001_003": -1}
    assert "attachment" in exported.headers["content-disposition"]
    other_tab.close()


def test_bad_requests_get_a_message_and_nothing_outside_the_run_is_served(waiting):
    s = waiting
    s.labelling(1)
    c = s.client
    for body, words in [({"round": 1, "id": "r001_000", "value": 2}, "must be 1, -1, 0"),
                        ({"round": 1, "id": "r001_000", "value": True}, "must be 1, -1, 0"),
                        ({"round": 1, "id": "r009_000", "value": 1}, "not a query of round 1"),
                        ({"round": "1", "id": "r001_000", "value": 1}, "must be an integer"),
                        ({"round": 1, "id": 3, "value": 1}, "query id")]:
        r = c.post("/api/label", json=body)
        assert r.status_code == 400 and words in r.json()["error"], (body, r.text)
    r = c.post("/api/label", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = c.post("/api/submit", json={"round": 1})
    assert r.status_code == 400 and "no answer yet" in r.json()["error"]
    assert c.post("/api/submit", json={"round": 7}).status_code == 409
    assert c.get("/api/submit").status_code == 405
    for path in ("/api/image/1/99.png", "/api/image/1/..%2F..%2Fconfig.yaml", "/static/..%2F..%2Fserve.py",
                 "/static/index.html", "/static/../../config.yaml", "/api/grid/..%2Fconfig.yaml",
                 "/serve/labels.json", "/config.yaml", "/api/image/-1/0.png", "/api/image/1/0.png/../../../token"):
        r = c.get(path)
        assert r.status_code == 404 and "error" in r.json(), (path, r.status_code)


def test_a_restarted_server_continues_at_the_same_round_with_its_clicks(served):
    s = served(rounds=3)
    s.answer_round(1)
    s.labelling(2)
    s.label(2, "r002_000", 1)
    s.label(2, "r002_003", -1)
    first = [s.client.get(f"/api/image/2/{i}.png").content for i in range(4)]
    run_dir, token = s.served.run_dir, s.token
    s.close()  # the server dies in the middle of round 2
    again = served(resume=str(run_dir))
    assert again.token == token  # an open tab's URL still works
    st = again.labelling(2)
    assert st["draft"] == {"r002_000": 1, "r002_003": -1}
    assert [again.client.get(f"/api/image/2/{i}.png").content for i in range(4)] == first  # the same images
    assert st["history"][0]["n"] == 4


def test_exported_labels_replay_with_papa_train_to_the_same_model(served, tiny, tmp_path):
    s = served(rounds=2)
    s.answer_round(1, rule=lambda i: 1 if i < 2 else -1)
    s.answer_round(2, rule=lambda i: (0, 1, -1, 1)[i])
    s.wait(lambda st: st["status"] == "done")
    labels = tmp_path / "exported.json"
    labels.write_bytes(s.client.get("/api/labels.json").content)
    from papa.train import main
    replay_out = tmp_path / "replay"
    ovs = overrides(tiny, replay_out, 2, ["feedback.source=file", f"feedback.labels_file={labels}",
                                          "train.sample_path=replay"])
    assert main(["--config", MNIST] + [a for o in ovs for a in ("--set", o)]) == 0
    served_ck = checkpoint.load(s.served.run_dir / "checkpoints" / "round_002.pt")
    replay_ck = checkpoint.load(replay_out / "mnist" / "replay" / "checkpoints" / "round_002.pt")
    for k, v in served_ck["model"].items():
        assert torch.equal(v, replay_ck["model"][k]), k
    assert json.loads((s.served.run_dir / "rounds" / "002" / "labels.json").read_text()) == \
        json.loads((replay_out / "mnist" / "replay" / "rounds" / "002" / "labels.json").read_text())


def test_pairwise_methods_ask_for_pairs(served):
    s = served(rounds=1, extra=["train.algo=diffusion_dpo", "train.samples_per_round=2", "train.batch_size=1"])
    st = s.labelling(1)
    assert st["kind"] == "pair" and st["ids"] == ["r001_p000", "r001_p001"] and st["images"] == 4
    assert s.client.get("/api/image/1/3.png").status_code == 200
    s.label(1, "r001_p000", 1)
    s.label(1, "r001_p001", 0)
    assert s.client.post("/api/submit", json={"round": 1}).status_code == 200
    s.wait(lambda st: st["status"] == "done")
    assert s.client.get("/api/labels.json").json() == {"r001_p000": 1, "r001_p001": 0}


def test_preview_draws_from_the_current_model_while_waiting(waiting):
    s = waiting
    s.labelling(1)
    assert s.client.get("/api/preview.png").status_code == 404
    assert s.client.post("/api/preview").status_code == 202
    st = s.wait(lambda st: st["preview"] is not None)
    assert st["preview"]["n"] == 16 and s.client.get("/api/preview.png").content[:4] == b"\x89PNG"


def test_bad_input_fails_in_one_line_before_any_work(tiny, tmp_path):
    ovs = overrides(tiny, tmp_path)
    cfg, run_dir = prepare(MNIST, ovs, None)
    assert run_dir.name.startswith("person_") and cfg.feedback.source == "file" and cfg.feedback.wait
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="a person cannot give"):
        prepare(MNIST, ovs + ["train.algo=ddpo"], None)
    with pytest.raises(ConfigError, match="no config.yaml there"):
        prepare(None, [], str(tmp_path / "nowhere"))
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("task_name: mnist\n")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        prepare(MNIST, ovs, None)
    sock = bind("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="cannot listen"):
        bind("127.0.0.1", sock.getsockname()[1])
    sock.close()


def test_under_torchrun_rank0_serves_and_both_ranks_train_as_one(tiny, tmp_path):
    """`torchrun --nproc_per_node=2 -m papa.serve`: rank 0 serves the page and broadcasts the person's answers, both
    ranks train; the exported labels replayed by papa.train on one process give the same metrics (summed gradients
    in another order: equal up to float rounding, as tests/test_train.py's two-rank test)."""
    import os
    import re
    import subprocess
    import sys

    import httpx
    served_out, replay_out = tmp_path / "served", tmp_path / "replay"
    ovs = overrides(tiny, served_out, 2)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "papa.serve", "--config", MNIST, "--port", "0", "--exit-when-done",
                             *[a for o in ovs for a in ("--set", o)]],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    output = lambda: (tmp_path / "serve.log").read_text()[-2000:]
    try:
        t0 = time.time()
        while not (m := re.search(r"open (http://127\.0\.0\.1:\d+)/\?token=([\w-]+)", output())):
            assert time.time() - t0 < 120 and proc.poll() is None, output()
            time.sleep(0.2)
        url, token = m.groups()
        http = httpx.Client(base_url=url, headers={"X-Papa-Token": token}, timeout=60)
        for r, rule in ((1, lambda i: 1 if i < 2 else -1), (2, lambda i: (0, 1, -1, 1)[i])):
            t0 = time.time()
            while (s := http.get("/api/state").json())["status"] != "labelling" or s["round"] != r:
                assert time.time() - t0 < 300 and proc.poll() is None, s["progress"]
                time.sleep(0.1)
            for i, qid in enumerate(s["ids"]):
                assert http.post("/api/label", json={"round": r, "id": qid, "value": rule(i)}).status_code == 200
            assert http.post("/api/submit", json={"round": r}).status_code == 200
        assert proc.wait(timeout=300) == 0, output()  # --exit-when-done: it goes once the last round is in
    finally:
        if proc.poll() is None:
            proc.kill()
    served_dir = next((served_out / "mnist").glob("person_*"))
    labels = served_dir / "serve" / "labels.json"  # what the export serves
    from papa.train import main
    replay = overrides(tiny, replay_out, 2, ["feedback.source=file", f"feedback.labels_file={labels}",
                                             "train.sample_path=replay"])
    assert main(["--config", MNIST] + [a for o in replay for a in ("--set", o)]) == 0
    assert_same_metrics(metrics(served_dir), metrics(replay_out / "mnist" / "replay"), tol=1e-3)


def test_a_person_is_asked_about_the_selectors_picks_and_their_labels_replay(served, tiny, tmp_path):
    """With a pool, the page shows the k the selector picked (and the budget counts only them); the exported labels
    replay with papa.train, whose selector picks the same images from the same answers, to the same model."""
    pool = ["select.selector=exploit", "select.pool_size=8", "select.ensemble=2"]
    s = served(rounds=2, extra=pool)
    st = s.answer_round(1, rule=lambda i: 1 if i < 2 else -1)
    assert len(st["ids"]) == 4 and st["images"] == 4
    s.answer_round(2, rule=lambda i: (1, -1, 1, 0)[i])
    s.wait(lambda st: st["status"] == "done")
    assert json.loads((s.served.run_dir / "rounds" / "002" / "pool.json").read_text())["fallback"] is None
    labels = tmp_path / "exported.json"
    labels.write_bytes(s.client.get("/api/labels.json").content)
    from papa.train import main
    replay_out = tmp_path / "replay"
    ovs = overrides(tiny, replay_out, 2, [*pool, "feedback.source=file", f"feedback.labels_file={labels}",
                                          "train.sample_path=replay"])
    assert main(["--config", MNIST] + [a for o in ovs for a in ("--set", o)]) == 0
    served_ck = checkpoint.load(s.served.run_dir / "checkpoints" / "round_002.pt")
    replay_ck = checkpoint.load(replay_out / "mnist" / "replay" / "checkpoints" / "round_002.pt")
    assert all(torch.equal(v, replay_ck["model"][k]) for k, v in served_ck["model"].items())


def test_several_people_each_align_their_own_adapter_on_one_server(tiny, tmp_path):
    """`papa.serve --user ann --user bo`: one server, a page, token, round queue and adapter per person; a person's
    token opens only their page; each queue goes at its own person's pace."""
    import os
    import re
    import subprocess
    import sys

    import httpx
    from papa.serve import prepare_people
    ovs = overrides(tiny, tmp_path, rounds=1, extra=["adapter.rank=2", "adapter.alpha=8"])
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "papa.serve", "--config", MNIST, "--port", "0", "--exit-when-done",
                             "--user", "ann", "--user", "bo", "--threads", "1", *[a for o in ovs for a in ("--set", o)]],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    output = lambda: (tmp_path / "serve.log").read_text()[-3000:]  # noqa: E731
    try:
        t0 = time.time()
        while len(found := re.findall(r"(\w+): open (http://127\.0\.0\.1:\d+)/u/\w+/\?token=([\w-]+)", output())) < 2:
            assert time.time() - t0 < 120 and proc.poll() is None, output()
            time.sleep(0.2)
        tokens = {name: tok for name, _, tok in found}
        http = httpx.Client(base_url=found[0][1], timeout=60)
        assert tokens["ann"] != tokens["bo"] and http.get("/").status_code == 404
        assert http.get("/u/ann/api/state", headers={"X-Papa-Token": tokens["bo"]}).status_code == 403
        page = http.get(f"/u/bo/?token={tokens['bo']}")
        assert page.status_code == 200 and 'src="static/app.js"' in page.text   # relative: works under /u/bo/
        assert http.get("/u/bo/static/app.js", headers={"X-Papa-Token": tokens["bo"]}).status_code == 200
        for name in ("bo", "ann"):
            tok = {"X-Papa-Token": tokens[name]}
            t0 = time.time()
            while (s := http.get(f"/u/{name}/api/state", headers=tok).json())["status"] != "labelling":
                assert time.time() - t0 < 300 and proc.poll() is None, output()
                time.sleep(0.1)
            for i, qid in enumerate(s["ids"]):
                assert http.post(f"/u/{name}/api/label", headers=tok,
                                 json={"round": 1, "id": qid, "value": 1 if i % 2 else -1}).status_code == 200
            assert http.post(f"/u/{name}/api/submit", headers=tok, json={"round": 1}).status_code == 200
        assert proc.wait(timeout=300) == 0, output()   # --exit-when-done: once everyone's last round is in
    finally:
        if proc.poll() is None:
            proc.kill()
    root = next((tmp_path / "mnist").iterdir())
    for name in ("ann", "bo"):   # every person's checkpoint holds their adapter alone
        sd = checkpoint.load(root / "users" / name / "checkpoints" / "round_001.pt")["model"]
        assert sd and all("lora_" in k for k in sd)
    from papa.sample import main as sample   # a person's model samples as a population user's does
    assert sample(["--config", str(root / "config.yaml"), "--user", "bo", "--checkpoint", str(root), "--num", "2",
                   "--out", str(tmp_path / "s"), "--quiet", "--set", "sample.batch_size=2"]) == 0
    with pytest.raises(ConfigError, match="adapter.rank must be > 0"):
        prepare_people(MNIST, overrides(tiny, tmp_path / "x", rounds=1), None, ["ann"])
    with pytest.raises(ConfigError, match="'a/b': a name is letters"):
        prepare_people(MNIST, ovs, None, ["a/b"])
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_people(MNIST, ovs, None, ["ann"])
    # a later start continues ann (done) and brings in a newcomer under the run's saved config
    _, _, again = prepare_people(None, [], str(root), ["ann", "cy"])
    assert [n for n, _, _ in again] == ["ann", "cy"] and again[1][1].adapter.rank == 2
