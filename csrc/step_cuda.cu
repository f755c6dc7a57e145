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
void check_step_outputs(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x0,
                        const at::Tensor& log_prob);

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
  check_step_inputs(x_t, eps, noise, coef);
  auto x_prev = at::empty(x_t.sizes(), x_t.options()), x0 = at::empty(x_t.sizes(), x_t.options());
  auto log_prob = at::empty({x_t.size(0)}, x_t.options().dtype(at::kFloat));
  fused_step_out_cuda(x_t, eps, noise, coef, x_prev, x0, log_prob);
  return {x_prev, x0, log_prob};
}

TORCH_LIBRARY_IMPL(papa, CUDA, m) {
  m.impl("fused_step", &fused_step_cuda);
  m.impl("fused_step_out", &fused_step_out_cuda);
}

}  // namespace papa
