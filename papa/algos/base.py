"""What a method is to the round engine: how it collects a round (samples + feedback) and the loss of a work list.

A method declares what it needs from a round (`collect`: images, pairs or trajectories, and the feedback on them) and
supplies its loss over a flat work list (`step_items` builds the list for one optimiser step, `loss` evaluates a chunk
of it). The engine does the rest: shuffling units into optimiser steps, sharding the work list over ranks, chunking it
through the UNet with gradient accumulation, the all-reduce, clipping, the optimiser, evaluation and records. A new
method is one file here plus a registry line.

Loss normalisation: every item carries its own weight so that the sum over the whole work list of an optimiser step is
that step's loss; chunks and ranks only split the sum, so the maths does not depend on the chunk size or world size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class Items(dict):
    """A flat work list: a dict of tensors sharing the leading dimension K (one row per UNet evaluation or pair)."""

    def __len__(self) -> int:
        return len(next(iter(self.values()))) if dict.__len__(self) else 0

    def slice(self, sl: slice) -> "Items":
        return Items({k: v[sl] for k, v in self.items()})

    def to(self, device) -> "Items":
        return Items({k: v.to(device) for k, v in self.items()})

    def __getattr__(self, key: str) -> torch.Tensor:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass
class RoundData:
    """One round's collection: what the user saw, what they said, and what the update needs."""
    images: torch.Tensor                        # (N, C, H, W) shown to the user / reward model; saved with the run
    labels: dict                                # JSON-able record of the feedback (image or pair id -> value)
    queries: int                                # feedback used: labels (images or pairs) or reward-model queries
    tensors: dict = field(default_factory=dict)  # what `step_items` needs (labels, trajectories, rewards, ...)
    stats: dict = field(default_factory=dict)    # round facts for metrics (positives, ties, mean reward, ...)


class Method:
    """Base class. Subclasses set `name`, implement `collect`, `num_units`, `step_items` and `loss`."""
    name = "?"
    stat_keys: tuple[str, ...] = ()   # float sums `loss` reports per chunk, summed over chunks, ranks and steps

    def __init__(self, engine):
        self.engine = engine
        self.cfg = engine.cfg
        self.t = engine.cfg.train
        self.sched = engine.sched

    # --- collection
    def collect(self, r: int) -> RoundData:
        raise NotImplementedError

    # --- update
    def num_units(self, data: dict) -> int:
        """Units (images or pairs) that `train.batch_size` counts; the engine shuffles them into optimiser steps."""
        raise NotImplementedError

    keeps_history = False  # the engine keeps every round's training tensors (in checkpoints too) for `prepare`

    def prepare(self, data: dict, history: list[dict]) -> dict:
        """The round's training set as the update uses it (e.g. with per-unit weights from all rounds' feedback so far,
        `history`, which holds tensors where `train.replay` or `keeps_history`); default: as it is."""
        return data

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator) -> tuple[object, Items]:
        """(context, work list) for one optimiser step over `units`; an empty list skips the step."""
        raise NotImplementedError

    def loss(self, ctx, chunk: Items) -> tuple[torch.Tensor, dict]:
        """(loss of the chunk: its items' weighted sum, {stat: float sum}) with the chunk on the engine's device."""
        raise NotImplementedError

    def summarize(self, stats: dict) -> dict:
        """Round metrics from the stats summed over chunks, ranks and optimiser steps."""
        return {}

    @staticmethod
    def merge(history: list[dict]) -> dict:
        """All rounds' tensors as one training set (replay)."""
        return {k: torch.cat([h[k] for h in history]) for k in history[0]}

    @staticmethod
    def select(data: dict, units: torch.Tensor) -> dict:
        """The given units of a training set (replay's draw from earlier rounds)."""
        return {k: v[units] for k, v in data.items()}


def ratio(stats: dict, num: str, den: str) -> float:
    d = stats.get(den, 0.0)
    return stats.get(num, 0.0) / d if d else float("nan")
