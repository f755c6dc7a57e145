// papa fused denoising step: the per-element maths, free of torch and Python so every backend (CPU op, CUDA op,
// the CMake unit test) shares one definition.
//
// For one sample with per-sample coefficients (docs/ALGORITHMS.md §1, §3; computed by papa.schedule.step_coefficients):
//   μ       = c_xt · x_t + c_eps · ε̂
//   x_prev  = μ + σ · z                        (z ~ N(0, I), given)
//   x̂0      = clamp(a0 · x_t − b0 · ε̂, −1, 1)  (a0 = 1/√ᾱ_t, b0 = √(1−ᾱ_t)/√ᾱ_t)
//   log π   = mean_j[−z_j²/2] − log σ − ½ log 2π   (since (x_prev − μ)/σ = z; NaN where σ = 0: no density)
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace papa {

constexpr int kNumCoef = 5;  // c_xt, c_eps, sigma, a0, b0
constexpr double kHalfLog2Pi = 0.91893853320467274178;

#if defined(__CUDACC__)
#define PAPA_HD __host__ __device__ __forceinline__
#else
#define PAPA_HD inline
#endif

// One element: writes x_prev and x0, returns z² for the log-prob reduction.
template <typename scalar_t, typename acc_t>
PAPA_HD acc_t step_element(scalar_t x, scalar_t eps, scalar_t z, const float* coef, scalar_t* x_prev,
                           scalar_t* x0) {
  const acc_t xv = static_cast<acc_t>(x), ev = static_cast<acc_t>(eps), zv = static_cast<acc_t>(z);
  const acc_t mean = static_cast<acc_t>(coef[0]) * xv + static_cast<acc_t>(coef[1]) * ev;
  *x_prev = static_cast<scalar_t>(mean + static_cast<acc_t>(coef[2]) * zv);
  acc_t p0 = static_cast<acc_t>(coef[3]) * xv - static_cast<acc_t>(coef[4]) * ev;
  p0 = p0 < acc_t(-1) ? acc_t(-1) : (p0 > acc_t(1) ? acc_t(1) : p0);
  *x0 = static_cast<scalar_t>(p0);
  return zv * zv;
}

template <typename acc_t>
PAPA_HD float step_log_prob(acc_t sum_z2, int64_t numel, float sigma) {
  if (!(sigma > 0.f)) return std::numeric_limits<float>::quiet_NaN();
  return static_cast<float>(-acc_t(0.5) * sum_z2 / static_cast<acc_t>(numel) - std::log(static_cast<acc_t>(sigma)) -
                            static_cast<acc_t>(kHalfLog2Pi));
}

// Whole-sample reference loop (used by the CPU op and the unit test).
template <typename scalar_t, typename acc_t>
inline float step_sample(const scalar_t* x, const scalar_t* eps, const scalar_t* z, const float* coef, int64_t numel,
                         scalar_t* x_prev, scalar_t* x0) {
  acc_t s = 0;
  for (int64_t j = 0; j < numel; ++j) s += step_element<scalar_t, acc_t>(x[j], eps[j], z[j], coef, x_prev + j, x0 + j);
  return step_log_prob<acc_t>(s, numel, coef[2]);
}

}  // namespace papa

namespace papa {

// Per-step Gaussian log-probability of a stored x_prev under N(μ = c_xt·x_t + c_eps·ε̂, σ²) for one row of D pixels
// (docs/ALGORITHMS.md §3):  lp = scale·Σ_j −(x_prev_j − μ_j)²/(2σ²) − scale·D·(log σ + ½ log 2π),  scale = 1/D (mean) or 1.
template <typename scalar_t, typename acc_t>
PAPA_HD acc_t logprob_residual(scalar_t x, scalar_t eps, scalar_t x_prev, acc_t c_xt, acc_t c_eps) {
  return static_cast<acc_t>(x_prev) - (c_xt * static_cast<acc_t>(x) + c_eps * static_cast<acc_t>(eps));
}

template <typename acc_t>
PAPA_HD acc_t logprob_from_sum(acc_t sum_r2, acc_t sigma, int64_t numel, acc_t scale) {
  return -scale * sum_r2 / (acc_t(2) * sigma * sigma) -
         scale * static_cast<acc_t>(numel) * (std::log(sigma) + static_cast<acc_t>(kHalfLog2Pi));
}

template <typename scalar_t, typename acc_t>
inline acc_t logprob_row(const scalar_t* x, const scalar_t* eps, const scalar_t* x_prev, acc_t c_xt, acc_t c_eps,
                         acc_t sigma, int64_t numel, acc_t scale) {
  acc_t s = 0;
  for (int64_t j = 0; j < numel; ++j) {
    const acc_t r = logprob_residual<scalar_t, acc_t>(x[j], eps[j], x_prev[j], c_xt, c_eps);
    s += r * r;
  }
  return logprob_from_sum<acc_t>(s, sigma, numel, scale);
}

// Backward of one element: with k = g·scale·(x_prev − μ)/σ²:  ∂/∂ε̂ = k·c_eps, ∂/∂x_t = k·c_xt, ∂/∂x_prev = −k.
template <typename scalar_t, typename acc_t>
PAPA_HD void logprob_grad_element(scalar_t x, scalar_t eps, scalar_t x_prev, acc_t c_xt, acc_t c_eps, acc_t k_row,
                                  scalar_t* g_eps, scalar_t* g_x, scalar_t* g_prev) {
  const acc_t k = k_row * logprob_residual<scalar_t, acc_t>(x, eps, x_prev, c_xt, c_eps);
  *g_eps = static_cast<scalar_t>(k * c_eps);
  *g_x = static_cast<scalar_t>(k * c_xt);
  *g_prev = static_cast<scalar_t>(-k);
}

}  // namespace papa
