"""The table and summary of docs/results/rejudge_mnist.md, from the JSON that `python -m papa.rejudge … --out FILE`
writes: per run the recorded → new figures of the last evaluation, and over all runs how far the rate and the
rejected rates moved and which bound verdicts changed (the bounds of docs/ALIGNMENT.md, each against the base judged
by the same evaluator).

    .venv/bin/python scripts/rejudge_table.py rejudge.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from papa.config import load_config  # noqa: E402
from papa.evaluation import TARGET_RATE, bounds_met  # noqa: E402

COLUMNS = ("legible_preferred_rate", "rejected_rate"), ("min_liked_share", "precision", "fid_preferred")


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="the --out file of papa.rejudge")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.json).read_text(encoding="utf-8"))
    moved = {k: [r["final"][k] - r["recorded_final"][k] for r in res] for k in ("legible_preferred_rate", "rejected_rate")}
    base_moved = [r["base"]["rejected_rate"] - r["recorded_base"]["rejected_rate"] for r in res]
    flips, inside = Counter(), Counter()
    for r in res:
        cfg = load_config(Path(r["run"]) / "config.yaml")
        old = bounds_met(r["recorded_final"], r["recorded_base"], len(cfg.feedback.preference),
                         TARGET_RATE.get(cfg.data.dataset, 0.9))
        for k, ok in r["bounds"].items():
            if old.get(k) != ok:
                flips[f"{k}: {'met' if old.get(k) else 'failed'} → {'met' if ok else 'failed'}"] += 1
        inside["recorded"] += all(v is not False for v in old.values())
        inside["now"] += all(v is not False for v in r["bounds"].values())
    for k, d in moved.items():
        print(f"{len(res)} runs, final {k}: mean {statistics.mean(d):+.4f}, from {min(d):+.3f} to {max(d):+.3f}")
    print(f"base rejected_rate: mean {statistics.mean(base_moved):+.4f}, from {min(base_moved):+.3f} to "
          f"{max(base_moved):+.3f}")
    print("bound verdicts changed: " + (", ".join(f"{k} ({n})" for k, n in sorted(flips.items())) or "none"))
    print(f"runs inside every bound: {inside['recorded']} recorded → {inside['now']} now\n")
    print("| run (tag / dataset / set and seed) | rate | rejected | base rejected | smallest liked share | precision "
          "| FID | bounds failed (new) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        f, rf, b, rb = r["final"], r["recorded_final"], r["base"], r["recorded_base"]
        cells = [f"{_f(rf[k])} → {_f(f[k])}" for k in COLUMNS[0]]
        cells.append(f"{_f(rb['rejected_rate'])} → {_f(b['rejected_rate'])}")
        cells += [f"{_f(rf.get(k))} → {_f(f.get(k))}" for k in COLUMNS[1]]
        failed = [k for k, ok in r["bounds"].items() if ok is False]
        print(f"| {'/'.join(Path(r['run']).parts[-3:])} | " + " | ".join(cells) + f" | {', '.join(failed) or 'none'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
