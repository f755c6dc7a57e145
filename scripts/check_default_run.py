"""The default run's time check: the default MNIST run with one process and with two, timed, and their metrics compared.

    .venv/bin/python scripts/check_default_run.py [--config configs/mnist.yaml] [--out runs/default_check]
                                                  [--only 1|2] [--set KEY=VALUE ...]

Runs, one after the other (time them on an otherwise idle machine):
  1 process:  python -m papa.train --config C --threads 2              (both cores for one process)
  2 processes: torchrun --standalone --nproc_per_node=2 -m papa.train --config C --threads 1
each into its own directory under --out, then writes `check.md` and `check.json` there: wall seconds of each (limit
900 s), and the final and per-round metrics side by side with their differences. The tolerance is stated, not
tuned: both runs draw the same images from the same seeds, but two ranks all-reduce gradient sums in another order
(float32 rounding, ~1e-7 per step) and 300 optimiser steps with labels that can flip on a changed sample let that
grow, so the final legible preferred rate may differ by up to 0.03 (the rejected rate by 0.02) and the FID by up to 15 %. Exit code 1 if a limit fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 900
TOL = {"legible_preferred_rate": ("abs", 0.03), "rejected_rate": ("abs", 0.02), "fid_preferred": ("rel", 0.15),
       "diversity": ("abs", 0.05)}


def run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    secs = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"error: `{' '.join(cmd)}` failed with exit code {rc}; see {log}")
    return secs


VOLATILE = ("elapsed", "round_seconds", "eval_seconds", "peak_rss_mb", "peak_cuda_mb")


def largest_difference(a: list[dict], b: list[dict]) -> tuple[float, str]:
    """The largest absolute difference of any numeric metric (lists element by element) in any row of two runs'
    metrics.jsonl, wall-time fields aside, and the key it is in."""
    worst = (0.0, "")
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            vb = rb.get(k)
            if k in VOLATILE or isinstance(va, bool) or vb is None:
                continue
            pairs = zip(va, vb) if isinstance(va, list) else [(va, vb)]
            for x, y in pairs:
                if isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) > worst[0]:
                    worst = (abs(x - y), k)
    return worst


def all_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_rows(run_dir: Path) -> list[dict]:
    """The run's evaluation rows (round 0 … the last), in order."""
    return [r for r in all_rows(run_dir) if "preferred_rate" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mnist.yaml")
    ap.add_argument("--out", default="runs/default_check")
    ap.add_argument("--only", choices=["1", "2"], default=None, help="run only this process count (reuse the other)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    torchrun = str(Path(py).with_name("torchrun"))
    sets = [a for kv in args.overrides for a in ("--set", kv)]
    common = ["-m", "papa.train", "--config", args.config, "--overwrite", *sets]
    plans = {
        "1": [py, *common, "--set", f"train.output_dir={out / 'p1'}", "--threads", "2"],
        "2": [torchrun, "--standalone", "--nproc_per_node=2", *common, "--set", f"train.output_dir={out / 'p2'}",
              "--threads", "1"],
    }
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for n, cmd in plans.items():
        if args.only and n != args.only:
            continue
        shown = ["python" if n == "1" else "torchrun", *cmd[1:]]
        times[n] = {"seconds": round(run(cmd, out / f"p{n}.log"), 1), "command": " ".join(shown),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
        times_path.write_text(json.dumps(times, indent=2))
    if set(times) != {"1", "2"}:
        print("only one run so far; rerun without --only to compare")
        return 0
    runs = {n: next((out / f"p{n}").glob("*/*/metrics.jsonl")).parent for n in ("1", "2")}
    m = {n: eval_rows(d) for n, d in runs.items()}
    ok = all(t["seconds"] <= LIMIT_S for t in times.values())
    lines = ["# Default MNIST run: one process against two", "",
             f"Config `{args.config}` {' '.join(args.overrides)}; wall-time limit {LIMIT_S} s each.", "",
             "| | 1 process | 2 processes | difference | tolerance |", "|---|---|---|---|---|",
             f"| wall seconds | {times['1']['seconds']} | {times['2']['seconds']} | | ≤ {LIMIT_S} each |"]
    a, b = m["1"][-1], m["2"][-1]
    result = {"times": times, "final": {"1": a, "2": b}, "within": {}}
    for key, (kind, tol) in TOL.items():
        d = abs(a[key] - b[key]) if kind == "abs" else abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
        within = d <= tol or (a[key] != a[key] and b[key] != b[key])  # NaN on both (no preferred sample) agrees
        ok &= within
        result["within"][key] = within
        lines.append(f"| final {key} | {a[key]:.4f} | {b[key]:.4f} | {d:.4f}{' (rel)' if kind == 'rel' else ''} | "
                     f"≤ {tol} {'ok' if within else 'EXCEEDED'} |")
    diff, key = largest_difference(all_rows(runs["1"]), all_rows(runs["2"]))
    result["largest_difference"] = {"value": diff, "key": key}
    lines += ["", f"Largest difference of any metric in any round (losses included, wall times aside): {diff:.2g} "
              f"({key or 'none'}).",
              "", "Per evaluation (labels used: rate 1-process / 2-process, FID 1-process / 2-process):", ""]
    for r1, r2 in zip(m["1"], m["2"]):
        lines.append(f"- {r1.get('labels_used', '?')}: legible preferred rate {r1['legible_preferred_rate']:.3f} / "
                     f"{r2['legible_preferred_rate']:.3f}, "
                     f"FID {r1['fid_preferred']:.2f} / {r2['fid_preferred']:.2f}")
    lines += ["", f"Result: {'PASS' if ok else 'FAIL'}. Commands: `{times['1']['command']}` and "
              f"`{times['2']['command']}` ({times['1']['date']}, {times['1']['cpus']} CPUs)."]
    (out / "check.md").write_text("\n".join(lines) + "\n")
    (out / "check.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
