"""What one online round is made of, as data: its seed, what was drawn, the question asked and what it collected.

The engine draws a round's samples as its method declares (`Method.draws`), gives every query a stable id, saves the
images, asks the feedback source and hands the answers back to the method (`Method.build`), which turns them into the
tensors its loss trains on. Everything random in a round derives from (train.seed, round) through `round_seed`, so a
resumed run, or one on another number of ranks, draws the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DRAWS = ("images", "image_pairs", "trajectories", "trajectory_pairs")  # what a method's round samples
FEEDBACK = ("label", "pair", "reward")                                 # what it asks about them


def round_seed(seed: int, r: int) -> int:
    """The sampling seed of round r (0-based) of a run seeded `seed`."""
    return seed * 100_003 + r + 1


def image_id(round_idx: int, i: int) -> str:
    """Id of image i of round `round_idx` (1-based): the name under rounds/NNN/ that labels files use."""
    return f"r{round_idx:03d}_{i:03d}"


def pair_id(round_idx: int, p: int) -> str:
    """Id of pair p (images 2p and 2p + 1) of round `round_idx`."""
    return f"r{round_idx:03d}_p{p:03d}"


@dataclass
class Samples:
    """What a round drew: the final images (N, C, H, W) in [−1, 1] and, for trajectory methods, the recording."""
    images: torch.Tensor
    traj: dict | None = None                     # papa.sampling.Trajectories: x, t, coef, log_prob, x0_hat


@dataclass
class Query:
    """One round's question to a feedback source. `images` has one entry per id for labels and rewards, and two per
    id for pairs (members 2p and 2p + 1 of pair p)."""
    round: int                                   # 1-based
    kind: str                                    # label | pair | reward
    ids: list[str]
    images: torch.Tensor

    @property
    def first(self) -> torch.Tensor:
        return self.images[0::2]

    @property
    def second(self) -> torch.Tensor:
        return self.images[1::2]


@dataclass
class RoundData:
    """One round's collection: what the user saw, what they said, and what the update needs."""
    images: torch.Tensor                         # (N, C, H, W) the round's samples; saved with the run
    labels: dict                                 # JSON-able record of the feedback (image or pair id -> value)
    queries: int                                 # feedback used: labels (images or pairs) or reward queries
    tensors: dict = field(default_factory=dict)  # what `step_items` needs (labels, trajectories, rewards, ...)
    stats: dict = field(default_factory=dict)    # round facts for metrics (positives, ties, mean reward, ...)
