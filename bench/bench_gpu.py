"""GPU benchmarks (skipped without CUDA, with the reason printed). Same-run ratios against eager torch.

    pytest bench/bench_gpu.py -s        (scripts/gpu_check.sh runs these and writes the JSON under $OUT)

Floors (issue 4): Triton log-prob + D3PO loss forward+backward ≥ 3× eager torch with ≤ 0.5× its peak memory at
512 pairs × 20 steps × 1×28×28; CUDA-graph sampling of 10 images × 1000 steps with the paper UNet ≥ 3× the eager loop.
Reported, not gated: the fused C++/CUDA step against the eager step, and one PAPA update against the reference loop.
"""
import pytest
import torch

from benchutil import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU benchmarks need one")


def cuda_time(fn, reps=20, warmup=5) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_triton_logprob_dpo_vs_eager(benchmark):
    from papa_kernels.dpo import fused_d3po_loss, fused_d3po_loss_ref
    from papa.schedule import NoiseSchedule
    P, S = 512, 20
    N = P * S
    sched = NoiseSchedule()
    t = torch.randint(100, 1000, (N * 2,))
    coef = sched.fused_coefficients(t, t - 1)[:, :3].view(N, 2, 3).cuda()
    x, p, er = (torch.randn(N, 2, 1, 28, 28, device="cuda") for _ in range(3))
    ep0 = er + 0.01 * torch.randn_like(er)
    h = torch.tensor([[1.0, -1.0]], device="cuda").repeat(N, 1)

    def run(fn):
        ep = ep0.clone().requires_grad_(True)
        loss = fn(x, ep, er, p, coef, h)[0].mean()
        loss.backward()
        return ep.grad

    eager = lambda: run(fused_d3po_loss_ref)
    fused = lambda: run(fused_d3po_loss)
    t_e, t_f = cuda_time(eager), cuda_time(fused)
    m_e, m_f = peak_memory(eager), peak_memory(fused)
    benchmark.pedantic(fused, rounds=5, iterations=1)
    benchmark.extra_info.update(eager_s=t_e, triton_s=t_f, speedup=t_e / t_f, eager_peak=m_e, triton_peak=m_f,
                                memory_ratio=m_f / m_e, device=torch.cuda.get_device_name())
    print(f"\nlog-prob + D3PO fwd+bwd, {P} pairs x {S} steps: eager {t_e * 1e3:.2f} ms {m_e / 2**20:.0f} MiB, "
          f"triton {t_f * 1e3:.2f} ms {m_f / 2**20:.0f} MiB -> {t_e / t_f:.2f}x, memory {m_f / m_e:.2f}x")
    assert t_e / t_f >= 3.0 and m_f / m_e <= 0.5


def test_cuda_graph_sampling_paper_unet(benchmark):
    from papa.config import load_config
    from papa.models import build_unet
    from papa.sampling import sample
    from papa.schedule import NoiseSchedule
    cfg = load_config(ROOT / "configs" / "mnist_paper.yaml")
    model = build_unet(cfg.model).cuda().eval()
    sched = NoiseSchedule.from_config(cfg.diffusion)
    run = lambda g: sample(model, sched, 10, steps=1000, seed=0, batch_size=10, device="cuda", progress=False,
                           cuda_graph=g)
    eager, graphed = run(False), run(True)
    torch.testing.assert_close(eager, graphed, atol=2e-3, rtol=0)  # the same samples
    t_e = cuda_time(lambda: run(False), reps=3, warmup=1)
    t_g = cuda_time(lambda: run(True), reps=3, warmup=1)
    benchmark.pedantic(lambda: run(True), rounds=1, iterations=1)
    benchmark.extra_info.update(eager_s=t_e, graph_s=t_g, speedup=t_e / t_g, device=torch.cuda.get_device_name())
    print(f"\nsampling 10 x 1000 steps, paper UNet: eager {t_e:.2f} s, CUDA graph {t_g:.2f} s -> {t_e / t_g:.2f}x")
    assert t_e / t_g >= 3.0


def test_fused_cuda_step_vs_eager(benchmark):
    from papa import ops
    from papa.schedule import NoiseSchedule
    if not ops.extension_available():
        pytest.skip("papa._C not built")
    sched = NoiseSchedule()
    B = 256
    t = torch.randint(1, 1000, (B,), device="cuda")
    x, eps, z = (torch.randn(B, 1, 28, 28, device="cuda") for _ in range(3))
    eager = lambda: sched.step(x, eps, t, t - 1, "ancestral", noise=z)
    fused = lambda: torch.ops.papa.fused_step(x, eps, z, sched.fused_coefficients(t, t - 1))
    t_e, t_f = cuda_time(eager, reps=200), cuda_time(fused, reps=200)
    benchmark.pedantic(fused, rounds=50, iterations=1)
    benchmark.extra_info.update(eager_s=t_e, fused_s=t_f, speedup=t_e / t_f)
    print(f"\nfused step B=256 on GPU: eager {t_e * 1e6:.0f} us, fused {t_f * 1e6:.0f} us -> {t_e / t_f:.2f}x")
