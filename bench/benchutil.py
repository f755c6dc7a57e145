"""Shared benchmark helpers (uniquely named: tests/ has a conftest too).

Every gate is the median of per-pair ratios reference time / fast time, the two timed in alternation in the same run
(reference, fast, reference, fast, …): load that comes and goes on the shared 2-core machine then hits both members
of a pair alike, and the median drops the pairs it hit unevenly. Never an absolute time (absolute times drift 20–30 %
between runs and 2–7× with a second job beside them).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

LONG = os.environ.get("PAPA_BENCH_LONG", "") not in ("", "0")  # opt-in long benchmarks (bench/README.md)


# a tiny UNet for the benchmarks' quick mode, which checks a measurement in seconds (tiny_checkpoints)
TINY_MODEL = ["model.down_channels=[8,16,16,16]", "model.mid_channels=[16,16,16]", "model.time_emb_dim=16"]


def tiny_checkpoints(d: Path) -> list[str]:
    """Untrained tiny base model, 11-class oracle and evaluator files in `d`; the overrides that point a config at
    them (with TINY_MODEL)."""
    import torch
    from papa import checkpoint
    from papa.config import load_config
    from papa.models import EvaluatorCNN, OracleCNN, build_unet
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "mnist.yaml", TINY_MODEL)
    checkpoint.atomic_save({"state_dict": build_unet(cfg.model).state_dict()}, d / "base.pt")
    checkpoint.atomic_save({"state_dict": OracleCNN(num_classes=11).state_dict()}, d / "oracle.pt")
    checkpoint.atomic_save({"state_dict": EvaluatorCNN().state_dict()}, d / "evaluator.pt")
    return [f"checkpoints.base={d / 'base.pt'}", f"checkpoints.oracle={d / 'oracle.pt'}",
            f"checkpoints.evaluator={d / 'evaluator.pt'}"]


def bench_threads() -> int:
    """Threads for the benchmarks that take a thread count: PAPA_BENCH_THREADS, default 1 (a second job on the
    2-core machine slows a 2-thread run 5×, a 1-thread run far less)."""
    return int(os.environ.get("PAPA_BENCH_THREADS", "1"))


@dataclass
class Paired:
    """Seconds of a reference and a fast path measured in alternation; pair i is (reference_s[i], fast_s[i])."""
    reference_s: list[float]
    fast_s: list[float]

    @property
    def ratios(self) -> list[float]:
        return [r / f for r, f in zip(self.reference_s, self.fast_s)]

    @property
    def ratio(self) -> float:
        """The gated figure: the median of the per-pair ratios (> 1: the fast path is faster)."""
        return statistics.median(self.ratios)

    def info(self, reference: str = "reference", fast: str = "fast") -> dict[str, Any]:
        return {f"{reference}_s": statistics.median(self.reference_s), f"{fast}_s": statistics.median(self.fast_s),
                "ratio": self.ratio, "ratios": [round(r, 3) for r in self.ratios], "pairs": len(self.fast_s)}

    def line(self, reference: str = "reference", fast: str = "fast", unit: float = 1e3, suffix: str = "ms") -> str:
        return (f"{reference} {statistics.median(self.reference_s) * unit:.3f} {suffix}, {fast} "
                f"{statistics.median(self.fast_s) * unit:.3f} {suffix} (medians of {len(self.fast_s)}): median ratio "
                f"{self.ratio:.2f}x (pairs {', '.join(f'{r:.2f}' for r in self.ratios)})")


def alternated(reference: Callable[[], Any], fast: Callable[[], Any], reps: int, warmup: int = 1, inner: int = 1,
               benchmark=None) -> Paired:
    """Time `reference` and `fast` in alternation, `reps` pairs after `warmup` untimed pairs; each timing covers
    `inner` calls (for calls too short for one timer reading), reported per call.

    With pytest-benchmark's `benchmark` fixture the fast path's rounds also feed its table: `fast` is the timed
    target and the reference the untimed setup of each round, so the order stays reference, fast, reference, fast."""
    for _ in range(warmup):
        reference()
        fast()
    ref_s: list[float] = []
    fast_s: list[float] = []

    def timed(fn, out):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)

    if benchmark is None:
        for _ in range(reps):
            timed(reference, ref_s)
            timed(fast, fast_s)
    else:
        benchmark.pedantic(lambda: timed(fast, fast_s), setup=lambda: timed(reference, ref_s), rounds=reps,
                           iterations=1)
    return Paired(ref_s, fast_s)
