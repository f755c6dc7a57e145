"""The C++ extension's CPU ops against the eager torch compositions, one thread, timed in alternation.

    pytest bench/bench_step.py -s

Floors (medians of alternated per-pair ratios, set to hold with a second job on the 2-core machine): the fused C++
step ≥ 1.5× the eager composition (`NoiseSchedule.step`) at batch 256 of 28×28; the C++ step log-prob forward +
registered backward ≥ 1× the torch reference (`papa.ops_ref.step_log_prob_ref`, the tests' oracle). The original
target was 2× of the fused step: it read 3.9× when first recorded (2026-11-22, eager 1.05 ms), 1.9–2.3× in the
2026-12-01 runs, the previous min-of-reps version of this benchmark included (eager 0.5–0.66 ms, fused 0.26–0.29 ms;
why the eager step got faster is not established), so 2× is not a floor that holds here (bench/README.md).
"""
import pytest
import torch

from benchutil import alternated
from papa import ops
from papa.schedule import NoiseSchedule

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="papa._C not built")


def _case(B=256):
    sched = NoiseSchedule()
    t = torch.randint(1, 1000, (B,))
    x, eps, z = torch.randn(3, B, 1, 28, 28).unbind(0)
    return sched, x, eps, z, t


def test_fused_step_vs_eager(benchmark):
    """Both start from (x_t, ε̂, z, t, t_prev) and produce x_{t−1}, x̂0 and the log-prob."""
    sched, x, eps, z, t = _case()
    tp = t - 1
    eager = lambda: sched.step(x, eps, t, tp, "ancestral", noise=z)
    fused = lambda: torch.ops.papa.fused_step(x, eps, z, sched.fused_coefficients(t, tp))
    m = alternated(eager, fused, reps=15, warmup=3, inner=20, benchmark=benchmark)
    benchmark.extra_info.update(m.info("eager", "fused"))
    print(f"\nfused step B=256 28x28: {m.line('eager', 'fused')}")
    assert m.ratio >= 1.5, f"fused step only {m.ratio:.2f}x the eager composition (floor 1.5x)"


def test_cpp_step_log_prob_fwd_bwd_vs_eager(benchmark):
    """512 pairs × 2 members of 1×28×28 (one D3PO/DDPO chunk's worth), float32. On a CPU the gain is the fused pass
    over the pixels, not arithmetic."""
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

    eager = lambda: run(ops.step_log_prob_ref)
    fused = lambda: run(lambda a, b, c, d: torch.ops.papa.step_log_prob(a, b, c, d, True))
    torch.testing.assert_close(eager(), fused(), atol=1e-6, rtol=1e-4)
    m = alternated(eager, fused, reps=15, warmup=1, inner=3, benchmark=benchmark)
    benchmark.extra_info.update(m.info("eager", "cpp"))
    print(f"\nC++ step log-prob fwd+bwd 1024x28x28: {m.line('eager', 'C++')}")
    assert m.ratio >= 1.0, f"C++ log-prob fwd+bwd slower than eager torch ({m.ratio:.2f}x, floor 1x)"
