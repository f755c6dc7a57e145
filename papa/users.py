"""Many simulated users: a population file, the fine-grained image measurements some of them care about, and the
simulated user that answers for each.

A population file (YAML, e.g. configs/users_mnist.yaml) lists users; each likes an image when it is a legible member of
one of their classes (the oracle's reject option, as the default simulated user) and, for a user with a fine-grained
taste, when a measurement of the image is on their side of a threshold:

    dataset: mnist
    users:
      - id: curvy_a                      # a name: letters, digits, '_' or '-'
        like: [0, 3, 6, 8]               # the classes they like
        attribute: {name: stroke_width, above: 2.7, margin: 0.2}   # optional: only bold strokes (or below: thin)
        flip_prob: 0.05                  # optional: each answer flipped with this probability (seeded)
        skip_below: 0.6                  # optional: "unsure": skip when the oracle's top probability is below it
        new: true                        # optional: a user held out of shared training (a newcomer)

A user with an attribute also skips an image whose measurement lies within `margin` of the threshold: people are unsure
about the borderline. The measurements (all on images in [−1, 1], ink = pixels above mid-grey, papa.fidelity.ink_mask):

- `stroke_width`: papa.fidelity.stroke_width, 2 · ink area / ink perimeter, in pixels (MNIST test median 2.67).
- `slant`: the ink's shear, Σ dx·dy / Σ dy² over ink pixels, dx rightwards from the ink's centre and dy upwards: how
  many pixels the stroke moves right per pixel up; positive leans right (MNIST test median 0.00, quartiles ±0.15).
- `ink`: the fraction of the image that is ink, papa.fidelity.ink: large versus small (MNIST median 0.12, Fashion 0.30).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from papa.config import ConfigError, read_yaml
from papa.feedback import OracleFeedback
from papa.fidelity import ink, ink_mask, stroke_width

NUM_CLASSES = 10


def slant(images: torch.Tensor) -> torch.Tensor:
    """Per image, the ink's shear Σ dx·dy / Σ dy² (dx right of the ink centroid, dy above it): (N,) float64; 0 for an
    image whose ink is one row or none. A stroke leaning right (top to the right of its bottom) is positive."""
    m = ink_mask(images).double()[:, 0]
    h, w = m.shape[1:]
    ys = torch.arange(h, dtype=torch.float64)[None, :, None]
    xs = torch.arange(w, dtype=torch.float64)[None, None, :]
    area = m.sum((1, 2)).clamp_min(1)
    dy = ((m * ys).sum((1, 2)) / area)[:, None, None] - ys       # rows count downwards: up is centroid − row
    dx = xs - ((m * xs).sum((1, 2)) / area)[:, None, None]
    var = (m * dy * dy).sum((1, 2))
    return torch.where(var > 0, (m * dx * dy).sum((1, 2)) / var.clamp_min(1e-12), torch.zeros_like(var))


ATTRIBUTES = {"stroke_width": stroke_width, "slant": slant, "ink": ink}


@dataclass(frozen=True)
class Attribute:
    """A fine-grained taste: the measurement `name` above (or below) `threshold`; unsure within `margin` of it."""
    name: str
    threshold: float
    above: bool
    margin: float = 0.0

    def measure(self, images: torch.Tensor) -> torch.Tensor:
        return ATTRIBUTES[self.name](images.float().cpu())

    def likes(self, images: torch.Tensor) -> torch.Tensor:
        v = self.measure(images)
        return v > self.threshold if self.above else v < self.threshold

    def unsure(self, images: torch.Tensor) -> torch.Tensor:
        return (self.measure(images) - self.threshold).abs() < self.margin


@dataclass(frozen=True)
class UserSpec:
    id: str
    like: tuple[int, ...]
    attribute: Attribute | None = None
    flip_prob: float = 0.0
    skip_below: float = 0.0
    new: bool = False

    def taste(self) -> str:
        """The fine-grained taste in words ('stroke_width > 2.9'), '' for none."""
        a = self.attribute
        return "" if a is None else f"{a.name} {'>' if a.above else '<'} {a.threshold:g}"

    def describe(self) -> str:
        return f"{self.id}: likes {list(self.like)}" + (f", {self.taste()}" if self.attribute else "")

    def as_dict(self) -> dict:
        """Everything that decides the user's answers, as plain data (kept beside their run, checked on resume)."""
        a = self.attribute
        return {"id": self.id, "like": list(self.like), "flip_prob": self.flip_prob, "skip_below": self.skip_below,
                "attribute": None if a is None else {"name": a.name, "threshold": a.threshold, "above": a.above,
                                                     "margin": a.margin}}


@dataclass(frozen=True)
class Population:
    dataset: str
    users: tuple[UserSpec, ...]
    path: str = ""

    @property
    def seen(self) -> list[UserSpec]:
        return [u for u in self.users if not u.new]

    @property
    def new(self) -> list[UserSpec]:
        return [u for u in self.users if u.new]


_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_USER_KEYS = {"id", "like", "attribute", "flip_prob", "skip_below", "new"}
_ATTR_KEYS = {"name", "above", "below", "margin"}


def _attribute(raw, where: str) -> Attribute | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.attribute must be a mapping like {{name: stroke_width, above: 2.7}}, got {raw!r}")
    extra = set(raw) - _ATTR_KEYS
    if extra:
        raise ConfigError(f"{where}.attribute has unknown key(s) {sorted(extra)}; allowed: {sorted(_ATTR_KEYS)}")
    if raw.get("name") not in ATTRIBUTES:
        raise ConfigError(f"{where}.attribute.name must be one of {sorted(ATTRIBUTES)}, got {raw.get('name')!r}")
    if ("above" in raw) == ("below" in raw):
        raise ConfigError(f"{where}.attribute needs exactly one of 'above' or 'below' (the threshold and its side)")
    side = "above" if "above" in raw else "below"
    thr, margin = raw[side], raw.get("margin", 0.0)
    for key, v in ((side, thr), ("margin", margin)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ConfigError(f"{where}.attribute.{key} must be a number, got {v!r}")
    if margin < 0:
        raise ConfigError(f"{where}.attribute.margin must be ≥ 0, got {margin}")
    return Attribute(raw["name"], float(thr), side == "above", float(margin))


def _user(raw, i: int, where: str) -> UserSpec:
    w = f"{where}: users[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{w} must be a mapping with at least 'id' and 'like', got {raw!r}")
    extra = set(raw) - _USER_KEYS
    if extra:
        raise ConfigError(f"{w} has unknown key(s) {sorted(extra)}; allowed: {sorted(_USER_KEYS)}")
    uid = raw.get("id")
    if not isinstance(uid, str) or not _ID.match(uid):
        raise ConfigError(f"{w}.id must be 1–64 letters, digits, '_' or '-', got {uid!r}")
    w = f"{where}: user {uid!r}"
    like = raw.get("like")
    if (not isinstance(like, list) or not like or len(set(like)) != len(like)
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < NUM_CLASSES for c in like)):
        raise ConfigError(f"{w}.like must be a non-empty list of distinct class indices 0–{NUM_CLASSES - 1}, "
                          f"got {like!r}")
    probs = {}
    for key, hi in (("flip_prob", 0.5), ("skip_below", 1.0)):
        v = raw.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < hi:
            raise ConfigError(f"{w}.{key} must be a number in [0, {hi}), got {v!r}")
        probs[key] = float(v)
    new = raw.get("new", False)
    if not isinstance(new, bool):
        raise ConfigError(f"{w}.new must be true or false, got {new!r}")
    return UserSpec(uid, tuple(like), _attribute(raw.get("attribute"), w), probs["flip_prob"], probs["skip_below"], new)


def load_population(path: str | Path) -> Population:
    """Read and validate a population file; any problem is a ConfigError naming the file, the user and the key."""
    p = Path(path)
    raw = read_yaml(p, "population file", "configs/users_mnist.yaml")
    if set(raw) - {"dataset", "users"}:
        raise ConfigError(f"{p} must be a mapping with keys 'dataset' and 'users'")
    if raw.get("dataset") not in ("mnist", "fashion_mnist"):
        raise ConfigError(f"{p}: dataset must be mnist or fashion_mnist, got {raw.get('dataset')!r}")
    users = raw.get("users")
    if not isinstance(users, list) or not users:
        raise ConfigError(f"{p}: users must be a non-empty list")
    specs = tuple(_user(u, i, str(p)) for i, u in enumerate(users))
    ids = [u.id for u in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{p}: user id(s) {dup} appear more than once; every user needs a distinct id")
    return Population(raw["dataset"], specs, str(p))


class SimulatedUser(OracleFeedback):
    """One user of a population: the realistic simulated user (reject-aware oracle, label noise, unsure → skip) with
    their own class set and, optionally, a fine-grained taste that an image must also meet to be liked."""

    def __init__(self, oracle: torch.nn.Module, spec: UserSpec, seed: int = 0):
        super().__init__(oracle, list(spec.like), True, spec.flip_prob, spec.skip_below, seed, reject=True)
        self.spec = spec

    @torch.no_grad()
    def judge(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The oracle's (likes, unsure), narrowed by the taste: liked only when the attribute is liked too, unsure
        also when the attribute is too close to the user's threshold to tell."""
        likes, unsure = super().judge(images)
        a = self.spec.attribute
        return (likes & a.likes(images).cpu(), unsure | a.unsure(images).cpu()) if a is not None else (likes, unsure)

    def answers(self, images: torch.Tensor, round_idx: int = 0) -> torch.Tensor:
        """Labels as the user gives them: +1 like, −1 dislike, 0 skip (unsure), with their label noise."""
        likes, unsure = self.judge(images)
        return self.noisy(torch.where(likes, 1.0, -1.0 if self.full else 0.0), unsure, round_idx)
