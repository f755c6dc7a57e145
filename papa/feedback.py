"""Feedback sources: who labels a round's images. One small interface, so a person can replace the simulated user.

- `OracleFeedback`: the oracle classifier plays a user with a preference set: +1 for a preferred class, else −1
  (`full_exploitation`) or 0 (ignored).
- `FileFeedback`: labels from a JSON file `{"<image id>": 1 | -1 | 0, …}` (image ids are `r<round>_<index>`, the
  file names the trainer writes under `rounds/NNN/`), so real human labels work without code. A missing id is an
  error that names it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from papa.config import ConfigError


def image_id(round_idx: int, i: int) -> str:
    return f"r{round_idx:03d}_{i:03d}"


class OracleFeedback:
    def __init__(self, oracle: torch.nn.Module, preference: list[int], full_exploitation: bool = True):
        self.oracle, self.preference, self.full = oracle.eval(), torch.tensor(preference), full_exploitation

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, round_idx: int) -> torch.Tensor:
        cls = self.oracle(images).argmax(1)
        liked = torch.isin(cls, self.preference)
        return torch.where(liked, 1.0, -1.0 if self.full else 0.0)


class FileFeedback:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"config key 'feedback.labels_file': file '{path}' not found")

    def __call__(self, images: torch.Tensor, round_idx: int) -> torch.Tensor:
        try:
            labels = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"labels file '{self.path}' is not valid JSON: {e}") from None
        out = []
        for i in range(len(images)):
            key = image_id(round_idx, i)
            if key not in labels:
                raise ConfigError(f"labels file '{self.path}' has no label for image '{key}' "
                                  f"(add \"{key}\": 1, -1 or 0; images are under rounds/{round_idx:03d}/)")
            v = labels[key]
            if v not in (1, -1, 0):
                raise ConfigError(f"labels file '{self.path}': label of '{key}' must be 1, -1 or 0, got {v!r}")
            out.append(float(v))
        return torch.tensor(out)


def build_feedback(cfg, oracle: torch.nn.Module | None):
    f = cfg.feedback
    if f.source == "file":
        return FileFeedback(f.labels_file)
    return OracleFeedback(oracle, f.preference, f.full_exploitation)
