"""Sampling throughput with the default MNIST config (fast UNet, 100-step respaced ancestral sampler).

    pytest bench/bench_sampling.py --benchmark-only -s

Reports the seconds for 100 samples (issue 2: ≤ 60 s on the 2-core CPU; figure recorded in bench/README.md, not
gated here since absolute times drift between runs). The same-run gate is the fused step against the eager step in
the full sampling loop: the UNet dominates the loop (the step is ~1% of it), so the floor is only "not slower beyond
noise" (≥ 0.9×). Issue 4's 1.2× for 1000-step sampling therefore comes from the UNet: bf16 autocast (gated ≥ 1.2× on
CPUs with bf16 kernels) and torch.compile (reported).
"""
import os

import pytest
import torch

from benchutil import ROOT, interleaved_min_times, min_time
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
    def run(backend):
        monkeypatch.setenv("PAPA_OPS", backend)
        return sample(model, sched, 32, steps=20, seed=0, batch_size=32, progress=False)

    # the two loops differ by ~1 % of their time, so they are timed in alternation: load that comes and goes on the
    # shared machine then hits both alike (timed in separate blocks, the ratio read 0.83x once under load)
    best = interleaved_min_times({"torch": lambda: run("torch"), "cpp": lambda: run("cpp")}, reps=5)
    benchmark.pedantic(lambda: run("cpp"), rounds=1, iterations=1)
    ratio = best["torch"] / best["cpp"]
    benchmark.extra_info.update(eager_s=best["torch"], fused_s=best["cpp"], speedup=ratio)
    print(f"\nsampling loop 32x20 steps: reference-step loop {best['torch']:.2f} s, fused {best['cpp']:.2f} s, "
          f"{ratio:.2f}x")
    assert ratio >= 0.9


def _run(model, sched, S, **kw):
    return sample(model, sched, 100, steps=S, seed=0, batch_size=100, progress=False, **kw)


def _eager_loop(model, sched, S, monkeypatch, images=False):
    """Per-step seconds of the eager float32 loop (eager UNet, torch reference step) on an S-step chain (and, with
    `images`, that loop's images)."""
    with monkeypatch.context() as mp:
        mp.setenv("PAPA_OPS", "torch")
        t = min_time(lambda: _run(model, sched, S), reps=3, warmup=1) / S
        return (t, _run(model, sched, S)) if images else t


def test_bf16_sampling_1000_steps_vs_eager_loop(benchmark, monkeypatch):
    """1000-step sampling of 100 images with the default model: the loop with the UNet under bf16 autocast and the
    fused step against the eager float32 loop (eager UNet, torch reference step). The UNet is ~99 % of a step, so the
    speed must come from it: bf16 runs its convolutions on oneDNN's AMX / AVX-512-BF16 kernels. Timing 1000 steps twice
    would take ~6 minutes here, so the steady per-step times are measured in this run on a 6-step chain (same per-step
    cost, no compilation to charge): ratio = t_eager / t_bf16 per step = the 1000-step ratio. Gated ≥ 1.2× (issue 4)
    where the CPU has bf16 kernels; ε̂ must stay within bf16's error of float32 (the images are not bit-equal; their
    evaluator statistics at 1000 steps are in docs/SAMPLING.md)."""
    from papa.sampling import autocast_bf16, supports_bf16
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    model, sched = _model(cfg), NoiseSchedule.from_config(cfg.diffusion)
    S, threads = 6, 1
    torch.set_num_threads(threads)
    try:
        t_eager = _eager_loop(model, sched, S, monkeypatch)
        benchmark.pedantic(lambda: _run(model, sched, S, precision="bf16"), rounds=3, iterations=1, warmup_rounds=1)
        t_fast = benchmark.stats.stats.min / S
        x = torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        t = torch.randint(0, 1000, (100,), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            eps32, eps16 = model(x, t), autocast_bf16(model, "cpu")(x, t)
    finally:
        torch.set_num_threads(1)
    rel = float((eps16 - eps32).norm() / eps32.norm())
    ratio = t_eager / t_fast
    benchmark.extra_info.update(eager_step_s=t_eager, bf16_step_s=t_fast, speedup=ratio, eps_rel_err=rel,
                                threads=threads)
    print(f"\n1000-step sampling of 100 images ({threads} thread): eager fp32 loop {1000 * t_eager:.0f} s "
          f"({t_eager:.3f} s/step), bf16 UNet + fused step {1000 * t_fast:.0f} s ({t_fast:.3f} s/step): {ratio:.2f}x; "
          f"eps relative error {rel:.1e}")
    assert rel < 2e-2, f"bf16 eps is {rel:.1e} off float32 (bf16 rounding gives ~5e-3)"
    if not supports_bf16(torch.device("cpu")):
        pytest.skip(f"no AVX-512-BF16/AMX here: bf16 measured {ratio:.2f}x, the 1.2x floor applies where oneDNN has "
                    "bf16 kernels")
    assert ratio >= 1.2


def test_compiled_sampling_1000_steps_vs_eager_loop(benchmark, monkeypatch):
    """The same 1000-step sampling with the float32 UNet under torch.compile (inductor) and the fused step, charged its
    measured compilation: ratio = 1000·t_eager / (t_compile + 1000·t_compiled). Inductor can fuse only the
    elementwise work around the convolutions (~25 % of a step), so ~1.2× per step is its ceiling here; the ratio is
    reported, not gated (0.9×–1.5× across runs on the shared 2-core machine). Gated: the compiled loop gives the eager
    loop's images."""
    import time
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    model, sched = _model(cfg), NoiseSchedule.from_config(cfg.diffusion)
    S, threads = 6, 1
    torch.set_num_threads(threads)
    try:
        t_eager, want = _eager_loop(model, sched, S, monkeypatch, images=True)
        t0 = time.perf_counter()
        got = _run(model, sched, S, compile_unet=True)  # first call: compiles
        t_first = time.perf_counter() - t0
        benchmark.pedantic(lambda: _run(model, sched, S, compile_unet=True), rounds=3, iterations=1)
        t_fast = benchmark.stats.stats.min / S
        t_compile = max(0.0, t_first - S * t_fast)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # inductor reorders fp32 sums (~1e-6 per call)
    ratio = 1000 * t_eager / (t_compile + 1000 * t_fast)
    benchmark.extra_info.update(eager_step_s=t_eager, compiled_step_s=t_fast, compile_s=t_compile, speedup=ratio,
                                threads=threads)
    print(f"\n1000-step sampling of 100 images ({threads} thread): eager loop {1000 * t_eager:.0f} s "
          f"({t_eager:.3f} s/step), compiled fp32 UNet + fused step {t_compile:.0f} s compile + {1000 * t_fast:.0f} s "
          f"({t_fast:.3f} s/step): {ratio:.2f}x (reported)")
