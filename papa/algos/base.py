"""What a method is to the round engine: what a round draws and asks, its settings, and the loss of a work list.

A method declares its round (`draws`: images, image pairs, trajectories or trajectory pairs; `feedback`: a label per
image, a choice per pair, or a reward), its settings section (`Settings`, a dataclass read from the config section
named after the method), its queries per unit and its diagnostics. The engine draws, gives ids, saves, asks and hands
the answers to `build`; the method supplies its loss over a flat work list (`step_items` builds the list for one
optimiser step, `loss` evaluates a chunk of it). The engine does the rest: shuffling units into optimiser steps,
sharding the work list over ranks, chunking it through the UNet with gradient accumulation, the all-reduce, clipping,
the optimiser, evaluation and records. Methods see the weights only through a `papa.policy.Policy`. A new method is
one file: a class with `@register`.

Loss normalisation: every item carries its own weight so that the sum over the whole work list of an optimiser step is
that step's loss; chunks and ranks only split the sum, so the maths does not depend on the chunk size or world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from papa.rounds import Query, RoundData, Samples  # noqa: F401 - RoundData: part of a method's vocabulary


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
class NoSettings:
    """A method without settings of its own."""

    def check(self, cfg, require) -> None:
        """Range checks; `require(cond, key, message)` raises a ConfigError naming `<method>.<key>`."""


class Method:
    """Base class. Subclasses set `name`, `draws`, `feedback` (and `Settings`), implement `build`, `num_units`,
    `step_items` and `loss`."""
    name: ClassVar[str] = "?"
    draws: ClassVar[str] = "images"             # images | image_pairs | trajectories | trajectory_pairs
    feedback: ClassVar[str] = "label"           # label | pair | reward
    queries_per_unit: ClassVar[int] = 1         # feedback budget used per unit (image or pair) of samples_per_round
    Settings: ClassVar[type] = NoSettings       # its config section, `<name>:`
    diagnostics: ClassVar[tuple[str, ...]] = ()  # metric names `summarize` adds to every round's row
    stat_keys: ClassVar[tuple[str, ...]] = ()   # float sums `loss` reports per chunk, summed over chunks, ranks, steps

    def __init__(self, cfg, policy, sched, device=torch.device("cpu")):
        self.cfg, self.policy, self.sched, self.device = cfg, policy, sched, device
        self.t = cfg.train
        self.s = cfg.method(self.name)

    # --- the round
    @property
    def base_below(self) -> int:
        """Sampling steps t < k use the frozen reference (ePAPA's switch); 0: the policy throughout."""
        return 0

    def observe_draw(self, images: torch.Tensor, r: int) -> None:
        """Round r's whole draw where it is more than what is asked about (a selector's pool, every candidate);
        default: unused."""

    def shown(self, samples: Samples) -> torch.Tensor:
        """The images the feedback source is asked about (default: the round's images)."""
        return samples.images

    def build(self, samples: Samples, answers: torch.Tensor, query: Query) -> tuple[dict, dict]:
        """(training tensors, round stats) from the round's samples and the source's answers."""
        raise NotImplementedError

    def record(self, query: Query, answers: torch.Tensor) -> dict:
        """The JSON record of the answers written to rounds/NNN/labels.json (default: id -> value)."""
        vals = answers.tolist()
        return {i: (int(v) if self.feedback != "reward" else round(float(v), 4)) for i, v in zip(query.ids, vals)}

    @classmethod
    def run_tag(cls, settings) -> str:
        """A suffix of the default run directory name that tells runs of this method apart (ePAPA: '_k350')."""
        return ""

    # --- update
    def num_units(self, data: dict) -> int:
        """Units (images or pairs) that `train.batch_size` counts; the engine shuffles them into optimiser steps."""
        raise NotImplementedError

    keeps_history = False  # the engine keeps every round's training tensors (in checkpoints too) for `prepare`

    def training_set(self, data: dict, history: list[dict], r: int) -> dict:
        """Round r's training units from its own (`data`) and, where the method replays, earlier rounds' feedback
        (`history`, which holds tensors where `keeps_history`); default: this round's."""
        return data

    def replayed(self, history: list[dict], r: int) -> dict | None:
        """Units from earlier rounds (`history`: rounds 1 … r) that round r's update trains on before its own
        feedback is in, while the person answers (the engine runs them first, then `training_set`'s); None: none."""
        return None

    def prepare(self, data: dict, history: list[dict]) -> dict:
        """The round's training set as the update uses it (e.g. with per-unit weights from all rounds' feedback so far);
        default: as it is."""
        return data

    def step_items(self, data: dict, units: torch.Tensor, gen: torch.Generator) -> tuple[object, Items]:
        """(context, work list) for one optimiser step over `units`; an empty list skips the step."""
        raise NotImplementedError

    def loss(self, ctx, chunk: Items) -> tuple[torch.Tensor, dict]:
        """(loss of the chunk: its items' weighted sum, {stat: float sum}) with the chunk on the engine's device."""
        raise NotImplementedError

    def summarize(self, stats: dict) -> dict:
        """Round metrics (named in `diagnostics`) from the stats summed over chunks, ranks and optimiser steps."""
        return {}

    @staticmethod
    def merge(history: list[dict]) -> dict:
        """All rounds' tensors as one training set (replay)."""
        return {k: torch.cat([h[k] for h in history]) for k in history[0]}

    @staticmethod
    def select(data: dict, units: torch.Tensor) -> dict:
        """The given units of a training set (replay's draw from earlier rounds)."""
        return {k: v[units] for k, v in data.items()}


class ImageLabels:
    """Mixin for methods that learn from one label per image (+1 / −1 / 0): the round's images and labels as the
    training tensors, a unit per image."""

    def build(self, samples: Samples, y: torch.Tensor, query: Query) -> tuple[dict, dict]:
        return {"x": samples.images.cpu(), "y": y}, {"round_positive": int((y > 0).sum()),
                                                     "round_negative": int((y < 0).sum())}

    def num_units(self, data: dict) -> int:
        return len(data["x"])


def ratio(stats: dict, num: str, den: str) -> float:
    d = stats.get(den, 0.0)
    return stats.get(num, 0.0) / d if d else float("nan")
