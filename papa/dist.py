"""torch.distributed plumbing: launch under torchrun or as one process, sharding helpers, clean teardown.

gloo on CPU, NCCL on GPUs; multi-node through torchrun's rendezvous. A final barrier before destroying the process
group avoids the SIGABRT at exit seen in ~1 of 6 CPU runs without it.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist


def timeout_seconds() -> float:
    """How long a collective may wait for the other ranks (PAPA_DIST_TIMEOUT, default 600 s) before it fails instead
    of hanging: gloo's default is 30 minutes. Errors are shared between ranks (`on_main`) and a failing rank exits
    at once, so this bound is only the backstop for a rank that dies without a word."""
    return float(os.environ.get("PAPA_DIST_TIMEOUT", "600"))


def env_rank() -> int:
    """This process's rank as torchrun sets it, readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
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


def on_main(fn: Callable[[], Any], world: int, rank: int) -> Any:
    """Run `fn` on rank 0 only and give every rank its result, or raise its exception on every rank.

    Rank-0-only work (asking the user, taking the run lock) is where a user error can strike one rank while the others
    wait in a collective; sharing the outcome makes all ranks fail together with the same message instead of leaving
    one in a barrier and the rest in a broadcast until the timeout."""
    if world == 1:
        return fn()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - every failure is re-raised below, on every rank
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def teardown(world: int, ok: bool = True) -> None:
    """End the process group. After a failure no barrier: the other ranks may be failing too, or waiting in another
    collective, and a barrier here is how one rank's error used to hang the run."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
            dist.destroy_process_group()
