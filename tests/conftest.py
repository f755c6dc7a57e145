"""Shared test set-up: one thread (less jitter), fixed seeds, paths, and small fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def chdir_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def reference_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parse shared/reference/<name>.tsv, or a copy under tests/data when shared/ is not beside the repo."""
    path = REFERENCE / name
    if not path.is_file():
        path = ROOT / "tests" / "data" / name
    rows = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows
