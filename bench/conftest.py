"""Benchmarks: fast path against its reference in the same run; gates are ratios with loose floors, never absolute
times (these machines drift 20-30% between runs). One thread, fixed seeds; set MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ to 1073741824 before starting (as .ci/run does) to avoid bimodal eager timings."""
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
