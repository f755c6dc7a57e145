"""Sampling throughput with the default MNIST config (fast UNet, 100-step respaced ancestral sampler).

    pytest bench/bench_sampling.py --benchmark-only -s

Reports the seconds for 100 samples (issue 2: ≤ 60 s on the 2-core CPU; figure recorded in bench/README.md, not
gated here since absolute times drift between runs). The same-run gate is the fused step against the eager step in
the full sampling loop: the UNet dominates the loop (the step is ~1% of it), so the floor is only "not slower beyond
noise" (≥ 0.9×); issue 4's 1.2× floor for the whole loop is not met by the fused step alone.
"""
import os

import pytest
import torch

from benchutil import ROOT, min_time
from papa import ops
from papa.config import load_config
from papa.models import build_unet, load_unet
from papa.sampling import sample
from papa.schedule import NoiseSchedule


def _model(cfg):
    path = ROOT / cfg.checkpoints.base
    return load_unet(cfg.model, path) if path.is_file() else build_unet(cfg.model).eval()


def test_sample_100_default_config(benchmark):
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    model, sched = _model(cfg), NoiseSchedule.from_config(cfg.diffusion)
    torch.set_num_threads(int(os.environ.get("PAPA_BENCH_THREADS", "2")))
    try:
        run = lambda: sample(model, sched, 100, steps=cfg.diffusion.sample_steps, seed=0, batch_size=100,
                             progress=False)
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(1)
    secs = benchmark.stats.stats.min
    benchmark.extra_info.update(seconds_for_100=secs, threads=int(os.environ.get("PAPA_BENCH_THREADS", "2")))
    print(f"\n100 samples, default MNIST config, {cfg.diffusion.sample_steps} steps: {secs:.1f} s")


@pytest.mark.skipif(not ops.extension_available(), reason="papa._C not built")
def test_sampling_loop_fused_vs_eager(benchmark, monkeypatch):
    """The whole loop with the fused step against the same loop on the torch reference step (20 steps, 32 images)."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    model, sched = _model(cfg), NoiseSchedule.from_config(cfg.diffusion)
    run = lambda: sample(model, sched, 32, steps=20, seed=0, batch_size=32, progress=False)
    monkeypatch.setenv("PAPA_OPS", "torch")
    t_ref = min_time(run, reps=3, warmup=1)
    monkeypatch.setenv("PAPA_OPS", "cpp")
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    ratio = t_ref / benchmark.stats.stats.min
    benchmark.extra_info.update(eager_s=t_ref, speedup=ratio)
    print(f"\nsampling loop 32x20 steps: reference-step loop {t_ref:.2f} s, fused {benchmark.stats.stats.min:.2f} s, "
          f"{ratio:.2f}x")
    assert ratio >= 0.9


def test_compiled_sampling_1000_steps_vs_eager_loop(benchmark):
    """1000-step sampling of 100 images with the default model: the loop with the UNet under torch.compile and the
    fused step against the eager loop (eager UNet, eager torch step). The UNet is ~99 % of the loop, so this is where
    the speed is. Timing 1000 steps twice would take ~10 minutes here, so both paths' steady per-step times are measured
    in this run on a short chain (same per-step cost) and the compiled path is charged its measured compilation:
    ratio = 1000·t_eager / (t_compile + 1000·t_compiled), reported against issue 4's 1.2× (not gated, see below)."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    model, sched = _model(cfg), NoiseSchedule.from_config(cfg.diffusion)
    threads = 1  # conftest's pinning; on 2 shared cores one thread gives the steadiest ratio
    torch.set_num_threads(threads)
    import time
    try:
        S = 6  # a 6-step chain per timed call: every step, of any chain, is one UNet call at batch 100 + one step

        def run(compile_unet):
            return sample(model, sched, 100, steps=S, seed=0, batch_size=100, progress=False,
                          compile_unet=compile_unet)

        os.environ["PAPA_OPS"] = "torch"
        try:
            t_eager = min_time(lambda: run(False), reps=3, warmup=1) / S
            want = run(False)
        finally:
            os.environ.pop("PAPA_OPS")
        t0 = time.perf_counter()
        got = run(True)  # first call: compiles
        t_first = time.perf_counter() - t0
        benchmark.pedantic(lambda: run(True), rounds=3, iterations=1)
        t_fast = benchmark.stats.stats.min / S
        t_compile = max(0.0, t_first - S * t_fast)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # inductor reorders fp32 sums (~1e-6 per call)
    ratio = 1000 * t_eager / (t_compile + 1000 * t_fast)
    benchmark.extra_info.update(eager_step_s=t_eager, compiled_step_s=t_fast, compile_s=t_compile, speedup=ratio,
                                threads=threads)
    print(f"\n1000-step sampling of 100 images ({threads} threads): eager loop {1000 * t_eager:.0f} s "
          f"({t_eager:.3f} s/step), compiled UNet + fused step {t_compile:.0f} s compile + {1000 * t_fast:.0f} s "
          f"({t_fast:.3f} s/step): {ratio:.2f}x")
    # Not gated on speed: on this shared 2-core machine the compiled step measured 0.91x-1.96x the eager one and the
    # 1000-step ratio 0.97x-1.47x across runs, with the load; issue 4's 1.2x is reported above and in bench/README.md.
    # What is gated is that the compiled loop gives the eager loop's images (the assert_close above).
