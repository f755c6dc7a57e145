"""Feedback sources: who answers a round's question. One typed protocol, so a person can replace the simulated user.

A source gets a `papa.rounds.Query` (the round, the kind of question, an id per query and the images) and returns the
answers as a tensor aligned with the ids, or None when it has no answer yet (a person still labelling): the engine
then asks again every `feedback.poll_seconds`, and a run stopped while waiting waits again when resumed, because the
resumed round draws the same images under the same ids.

- `OracleFeedback`: the oracle classifier plays a user with a preference set (by default a legible member of a
  preferred class: the oracle's reject option says "not a member of any class"). Labels: +1 for a preferred class, else
  −1 (`full_exploitation`) or 0 (ignored); pairs: +1 when the first image is preferred and the second not, −1 the
  reverse, 0 a tie; rewards: the oracle's probability mass on the preferred classes, in [0, 1].
- `FileFeedback`: labels from a JSON file `{"<id>": 1 | -1 | 0, …}` (image ids `r<round>_<index>` are the images the
  trainer wrote under `rounds/NNN/` before asking; pair ids `r<round>_p<index>`: 1 when the pair's first image
  (`2·index`) is preferred, −1 the second (`2·index + 1`), 0 a tie), so real human labels work without code. A missing
  id is an error that names it, or, with `feedback.wait`, "not yet".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from papa.config import ConfigError
from papa.models.classifier import REJECT_CLASS, has_reject
from papa.rounds import Query, image_id, pair_id  # noqa: F401 - the ids' home is papa.rounds; re-exported here


class FeedbackSource(Protocol):
    """Who answers: `kinds` it can answer; `ask` returns answers aligned with `query.ids`, or None for "not yet"."""
    kinds: tuple[str, ...]

    def ask(self, query: Query) -> torch.Tensor | None: ...


class OracleFeedback:
    """The simulated user. It likes an image when the oracle's decision is a preferred class. With a reject-aware
    oracle and `reject` (the default), an image the oracle calls no member of any class is disliked, as a person
    dislikes a malformed digit; `reject=False` is the argmax-only user, who always sees one of the classes. With
    `skip_below` > 0 it skips what it is unsure of (top probability below it), and with `flip_prob` > 0 it flips each
    remaining decision with that probability, from a generator seeded by the run's seed and the round: the same run
    gets the same noisy answers, resumed or not."""
    kinds = ("label", "pair", "reward")

    def __init__(self, oracle: torch.nn.Module, preference: list[int], full_exploitation: bool = True,
                 flip_prob: float = 0.0, skip_below: float = 0.0, seed: int = 0, reject: bool = False):
        self.oracle, self.preference, self.full = oracle.eval(), torch.tensor(preference), full_exploitation
        self.flip_prob, self.skip_below, self.seed = flip_prob, skip_below, seed
        if reject and not has_reject(oracle):
            raise ConfigError("config key 'feedback.reject': true needs an oracle with a reject class, and "
                              "checkpoints.oracle has 10 outputs; point it at a reject-aware file "
                              "(checkpoints/<dataset>/oracle_reject.pt) or set feedback.reject=false")
        self.reject = reject

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """The oracle's class probabilities; over the classes only when it does not use its reject option."""
        logits = self.oracle(images).float()
        if has_reject(self.oracle) and not self.reject:
            logits = logits[:, :REJECT_CLASS]
        return logits.softmax(1)

    @torch.no_grad()
    def judge(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((N,) likes, (N,) unsure), both bool on the CPU, from one pass of the oracle: liked when its decision is a
        preferred class (never the reject class), unsure when its top probability is below `skip_below`."""
        p = self.probs(images)
        likes = torch.isin(p.argmax(1), self.preference.to(p.device)).cpu()
        unsure = (p.max(1).values < self.skip_below).cpu() if self.skip_below > 0 else torch.zeros_like(likes)
        return likes, unsure

    def likes(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the oracle's decision is a preferred class (never the reject class)."""
        return self.judge(images)[0]

    def unsure(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the oracle's top probability is below `skip_below`."""
        return self.judge(images)[1]

    def ask(self, query: Query) -> torch.Tensor:
        if query.kind == "reward":
            return self.reward(query.images).cpu()
        if query.kind == "label":
            likes, unsure = self.judge(query.images)
            y = torch.where(likes, 1.0, -1.0 if self.full else 0.0)
        else:
            (l1, u1), (l2, u2) = self.judge(query.first), self.judge(query.second)
            y, unsure = l1.float() - l2.float(), u1 | u2  # +1 first, −1 second, 0 tie (both or neither)
        return self.noisy(y, unsure, query.round)

    def noisy(self, y: torch.Tensor, unsure: torch.Tensor, round_idx: int) -> torch.Tensor:
        """Skip the unsure (0), then flip each remaining answer with probability flip_prob (seeded by the round)."""
        y = torch.where(unsure, torch.zeros_like(y), y)
        if self.flip_prob > 0:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_idx)
            flip = torch.rand(len(y), generator=gen) < self.flip_prob
            y = torch.where(flip, -y, y)  # a skip (0) or a tie stays what it is
        return y

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, round_idx: int) -> torch.Tensor:
        return torch.where(self.likes(images), 1.0, -1.0 if self.full else 0.0)

    @torch.no_grad()
    def pairwise(self, first: torch.Tensor, second: torch.Tensor, round_idx: int) -> torch.Tensor:
        return self.likes(first).float() - self.likes(second).float()  # +1 first, −1 second, 0 tie (both or neither)

    @torch.no_grad()
    def reward(self, images: torch.Tensor) -> torch.Tensor:
        """The probability mass on the preferred classes (the reject class counts against, when used)."""
        return self.probs(images)[:, self.preference.to(images.device)].sum(1)


class FileFeedback:
    kinds = ("label", "pair")

    def __init__(self, path: str | Path, wait: bool = False):
        self.path, self.wait = Path(path), wait
        if not self.path.is_file():
            raise ConfigError(f"config key 'feedback.labels_file': file '{path}' not found")

    def ask(self, query: Query) -> torch.Tensor | None:
        try:
            return self(query.images if query.kind == "label" else query.first, query.round, ids=query.ids)
        except MissingLabel:
            if self.wait:
                return None
            raise

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
                raise MissingLabel(f"labels file '{self.path}' has no label for image '{key}' "
                                  f"(add \"{key}\": 1, -1 or 0; images are under rounds/{round_idx:03d}/)")
            v = labels[key]
            if type(v) is not int or v not in (1, -1, 0):  # true and 1.0 compare equal to 1: refuse them too
                raise ConfigError(f"labels file '{self.path}': label of '{key}' must be 1, -1 or 0, got {v!r}")
            out.append(float(v))
        return torch.tensor(out)


class MissingLabel(ConfigError):
    """A labels file has no answer (yet) for a query id."""


def build_feedback(cfg, oracle: torch.nn.Module | None):
    f = cfg.feedback
    if f.source == "file":
        return FileFeedback(f.labels_file, wait=f.wait)
    return OracleFeedback(oracle, f.preference, f.full_exploitation, f.flip_prob, f.skip_below, cfg.train.seed,
                          reject=f.reject)
