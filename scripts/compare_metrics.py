"""Compare two runs' metrics.jsonl, evaluation by evaluation: `python scripts/compare_metrics.py RUN_A RUN_B`.

Prints the largest absolute difference of every numeric key the two runs share (timings and memory left out) and
exits 1 unless every shared evaluation number is equal. Used to show that a change of code leaves a run's numbers as
they were (the same seeds, threads and machine)."""
import argparse
import json
import sys
from pathlib import Path

VOLATILE = ("elapsed", "round_seconds", "eval_seconds", "peak_rss_mb", "peak_cuda_mb", "eval_cached")


def rows(run: str) -> list[dict]:
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        print(f"error: {f} does not exist; give two run directories (each holding a metrics.jsonl)", file=sys.stderr)
        sys.exit(2)
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    args = ap.parse_args()
    a, b = rows(args.run_a), rows(args.run_b)
    if [r["round"] for r in a] != [r["round"] for r in b]:
        print(f"different rounds: {[r['round'] for r in a]} vs {[r['round'] for r in b]}")
        return 1
    worst, n = {}, 0
    for ra, rb in zip(a, b):
        for k in sorted(set(ra) & set(rb) - set(VOLATILE)):
            va, vb = ra[k], rb[k]
            flat = lambda v: v if isinstance(v, list) else [v]
            for x, y in zip(flat(va), flat(vb)):
                if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                    n += 1
                    d = abs(x - y) if x == x or y == y else 0.0
                    worst[k] = max(worst.get(k, 0.0), d)
    for k, d in worst.items():
        print(f"{k:28s} max |diff| {d:.3g}")
    only = sorted(set().union(*b) - set().union(*a))
    print(f"{n} shared numbers over {len(a)} rows; keys only in the second run: {', '.join(only) or 'none'}")
    return 0 if all(d == 0 for d in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
