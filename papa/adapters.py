"""Low-rank adapters on one shared base UNet (LoRA, through `peft`): a user's model is the base plus their adapter.

    W x + (α / r) · B A x,   A: r × in (for a Conv2d, a conv of the layer's kernel size), B: out × r (a 1 × 1 conv),
    B = 0 at the start, so training starts exactly at the base model.

`AdapterPolicy` is a `papa.policy.Policy`: methods call `policy(x, t)` and `reference(x, t)` as they do for a full copy,
and no method changes. The reference is the same network with its adapters switched off, so the base is held once.
What a checkpoint holds is the adapter alone (`state_dict`), its keys checked on load: a missing or renamed key is an
error that names it, never a silent partial load. `peft` (and the `transformers` it imports) is imported only when an
adapter is configured.
"""
from __future__ import annotations

import math
import re

import torch

from papa.policy import Policy

ADAPTER = "default"                     # the adapter's name inside the peft model (one user per policy)


def lora_config(acfg):
    from peft import LoraConfig
    return LoraConfig(r=acfg.rank, lora_alpha=acfg.alpha, target_modules=acfg.targets, lora_dropout=0.0,
                      init_lora_weights=True)


def wrap(base: torch.nn.Module, acfg, seed: int = 0) -> torch.nn.Module:
    """The base UNet with a fresh adapter on the layers whose names match `acfg.targets` (a regex, matched whole);
    every base weight frozen. B = 0 and A uniform in ±1/√fan_in (peft's default, Kaiming-uniform with a = √5), drawn
    from a generator seeded by `seed` so that the adapter does not depend on the global generator's state."""
    from peft import get_peft_model
    if not adaptable_layers(base, acfg.targets):
        raise ValueError(f"adapter.targets {acfg.targets!r} matches no Conv2d or Linear layer of the UNet (whole "
                         f"names, e.g. {adaptable_layers(base, '.*')[:2]})")
    model = get_peft_model(base, lora_config(acfg), adapter_name=ADAPTER)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif "lora_B" in name:
                p.zero_()
    return model


def adaptable_layers(net: torch.nn.Module, targets: str) -> list[str]:
    """The names of `net`'s Conv2d and Linear layers that the regex `targets` matches whole (as peft matches them)."""
    pat = re.compile(targets)
    return [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and
            pat.fullmatch(n)]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights alone, under peft's stable names (no adapter name inside the keys)."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_adapter_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load an adapter's weights; every key the adapter has must be there with its shape, and no other."""
    want = adapter_state(model)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise ValueError(f"the adapter weights do not fit this adapter: {len(missing)} missing (first: "
                         f"{missing[:1]}), {len(extra)} unexpected (first: {extra[:1]}); was it made with other "
                         "adapter.rank / adapter.targets?")
    bad = [k for k in want if tuple(want[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise ValueError(f"adapter weight {bad[0]} has shape {tuple(sd[bad[0]].shape)}, this adapter's is "
                         f"{tuple(want[bad[0]].shape)}; was it made with another adapter.rank?")
    from peft import set_peft_model_state_dict
    res = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER)
    unexpected = getattr(res, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"peft could not place adapter weight(s) {unexpected[:3]}")


class BaseView(torch.nn.Module):
    """The base model as a module of its own: the adapted network run with its adapters switched off. It holds no
    weights of its own (the peft model is kept outside the module tree, so it is neither trained nor saved twice)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._model = [model]

    @property
    def model(self) -> torch.nn.Module:
        return self._model[0]

    def off(self):
        return self.model.disable_adapter()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self.off():
            return self.model(x, t)

    def features(self, x: torch.Tensor, t) -> torch.Tensor:
        with self.off():
            return self.model.get_base_model().features(x, t)

    def parameters(self, recurse: bool = True):
        return self.model.get_base_model().parameters(recurse)


class AdapterPolicy(Policy):
    """One user's LoRA adapter on the shared base UNet: only the adapter trains; the reference is the base."""

    def __init__(self, base: torch.nn.Module, acfg, seed: int = 0):
        self.module = wrap(base, acfg, seed)
        self.reference_module = BaseView(self.module)

    def module_state(self, module: torch.nn.Module) -> dict:
        return adapter_state(module)

    def load_module_state(self, module: torch.nn.Module, sd: dict) -> None:
        load_adapter_state(module, sd)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_adapter_state(sd: dict) -> bool:
    """A state dict that holds an adapter's weights only (what an adapter run's checkpoint stores)."""
    return bool(sd) and all("lora_" in k for k in sd)

