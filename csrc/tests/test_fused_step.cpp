// C++ unit test of papa::fused_step through the dispatcher, against the formula computed with plain ATen in double.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <cmath>
#include <cstdio>

#include "step_kernel.h"

static int failures = 0;
#define EXPECT(cond, ...)                                       \
  do {                                                          \
    if (!(cond)) {                                              \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
      ++failures;                                               \
    }                                                           \
  } while (0)

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("papa::fused_step", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&)>();
  at::manual_seed(0);
  for (int64_t B : {1, 3, 256}) {
    auto x = at::randn({B, 1, 28, 28}, at::kDouble), e = at::randn_like(x), z = at::randn_like(x);
    auto coef = at::rand({B, papa::kNumCoef}, at::kFloat) + 0.1;
    coef.select(0, 0).select(0, 2).fill_(0.f);  // sample 0 at the last step: sigma = 0, NaN log-prob
    auto [prev, x0, lp] = op.call(x, e, z, coef);
    auto c = coef.to(at::kDouble);
    auto col = [&](int i) { return c.select(1, i).view({B, 1, 1, 1}); };
    auto want_prev = col(0) * x + col(1) * e + col(2) * z;
    auto want_x0 = (col(3) * x - col(4) * e).clamp(-1, 1);
    EXPECT(at::allclose(prev, want_prev, 1e-6, 1e-6), "x_prev mismatch at B=%ld", (long)B);
    EXPECT(at::allclose(x0, want_x0, 1e-6, 1e-6), "x0 mismatch at B=%ld", (long)B);
    auto want_lp = -0.5 * z.flatten(1).pow(2).mean(1) - c.select(1, 2).log() - papa::kHalfLog2Pi;
    EXPECT(std::isnan(lp[0].item<float>()), "sigma = 0 must give NaN");
    if (B > 1)
      EXPECT(at::allclose(lp.slice(0, 1).to(at::kDouble), want_lp.slice(0, 1), 1e-4, 1e-5), "log-prob mismatch");
    auto xf = x.to(at::kFloat);  // float32 path
    auto [pf, x0f, lpf] = op.call(xf, e.to(at::kFloat), z.to(at::kFloat), coef);
    EXPECT(at::allclose(pf.to(at::kDouble), want_prev, 1e-4, 1e-5), "float32 x_prev mismatch");
  }
  bool threw = false;
  try {
    op.call(at::randn({2, 4}), at::randn({2, 4}), at::randn({2, 4}), at::rand({2, 3}));
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw, "a (B, 3) coef must be rejected");

  // papa::fused_step_out writes into preallocated buffers and matches papa::fused_step
  auto out_op = c10::Dispatcher::singleton().findSchemaOrThrow("papa::fused_step_out", "")
                    .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::Tensor&, at::Tensor&, at::Tensor&)>();
  {
    auto x = at::randn({4, 1, 28, 28}), e = at::randn_like(x), z = at::randn_like(x);
    auto coef = at::rand({4, papa::kNumCoef}, at::kFloat) + 0.1;
    auto traj = at::full({3, 4, 1, 28, 28}, NAN), x0 = at::full_like(x, NAN), lp = at::full({4}, NAN);
    auto slot = traj.select(0, 1);
    out_op.call(x, e, z, coef, slot, x0, lp);
    auto [prev, x0_want, lp_want] = op.call(x, e, z, coef);
    EXPECT(at::equal(traj.select(0, 1), prev) && at::equal(x0, x0_want) && at::equal(lp, lp_want),
           "fused_step_out differs from fused_step");
    EXPECT(at::isnan(traj.select(0, 0)).all().item<bool>() && at::isnan(traj.select(0, 2)).all().item<bool>(),
           "fused_step_out wrote outside its slot");
  }

  // papa::step_log_prob against the formula in double, mean and sum
  auto lp_op = c10::Dispatcher::singleton().findSchemaOrThrow("papa::step_log_prob", "")
                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  for (bool mean : {true, false}) {
    auto x = at::randn({5, 3, 7, 7}, at::kDouble), e = at::randn_like(x), p = at::randn_like(x);
    auto coef = at::rand({5, 3}, at::kDouble) + 0.2;
    auto mu = coef.select(1, 0).view({5, 1, 1, 1}) * x + coef.select(1, 1).view({5, 1, 1, 1}) * e;
    auto sig = coef.select(1, 2).view({5, 1, 1, 1});
    auto per = (-(p - mu).pow(2) / (2 * sig * sig) - sig.log() - papa::kHalfLog2Pi).flatten(1);
    auto want = mean ? per.mean(1) : per.sum(1);
    EXPECT(at::allclose(lp_op.call(x, e, p, coef, mean), want, 1e-10, 1e-10), "step_log_prob mismatch (mean=%d)",
           (int)mean);
  }
  std::printf(failures ? "%d failed\n" : "all fused_step checks passed\n", failures);
  return failures ? 1 : 0;
}
