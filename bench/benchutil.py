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


def interleaved_min_times(fns: dict, reps: int = 5, warmup: int = 1) -> dict:
    """Best-of-`reps` wall time of each fn, measured in alternation (a, b, a, b, …) so that a change in the machine's
    load during the measurement hits every candidate alike; the ratio of these minima is what the gates use."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best
