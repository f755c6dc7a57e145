"""Every method side by side on equal terms: `python -m papa.compare --config configs/compare_mnist.yaml`.

Runs each method of the compare config (PAPA, ePAPA, Diffusion-KTO, D3PO, Diffusion-DPO, DDPO, SDPO) for every seed
with the same base model, evaluator, evaluation seed and feedback budget (labels, pairs or reward queries: checked
before anything runs), then writes `<output_dir>/<task>/compare.md` (final legible preferred rate, rejected rate,
smallest liked share, precision, recall, diversity, FID, KL to the base, feedback used, training and wall time, peak
memory: mean ± std over seeds; the seeds meeting each bound of docs/ALIGNMENT.md; each method's diagnostics),
`compare.png` (rate and FID against feedback used, per method), `compare_grids.png` (the base's evaluation samples
beside each method's final ones) and `compare.json` (every run's summary). Finished runs are reused, interrupted ones
resumed (`papa.train --resume`), so rerunning the command continues where it stopped.

On one process, runs are launched as `python -m papa.train` children, `--jobs` at a time (each with
`--threads` torch threads), so each child's peak RSS is its own. Under `torchrun --nproc_per_node=N -m papa.compare`
every run uses all N ranks, one run after another, in this process.

Compare config (YAML):
    base_config: configs/mnist.yaml        # every run starts from it
    output_dir: runs/compare
    seeds: [0, 1, 2]
    budget: 300                            # feedback units per run: rounds × queries per round must equal it
    target: 0.9                            # the rate bound (MNIST 0.90, Fashion-MNIST 0.85)
    common: {eval.every: 10}               # overrides for every method
    methods: {epapa: {}, d3po: {train.algo: d3po}, ...}   # name -> overrides
    records: docs/results/compare_mnist    # optional: each finished run's small files are copied here (config,
                                           # metrics, summary, grids), and a run found here is restored, not rerun;
                                           # once every run is finished, the report (compare.md, .png, _grids.png,
                                           # .json) is copied here too
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from papa.algos import METHODS
from papa.cli import run_main
from papa.config import Config, ConfigError, load_config, to_dict
from papa.evaluation import (BOUNDS, FID_MAX, PRECISION_MIN, QUALITY_BOUNDS, REJECT_MAX, SHARE_BOUNDS,
                             bounds_met, within)



def diagnostic_keys() -> tuple[str, ...]:
    """Every method's declared diagnostics, and the round reward of the reward methods."""
    from papa.algos import METHODS
    keys = [k for cls in METHODS.values() for k in cls.diagnostics]
    # the selectors' (papa.select): the preference model's foresight of the answers, and the pool's sampling cost
    return tuple(dict.fromkeys(keys + ["round_reward", "pref_acc", "pref_brier", "pool_seconds"]))
HEADLINE = [("legible_preferred_rate", "legible preferred rate", "{:.3f}"), ("rejected_rate", "rejected", "{:.3f}"),
            ("min_liked_share", "smallest liked share", "{:.3f}"), ("precision", "precision", "{:.3f}"),
            ("recall", "recall", "{:.3f}"), ("diversity", "diversity", "{:.3f}"),
            ("fid_preferred", "FID (preferred)", "{:.2f}"), ("kl_to_base", "KL to base", "{:.3f}")]


def load_compare(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"compare config '{path}' not found; pass e.g. configs/compare_mnist.yaml")
    try:  # read as UTF-8 whatever the locale: YAML is UTF-8, and a binary file must be an error, not a traceback
        spec = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"compare config '{path}' is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                          "pass a YAML file such as configs/compare_mnist.yaml") from None
    except OSError as e:
        raise ConfigError(f"compare config '{path}' cannot be read ({e.strerror or type(e).__name__}); check its "
                          "permissions") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"compare config '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"compare config '{path}' must be a YAML mapping (base_config: …, seeds: …), got a "
                          f"{type(spec).__name__}")
    known = {"base_config", "output_dir", "seeds", "budget", "common", "methods", "target", "records"}
    for k in spec:
        if k not in known:
            raise ConfigError(f"unknown compare config key '{k}' in {path}; valid keys: {', '.join(sorted(known))}")
    for k in ("base_config", "seeds", "budget", "methods"):
        if k not in spec:
            raise ConfigError(f"compare config '{path}' needs the key '{k}'")
    seeds = spec["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"compare config key 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    b = spec["budget"]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ConfigError(f"compare config key 'budget' must be a positive integer (feedback units per run), got {b!r}")
    if not isinstance(spec["methods"], dict) or not spec["methods"]:
        raise ConfigError("compare config key 'methods' must map method names to overrides")
    for where, ov in [("common", spec.get("common")), *((f"methods.{m}", o) for m, o in spec["methods"].items())]:
        if ov is not None and not isinstance(ov, dict):
            raise ConfigError(f"compare config key '{where}' must map config keys to values (e.g. {{train.lr: 1.0e-5}}"
                              f"), got a {type(ov).__name__}")
    spec.setdefault("output_dir", "runs/compare")
    spec.setdefault("target", 0.9)
    if isinstance(spec["target"], bool) or not isinstance(spec["target"], (int, float)) or not 0 < spec["target"] <= 1:
        raise ConfigError(f"compare config key 'target' must be a rate in (0, 1], got {spec['target']!r}")
    spec.setdefault("common", {})
    if spec.get("records") is not None and not isinstance(spec["records"], str):
        raise ConfigError(f"compare config key 'records' must be a directory path, got {spec['records']!r}")
    return spec


def _dotted(ov: dict | None, prefix: str = "") -> dict:
    """Overrides with nested sections spelled out ({train: {lr: 1e-5}} -> {train.lr: 1e-5}): a nested section sets
    only the keys it names, never the whole section."""
    out = {}
    for k, v in (ov or {}).items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def overrides_for(spec: dict, method: str, seed: int) -> list[str]:
    ov = {**_dotted(spec["common"]), **_dotted(spec["methods"][method])}
    ov.update({"train.seed": seed, "train.output_dir": spec["output_dir"], "train.sample_path": f"{method}_seed{seed}"})
    return [f"{k}={json.dumps(v)}" for k, v in ov.items()]


def plan(spec: dict) -> list[tuple[str, int, Config, list[str]]]:
    """Every (method, seed) run with its validated config, seed by seed; the budget is checked for each method."""
    runs = []
    for seed in spec["seeds"]:  # seed-major: an interrupted comparison still covers every method
        for method in spec["methods"]:
            ov = overrides_for(spec, method, seed)
            try:
                cfg = load_config(spec["base_config"], ov)
            except ConfigError as e:
                raise ConfigError(f"compare method '{method}': {e}") from None
            t = cfg.train
            per_unit = METHODS[t.algo].queries_per_unit
            used = t.rounds * t.samples_per_round * per_unit
            if used != spec["budget"]:
                raise ConfigError(f"compare method '{method}' uses {used} feedback units (train.rounds {t.rounds} × "
                                  f"samples_per_round {t.samples_per_round} × {per_unit} per "
                                  f"unit), not the budget {spec['budget']}; change its rounds or samples_per_round")
            runs.append((method, seed, cfg, ov))
            first = runs[0][2]
            for key in EQUAL_TERMS:
                mine, theirs = _get(cfg, key), _get(first, key)
                if mine != theirs:
                    raise ConfigError(f"compare method '{method}' sets {key} to {mine!r}, but '{runs[0][0]}' has "
                                      f"{theirs!r}; every method must share it (set it under 'common')")
    return runs


# what every run of a comparison must share, or the report's "on equal terms" would not hold
EQUAL_TERMS = ("task_name", "data.dataset", "feedback.preference", "checkpoints.base", "checkpoints.evaluator",
               "eval.seed", "eval.final_num")


def _get(cfg: Config, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.task_name / cfg.train.sample_path


def read_metrics(d: Path) -> list[dict]:
    f = d / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


LOCATION_KEYS = ("train.output_dir", "train.sample_path")


def config_changes(cfg: Config, saved: Path | None = None) -> list[str]:
    """Keys in which the run directory's saved config (or `saved`) differs from the planned one (location keys
    aside)."""
    saved = saved or run_dir(cfg) / "config.yaml"
    if not saved.is_file():
        return []
    from papa.train import _diff
    try:
        old = to_dict(load_config(saved))  # through the dataclasses: keys added since then take their defaults
    except ConfigError:
        return ["config.yaml (no longer a valid config)"]
    return [k for k in _diff(old, to_dict(cfg)) if k not in LOCATION_KEYS]


def finished(cfg: Config) -> bool:
    """Finished with the planned config: reusable as it is."""
    rows = read_metrics(run_dir(cfg))
    return (bool(rows) and rows[-1]["round"] == cfg.train.rounds and (run_dir(cfg) / "summary.md").is_file()
            and not config_changes(cfg))


# A run's record: the few small files its report needs (config, metrics, summary; for the first seed also the base's
# and the final evaluation grids), kept under the compare config's `records` directory, so that a comparison too long
# for one sitting can be committed run by run and finished on another machine. Checkpoints are not kept: a recorded
# run is finished.
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.md")
REPORT_FILES = ("compare.md", "compare.png", "compare_grids.png", "compare.json")  # also kept under `records`


def record_dir(spec: dict, cfg: Config) -> Path:
    return Path(spec["records"]) / cfg.task_name / cfg.train.sample_path


def first_last_grids(rows: list[dict]) -> tuple[str, str] | None:
    """A run's first and last evaluation grids, relative to its directory (None before any evaluation)."""
    evals = [r for r in rows if "preferred_rate" in r]
    return tuple(f"rounds/{r['round']:03d}/eval_grid.png" for r in (evals[0], evals[-1])) if evals else None


def _record_grids(spec: dict, cfg: Config, rows: list[dict]) -> list[str]:
    """The grids a record keeps: the first and last evaluation's, of the first seed's run (the report shows those)."""
    grids = first_last_grids(rows)
    return sorted(set(grids)) if grids and cfg.train.seed == spec["seeds"][0] else []


def save_record(spec: dict, cfg: Config) -> None:
    """Copy a finished run's record to `records` (atomically, file by file; the metrics last, which marks it)."""
    from papa.checkpoint import atomic_write_bytes
    src, dst = run_dir(cfg), record_dir(spec, cfg)
    names = [n for n in _record_grids(spec, cfg, read_metrics(src)) if (src / n).is_file()] + list(RECORD_FILES)
    if all((dst / n).is_file() and (dst / n).read_bytes() == (src / n).read_bytes() for n in names):
        return
    (dst / "metrics.jsonl").unlink(missing_ok=True)    # an interrupted update must not leave old metrics as finished
    for old in dst.glob("rounds/*/eval_grid.png"):
        if str(old.relative_to(dst)) not in names:
            old.unlink()
    for n in sorted(names, key=lambda n: n == "metrics.jsonl"):
        atomic_write_bytes(dst / n, (src / n).read_bytes())


def restore_record(spec: dict, cfg: Config) -> bool:
    """Bring a recorded run back, when it was made with the planned config, into a run directory that holds no
    metrics yet, or only a run that would be rerun anyway (unfinished with nothing to resume, or made with another
    config); True when restored."""
    from papa.checkpoint import atomic_write_bytes
    from papa.rundir import clear_run
    src, dst = record_dir(spec, cfg), run_dir(cfg)
    if not all((src / n).is_file() for n in RECORD_FILES) or config_changes(cfg, src / "config.yaml"):
        return False
    if (dst / "metrics.jsonl").is_file():
        if finished(cfg) or start_mode(cfg, say=False) == "resume" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a finished run is reused as it is, an interrupted one of this config resumed; under torchrun every
            # rank restores, and clearing is not idempotent as the copies are, so a stale run there is rerun
            return False
        clear_run(dst)  # the stale run's files go, so none of them can pass for the record's
    # the metrics last: with them the run counts as finished (every rank under torchrun restores alike)
    for n in sorted([*_record_grids(spec, cfg, read_metrics(src)), *RECORD_FILES],
                    key=lambda n: n == "metrics.jsonl"):
        if (src / n).is_file():
            atomic_write_bytes(dst / n, (src / n).read_bytes())
    return True


def start_mode(cfg: Config, say: bool = True) -> str:
    """How a planned run starts: 'resume' (an interrupted run of this config), 'overwrite' (a directory made with
    another config, or one without checkpoints: its old files go, so they can never pass as this run's) or 'fresh'."""
    d = run_dir(cfg)
    changed = config_changes(cfg)
    if changed:  # made with another config (e.g. the default changed): start it afresh
        if say:
            print(f"[compare] {d} was made with another config ({', '.join(changed)}); rerunning it", flush=True)
        return "overwrite"
    if (d / "checkpoints").is_dir() and any((d / "checkpoints").glob("round_*.pt")):
        return "resume"
    return "overwrite" if d.exists() else "fresh"


def train_args(spec: dict, cfg: Config, ov: list[str], threads: int) -> list[str]:
    args = ["--config", spec["base_config"], "--threads", str(threads)]
    for o in ov:
        args += ["--set", o]
    mode = start_mode(cfg)
    # --force on resume: start_mode has found every config value equal to the run's, so a checkpoint whose config
    # hash differs was written before papa gained a key (it takes its default), not under another config
    return args + (["--resume", str(run_dir(cfg)), "--force"] if mode == "resume" else
                   ["--overwrite"] if mode == "overwrite" else [])


def run_children(spec: dict, todo: list, jobs: int, threads: int, log_dir: Path) -> list[str]:
    """Launch `python -m papa.train` children, `jobs` at a time; returns failures."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(todo), {}, []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while pending or running:
        while pending and len(running) < jobs:
            method, seed, cfg, ov = pending.pop(0)
            log = open(log_dir / f"{method}_seed{seed}.log", "a")
            p = subprocess.Popen([sys.executable, "-m", "papa.train", *train_args(spec, cfg, ov, threads)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
            running[p.pid] = (p, log, method, seed, time.time(), cfg)
            print(f"[compare] started {method} seed {seed} (log {log.name})", flush=True)
        pid, status, _ = os.wait4(-1, 0)
        if pid not in running:
            continue
        p, log, method, seed, t0, cfg = running.pop(pid)
        log.close()
        code = os.waitstatus_to_exitcode(status)
        print(f"[compare] {method} seed {seed}: {'done' if code == 0 else f'FAILED (exit {code})'} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if code == 0 and spec.get("records") and finished(cfg):
            save_record(spec, cfg)  # at once: a comparison stopped later keeps every run finished so far
        if code != 0:
            failed.append(f"{method} seed {seed} (exit {code}, log {log_dir / f'{method}_seed{seed}.log'})")
    return failed


def run_in_process(spec: dict, todo: list) -> None:
    """Under torchrun: every run on all ranks, one after another."""
    from papa import dist
    from papa.engine import Engine
    rank, world, device = dist.init()
    ok = False
    try:
        for method, seed, cfg, ov in todo:
            d = run_dir(cfg)
            mode = start_mode(cfg, say=rank == 0)  # every rank decides before rank 0 changes anything
            dist.barrier(world)
            if rank == 0:
                print(f"[compare] {method} seed {seed} on {world} ranks", flush=True)
            # the engine clears an overwritten directory on rank 0 under its lock, then every rank waits for it
            Engine.from_config(cfg, d, rank, world, device).run(resume=mode == "resume", force=mode == "resume",
                                                                overwrite=mode == "overwrite")
            dist.barrier(world)
            if rank == 0 and spec.get("records") and finished(cfg):
                save_record(spec, cfg)
        ok = True
    finally:
        dist.teardown(world, ok)  # after a failure no barrier: it would wait for ranks that are failing too


# ----------------------------------------------------------------------------- the report


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    return m, (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0


def _fmt(ms: tuple[float, float], f: str) -> str:
    return "n/a" if math.isnan(ms[0]) else f"{f.format(ms[0])} ± {f.format(ms[1])}"


def _rate(row: dict) -> float:
    """The headline: the legible preferred rate (runs judged before the reject option: the argmax preferred rate)."""
    return row.get("legible_preferred_rate", row["preferred_rate"])


def labels_to(curve: list[tuple[int, float]], target: float) -> float:
    """The feedback used when the rate curve first reaches `target`, linearly interpolated between the two evaluations
    around the crossing; nan when it never does."""
    if curve and curve[0][1] >= target:
        return float(curve[0][0])
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return math.nan


def summarize_run(rows: list[dict], target: float = 0.9, n_liked: int = 1) -> dict:
    evals = [r for r in rows if "preferred_rate" in r]
    final = evals[-1]
    out = {k: final.get(k, math.nan) for k, _, _ in HEADLINE}
    out["bounds"] = bounds_met(final, evals[0], n_liked, target)  # against the run's own round 0 (the base)
    out["legible_preferred_rate"] = _rate(final)
    out["labels_used"] = final["labels_used"]
    out["wall_s"] = final.get("elapsed", 0.0)
    out["train_s"] = sum(r.get("round_seconds", 0.0) - r.get("eval_seconds", 0.0) for r in rows if r["round"] > 0)
    out["peak_rss_mb"] = max((r.get("peak_rss_mb", 0.0) for r in rows), default=math.nan)
    out["curve"] = [(r["labels_used"], _rate(r)) for r in evals]
    out["fid_curve"] = [(r["labels_used"], r["fid_preferred"]) for r in evals]
    out["labels_to_target"] = labels_to(out["curve"], target)
    for k in diagnostic_keys():
        vals = [r[k] for r in rows if k in r and not (isinstance(r[k], float) and math.isnan(r[k]))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def _mean(res: list[dict], key: str) -> float:
    return _mean_std([r[key] for r in res])[0]


def _finite(x):
    """x with every non-finite float as None: compare.json is strict JSON (NaN is not), for jq and browsers alike."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def report(spec: dict, runs: list, command: str) -> tuple[Path, Path]:
    """compare.md (the table, the bounds each method meets, diagnostics, the verdicts), compare.png (rate and FID
    against feedback) and compare_grids.png (the base's evaluation samples beside each method's final ones)."""
    by_method: dict[str, list[dict]] = {}
    dirs: dict[str, Path] = {}
    task = runs[0][2].task_name
    preference = runs[0][2].feedback.preference
    for method, seed, cfg, _ in runs:
        rows = read_metrics(run_dir(cfg))
        if rows and finished(cfg):
            by_method.setdefault(method, []).append(summarize_run(rows, spec["target"], len(preference)))
            dirs.setdefault(method, run_dir(cfg))   # the first seed's run: its grids
    out_dir = Path(spec["output_dir"]) / task
    lines = [f"# Comparison: {task}, preference {preference}", "",
             f"Command: `{command}`; {time.strftime('%Y-%m-%d')}; device: {device_name()}.",
             f"Every method: the same base model, evaluator and evaluation seed, a budget of {spec['budget']} "
             f"feedback units (labels, pair choices, or reward queries), seeds {spec['seeds']}. Final evaluation on "
             f"{runs[0][2].eval.final_num} fixed-seed samples judged by the evaluator; mean ± std over seeds.", "",
             "| method | runs | " + " | ".join(h for _, h, _ in HEADLINE) + f" | feedback to {spec['target']:.2f} | "
             "feedback used | training s | wall s | s per label | peak RSS MB |", "|---" * (len(HEADLINE) + 8) + "|"]
    for method, res in by_method.items():
        cells = [_fmt(_mean_std([r[k] for r in res]), f) for k, _, f in HEADLINE]
        reached = [r["labels_to_target"] for r in res if not math.isnan(r["labels_to_target"])]
        cells.append(f"{_fmt(_mean_std(reached), '{:.0f}')} ({len(reached)}/{len(res)} reached)")
        per_label = _mean_std([r["train_s"] / max(1, r["labels_used"]) for r in res])
        lines.append(f"| {method} | {len(res)} | " + " | ".join(cells) +
                     f" | {res[0]['labels_used']} | {_fmt(_mean_std([r['train_s'] for r in res]), '{:.0f}')} | "
                     f"{_fmt(_mean_std([r['wall_s'] for r in res]), '{:.0f}')} | {_fmt(per_label, '{:.2f}')} | "
                     f"{_fmt(_mean_std([r['peak_rss_mb'] for r in res]), '{:.0f}')} |")
    base = next((read_metrics(run_dir(c)) for _, _, c, _ in runs if finished(c)), [])  # round 0 of a finished run
    if base:
        b = base[0]
        lines += ["", f"Base model (round 0): legible preferred rate {_rate(b):.3f}, rejected "
                      f"{b.get('rejected_rate', math.nan):.3f}, smallest liked share "
                      f"{b.get('min_liked_share', math.nan):.3f}, precision {b.get('precision', math.nan):.3f}, "
                      f"recall {b.get('recall', math.nan):.3f}, FID (preferred) {b['fid_preferred']:.2f}, "
                      f"diversity {b['diversity']:.3f}."]
    if by_method:
        lines += ["", f"Bounds (docs/ALIGNMENT.md), seeds meeting each on the final evaluation: rate ≥ "
                      f"{spec['target']:.2f}; every liked class ≥ half its fair share ({0.5 / len(preference):.3f}); "
                      f"rejected ≤ {REJECT_MAX}× the base's; precision ≥ {PRECISION_MIN}× the base's; FID ≤ "
                      f"{FID_MAX}× the base's.", "",
                  "| method | rate | liked | rejected | precision | FID | quality (rejected, precision, FID) | "
                  "quality and liked | every bound |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, res in by_method.items():
            n = len(res)
            count = lambda keys: sum(within(r["bounds"], keys) for r in res)
            cell = lambda k: "n/a" if all(r["bounds"][k] is None for r in res) else f"{count([k])}/{n}"
            lines.append(f"| {method} | " + " | ".join(cell(k) for k in BOUNDS) +
                         f" | {count(QUALITY_BOUNDS)}/{n} | {count(SHARE_BOUNDS)}/{n} | {count(BOUNDS)}/{n} |")
        lines.append("(n/a: the metric is not in these runs' evaluations, e.g. no rejected rate from an argmax-only "
                     "evaluator; a bound that does not apply counts as met.)")
    diag = []
    for method, res in by_method.items():
        parts = [f"{k.replace('_', ' ')} {_fmt(_mean_std([r.get(k, math.nan) for r in res]), '{:.3g}')}"
                 for k in diagnostic_keys() if k in res[0]]
        if parts:
            diag.append(f"- {method}: " + ", ".join(parts) + " (mean over rounds)")
    if diag:
        lines += ["", "Diagnostics:", *diag]
    complete = {m: res for m, res in by_method.items() if len(res) == len(spec["seeds"])}
    if complete:  # every verdict counts only the methods with every seed finished
        best = max(complete, key=lambda m: _mean(complete[m], "legible_preferred_rate"))
        fast = min(complete, key=lambda m: _mean_std([r["train_s"] / max(1, r["labels_used"])
                                                      for r in complete[m]])[0])
        lines += ["", f"Highest final legible preferred rate at this budget, quality aside: **{best}**. "
                      f"Fastest per label (training seconds per feedback unit, evaluation excluded): **{fast}**."]
        for keys, what in ((QUALITY_BOUNDS, "the quality bounds (rejected, precision, FID)"),
                           (SHARE_BOUNDS, "the quality bounds with every liked class at half its fair share")):
            ok = [m for m, res in complete.items() if all(within(r["bounds"], keys) for r in res)]
            # a method that stays inside the bounds by not moving has learnt nothing: it must beat the base's rate
            moved = [m for m in ok if not base or _mean(complete[m], "legible_preferred_rate") > _rate(base[0])]
            base_note = f", base {_rate(base[0]):.3f}" if base else ""
            if moved:
                kept = max(moved, key=lambda m: _mean(complete[m], "legible_preferred_rate"))
                lines.append(f"Most label-efficient within {what}, by the highest mean rate at equal feedback among "
                             f"the methods inside them on every seed: **{kept}** "
                             f"({_mean(complete[kept], 'legible_preferred_rate'):.3f}{base_note}; inside on every "
                             f"seed: {', '.join(ok)}).")
            elif ok:
                lines.append(f"No method inside {what} on every seed ({', '.join(ok)}) raised the rate above the "
                             f"base's{base_note}.")
            else:
                lines.append(f"No method kept every seed within {what}.")
    if len(complete) < len(by_method):
        lines += ([] if complete else [""]) + ["Not in any verdict, for want of seeds: "
                                               f"{', '.join(m for m in by_method if m not in complete)}."]
    missing = [f"{m} seed {s}" for m, s, c, _ in runs if not finished(c)]
    if missing:
        lines += ["", f"Not finished (excluded): {', '.join(missing)}."]
    lines += ["", "KL to base: the mean per-step KL(p_θ ‖ p_base) of the sampling chain on a fixed probe of noised test "
                  "images (nats per pixel); wall time includes evaluation, training time excludes it; peak RSS is each "
                  "run's process (CPU). Feedback to the target: interpolated between evaluations, averaged over the "
                  "seeds that reached it.", ""]
    from papa.checkpoint import atomic_write_bytes, atomic_write_text
    png = out_dir / "compare.png"
    atomic_write_bytes(png, plot(by_method, task, spec["budget"]))
    grids = grid_figure(dirs, f"{task} {preference}")
    if grids is not None:
        atomic_write_bytes(out_dir / "compare_grids.png", grids)
        lines += ["![the base's samples beside each method's](compare_grids.png)", ""]
    else:  # no grids to show: an older figure must not pass for this report's
        (out_dir / "compare_grids.png").unlink(missing_ok=True)
    md = out_dir / "compare.md"
    atomic_write_text(md, "\n".join(lines))
    atomic_write_text(out_dir / "compare.json", json.dumps(_finite(
        {"preference": preference, "budget": spec["budget"], "target": spec["target"], "seeds": spec["seeds"],
         "base": {k: base[0].get(k) for k in ("legible_preferred_rate", "rejected_rate", "min_liked_share",
                                              "precision", "recall", "fid_preferred", "diversity")} if base else None,
         "methods": by_method}), indent=1, default=str, allow_nan=False))
    return md, png


def grid_figure(dirs: dict[str, Path], title: str) -> bytes | None:
    """The base's evaluation grid (round 0) beside each method's final one (its first seed's run), one figure."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    panels = []
    for method, d in dirs.items():
        rows = read_metrics(d)
        first, last = (d / g for g in first_last_grids(rows))
        if not (first.is_file() and last.is_file()):
            continue
        if not panels:
            panels.append(("base (round 0)", first))
        panels.append((f"{method}, {rows[-1]['labels_used']} units, {d.name.rsplit('_', 1)[-1]}", last))
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, path) in zip(axes.flat, panels):
        ax.imshow(mpimg.imread(path), cmap="gray")
        ax.set_title(name, fontsize=8)
    fig.suptitle(f"{title}: the first evaluation samples (fixed seed), base and each method at the end", fontsize=9)
    fig.tight_layout(h_pad=1.5)  # room for each row's titles above its grids
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot(by_method: dict, task: str, budget: int) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, res in by_method.items():
        for a, key in ((ax, "curve"), (ax2, "fid_curve")):
            xs = [x for x, _ in res[0][key]]
            curves = [[y for _, y in r[key]] for r in res if len(r[key]) == len(xs)]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(xs))]
            std = [_mean_std([c[i] for c in curves])[1] for i in range(len(xs))]
            line, = a.plot(xs, mean, marker="o", label=f"{method} (n={len(curves)})")
            a.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                           color=line.get_color(), alpha=0.15)
    for a in (ax, ax2):
        a.set_xlabel("feedback used (labels, pair choices or reward queries)")
        a.set_xlim(0, budget)
        a.grid(alpha=0.3)
    ax.set_ylabel("legible preferred rate (evaluator)")
    ax.set_ylim(0, 1.02)
    if by_method:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center")
    ax.set_title(f"{task}: legible preferred rate, mean ± std over seeds", fontsize=10)
    ax2.set_ylabel("FID of preferred-class samples (evaluator features)")
    ax2.set_yscale("log")
    ax2.set_title("quality: FID against real test images of the preferred classes\n(the points between the first "
                  "and the last use eval.num samples,\nso their FID reads high)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def device_name() -> str:
    import platform

    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.compare", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default="configs/compare_mnist.yaml", help="compare config (YAML)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once on one process (children)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: cores / jobs)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these methods (the report covers all)")
    ap.add_argument("--report-only", action="store_true", help="write compare.md/png from finished runs, run nothing")
    ap.add_argument("--no-restore", action="store_true",
                    help="do not restore runs from the config's `records`: rerun every run not in output_dir")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    spec = load_compare(args.config)
    runs = plan(spec)  # validates every run before any work
    if args.only:
        unknown = [m for m in args.only if m not in spec["methods"]]
        if unknown:
            raise ConfigError(f"--only {' '.join(unknown)}: not in the compare config's methods "
                              f"({', '.join(spec['methods'])})")
    if spec.get("records") and not args.no_restore:
        restored = [f"{m} seed {sd}" for m, sd, c, _ in runs if restore_record(spec, c)]
        if restored and int(os.environ.get("RANK", "0")) == 0:
            print(f"[compare] restored from {spec['records']}: {', '.join(restored)}", flush=True)
    todo = [r for r in runs if not finished(r[2]) and (not args.only or r[0] in args.only)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    command = f"python -m papa.compare --config {args.config}"  # what produces these runs (flags only schedule them)
    failed = []
    done = sum(finished(r[2]) for r in runs)
    print(f"[compare] {len(runs)} runs planned, {done} finished and reused, "
          f"{0 if args.report_only else len(todo)} to run", flush=True)
    if not args.report_only and todo:
        if world > 1:
            run_in_process(spec, todo)
        else:
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
            failed = run_children(spec, todo, args.jobs, threads, Path(spec["output_dir"]) / runs[0][2].task_name /
                                  "logs")
            if failed:
                print("[compare] failed: " + "; ".join(failed), file=sys.stderr)
    if int(os.environ.get("RANK", "0")) == 0:
        if spec.get("records"):
            for _, _, c, _ in runs:
                if finished(c):
                    save_record(spec, c)
        md, png = report(spec, runs, command)
        print(f"[compare] wrote {md} and {png}")
        if spec.get("records") and all(finished(c) for _, _, c, _ in runs):
            # the whole report beside the records, so that a clone shows it as it was made (a partial one is not
            # kept: the records' report always covers every planned run)
            from papa.checkpoint import atomic_write_bytes
            for name in REPORT_FILES:
                if (md.parent / name).is_file():
                    atomic_write_bytes(Path(spec["records"]) / name, (md.parent / name).read_bytes())
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
