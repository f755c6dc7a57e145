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


def wrap(base: torch.nn.Module, acfg, seed: int = 0, name: str = ADAPTER) -> torch.nn.Module:
    """The base UNet with a fresh adapter `name` on the layers whose names match `acfg.targets` (a regex, matched
    whole); every base weight frozen. See `init_adapter` for its initialisation."""
    from peft import get_peft_model
    if not adaptable_layers(base, acfg.targets):
        raise ValueError(f"adapter.targets {acfg.targets!r} matches no Conv2d or Linear layer of the UNet (whole "
                         f"names, e.g. {adaptable_layers(base, '.*')[:2]})")
    model = get_peft_model(base, lora_config(acfg), adapter_name=name)
    init_adapter(model, name, seed)
    return model


def init_adapter(model: torch.nn.Module, name: str, seed: int) -> None:
    """B = 0 and A uniform in ±1/√fan_in (peft's default, Kaiming-uniform with a = √5), drawn from a generator seeded by
    `seed`, so that an adapter does not depend on the global generator's state."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".lora_A.{name}." in key:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif f".lora_B.{name}." in key:
                p.zero_()


def adaptable_layers(net: torch.nn.Module, targets: str) -> list[str]:
    """The names of `net`'s Conv2d and Linear layers that the regex `targets` matches whole (as peft matches them)."""
    pat = re.compile(targets)
    return [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and
            pat.fullmatch(n)]


def adapter_state(model: torch.nn.Module, name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights alone, under peft's stable names (no adapter name inside the keys)."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def load_adapter_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], name: str = ADAPTER) -> None:
    """Load adapter `name`'s weights; every key the adapter has must be there with its shape, and no other."""
    want = adapter_state(model, name)
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
    res = set_peft_model_state_dict(model, sd, adapter_name=name)
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



BASE = "__base__"                       # in a mixed batch: this image is sampled from the base, no adapter
MIX = "__mix__"                         # UserAdapters.mix's scratch adapter


class UserAdapters:
    """Many users' adapters on one base UNet held once: one named adapter per user, each a few percent of the base.
    `forward(x, t, users)` runs a batch that mixes users in one pass (peft's per-sample `adapter_names`; BASE for an
    image from the base); `for_users(users)` is a module that does the same for a sampler. Inside the peft model the
    adapters are named `user_0`, `user_1`, … (peft finds an adapter's weights by its name inside the layer names, so a
    user id such as '2' must not be one)."""

    def __init__(self, base: torch.nn.Module, acfg, users: list[str], seed: int = 0):
        if not users or len(set(users)) != len(users) or BASE in users:
            raise ValueError(f"users must be distinct names, none of them {BASE!r}; got {users}")
        self.users, self.acfg = list(users), acfg
        self._name = {u: f"user_{i}" for i, u in enumerate(users)}
        self.model = wrap(base, acfg, seed, name=self._name[users[0]]).eval()
        for i, u in enumerate(users[1:], 1):
            self.model.add_adapter(self._name[u], lora_config(acfg))
            init_adapter(self.model, self._name[u], seed + i)
        self.model.requires_grad_(False)

    def numbers_per_user(self) -> int:
        return sum(v.numel() for v in self.state(self.users[0]).values())

    def state(self, user: str) -> dict[str, torch.Tensor]:
        return adapter_state(self.model, self._known(user))

    def load(self, user: str, sd: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, sd, self._known(user))

    def _known(self, user: str) -> str:
        if user not in self._name:
            raise KeyError(f"no adapter for user {user!r}; the users are {self.users}")
        return self._name[user]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, users: list[str]) -> torch.Tensor:
        if len(users) != len(x):
            raise ValueError(f"{len(users)} user names for a batch of {len(x)}")
        return self.model(x, t, adapter_names=[u if u == BASE else self._known(u) for u in users])

    def for_users(self, users: list[str]) -> torch.nn.Module:
        return _MixedBatch(self, users)

    def mix(self, weights: dict[str, float]) -> dict[str, torch.Tensor]:
        """One adapter of this rank from a weighted sum of users' adapters: in every layer ΔW = Σ_u w_u ΔW_u (each
        ΔW_u = (α / r) B_u A_u), cut to the best rank-r approximation by SVD (peft's `add_weighted_adapter`, "svd").
        Returned as an adapter state of this object's rank and α, each component's factors balanced (column i of B
        and row i of A of equal norm), so that training can start from it."""
        names = [self._known(u) for u in weights]
        try:
            self.model.add_weighted_adapter(names, [float(w) for w in weights.values()], MIX,
                                            combination_type="svd", svd_rank=self.acfg.rank)
            sd = adapter_state(self.model, MIX)
        finally:
            if MIX in self.model.peft_config:
                self.model.delete_adapter(MIX)
            self.model.requires_grad_(False)
        scale = self.acfg.alpha / self.acfg.rank   # peft's mixture has α = its rank: scale 1
        for ka in [k for k in sd if ".lora_A." in k]:
            kb = ka.replace(".lora_A.", ".lora_B.")
            a, b = sd[ka], sd[kb]                  # A (r, in, …), B (out, r, …): ΔW = Σ_i B[:, i] A[i]
            na = a.flatten(1).norm(dim=1).clamp_min(1e-12)                  # (r,)
            nb = b.transpose(0, 1).flatten(1).norm(dim=1).clamp_min(1e-12)  # (r,)
            c = (na / nb).sqrt()                   # B_i · c_i and A_i / c_i: the same product, equal norms
            sd[kb] = b * (c / scale ** 0.5).view((1, -1) + (1,) * (b.dim() - 2))
            sd[ka] = a / (c * scale ** 0.5).view((-1,) + (1,) * (a.dim() - 1))
        return sd


class _MixedBatch(torch.nn.Module):
    """A sampler's view of UserAdapters for one batch: image i is user users[i]'s (the batch must be the whole list)."""

    def __init__(self, adapters: UserAdapters, users: list[str]):
        super().__init__()
        self._adapters, self.users = [adapters], list(users)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._adapters[0].forward(x, t, self.users)
