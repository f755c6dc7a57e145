"""torch.distributed plumbing: launch under torchrun or as one process, sharding helpers, clean teardown.

gloo on CPU, NCCL on GPUs; multi-node through torchrun's rendezvous. A final barrier before destroying the process
group avoids the SIGABRT at exit seen in ~1 of 6 CPU runs without it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shard(n: int, rank: int, world: int) -> range:
    """Contiguous, balanced slice of range(n) for this rank."""
    lo, hi = n * rank // world, n * (rank + 1) // world
    return range(lo, hi)


def gather_cat(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order (shapes may differ in dim 0)."""
    if world == 1:
        return t
    parts: list = [None] * world
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts).to(t.device)


def broadcast_tensor(t: torch.Tensor, world: int, src: int = 0) -> torch.Tensor:
    if world == 1:
        return t
    obj = [t.cpu()]
    dist.broadcast_object_list(obj, src=src)
    return obj[0].to(t.device)


def all_reduce_grads(model: torch.nn.Module, world: int, mean: bool = False) -> None:
    """Sum (or average, the DDP convention) gradients over ranks, flattened into one buffer for one collective."""
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    if mean:
        flat /= world
    off = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[off:off + n].view_as(p))
        off += n


def all_reduce_sum(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def teardown(world: int) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
