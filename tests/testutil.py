"""Shared test helpers (a uniquely named module: `tests/` and `bench/` both have a conftest, so helpers must not live
there). Importing it sets TRITON_INTERPRET when there is no GPU, before any kernel module is imported."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import torch

ROOT = Path(__file__).resolve().parents[1]

# Triton kernels run under the interpreter on CPU tensors when there is no GPU; it must be set before the kernel
# modules are imported (test code may query CUDA; papa itself never does at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Poisoned:
    """Stands in for the `torch` module inside a kernel module: every torch.empty/empty_like it allocates is filled
    with NaN, so an element a kernel forgets to write shows up (the interpreter does not catch such bugs)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, **k):
        t = torch.empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @staticmethod
    def empty_like(x, **k):
        t = torch.empty_like(x, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t


def reference_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parse tests/data/<name>.tsv: the reference implementation's parameter names and shapes, one per line."""
    path = ROOT / "tests" / "data" / name
    rows = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def metrics(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    volatile = ("elapsed", "round_seconds", "eval_seconds", "peak_rss_mb", "peak_cuda_mb", "eval_cached",
                "pool_seconds", "select_seconds")
    return [{k: v for k, v in r.items() if k not in volatile} for r in rows]


def assert_same_metrics(a, b, tol=0.0):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=tol, abs=tol, nan_ok=True), (ra["round"], k)
            else:
                assert va == vb, (ra["round"], k)
