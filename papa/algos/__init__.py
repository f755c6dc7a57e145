"""Preference-alignment methods on one round engine (`papa.engine`). Each file holds one method: what a round must
draw and ask, its settings section, and its loss over a flat work list of UNet evaluations, with the formula in its
docstring. A method is one class registered with `@register`; the engine, the config and the comparison read
everything else (feedback kind, queries per unit, diagnostics, settings) from the class.

| algo | feedback (one budget unit each) | trains |
|---|---|---|
| papa (ePAPA: papa.epapa_k > 0) | a label per image (+1 / −1 / 0) | ELBO-weighted signed likelihood + QPDE, no reward model |
| d3po | a choice per pair from shared noise | per-step log-prob ratios to the frozen base, DPO loss |
| diffusion_dpo | a choice per pair | trajectory-free DPO on the noising loss |
| diffusion_kto | a label per image (+1 / −1 / 0) | trajectory-free KTO utility on the noising loss, no pairs |
| ddpo | a reward query per image (oracle's preferred mass) | PPO on recorded trajectories |
| sdpo | three reward queries per trajectory, pairs from shared noise | stepwise clipped difference regression |
"""
from __future__ import annotations

import importlib

# the shipped methods, imported on first use (each module registers its class)
BUILTIN = ("papa.algos.papa", "papa.algos.d3po", "papa.algos.diffusion_dpo", "papa.algos.diffusion_kto",
           "papa.algos.ddpo", "papa.algos.sdpo")


class _Registry(dict):
    """name -> Method class; the shipped methods are imported the first time anyone looks."""
    loaded = False

    def _load(self) -> None:
        if not self.loaded:
            self.loaded = True
            for m in BUILTIN:
                importlib.import_module(m)

    def __getitem__(self, k):
        self._load()
        return super().__getitem__(k)

    def __contains__(self, k):
        self._load()
        return super().__contains__(k)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def items(self):
        self._load()
        return super().items()

    def keys(self):
        self._load()
        return super().keys()


METHODS: dict = _Registry()


def register(cls):
    """Class decorator: make a Method available as `train.algo: <cls.name>` with its `<cls.name>:` config section."""
    dict.__setitem__(METHODS, cls.name, cls)
    return cls


def get_method(name: str):
    return METHODS[name]


def method_settings() -> dict:
    """name -> the Settings dataclass of every registered method (the config's method sections)."""
    return {name: cls.Settings for name, cls in METHODS.items()}
