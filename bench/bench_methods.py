"""What one feedback unit costs each method: a round's draw, feedback and update (no evaluation, no checkpoint) over
the round's feedback units (image labels, pair choices or reward queries), every method at the comparison's settings.

    pytest bench/bench_methods.py -s                      tiny model, every method: checks the measurement (seconds)
    PAPA_BENCH_LONG=1 pytest bench/bench_methods.py -s    the default MNIST model at configs/compare_mnist.yaml's
                                                          settings (about 6 minutes at one thread)

Every method's engine lives in this one process, built once; the rounds are timed in alternation (one round of each
method in turn, `CYCLES` times after a warm-up cycle), so load that comes and goes hits every method of a cycle alike.
The figure is each method's cost per feedback unit over ePAPA's in the same cycle, the median over the cycles: the
comparison's timing columns (`papa.compare`) come from whole runs that may share the machine unevenly, these ratios
do not depend on that. The rounds are the runs' first rounds (ePAPA's replay draws from them as it does in a run).

Gated (long run only): the trajectory methods (D3PO, DDPO, SDPO), which train a 20-step chain's steps instead of
many timesteps per image, cost at most half of ePAPA per feedback unit (docs/COMPARE.md names the fastest method by
this benchmark). The tiny run gates what the measurement rests on: every method's round used its feedback units, and
each cost is positive and finite.
"""
import math
import statistics
import time

import torch

from benchutil import LONG, ROOT, TINY_MODEL, bench_threads, tiny_checkpoints

COMPARE = ROOT / "configs" / "compare_mnist.yaml"
CYCLES = 3
FAST = ("d3po", "ddpo", "sdpo")   # each ≤ FLOOR × ePAPA's cost per unit on the default model
FLOOR = 0.5
TINY = [*TINY_MODEL, "papa.timesteps_per_sample=6", "diffusion_dpo.timesteps_per_sample=4",
        "diffusion_kto.timesteps_per_sample=4", "train.timestep_chunk=8", "diffusion.sample_steps=4",
        "train.traj_steps=4", "eval.real_max=50", "train.ema_decay=0",
        "feedback.skip_below=0", "feedback.reject=false"]   # the untrained oracle is unsure of everything


def engines(tmp, extra: list[str]) -> dict:
    """Every method of the comparison, seed 0, with its own run directory under `tmp`."""
    from papa import compare
    from papa.config import load_config
    from papa.engine import Engine
    spec = compare.load_compare(COMPARE)
    out = {}
    for method, seed, _, ov in compare.plan(spec):
        if seed != spec["seeds"][0]:
            continue
        cfg = load_config(spec["base_config"], [*ov, f"train.output_dir={tmp}", *extra])
        e = Engine.from_config(cfg, compare.run_dir(cfg))
        e.dir.take(True)
        out[method] = e
    return out


def measure(tmp, extra: list[str], cycles: int) -> dict[str, list[float]]:
    """Seconds per feedback unit of each method's rounds, cycle by cycle (after one untimed warm-up cycle)."""
    torch.set_num_threads(bench_threads())
    es = engines(tmp, extra)
    per_unit: dict[str, list[float]] = {m: [] for m in es}
    for c in range(cycles + 1):
        for m, e in es.items():
            t0 = time.perf_counter()
            data, upd = e.train_round(c)
            s = time.perf_counter() - t0
            assert data.queries > 0, f"{m}: round {c + 1} used no feedback"
            # the tiny run's untrained oracle may tie every pair; the shipped one gives every method work to do
            assert upd["unet_items"] > 0 or not LONG, f"{m}: round {c + 1} trained nothing"
            if c:
                per_unit[m].append(s / data.queries)
    return per_unit


def ratios(per_unit: dict[str, list[float]], base: str = "epapa") -> dict[str, float]:
    """Each method's cost per unit over `base`'s in the same cycle, median over the cycles."""
    return {m: statistics.median(a / b for a, b in zip(v, per_unit[base])) for m, v in per_unit.items()}


def report(per_unit, r) -> str:
    lines = [f"{'method':<14} {'s per unit (median)':>20} {'/ epapa (median of cycles)':>28}"]
    for m in sorted(r, key=r.get):
        lines.append(f"{m:<14} {statistics.median(per_unit[m]):>20.3f} {r[m]:>28.2f}   "
                     f"(cycles {', '.join(f'{x:.3f}' for x in per_unit[m])})")
    return "\n".join(lines)


def test_cost_per_feedback_unit(tmp_path, benchmark):
    if LONG:
        extra, cycles = [], CYCLES
    else:
        extra, cycles = [*TINY, *tiny_checkpoints(tmp_path)], 2
    per_unit = benchmark.pedantic(lambda: measure(tmp_path / "runs", extra, cycles), rounds=1, iterations=1)
    r = ratios(per_unit)
    benchmark.extra_info.update(per_unit_s={m: statistics.median(v) for m, v in per_unit.items()}, ratio_to_epapa=r,
                                threads=bench_threads(), long=LONG)
    print(f"\ncost per feedback unit, {'default MNIST model' if LONG else 'tiny model'}, {bench_threads()} thread(s), "
          f"{cycles} cycles:\n{report(per_unit, r)}")
    assert set(per_unit) >= {"epapa", *FAST}, f"the comparison config lost a method: {sorted(per_unit)}"
    assert all(len(v) == cycles and all(math.isfinite(x) and x > 0 for x in v) for v in per_unit.values())
    if LONG:
        slow = {m: round(r[m], 2) for m in FAST if r[m] > FLOOR}
        assert not slow, f"per feedback unit these cost more than {FLOOR}x ePAPA: {slow}"
