// papa's torch operators: schema definitions, the CPU implementation, and the Python module stub.
//
//   papa::fused_step(Tensor x_t, Tensor eps, Tensor noise, Tensor coef) -> (Tensor x_prev, Tensor x0, Tensor log_prob)
//   papa::fused_step_out(x_t, eps, noise, coef, Tensor(a!) x_prev, Tensor(b!) x0, Tensor(c!) log_prob) -> ()
//
//   papa::step_log_prob(Tensor x_t, Tensor eps, Tensor x_prev, Tensor coef, bool mean) -> Tensor log_prob
//   papa::step_log_prob_backward(Tensor grad, x_t, eps, x_prev, coef, bool mean) -> (g_x_t, g_eps, g_x_prev)
//
// step_log_prob: (B,) log N(x_prev; c_xt·x_t + c_eps·ε̂, σ²) per row, coef (B, ≥3) [c_xt, c_eps, σ] (float32 or
// float64), pixel mean (mean=true) or sum; float32 out (float64 for float64 inputs). Its autograd formula is registered
// from Python (papa/ops.py, torch.library.register_autograd) with the backward op above.
//
// The out variant writes into preallocated, contiguous buffers (a trajectory recorder's step slices), so a batch of
// trajectories, each row at its own timestep (per-row coef), advances without allocating.
// x_t, eps, noise: (B, ...) same dtype; coef: (B, 5) float32 [c_xt, c_eps, sigma, a0, b0]; log_prob: (B,) float32.
// The CUDA implementation is registered from step_cuda.cu when the extension is built with CUDA.
#ifdef PAPA_PYTHON_MODULE
#include <Python.h>
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "step_kernel.h"

#ifdef PAPA_PYTHON_MODULE
extern "C" {
// `import papa._C` loads this library, which registers the ops below with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace papa {

using FusedStepOut = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                              at::Tensor&, at::Tensor&);

void check_step_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& noise, const at::Tensor& coef) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0, "papa::fused_step: x_t must be (B, ...) with B > 0");
  TORCH_CHECK(eps.sizes() == x.sizes() && noise.sizes() == x.sizes(),
              "papa::fused_step: eps and noise must have x_t's shape ", x.sizes());
  TORCH_CHECK(eps.scalar_type() == x.scalar_type() && noise.scalar_type() == x.scalar_type(),
              "papa::fused_step: x_t, eps and noise must share a dtype");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == x.size(0) && coef.size(1) == kNumCoef &&
                  coef.scalar_type() == at::kFloat,
              "papa::fused_step: coef must be float32 of shape (B, 5)");
  TORCH_CHECK(x.device() == eps.device() && x.device() == noise.device() && x.device() == coef.device(),
              "papa::fused_step: all inputs must be on one device");
}

void check_step_outputs(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x0,
                        const at::Tensor& log_prob) {
  for (const auto* o : {&x_prev, &x0})
    TORCH_CHECK(o->sizes() == x.sizes() && o->scalar_type() == x.scalar_type() && o->is_contiguous() &&
                    o->device() == x.device(),
                "papa::fused_step_out: x_prev and x0 must be contiguous, of x_t's shape ", x.sizes(), " and dtype");
  TORCH_CHECK(log_prob.dim() == 1 && log_prob.size(0) == x.size(0) && log_prob.scalar_type() == at::kFloat &&
                  log_prob.is_contiguous() && log_prob.device() == x.device(),
              "papa::fused_step_out: log_prob must be contiguous float32 of shape (B,)");
}

void fused_step_out_cpu(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise, const at::Tensor& coef,
                        at::Tensor& x_prev, at::Tensor& x0, at::Tensor& log_prob) {
  check_step_inputs(x_t, eps, noise, coef);
  check_step_outputs(x_t, x_prev, x0, log_prob);
  auto x = x_t.contiguous(), e = eps.contiguous(), z = noise.contiguous(), c = coef.contiguous();
  const int64_t B = x.size(0), D = x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "papa_fused_step_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *ep = e.const_data_ptr<scalar_t>(),
                   *zp = z.const_data_ptr<scalar_t>();
    const float* cp = c.const_data_ptr<float>();
    scalar_t *op = x_prev.mutable_data_ptr<scalar_t>(), *x0p = x0.mutable_data_ptr<scalar_t>();
    float* lp = log_prob.mutable_data_ptr<float>();
    // one grain per sample: each sample's pixels stream through once, its reduction stays thread-local
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        lp[b] = step_sample<scalar_t, acc_t>(xp + b * D, ep + b * D, zp + b * D, cp + b * kNumCoef, D, op + b * D,
                                             x0p + b * D);
    });
  });
}

// fused_step on any backend: allocate the three outputs, then run that backend's fused_step_out into them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_step_into_new(const at::Tensor& x_t, const at::Tensor& eps,
                                                                   const at::Tensor& noise, const at::Tensor& coef,
                                                                   FusedStepOut out) {
  check_step_inputs(x_t, eps, noise, coef);
  auto x_prev = at::empty(x_t.sizes(), x_t.options()), x0 = at::empty(x_t.sizes(), x_t.options());
  auto log_prob = at::empty({x_t.size(0)}, x_t.options().dtype(at::kFloat));
  out(x_t, eps, noise, coef, x_prev, x0, log_prob);
  return {x_prev, x0, log_prob};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_step_cpu(const at::Tensor& x_t, const at::Tensor& eps,
                                                              const at::Tensor& noise, const at::Tensor& coef) {
  return fused_step_into_new(x_t, eps, noise, coef, &fused_step_out_cpu);
}

void check_logprob_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& x_prev, const at::Tensor& coef) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0, "papa::step_log_prob: x_t must be (B, ...) with B > 0");
  TORCH_CHECK(eps.sizes() == x.sizes() && x_prev.sizes() == x.sizes(),
              "papa::step_log_prob: eps and x_prev must have x_t's shape ", x.sizes());
  TORCH_CHECK(eps.scalar_type() == x.scalar_type() && x_prev.scalar_type() == x.scalar_type(),
              "papa::step_log_prob: x_t, eps and x_prev must share a dtype");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == x.size(0) && coef.size(1) >= 3 &&
                  (coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble),
              "papa::step_log_prob: coef must be float32/float64 of shape (B, >=3) [c_xt, c_eps, sigma]");
  TORCH_CHECK(x.device() == eps.device() && x.device() == x_prev.device() && x.device() == coef.device(),
              "papa::step_log_prob: all inputs must be on one device");
}

at::ScalarType logprob_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor step_log_prob_cpu(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& x_prev,
                             const at::Tensor& coef, bool mean) {
  check_logprob_inputs(x_t, eps, x_prev, coef);
  const auto acc_type = logprob_acc_type(x_t);
  auto x = x_t.contiguous(), e = eps.contiguous(), p = x_prev.contiguous();
  auto c = coef.narrow(1, 0, 3).to(acc_type).contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(acc_type));
  const int64_t B = x.size(0), D = x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "papa_step_log_prob_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *ep = e.const_data_ptr<scalar_t>(),
                   *pp = p.const_data_ptr<scalar_t>();
    const acc_t* cp = c.const_data_ptr<acc_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(D) : acc_t(1);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        op[b] = logprob_row<scalar_t, acc_t>(xp + b * D, ep + b * D, pp + b * D, cp[b * 3], cp[b * 3 + 1],
                                             cp[b * 3 + 2], D, scale);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_log_prob_backward_cpu(const at::Tensor& grad,
                                                                          const at::Tensor& x_t, const at::Tensor& eps,
                                                                          const at::Tensor& x_prev,
                                                                          const at::Tensor& coef, bool mean) {
  check_logprob_inputs(x_t, eps, x_prev, coef);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == x_t.size(0), "papa::step_log_prob_backward: grad must be (B,)");
  const auto acc_type = logprob_acc_type(x_t);
  auto x = x_t.contiguous(), e = eps.contiguous(), p = x_prev.contiguous();
  auto c = coef.narrow(1, 0, 3).to(acc_type).contiguous();
  auto g = grad.to(acc_type).contiguous();
  auto g_eps = at::empty_like(x), g_x = at::empty_like(x), g_prev = at::empty_like(x);
  const int64_t B = x.size(0), D = x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "papa_step_log_prob_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *ep = e.const_data_ptr<scalar_t>(),
                   *pp = p.const_data_ptr<scalar_t>();
    const acc_t *cp = c.const_data_ptr<acc_t>(), *gp = g.const_data_ptr<acc_t>();
    scalar_t *ge = g_eps.mutable_data_ptr<scalar_t>(), *gx = g_x.mutable_data_ptr<scalar_t>(),
             *gpr = g_prev.mutable_data_ptr<scalar_t>();
    const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(D) : acc_t(1);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t sigma = cp[b * 3 + 2], k_row = gp[b] * scale / (sigma * sigma);
        for (int64_t j = 0; j < D; ++j) {
          const int64_t i = b * D + j;
          logprob_grad_element<scalar_t, acc_t>(xp[i], ep[i], pp[i], cp[b * 3], cp[b * 3 + 1], k_row, ge + i, gx + i,
                                                gpr + i);
        }
      }
    });
  });
  return {g_x, g_eps, g_prev};
}

TORCH_LIBRARY(papa, m) {
  m.def("fused_step(Tensor x_t, Tensor eps, Tensor noise, Tensor coef) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_step_out(Tensor x_t, Tensor eps, Tensor noise, Tensor coef, Tensor(a!) x_prev, Tensor(b!) x0, "
      "Tensor(c!) log_prob) -> ()");
  m.def("step_log_prob(Tensor x_t, Tensor eps, Tensor x_prev, Tensor coef, bool mean) -> Tensor");
  m.def(
      "step_log_prob_backward(Tensor grad, Tensor x_t, Tensor eps, Tensor x_prev, Tensor coef, bool mean) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(papa, CPU, m) {
  m.impl("fused_step", &fused_step_cpu);
  m.impl("fused_step_out", &fused_step_out_cpu);
  m.impl("step_log_prob", &step_log_prob_cpu);
  m.impl("step_log_prob_backward", &step_log_prob_backward_cpu);
}

}  // namespace papa
