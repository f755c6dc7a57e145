// papa's torch operators: schema definitions, the CPU implementation, and the Python module stub.
//
//   papa::fused_step(Tensor x_t, Tensor eps, Tensor noise, Tensor coef) -> (Tensor x_prev, Tensor x0, Tensor log_prob)
//   papa::fused_step_out(x_t, eps, noise, coef, Tensor(a!) x_prev, Tensor(b!) x0, Tensor(c!) log_prob) -> ()
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_step_cpu(const at::Tensor& x_t, const at::Tensor& eps,
                                                              const at::Tensor& noise, const at::Tensor& coef) {
  check_step_inputs(x_t, eps, noise, coef);
  auto x_prev = at::empty(x_t.sizes(), x_t.options()), x0 = at::empty(x_t.sizes(), x_t.options());
  auto log_prob = at::empty({x_t.size(0)}, x_t.options().dtype(at::kFloat));
  fused_step_out_cpu(x_t, eps, noise, coef, x_prev, x0, log_prob);
  return {x_prev, x0, log_prob};
}

TORCH_LIBRARY(papa, m) {
  m.def("fused_step(Tensor x_t, Tensor eps, Tensor noise, Tensor coef) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_step_out(Tensor x_t, Tensor eps, Tensor noise, Tensor coef, Tensor(a!) x_prev, Tensor(b!) x0, "
      "Tensor(c!) log_prob) -> ()");
}

TORCH_LIBRARY_IMPL(papa, CPU, m) {
  m.impl("fused_step", &fused_step_cpu);
  m.impl("fused_step_out", &fused_step_out_cpu);
}

}  // namespace papa
