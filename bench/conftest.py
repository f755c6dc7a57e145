"""Benchmarks: fast path against its reference in the same run; every gate is the median of per-pair ratios timed in
alternation (benchutil.alternated) with floors that hold on a loaded machine, never an absolute time (absolute times
drift 20-30% between runs). One thread, fixed seeds; set MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ to
1073741824 before starting (as .ci/run does) to avoid bimodal eager timings. PAPA_BENCH_LONG=1 adds the long
benchmarks, PAPA_BENCH_THREADS the thread count of those that take one (bench/README.md)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    torch.set_num_threads(1)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print("bench: MALLOC_MMAP_THRESHOLD_ not set; eager CPU timings may be bimodal", file=sys.stderr)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
