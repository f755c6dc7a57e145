"""Preference-alignment methods on one round engine (`papa.engine`). Each file holds one method: what it collects from
a round and its loss over a flat work list of UNet evaluations, with the formula in its docstring.

| algo | feedback (one budget unit each) | trains |
|---|---|---|
| papa (ePAPA: epapa_k > 0) | a label per image (+1 / −1 / 0) | ELBO-weighted signed likelihood + QPDE, no reward model |
| d3po | a choice per pair from shared noise | per-step log-prob ratios to the frozen base, DPO loss |
| diffusion_dpo | a choice per pair | trajectory-free DPO on the noising loss |
| ddpo | a reward query per image (oracle's preferred mass) | PPO on recorded trajectories |
| sdpo | three reward queries per trajectory, pairs from shared noise | stepwise clipped difference regression |
"""
from __future__ import annotations

import importlib

ALGOS = {"papa": "papa.algos.papa:PAPA", "d3po": "papa.algos.d3po:D3PO",
         "diffusion_dpo": "papa.algos.diffusion_dpo:DiffusionDPO", "ddpo": "papa.algos.ddpo:DDPO",
         "sdpo": "papa.algos.sdpo:SDPO"}
PAIRWISE = ("d3po", "diffusion_dpo", "sdpo")      # samples_per_round counts pairs
REWARD = ("ddpo", "sdpo")                         # need a reward: the oracle


def get_method(name: str):
    module, cls = ALGOS[name].split(":")
    return getattr(importlib.import_module(module), cls)
