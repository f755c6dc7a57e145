"""Fused denoising step (C++ extension) against the eager torch composition (papa.schedule.NoiseSchedule.step).

    pytest bench/bench_step.py --benchmark-only

Floor (issue 4): the fused C++ step is ≥ 2× the eager composition at batch 256 of 28×28 on the 2-core CPU, one
thread. Both start from (x_t, ε̂, z, t, t_prev) and produce x_{t−1}, x̂0 and the log-prob.
"""
import pytest
import torch

from benchutil import min_time
from papa import ops
from papa.schedule import NoiseSchedule

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="papa._C not built")


def _case(B=256):
    sched = NoiseSchedule()
    t = torch.randint(1, 1000, (B,))
    x, eps, z = torch.randn(3, B, 1, 28, 28).unbind(0)
    return sched, x, eps, z, t


def test_fused_step_vs_eager(benchmark):
    sched, x, eps, z, t = _case()
    tp = t - 1
    eager = lambda: sched.step(x, eps, t, tp, "ancestral", noise=z)
    fused = lambda: torch.ops.papa.fused_step(x, eps, z, sched.fused_coefficients(t, tp))
    t_ref = min_time(eager)
    benchmark(fused)
    t_fast = benchmark.stats.stats.min
    ratio = t_ref / t_fast
    benchmark.extra_info.update(eager_s=t_ref, fused_s=t_fast, speedup=ratio)
    print(f"\nfused step B=256 28x28: eager {t_ref * 1e3:.3f} ms, fused {t_fast * 1e3:.3f} ms, speedup {ratio:.2f}x")
    assert ratio >= 2.0, f"fused step only {ratio:.2f}x the eager composition (floor 2x)"


def test_cpp_step_log_prob_fwd_bwd_vs_eager(benchmark):
    """The C++ log-prob op (forward + registered autograd backward) against the eager torch formula, 512 pairs × 2
    members of 1×28×28 (one D3PO/DDPO chunk's worth), float32. Reported, with a floor of parity: on a CPU the gain is
    the fused pass over the pixels, not arithmetic."""
    sched = NoiseSchedule()
    B = 1024
    t = torch.randint(1, 1000, (B,))
    coef = sched.fused_coefficients(t, t - 1, "ddim", 1.0)[:, :3].contiguous()
    x, eps, p = torch.randn(3, B, 1, 28, 28).unbind(0)
    g = torch.randn(B)

    def run(fn):
        e = eps.clone().requires_grad_(True)
        fn(x, e, p, coef).backward(g)
        return e.grad

    eager = lambda: run(lambda a, b, c, d: ops.step_log_prob_ref(a, b, c, d))
    fused = lambda: run(lambda a, b, c, d: torch.ops.papa.step_log_prob(a, b, c, d, True))
    torch.testing.assert_close(eager(), fused(), atol=1e-6, rtol=1e-4)
    t_ref = min_time(eager, reps=10)
    benchmark(fused)
    t_fast = benchmark.stats.stats.min
    ratio = t_ref / t_fast
    benchmark.extra_info.update(eager_s=t_ref, fused_s=t_fast, speedup=ratio)
    print(f"\nC++ step log-prob fwd+bwd 1024x28x28: eager {t_ref * 1e3:.2f} ms, C++ {t_fast * 1e3:.2f} ms, "
          f"speedup {ratio:.2f}x")
    assert ratio >= 1.0, f"C++ log-prob fwd+bwd slower than eager torch ({ratio:.2f}x)"
