"""Feedback sources: who labels a round's images. One small interface, so a person can replace the simulated user.

- `OracleFeedback`: the oracle classifier plays a user with a preference set: +1 for a preferred class, else −1
  (`full_exploitation`) or 0 (ignored).
- `FileFeedback`: labels from a JSON file `{"<image id>": 1 | -1 | 0, …}` (image ids are `r<round>_<index>`, the
  file names the trainer writes under `rounds/NNN/`), so real human labels work without code. A missing id is an
  error that names it. Pairwise choices (D3PO, Diffusion-DPO) use pair ids `r<round>_p<index>`: 1 when the pair's
  first image (`2·index`) is preferred, −1 the second (`2·index + 1`), 0 a tie.

Three kinds of query, each one per unit of the label budget:
- `__call__(images, round)` → (N,) per-image labels (PAPA);
- `pairwise(first, second, round)` → (P,) preferences h ∈ {+1, −1, 0} (D3PO, Diffusion-DPO); the oracle prefers a
  preferred-class image over a non-preferred one and calls every other pair a tie;
- `reward(images)` → (N,) scalar rewards in [0, 1] (DDPO, SDPO): the oracle's probability mass on the preferred classes.
  Only the oracle has one: rewards from people are not what papa is for.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from papa.config import ConfigError


def image_id(round_idx: int, i: int) -> str:
    return f"r{round_idx:03d}_{i:03d}"


def pair_id(round_idx: int, p: int) -> str:
    return f"r{round_idx:03d}_p{p:03d}"


class OracleFeedback:
    def __init__(self, oracle: torch.nn.Module, preference: list[int], full_exploitation: bool = True):
        self.oracle, self.preference, self.full = oracle.eval(), torch.tensor(preference), full_exploitation

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, round_idx: int) -> torch.Tensor:
        cls = self.oracle(images).argmax(1)
        liked = torch.isin(cls, self.preference)
        return torch.where(liked, 1.0, -1.0 if self.full else 0.0)

    @torch.no_grad()
    def pairwise(self, first: torch.Tensor, second: torch.Tensor, round_idx: int) -> torch.Tensor:
        a = torch.isin(self.oracle(first).argmax(1), self.preference.to(first.device)).float()
        b = torch.isin(self.oracle(second).argmax(1), self.preference.to(first.device)).float()
        return a - b  # +1: first preferred, −1: second, 0: tie (both or neither preferred)

    @torch.no_grad()
    def reward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.oracle(images).float().softmax(1)
        return p[:, self.preference.to(images.device)].sum(1)


class FileFeedback:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"config key 'feedback.labels_file': file '{path}' not found")

    def __call__(self, images: torch.Tensor, round_idx: int, ids: list[str] | None = None) -> torch.Tensor:
        try:
            labels = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"labels file '{self.path}' is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"labels file '{self.path}' cannot be read ({e.strerror})") from None
        if not isinstance(labels, dict):
            raise ConfigError(f"labels file '{self.path}' must hold one JSON object {{\"<image id>\": 1 | -1 | 0, ...}}, "
                              f"got a {type(labels).__name__}")
        out = []
        for i in range(len(images)):
            key = ids[i] if ids else image_id(round_idx, i)
            if key not in labels:
                raise ConfigError(f"labels file '{self.path}' has no label for image '{key}' "
                                  f"(add \"{key}\": 1, -1 or 0; images are under rounds/{round_idx:03d}/)")
            v = labels[key]
            if type(v) is not int or v not in (1, -1, 0):  # true and 1.0 compare equal to 1: refuse them too
                raise ConfigError(f"labels file '{self.path}': label of '{key}' must be 1, -1 or 0, got {v!r}")
            out.append(float(v))
        return torch.tensor(out)

    def pairwise(self, first: torch.Tensor, second: torch.Tensor, round_idx: int) -> torch.Tensor:
        return self(first, round_idx, ids=[pair_id(round_idx, i) for i in range(len(first))])


def build_feedback(cfg, oracle: torch.nn.Module | None):
    f = cfg.feedback
    if f.source == "file":
        return FileFeedback(f.labels_file)
    return OracleFeedback(oracle, f.preference, f.full_exploitation)
