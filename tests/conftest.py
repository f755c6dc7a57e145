"""Shared fixtures: one thread (less jitter), fixed seeds, NaN-poisoned kernel outputs. Helpers live in testutil."""
import pytest
import torch

from testutil import Poisoned

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    def apply(*modules):
        for m in modules:
            monkeypatch.setattr(m, "torch", Poisoned())
    return apply
