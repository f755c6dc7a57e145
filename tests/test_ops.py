"""The fused denoising step: C++ (and, on a GPU, CUDA) against the float64 plain-torch reference."""
import pytest
import torch

from papa import ops
from papa.schedule import NoiseSchedule

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="papa._C not built (pip install -e .)")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(B, shape, dtype, device="cpu"):
    sched = NoiseSchedule()
    t = torch.randint(1, 1000, (B,))
    t[0] = 0  # one sample at the last step: σ = 0, log-prob NaN by convention
    coef = sched.fused_coefficients(t, t - 1).to(device)
    x, eps, z = (torch.randn(B, *shape, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    return x, eps, z, coef


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, shape", [(256, (1, 28, 28)), (3, (1, 5, 7))])
def test_cpp_step_matches_float64_reference(dtype, B, shape):
    x, eps, z, coef = _inputs(B, shape, dtype)
    got = torch.ops.papa.fused_step(x, eps, z, coef)
    want = ops.fused_step_ref(x.double(), eps.double(), z.double(), coef)
    tol = TOL[dtype]
    for g, w in zip(got[:2], want[:2]):
        assert g.dtype == dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, atol=tol * 10, rtol=tol)
    assert torch.isnan(got[2][0]) and torch.isnan(want[2][0])
    torch.testing.assert_close(got[2][1:].double(), want[2][1:].double(), atol=1e-4, rtol=1e-5)


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


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_dispatch_paths_agree(backend, monkeypatch):
    if backend == "cpp" and not ops.extension_available():
        pytest.skip("papa._C not built")
    x, eps, z, coef = _inputs(5, (1, 28, 28), torch.float32)
    monkeypatch.setenv("PAPA_OPS", backend)
    got = ops.fused_step(x, eps, z, coef)
    want = ops.fused_step_ref(x, eps, z, coef)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("PAPA_OPS", "fortran")
    x, eps, z, coef = _inputs(2, (1, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="PAPA_OPS"):
        ops.fused_step(x, eps, z, coef)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_step_matches_reference(dtype):
    x, eps, z, coef = _inputs(257, (1, 28, 28), dtype, "cuda")
    got = torch.ops.papa.fused_step(x, eps, z, coef)
    want = ops.fused_step_ref(x.double(), eps.double(), z.double(), coef)
    tol = TOL[dtype]
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g.double(), w, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(got[2][1:].double(), want[2][1:].double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpp", marks=needs_ext)])
def test_logprob_and_d3po_dispatch_paths_agree(backend, monkeypatch):
    monkeypatch.setenv("PAPA_OPS", backend)
    sched = NoiseSchedule()
    N = 3
    # t ≥ 100: at tiny σ fp32 log-probs are huge and their differences (what D3PO uses) lose digits in any
    # implementation; the float64 kernel tests cover the small-σ end
    t = torch.randint(100, 1000, (N * 2,))
    coef = sched.fused_coefficients(t, t - 1)
    x, ep, p = (torch.randn(N * 2, 1, 6, 6) for _ in range(3))
    er = ep + 0.01 * torch.randn_like(ep)
    h = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])
    e1 = ep.clone().requires_grad_(True)
    lp = ops.step_log_prob(x, e1, p, coef)
    want = ops.step_log_prob_ref(x, ep, p, coef[:, :3])
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-5)
    lr = ops.step_log_prob(x, er, p, coef).detach()
    loss = ops.d3po_loss(lp.view(N, 2), lr.view(N, 2), h, beta=50.0)
    loss.sum().backward()
    e2 = ep.clone().requires_grad_(True)
    ref = ops.d3po_loss_ref(ops.step_log_prob_ref(x, e2, p, coef[:, :3]).view(N, 2), lr.view(N, 2), h, beta=50.0)
    ref.sum().backward()
    # β = 50 amplifies fp32 rounding of the log-probs (~1e-6 relative) fifty-fold
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(e1.grad, e2.grad, atol=1e-5, rtol=1e-3)
    fl, flp, flr = ops.fused_d3po_loss(x.view(N, 2, 1, 6, 6), ep.view(N, 2, 1, 6, 6), er.view(N, 2, 1, 6, 6),
                                       p.view(N, 2, 1, 6, 6), coef.view(N, 2, 5), h, beta=50.0)
    # fused == unfused on the same backend; with PAPA_OPS=cpp the fused op is the torch twin (no C++ fused D3PO), so
    # the two differ by fp32 log-prob rounding times β
    tol = 1e-3 if backend == "cpp" else 1e-6
    torch.testing.assert_close(fl, loss.detach(), atol=tol, rtol=tol)


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
def test_cpp_step_log_prob_forward_backward_match_float64_reference(dtype, shape, reduce):
    import papa.ops as ops_module
    x, eps, p, coef = _lp_inputs(6, shape, dtype)
    e1 = eps.clone().requires_grad_(True)
    x1 = x.clone().requires_grad_(True)
    got = torch.ops.papa.step_log_prob(x1, e1, p, coef, reduce == "mean")
    g = torch.randn(6, dtype=torch.float64)
    got.backward(g.to(got.dtype))
    e2 = eps.double().requires_grad_(True)
    x2 = x.double().requires_grad_(True)
    want = ops_module.step_log_prob_ref(x2, e2, p.double(), coef.double(), reduce)
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


@needs_ext
def test_fused_step_out_writes_into_preallocated_buffers():
    x, eps, z, coef = _inputs(5, (1, 28, 28), torch.float32)
    traj = torch.full((3, 5, 1, 28, 28), float("nan"))
    x0 = torch.full((5, 1, 28, 28), float("nan"))
    lp = torch.full((2, 5), float("nan"))
    ret = ops.fused_step(x, eps, z, coef, out=(traj[1], x0, lp[1]))
    want = ops.fused_step_ref(x.double(), eps.double(), z.double(), coef)
    assert ret[0].data_ptr() == traj[1].data_ptr()
    torch.testing.assert_close(traj[1].double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0.double(), want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[1, 1:].double(), want[2][1:].double(), atol=1e-4, rtol=1e-5)
    assert torch.isnan(traj[0]).all() and torch.isnan(traj[2]).all() and torch.isnan(lp[0]).all()  # untouched
    torch.library.opcheck(torch.ops.papa.fused_step_out.default,
                          (x, eps, z, coef.clone().index_fill_(1, torch.tensor([2]), 0.3),
                           torch.empty_like(x), torch.empty_like(x), torch.empty(5)))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.fused_step(x, eps, z, coef, out=(traj[:, 0].transpose(0, 1)[0], x0, lp[1]))
