"""GPU benchmarks (skipped without CUDA, with the reason printed). Medians of per-pair ratios against eager torch,
the two timed in alternation in the same run (benchutil.alternated; every timed call ends with a device sync).

    pytest bench/bench_gpu.py -s        (scripts/gpu_check.sh runs these and writes the JSON under $OUT)

Floors: Triton log-prob + D3PO loss forward+backward ≥ 3× eager torch with ≤ 0.5× its peak memory at
512 pairs × 20 steps × 1×28×28; CUDA-graph sampling of 10 images × 1000 steps with the paper UNet ≥ 3× the eager loop;
the fused C++/CUDA step ≥ 1.2× the eager step at batch 256 (launch-bound: ~45 kernels against ~28, counted, since no
GPU run has measured it yet). None of these floors has been checked on a GPU yet (bench/README.md).
"""
import pytest
import torch

from benchutil import ROOT, alternated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU benchmarks need one")


def synced(fn):
    """fn followed by a device sync, so a wall-clock timing covers the work and not only its launch."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def peak_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_triton_logprob_dpo_vs_eager(benchmark):
    from papa.ops_ref import fused_d3po_loss_ref
    from papa.schedule import NoiseSchedule
    from papa_kernels.dpo import fused_d3po_loss
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

    eager, fused = synced(lambda: run(fused_d3po_loss_ref)), synced(lambda: run(fused_d3po_loss))
    m = alternated(eager, fused, reps=15, warmup=3, benchmark=benchmark)
    m_e, m_f = peak_memory(eager), peak_memory(fused)
    benchmark.extra_info.update(m.info("eager", "triton"), eager_peak=m_e, triton_peak=m_f, memory_ratio=m_f / m_e,
                                device=torch.cuda.get_device_name())
    print(f"\nlog-prob + D3PO fwd+bwd, {P} pairs x {S} steps: {m.line('eager', 'triton')}; peak {m_e / 2**20:.0f} vs "
          f"{m_f / 2**20:.0f} MiB -> memory {m_f / m_e:.2f}x")
    assert m.ratio >= 3.0, f"Triton log-prob + D3PO only {m.ratio:.2f}x eager (floor 3x)"
    assert m_f / m_e <= 0.5, f"Triton log-prob + D3PO peak memory {m_f / m_e:.2f}x eager's (floor 0.5x)"


def test_cuda_graph_sampling_paper_unet(benchmark):
    from papa.config import load_config
    from papa.models import build_unet
    from papa.sampling import sample
    from papa.schedule import NoiseSchedule
    cfg = load_config(ROOT / "configs" / "mnist_paper.yaml")
    model = build_unet(cfg.model).cuda().eval()
    sched = NoiseSchedule.from_config(cfg.diffusion)
    run = lambda g: synced(lambda: sample(model, sched, 10, steps=1000, seed=0, batch_size=10, device="cuda",
                                          progress=False, cuda_graph=g))
    eager, graphed = run(False), run(True)
    torch.testing.assert_close(eager(), graphed(), atol=2e-3, rtol=0)  # the same samples (and the warm-up)
    m = alternated(eager, graphed, reps=3, warmup=0, benchmark=benchmark)
    benchmark.extra_info.update(m.info("eager", "cuda_graph"), device=torch.cuda.get_device_name())
    print(f"\nsampling 10 x 1000 steps, paper UNet: {m.line('eager', 'CUDA graph', 1, 's')}")
    assert m.ratio >= 3.0, f"CUDA-graph sampling only {m.ratio:.2f}x the eager loop (floor 3x)"


def test_fused_cuda_step_vs_eager(benchmark):
    from papa import ops
    from papa.schedule import NoiseSchedule
    if not ops.extension_available():
        pytest.skip("papa._C not built")
    sched = NoiseSchedule()
    B = 256
    t = torch.randint(1, 1000, (B,), device="cuda")
    x, eps, z = (torch.randn(B, 1, 28, 28, device="cuda") for _ in range(3))
    eager = synced(lambda: sched.step(x, eps, t, t - 1, "ancestral", noise=z))
    fused = synced(lambda: torch.ops.papa.fused_step(x, eps, z, sched.fused_coefficients(t, t - 1)))
    m = alternated(eager, fused, reps=25, warmup=5, inner=20, benchmark=benchmark)
    benchmark.extra_info.update(m.info("eager", "fused"), device=torch.cuda.get_device_name())
    print(f"\nfused step B=256 on GPU: {m.line('eager', 'fused', 1e6, 'us')}")
    assert m.ratio >= 1.2, f"fused CUDA step only {m.ratio:.2f}x the eager step (floor 1.2x)"
