"""Batched reverse-diffusion sampling, with ePAPA's switch to the frozen base model for t < k.

Noise is drawn per sample from a generator seeded by (seed, global sample index), so a sample depends only on its
seed and index: not on the batch size, nor on how the samples are sharded over ranks. The sampler walks
`NoiseSchedule.sampling_timesteps(steps)`: all T steps, or a respaced (strided) chain when steps < T.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from papa import ops
from papa.schedule import NoiseSchedule


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def _randn(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


@torch.no_grad()
def sample(model: torch.nn.Module, sched: NoiseSchedule, num: int, *, steps: int, sampler: str = "ancestral",
           eta: float = 1.0, seed: int = 0, first_index: int = 0, batch_size: int = 100,
           base_model: torch.nn.Module | None = None, epapa_k: int = 0, image_shape: tuple[int, ...] = (1, 28, 28),
           device: str | torch.device = "cpu", progress: bool = True) -> torch.Tensor:
    """Draw `num` images in [−1, 1] (float32, CPU). Steps with t < epapa_k use `base_model` (ePAPA)."""
    if epapa_k > 0 and base_model is None:
        raise ValueError("epapa_k > 0 needs the frozen base model")
    ts = sched.sampling_timesteps(steps)
    out = []
    n_batches = (num + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * len(ts), desc="sampling", disable=not progress, dynamic_ncols=True, mininterval=1)
    for b0 in range(0, num, batch_size):
        idx = range(first_index + b0, first_index + min(num, b0 + batch_size))
        gens = sample_generators(seed, idx)
        x = _randn(gens, image_shape).to(device)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            net = base_model if t < epapa_k else model
            tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            eps = net(x, tt)
            noise = _randn(gens, image_shape).to(device) if t_prev >= 0 else torch.zeros_like(x)
            coef = sched.fused_coefficients(tt, torch.full_like(tt, t_prev), sampler, eta)
            x, _, _ = ops.fused_step(x, eps, noise, coef)  # x_{t_prev}, x̂0, log-prob in one pass
            bar.update(1)
        out.append(x.float().clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)
