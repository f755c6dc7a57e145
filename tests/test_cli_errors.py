"""The command-line promise, checked on the real entry points (`python -m papa.X` in a child process): bad input ends
with exactly one line on stderr, `error: <what, where, how to fix>`, and exit code 2, before anything is written.

Every case is tiny (random small models, 2 sampling steps, or a failure before any model is built): seconds each."""
import subprocess
import sys

import pytest
import torch

from papa import checkpoint
from papa.models import EvaluatorCNN, OracleCNN, build_unet
from testutil import ROOT

CONFIG = str(ROOT / "configs" / "mnist.yaml")
TINY = ["model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]", "model.time_emb_dim=16"]


def run_cli(module: str, *args: str, cwd, env: dict | None = None, code: str | None = None):
    """`python -m papa.<module> ARGS` (or `python -c CODE ARGS`) in `cwd`, one torch thread, a time limit."""
    import os
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", f"papa.{module}", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_line_error(r, *fragments: str) -> str:
    """Assert exit code 2 and stderr exactly one line `error: …` holding every fragment; return that line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def tree(d) -> dict:
    """Every file and directory under d with its bytes (None for directories): to show nothing was written."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.fixture
def models(tmp_path):
    """Random tiny UNet (the tiny model config), evaluator and oracle checkpoints in tmp_path/ck."""
    from papa.config import load_config
    d = tmp_path / "ck"
    unet = build_unet(load_config(CONFIG, TINY).model)
    checkpoint.atomic_save({"state_dict": unet.state_dict()}, d / "base.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, d / "evaluator.pt")
    checkpoint.atomic_save({"state_dict": OracleCNN(num_classes=11).state_dict()}, d / "oracle.pt")
    sets = TINY + ["diffusion.sample_steps=2", f"checkpoints.base={d / 'base.pt'}",
                   f"checkpoints.evaluator={d / 'evaluator.pt'}", f"checkpoints.oracle={d / 'oracle.pt'}"]
    return d, [a for s in sets for a in ("--set", s)]


# ----------------------------------------------------------------------------- papa.sample


def test_sample_out_under_a_regular_file_fails_before_sampling(tmp_path, models):
    """It used to sample first and die with a traceback when creating the directory."""
    _, sets = models
    (tmp_path / "afile").write_text("a regular file")
    before = tree(tmp_path)
    r = run_cli("sample", "--config", CONFIG, *sets, "--num", "2", "--quiet", "--out", str(tmp_path / "afile" / "x"),
                cwd=tmp_path)
    one_line_error(r, "--out", "is a file, not a directory")
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- papa.evaluate


@pytest.mark.parametrize("num", ["0", "-5", "1"])
def test_evaluate_num_below_two_is_refused_up_front(tmp_path, num):
    """The FID needs two samples; --num 1 used to die in it (LinAlgError) after sampling, 0 and -5 elsewhere."""
    r = run_cli("evaluate", "--config", CONFIG, "--num", num, "--write-manifest", cwd=tmp_path)
    one_line_error(r, "--num must be >= 2", f"got {num}")
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("problem", ["manifest is a directory", "sidecar is not JSON"])
def test_evaluate_write_manifest_problems_are_one_line_before_sampling(tmp_path, models, problem):
    d, sets = models
    if problem == "manifest is a directory":
        (d / "manifest.json").mkdir()
        fragments = ("manifest.json", "not a file")
    else:
        (d / "base.json").write_bytes(b"{not json")
        fragments = ("base.json", "not valid JSON")
    before = tree(tmp_path)
    r = run_cli("evaluate", "--config", CONFIG, *sets, "--num", "2", "--write-manifest", cwd=tmp_path)
    one_line_error(r, "--write-manifest", *fragments)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- papa.data


def test_data_export_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("a regular file")
    r = run_cli("data", "export", "mnist", str(tmp_path / "afile" / "x"), cwd=tmp_path)
    one_line_error(r, "export directory", f"'{tmp_path / 'afile'}' is a file")
    assert tree(tmp_path) == {"afile": b"a regular file"}


def test_data_fetch_with_a_garbage_root_does_not_report_the_cache_as_verified(tmp_path):
    """--root names the data: the cache (verified MNIST wherever the suite has run) must not stand in for it."""
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03 not an idx file")
    r = run_cli("data", "fetch", "mnist", "--root", str(tmp_path / "garbage"), cwd=tmp_path)
    one_line_error(r, f"data directory '{tmp_path / 'garbage'}'", "no verified mnist/train")
    assert "verified" not in r.stdout


def test_data_fetch_with_no_working_source_exits_2(tmp_path):
    """`python -m papa.data fetch` itself (its __main__ block, run by runpy) with an empty cache and the registries
    emptied (no network in a test): exit 2 and the one line listing what was tried, not exit 1."""
    code = ("import runpy, warnings, papa.data; papa.data.REGISTRY_SOURCES.clear(); "
            "warnings.filterwarnings('ignore', \"'papa.data' found in sys.modules\");"  # runpy's, for the re-run
            "runpy.run_module('papa.data', run_name='__main__', alter_sys=True)")
    r = run_cli("data", "fetch", "mnist", cwd=tmp_path, env={"PAPA_CACHE": str(tmp_path / "cache")}, code=code)
    one_line_error(r, "no source could provide verified mnist/train", "cache", "data.root")
    assert tree(tmp_path) == {}


# ----------------------------------------------------------------------------- papa.pretrain


def _pretrain(tmp_path, out, *extra):
    sets = TINY + ["pretrain.steps=1", "pretrain.batch_size=2", "pretrain.warmup_steps=1",
                   f"checkpoints.base={tmp_path / 'base.pt'}"]
    return run_cli("pretrain", "--config", CONFIG, *[a for s in sets for a in ("--set", s)], "--out", str(out),
                   "--device", "cpu", *extra, cwd=tmp_path)


def test_pretrain_refused_resume_leaves_the_run_directory_untouched(tmp_path):
    """A state.pt made with another config is refused before config.yaml is rewritten or log.txt opened."""
    out = tmp_path / "pre"
    out.mkdir()
    (out / "config.yaml").write_text("the earlier run's config\n")
    (out / "log.txt").write_text('{"step": 250}\n')
    checkpoint.atomic_save({"model": {}, "ema": {}, "opt": {}, "gen": torch.Generator().get_state(), "step": 250,
                            "config_hash": "made-with-another-config"}, out / "state.pt")
    before = tree(tmp_path)
    r = _pretrain(tmp_path, out, "--resume")
    one_line_error(r, "state.pt", "another data/model/diffusion/pretrain config", "--resume")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("state", ["a list", "no 'gen'", "step a str"])
def test_pretrain_resume_from_a_state_that_is_not_papas_is_one_line(tmp_path, state):
    out = tmp_path / "pre"
    good = {"model": {}, "ema": {}, "opt": {}, "gen": torch.Generator().get_state(), "step": 3, "config_hash": "x"}
    obj = {"a list": [1, 2, 3], "no 'gen'": {k: v for k, v in good.items() if k != "gen"},
           "step a str": {**good, "step": "3"}}[state]
    checkpoint.atomic_save(obj, out / "state.pt")
    before = tree(tmp_path)
    r = _pretrain(tmp_path, out, "--resume")
    one_line_error(r, f"{out / 'state.pt'}", {"a list": "holds a list", "no 'gen'": "has no 'gen'",
                                             "step a str": "'step' is a str"}[state])
    assert tree(tmp_path) == before


@pytest.mark.parametrize("problem", ["unusable data.root", "--out under a file"])
def test_pretrain_bad_input_creates_no_run_directory(tmp_path, problem):
    """No usable data (an empty data.root, which used to fall back to the cache) or an output path under a regular file:
    one line, and no run directory, config.yaml or log.txt."""
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "empty").mkdir()
    if problem == "unusable data.root":
        out, extra, fragments = tmp_path / "pre", ["--set", f"data.root={tmp_path / 'empty'}"], \
            (f"'{tmp_path / 'empty'}'", "data.root")
    else:
        out, extra, fragments = tmp_path / "afile" / "pre", [], ("--out", "is a file")
    before = tree(tmp_path)
    r = _pretrain(tmp_path, out, *extra)
    one_line_error(r, *fragments)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- papa.compare


def test_compare_binary_config_is_one_line(tmp_path):
    (tmp_path / "compare.yaml").write_bytes(b"\xff\xfe\x00\x89PNG binary\x00\x01")
    r = run_cli("compare", "--config", str(tmp_path / "compare.yaml"), cwd=tmp_path)
    one_line_error(r, "compare.yaml", "not UTF-8")
    assert list(tree(tmp_path)) == ["compare.yaml"]


BASE_SPEC = {"base_config": CONFIG, "seeds": [0], "budget": 300, "methods": {"epapa": {}}}


@pytest.mark.parametrize("change, fragments", [
    ({"seeds": [0, 0]}, ("'seeds'", "distinct integers")),
    ({"seeds": [True]}, ("'seeds'", "[True]")),
    ({"budget": "300"}, ("'budget'", "positive integer", "'300'")),
    ({"methods": {"epapa": ["train.lr=1e-5"]}}, ("'methods.epapa'", "must map config keys", "list")),
    ({"methods": {"epapa": {}, "kto": {"train.algo": "diffusion_kto", "eval.seed": 5}}},
     ("method 'kto'", "eval.seed", "'common'")),
    ({"methods": {"epapa": {}, "other": {"feedback": {"preference": [0, 3]}}}},
     ("method 'other'", "feedback.preference", "[0, 3]")),
])
def test_compare_config_errors_name_the_key(tmp_path, change, fragments):
    """Every compare-config mistake is refused before any work, naming the key (in process: the CLI turns a
    ConfigError into the one-line error of test_compare_binary_config_is_one_line)."""
    import yaml
    from papa.compare import load_compare, plan
    from papa.config import ConfigError
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**BASE_SPEC, **change}))
    with pytest.raises(ConfigError) as e:
        plan(load_compare(tmp_path / "c.yaml"))
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_compare_nested_overrides_set_only_their_keys(tmp_path):
    """`{train: {algo: ddpo}}` means train.algo, not a whole train section of defaults."""
    import yaml
    from papa.compare import load_compare, plan
    from papa.config import load_config
    spec = {**BASE_SPEC, "methods": {"ddpo": {"train": {"algo": "ddpo", "batch_size": 1}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    [(_, _, cfg, _)] = plan(load_compare(tmp_path / "c.yaml"))
    base = load_config(CONFIG)
    assert cfg.train.algo == "ddpo" and cfg.train.batch_size == 1
    assert (cfg.train.lr, cfg.train.ema_decay, cfg.train.rounds) == (base.train.lr, base.train.ema_decay,
                                                                      base.train.rounds)


# ----------------------------------------------------------------------------- papa.rejudge
@pytest.mark.parametrize("problem, fragments", [
    ("not a run", ("has no config.yaml", "run directory")),
    ("no such evaluator", ("--evaluator", "no such file")),
])
def test_rejudge_bad_input_is_one_line(tmp_path, problem, fragments):
    args = [str(tmp_path)] + (["--evaluator", str(tmp_path / "missing.pt")] if problem == "no such evaluator" else [])
    one_line_error(run_cli("rejudge", *args, cwd=tmp_path), *fragments)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_imports_and_explains_itself(script):
    """Each script under scripts/ answers --help (exit 0, a usage line): its imports resolve after a refactor."""
    import os
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-2000:]
