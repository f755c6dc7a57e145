// papa fused denoising step: the per-element maths, free of torch and Python so every backend (CPU op, CUDA op,
// the CMake unit test) shares one definition.
//
// For one sample with per-sample coefficients (ALGORITHMS.md §1, §3; computed by papa.schedule.step_coefficients):
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
