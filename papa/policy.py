"""The seam between a method and the weights it trains: the policy ε_θ(x, t) and the frozen reference ε_ref(x, t).

Methods call `policy(x, t)` (with gradients) and `reference(x, t)` (without), and never touch the modules behind them;
the engine optimises `parameters()`, keeps an EMA of `module`, samples from it and checkpoints `state_dict()`. So an
adapter on a shared base model, or one adapter per user, is a different Policy and no change to any method.
`FullPolicy` is a full trainable copy of the base UNet against the frozen base itself, as the papers do.
"""
from __future__ import annotations

import copy

import torch


class Policy:
    """Interface. `module` is the network sampled from and evaluated (policy weights applied); `reference_module` the
    frozen network the methods measure against (and ePAPA samples its low-noise steps from)."""
    module: torch.nn.Module
    reference_module: torch.nn.Module

    def policy(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.module(x, t)

    @torch.no_grad()
    def reference(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.reference_module(x, t)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser trains."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return self.module_state(self.module)

    def load_state_dict(self, sd: dict) -> None:
        self.load_module_state(self.module, sd)

    def module_state(self, module: torch.nn.Module) -> dict:
        """What a checkpoint keeps of `module` (the policy's network or a copy of it, such as its EMA)."""
        return module.state_dict()

    def load_module_state(self, module: torch.nn.Module, sd: dict) -> None:
        module.load_state_dict(sd)

    def train(self, mode: bool = True) -> "Policy":
        self.module.train(mode)
        return self

    def eval(self) -> "Policy":
        return self.train(False)


class FullPolicy(Policy):
    """Every weight of a copy of the base model is trained; the base itself is the frozen reference."""

    def __init__(self, base: torch.nn.Module):
        self.module = base
        self.reference_module = copy.deepcopy(base).requires_grad_(False).eval()
