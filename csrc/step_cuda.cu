// CUDA implementation of papa::fused_step: one block per sample, a grid-stride loop over its pixels and a block
// reduction of z² for the log-prob. Registered for the CUDA dispatch key; the maths is step_kernel.h's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "step_kernel.h"

namespace papa {

void check_step_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& noise, const at::Tensor& coef);
void check_logprob_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& x_prev, const at::Tensor& coef);
at::ScalarType logprob_acc_type(const at::Tensor& x);
void check_step_outputs(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x0,
                        const at::Tensor& log_prob);
using FusedStepOut = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                              at::Tensor&, at::Tensor&);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_step_into_new(const at::Tensor& x_t, const at::Tensor& eps,
                                                                   const at::Tensor& noise, const at::Tensor& coef,
                                                                   FusedStepOut out);

template <typename scalar_t, typename acc_t>
__global__ void fused_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                                  const scalar_t* __restrict__ z, const float* __restrict__ coef, int64_t D,
                                  scalar_t* __restrict__ x_prev, scalar_t* __restrict__ x0, float* __restrict__ lp) {
  const int64_t b = blockIdx.x;
  const float* c = coef + b * kNumCoef;
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const int64_t i = b * D + j;
    s += step_element<scalar_t, acc_t>(x[i], eps[i], z[i], c, x_prev + i, x0 + i);
  }
  __shared__ acc_t shared[32];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffff, s, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (blockDim.x + 31) / 32 ? shared[lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffff, s, off);
    if (lane == 0) lp[b] = step_log_prob<acc_t>(s, D, c[2]);
  }
}

void fused_step_out_cuda(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                         const at::Tensor& coef, at::Tensor& x_prev, at::Tensor& x0, at::Tensor& log_prob) {
  check_step_inputs(x_t, eps, noise, coef);
  check_step_outputs(x_t, x_prev, x0, log_prob);
  const c10::cuda::CUDAGuard guard(x_t.device());
  auto x = x_t.contiguous(), e = eps.contiguous(), z = noise.contiguous(), c = coef.contiguous();
  const int64_t B = x.size(0), D = x.numel() / B;
  const int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "papa_fused_step_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fused_step_kernel<scalar_t, acc_t><<<B, threads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
        c.const_data_ptr<float>(), D, x_prev.mutable_data_ptr<scalar_t>(), x0.mutable_data_ptr<scalar_t>(),
        log_prob.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_step_cuda(const at::Tensor& x_t, const at::Tensor& eps,
                                                               const at::Tensor& noise, const at::Tensor& coef) {
  return fused_step_into_new(x_t, eps, noise, coef, &fused_step_out_cuda);
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t s) {
  __shared__ acc_t shared[32];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffff, s, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  s = (warp == 0 && lane < (blockDim.x + 31) / 32) ? shared[lane] : acc_t(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffff, s, off);
  return s;  // valid in thread 0
}

template <typename scalar_t, typename acc_t>
__global__ void logprob_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                                   const scalar_t* __restrict__ p, const acc_t* __restrict__ c, int64_t D,
                                   acc_t scale, acc_t* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const acc_t c_xt = c[b * 3], c_eps = c[b * 3 + 1], sigma = c[b * 3 + 2];
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const acc_t r = logprob_residual<scalar_t, acc_t>(x[b * D + j], eps[b * D + j], p[b * D + j], c_xt, c_eps);
    s += r * r;
  }
  s = block_sum<acc_t>(s);
  if (threadIdx.x == 0) out[b] = logprob_from_sum<acc_t>(s, sigma, D, scale);
}

template <typename scalar_t, typename acc_t>
__global__ void logprob_bwd_kernel(const acc_t* __restrict__ g, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ eps, const scalar_t* __restrict__ p,
                                   const acc_t* __restrict__ c, int64_t D, acc_t scale, scalar_t* __restrict__ ge,
                                   scalar_t* __restrict__ gx, scalar_t* __restrict__ gp) {
  const int64_t b = blockIdx.x;
  const acc_t sigma = c[b * 3 + 2], k_row = g[b] * scale / (sigma * sigma);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const int64_t i = b * D + j;
    logprob_grad_element<scalar_t, acc_t>(x[i], eps[i], p[i], c[b * 3], c[b * 3 + 1], k_row, ge + i, gx + i, gp + i);
  }
}

at::Tensor step_log_prob_cuda(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& x_prev,
                              const at::Tensor& coef, bool mean) {
  check_logprob_inputs(x_t, eps, x_prev, coef);
  const c10::cuda::CUDAGuard guard(x_t.device());
  const auto acc_type = logprob_acc_type(x_t);
  auto x = x_t.contiguous(), e = eps.contiguous(), p = x_prev.contiguous();
  auto c = coef.narrow(1, 0, 3).to(acc_type).contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(acc_type));
  const int64_t B = x.size(0), D = x.numel() / B;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "papa_step_log_prob_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(D) : acc_t(1);
    logprob_fwd_kernel<scalar_t, acc_t><<<B, 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
        c.const_data_ptr<acc_t>(), D, scale, out.mutable_data_ptr<acc_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_log_prob_backward_cuda(const at::Tensor& grad,
                                                                           const at::Tensor& x_t,
                                                                           const at::Tensor& eps,
                                                                           const at::Tensor& x_prev,
                                                                           const at::Tensor& coef, bool mean) {
  check_logprob_inputs(x_t, eps, x_prev, coef);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == x_t.size(0), "papa::step_log_prob_backward: grad must be (B,)");
  const c10::cuda::CUDAGuard guard(x_t.device());
  const auto acc_type = logprob_acc_type(x_t);
  auto x = x_t.contiguous(), e = eps.contiguous(), p = x_prev.contiguous();
  auto c = coef.narrow(1, 0, 3).to(acc_type).contiguous();
  auto g = grad.to(acc_type).contiguous();
  auto g_eps = at::empty_like(x), g_x = at::empty_like(x), g_prev = at::empty_like(x);
  const int64_t B = x.size(0), D = x.numel() / B;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "papa_step_log_prob_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(D) : acc_t(1);
    logprob_bwd_kernel<scalar_t, acc_t><<<B, 256, 0, stream>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(),
        p.const_data_ptr<scalar_t>(), c.const_data_ptr<acc_t>(), D, scale, g_eps.mutable_data_ptr<scalar_t>(),
        g_x.mutable_data_ptr<scalar_t>(), g_prev.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g_x, g_eps, g_prev};
}

TORCH_LIBRARY_IMPL(papa, CUDA, m) {
  m.impl("fused_step", &fused_step_cuda);
  m.impl("fused_step_out", &fused_step_out_cuda);
  m.impl("step_log_prob", &step_log_prob_cuda);
  m.impl("step_log_prob_backward", &step_log_prob_backward_cuda);
}

}  // namespace papa
