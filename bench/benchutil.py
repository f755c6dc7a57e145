"""Shared benchmark helpers (uniquely named: tests/ has a conftest too)."""
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def min_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Best-of-`reps` wall time of fn() in seconds (the minimum is the least noisy estimator on a shared machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
