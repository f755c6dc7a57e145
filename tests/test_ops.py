"""papa.ops: the dispatch rule, and every backend of every op (the torch references included) against float64
formulas written here from the maths, sharing no code with papa. Also: the ops run with triton absent."""
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from papa import ops
from papa.schedule import NoiseSchedule
from testutil import ROOT

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="papa._C not built (pip install -e .)")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ALL_BACKENDS = ["torch", pytest.param("cpp", marks=needs_ext), "triton"]


# ----------------------------------------------------------------------------- float64 oracles, from the formulas


def normal_lp64(x, mu, sigma, reduce="mean"):
    """Per-sample log N(x; μ, σ² I) in float64 by torch.distributions, pixel mean or sum. sigma: (B,)."""
    s = sigma.double().reshape(-1, *([1] * (x.ndim - 1)))
    lp = torch.distributions.Normal(mu.double(), s).log_prob(x.double()).flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def step64(x, eps, z, coef):
    """The fused step in float64: μ = c_xt x + c_eps ε̂, x_prev = μ + σ z, x̂0 = clamp(a0 x − b0 ε̂, −1, 1),
    log π = log N(x_prev; μ, σ²) pixel mean (NaN where σ = 0)."""
    x, eps, z, c = (v.double() for v in (x, eps, z, coef))
    col = lambda i: c[:, i].reshape(-1, *([1] * (x.ndim - 1)))
    mu = col(0) * x + col(1) * eps
    x_prev = mu + col(2) * z
    sigma = c[:, 2]
    ok = sigma > 0
    lp = torch.full((len(x),), math.nan, dtype=torch.float64)
    lp[ok] = normal_lp64(x_prev[ok], mu[ok], sigma[ok])
    return x_prev, (col(3) * x - col(4) * eps).clamp(-1, 1), lp


def logprob64(x, eps, x_prev, coef, reduce="mean"):
    c = coef.double()
    col = lambda i: c[:, i].reshape(-1, *([1] * (x.ndim - 1)))
    return normal_lp64(x_prev, col(0) * x.double() + col(1) * eps.double(), c[:, 2], reduce)


def d3po64(lp, lr, h, beta, clip):
    """D3PO's loss as the paper writes it: r = clamp(exp(lp − lr), 1 − ε, 1 + ε), L = −log σ(β Σ_i h_i log r_i)."""
    r = torch.exp(lp.double() - lr.double()).clamp(1 - clip, 1 + clip)
    return -torch.nn.functional.logsigmoid(beta * (h.double() * torch.log(r)).sum(1))


def _inputs(B, shape, dtype, device="cpu"):
    sched = NoiseSchedule()
    t = torch.randint(1, 1000, (B,))
    t[0] = 0  # one sample at the last step: σ = 0, log-prob NaN by convention
    coef = sched.fused_coefficients(t, t - 1).to(device)
    x, eps, z = (torch.randn(B, *shape, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    return x, eps, z, coef


def _assert_step_close(got, want, dtype):
    tol = TOL[dtype]
    for g, w in zip(got[:2], want[:2]):
        assert g.dtype == dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, atol=tol * 10, rtol=tol)
    assert got[2].dtype == torch.float32
    assert torch.isnan(got[2][0]) and torch.isnan(want[2][0])
    torch.testing.assert_close(got[2][1:].double(), want[2][1:], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- the dispatch rule


def _on(device: str):
    """Stands in for a tensor on `device` (the rule reads only .device), so the CUDA preference is testable here."""
    return types.SimpleNamespace(device=torch.device(device))


def test_rule_prefers_triton_then_cpp_on_cuda_and_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("PAPA_OPS", raising=False)
    monkeypatch.setattr(ops, "extension_available", lambda: True)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    cuda, cpu = _on("cuda"), _on("cpu")
    assert [ops.backend(op, cuda) for op in ("fused_step", "step_log_prob", "fused_d3po_loss")] == \
           ["cpp", "triton", "triton"]
    assert [ops.backend(op, cpu) for op in ("fused_step", "step_log_prob", "fused_d3po_loss")] == \
           ["cpp", "cpp", "torch"]
    assert ops.backend("step_log_prob", _on("meta")) == "torch"  # a device with no preference: the reference
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert [ops.backend(op, cuda) for op in ("fused_step", "step_log_prob", "fused_d3po_loss")] == \
           ["cpp", "cpp", "torch"]
    monkeypatch.setattr(ops, "extension_available", lambda: False)
    assert {ops.backend(op, d) for op in ops.IMPLEMENTATIONS for d in (cuda, cpu)} == {"torch"}


def test_override_context_beats_env_and_falls_back_to_torch_where_an_op_lacks_the_backend(monkeypatch):
    monkeypatch.setattr(ops, "extension_available", lambda: True)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setenv("PAPA_OPS", "triton")
    cpu = _on("cpu")
    assert ops.backend("step_log_prob", cpu) == "triton"
    assert ops.backend("fused_step", cpu) == "torch"  # no Triton fused step: the reference
    with ops.use_backend("cpp"):
        assert ops.backend("step_log_prob", cpu) == "cpp" and ops.backend("fused_d3po_loss", cpu) == "torch"
        with ops.use_backend("torch"):
            assert {ops.backend(op, _on("cuda")) for op in ops.IMPLEMENTATIONS} == {"torch"}
        assert ops.forced_backend() == "cpp"
    assert ops.forced_backend() == "triton"
    monkeypatch.delenv("PAPA_OPS")
    assert ops.forced_backend() is None


def test_forcing_a_backend_that_is_not_installed_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "extension_available", lambda: False)
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    x, eps, z, coef = _inputs(2, (1, 4, 4), torch.float32)
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="not installed.*pip install"):
        ops.fused_step(x, eps, z, coef)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="not installed.*triton"):
        ops.step_log_prob(x, eps, z, coef)


def test_bad_backend_name(monkeypatch):
    x, eps, z, coef = _inputs(2, (1, 4, 4), torch.float32)
    monkeypatch.setenv("PAPA_OPS", "fortran")
    with pytest.raises(ValueError, match="PAPA_OPS"):
        ops.fused_step(x, eps, z, coef)
    with pytest.raises(ValueError, match="use_backend"), ops.use_backend("fortran"):
        pass


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "PAPA_OPS"}, "OMP_NUM_THREADS": "1"},
                          timeout=300)


def test_importing_papa_ops_queries_no_cuda_and_loads_no_backend():
    r = _run_python("""
        import sys, torch
        def no(*a, **k):
            raise AssertionError("CUDA queried at import time")
        torch.cuda.is_available = torch.cuda.device_count = torch.cuda.init = torch.cuda.current_device = no
        import papa.ops, papa.sampling
        assert "papa._C" not in sys.modules and "triton" not in sys.modules, sorted(sys.modules)
        print("lazy")
    """)
    assert r.returncode == 0 and "lazy" in r.stdout, r.stderr


def test_ops_engine_and_methods_run_with_triton_absent():
    """A machine without triton: papa.engine and every method import, the ops choose a non-Triton backend and give
    the references' numbers; forcing Triton is a clear error."""
    r = _run_python("""
        import sys
        class NoTriton:  # what an environment without the package looks like to `import triton`
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoTriton())
        import importlib, pathlib
        import torch
        import papa.engine, papa.algos, papa.train
        from papa import ops, ops_ref
        from papa.schedule import NoiseSchedule
        for f in sorted(pathlib.Path(papa.algos.__file__).parent.glob("[!_]*.py")):  # every method's module
            importlib.import_module(f"papa.algos.{f.stem}")
        try:
            import papa_kernels.logprob
        except ImportError:
            pass
        else:
            raise AssertionError("triton was not hidden")
        assert not ops.triton_available()
        sched = NoiseSchedule()
        t = torch.randint(1, 1000, (4,))
        coef = sched.fused_coefficients(t, t - 1)
        x, e, z = torch.randn(3, 4, 1, 5, 7).unbind(0)
        ext = "cpp" if ops.extension_available() else "torch"
        assert [ops.backend(op, x) for op in ("fused_step", "step_log_prob", "fused_d3po_loss")] == [ext, ext, "torch"]
        for got, want in zip(ops.fused_step(x, e, z, coef), ops_ref.fused_step_ref(x, e, z, coef)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        e1 = e.clone().requires_grad_(True)
        lp = ops.step_log_prob(x, e1, z, coef)
        lp.sum().backward()
        torch.testing.assert_close(lp, ops_ref.step_log_prob_ref(x, e, z, coef), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(e1.grad).all()
        v = lambda a: a.view(2, 2, 1, 5, 7)
        h = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        ep = v(e).clone().requires_grad_(True)
        loss = ops.fused_d3po_loss(v(x), ep, v(e) + 0.01, v(z), coef.view(2, 2, 5), h)[0]
        loss.sum().backward()
        want = ops_ref.fused_d3po_loss_ref(v(x), v(e), v(e) + 0.01, v(z), coef.view(2, 2, 5), h)[0]
        assert torch.equal(loss.detach(), want) and torch.isfinite(ep.grad).all()
        with ops.use_backend("triton"):
            try:
                ops.fused_d3po_loss(v(x), v(e), v(e), v(z), coef.view(2, 2, 5), h)
            except RuntimeError as err:
                assert "not installed" in str(err)
            else:
                raise AssertionError("forcing an absent Triton did not fail")
        assert "triton" not in sys.modules
        print("no-triton ok")
    """)
    assert r.returncode == 0 and "no-triton ok" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------- every backend against the formulas


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fused_step_every_backend_matches_the_formula(backend):
    """`triton` has no fused step: the rule runs the torch reference, which must then match the formula too."""
    x, eps, z, coef = _inputs(5, (1, 28, 28), torch.float32)
    with ops.use_backend(backend):
        got = ops.fused_step(x, eps, z, coef)
    _assert_step_close(got, step64(x, eps, z, coef), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, shape", [(64, (1, 28, 28)), (3, (1, 5, 7))])
def test_torch_reference_step_matches_the_formula(dtype, B, shape):
    x, eps, z, coef = _inputs(B, shape, dtype)
    _assert_step_close(ops.fused_step_ref(x, eps, z, coef), step64(x, eps, z, coef), dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logprob_and_d3po_every_backend_match_the_formula(backend):
    sched = NoiseSchedule()
    N, beta, clip = 3, 50.0, 0.1
    # stored steps as sampling makes them, x_prev = μ_ref + σ z, so log-probs are O(1) and fp32 keeps their
    # differences (what D3PO uses) to ~1e-6; t ≥ 100 keeps σ away from the tiny end, where fp32 residuals x_prev − μ
    # lose digits in any implementation (the float64 kernel tests cover it)
    t = torch.randint(100, 1000, (N * 2,))
    coef = sched.fused_coefficients(t, t - 1)
    x, ep, z = (torch.randn(N * 2, 1, 6, 6) for _ in range(3))
    er = ep + 0.1 * torch.randn_like(ep)  # policy log-ratios ~1e-2: β = 50 moves the loss well off ln 2
    col = lambda i: coef[:, i].view(-1, 1, 1, 1)
    p = col(0) * x + col(1) * er + col(2) * z
    h = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])
    e1 = ep.clone().requires_grad_(True)
    with ops.use_backend(backend):
        lp = ops.step_log_prob(x, e1, p, coef)
        lp.backward(torch.arange(1.0, N * 2 + 1))
        pair = lambda v: v.view(N, 2, 1, 6, 6)
        e2 = pair(ep).clone().requires_grad_(True)
        loss, lp_pol, lp_ref = ops.fused_d3po_loss(pair(x), e2, pair(er), pair(p), coef.view(N, 2, 5), h, beta, clip)
        loss.sum().backward()
    w1 = ep.double().requires_grad_(True)
    want = logprob64(x, w1, p, coef)
    want.backward(torch.arange(1.0, N * 2 + 1, dtype=torch.float64))
    torch.testing.assert_close(lp.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1.grad.double(), w1.grad, atol=1e-4, rtol=1e-4)
    w2 = ep.double().requires_grad_(True)
    want_pol, want_ref = logprob64(x, w2, p, coef).view(N, 2), logprob64(x, er, p, coef).view(N, 2)
    want_loss = d3po64(want_pol, want_ref, h, beta, clip)
    want_loss.sum().backward()
    torch.testing.assert_close(lp_pol.double(), want_pol.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_ref.double(), want_ref, atol=1e-5, rtol=1e-5)
    # β = 50 amplifies the fp32 rounding of the log-prob differences (~1e-6) fifty-fold
    torch.testing.assert_close(loss.double(), want_loss.detach(), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(e2.grad.double().view_as(w2), w2.grad, atol=1e-4, rtol=1e-3)
    assert loss[1].item() == pytest.approx(math.log(2), abs=1e-6) and (e2.grad[1] == 0).all()  # a tie


# ----------------------------------------------------------------------------- papa::fused_step (C++, CUDA)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, shape", [(256, (1, 28, 28)), (3, (1, 5, 7))])
def test_cpp_step_matches_float64_formula(dtype, B, shape):
    x, eps, z, coef = _inputs(B, shape, dtype)
    _assert_step_close(torch.ops.papa.fused_step(x, eps, z, coef), step64(x, eps, z, coef), dtype)


@needs_ext
def test_step_agrees_with_schedule_step():
    sched = NoiseSchedule()
    x, eps, z = torch.randn(3, 4, 1, 6, 6).unbind(0)
    t, tp = torch.tensor([999, 500, 3, 1]), torch.tensor([989, 490, 2, 0])
    for sampler, eta in (("ancestral", 1.0), ("ddim", 1.0), ("ddim", 0.5)):
        ref = sched.step(x, eps, t, tp, sampler, eta, noise=z)
        prev, x0, lp = ops.fused_step(x, eps, z, sched.fused_coefficients(t, tp, sampler, eta))
        torch.testing.assert_close(prev, ref.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x0, ref.pred_x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lp, ref.log_prob, atol=1e-4, rtol=1e-5)


@needs_ext
def test_opcheck():
    x, eps, z, coef = _inputs(4, (1, 6, 6), torch.float32)
    coef = coef.clone()
    coef[0, 2] = 0.3  # opcheck compares outputs: avoid NaN
    torch.library.opcheck(torch.ops.papa.fused_step.default, (x, eps, z, coef))


@needs_ext
def test_bad_inputs_raise_clear_errors():
    x, eps, z, coef = _inputs(4, (1, 6, 6), torch.float32)
    with pytest.raises(RuntimeError, match="coef must be float32"):
        torch.ops.papa.fused_step(x, eps, z, coef[:, :3])
    with pytest.raises(RuntimeError, match="eps and noise must have"):
        torch.ops.papa.fused_step(x, eps[:, :, :3], z, coef)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_step_matches_float64_formula(dtype):
    x, eps, z, coef = _inputs(257, (1, 28, 28), dtype, "cuda")
    got = [v.cpu() for v in torch.ops.papa.fused_step(x, eps, z, coef)]
    _assert_step_close(got, step64(x.cpu(), eps.cpu(), z.cpu(), coef.cpu()), dtype)


@needs_ext
def test_fused_step_out_writes_into_preallocated_buffers():
    x, eps, z, coef = _inputs(5, (1, 28, 28), torch.float32)
    traj = torch.full((3, 5, 1, 28, 28), float("nan"))
    x0 = torch.full((5, 1, 28, 28), float("nan"))
    lp = torch.full((2, 5), float("nan"))
    ret = ops.fused_step(x, eps, z, coef, out=(traj[1], x0, lp[1]))
    assert ret[0].data_ptr() == traj[1].data_ptr()
    _assert_step_close((traj[1], x0, lp[1]), step64(x, eps, z, coef), torch.float32)
    assert torch.isnan(traj[0]).all() and torch.isnan(traj[2]).all() and torch.isnan(lp[0]).all()  # untouched
    torch.library.opcheck(torch.ops.papa.fused_step_out.default,
                          (x, eps, z, coef.clone().index_fill_(1, torch.tensor([2]), 0.3),
                           torch.empty_like(x), torch.empty_like(x), torch.empty(5)))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.fused_step(x, eps, z, coef, out=(traj[:, 0].transpose(0, 1)[0], x0, lp[1]))


def test_fused_step_out_on_the_torch_reference():
    x, eps, z, coef = _inputs(5, (1, 5, 7), torch.float32)
    bufs = (torch.full_like(x, math.nan), torch.full_like(x, math.nan), torch.full((5,), math.nan))
    with ops.use_backend("torch"):
        ret = ops.fused_step(x, eps, z, coef, out=bufs)
    assert all(r is b for r, b in zip(ret, bufs))
    _assert_step_close(bufs, step64(x, eps, z, coef), torch.float32)


# ----------------------------------------------------------------------------- papa::step_log_prob (C++, autograd)


def _lp_inputs(B, shape, dtype, device="cpu"):
    sched = NoiseSchedule()
    t = torch.randint(1, 1000, (B,))
    coef = sched.fused_coefficients(t, t - 1, "ddim", 1.0)[:, :3].to(device)
    x, eps, p = (torch.randn(B, *shape, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    return x, eps, p, coef


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 5, 7)])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_cpp_step_log_prob_forward_backward_match_float64_formula(dtype, shape, reduce):
    x, eps, p, coef = _lp_inputs(6, shape, dtype)
    e1 = eps.clone().requires_grad_(True)
    x1 = x.clone().requires_grad_(True)
    got = torch.ops.papa.step_log_prob(x1, e1, p, coef, reduce == "mean")
    g = torch.randn(6, dtype=torch.float64)
    got.backward(g.to(got.dtype))
    e2 = eps.double().requires_grad_(True)
    x2 = x.double().requires_grad_(True)
    want = logprob64(x2, e2, p, coef, reduce)
    want.backward(g)
    scale = 1.0 if reduce == "mean" else float(torch.tensor(shape).prod())
    tol = TOL[dtype] * 10
    torch.testing.assert_close(got.double(), want, atol=tol * scale * 100, rtol=tol * 10)
    torch.testing.assert_close(e1.grad.double(), e2.grad, atol=tol * 100, rtol=tol * 10)
    torch.testing.assert_close(x1.grad.double(), x2.grad, atol=tol * 100, rtol=tol * 10)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@needs_ext
def test_cpp_step_log_prob_gradcheck_and_opcheck():
    x, eps, p, coef = _lp_inputs(3, (2, 3, 3), torch.float64)
    coef = coef.double()
    for mean in (True, False):
        torch.autograd.gradcheck(lambda xx, ee, pp: torch.ops.papa.step_log_prob(xx, ee, pp, coef, mean),
                                 (x.requires_grad_(True), eps.requires_grad_(True), p.requires_grad_(True)))
        torch.library.opcheck(torch.ops.papa.step_log_prob.default, (x, eps, p, coef, mean))
        g = torch.randn(3, dtype=torch.float64)
        torch.library.opcheck(torch.ops.papa.step_log_prob_backward.default, (g, x.detach(), eps.detach(),
                                                                              p.detach(), coef, mean))


@needs_ext
def test_cpp_step_log_prob_rejects_bad_input():
    x, eps, p, coef = _lp_inputs(2, (1, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="coef must be"):
        torch.ops.papa.step_log_prob(x, eps, p, coef[:, :2], True)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.papa.step_log_prob(x, eps[:, :, :2], p, coef, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_torch_reference_log_prob_matches_the_formula(dtype, reduce):
    x, eps, p, coef = _lp_inputs(6, (3, 5, 7), dtype)
    e1 = eps.clone().requires_grad_(True)
    got = ops.step_log_prob_ref(x, e1, p, coef, reduce)
    got.sum().backward()
    e2 = eps.double().requires_grad_(True)
    want = logprob64(x, e2, p, coef, reduce)
    want.sum().backward()
    scale = 1.0 if reduce == "mean" else 105.0
    torch.testing.assert_close(got.double(), want.detach(), atol=TOL[dtype] * 10 * scale, rtol=TOL[dtype] * 10)
    torch.testing.assert_close(e1.grad.double(), e2.grad, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
