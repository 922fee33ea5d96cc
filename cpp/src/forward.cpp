// Forward: statistics per group, then one affine pass. The fold between them turns each
// plane's (mean, rstd, weight, bias) into a shift and two scalars so the pass is one FMA.
#include <cmath>
#include <limits>

#include "kernels/table.h"
#include "fold.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

template <class S>
void group_moments(const Plan& plan, const S* x, double* mean, double* var) {
  check_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch(plan);
  std::vector<double> cmean(ch.count), cm2(ch.count);
  if (!plan.channels_last) {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      k.moments(x + ch.start(it), ch.length(ch.chunk(it)), &cmean[it], &cm2[it]);
    });
  } else {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      const int64_t j = ch.chunk(it), slot = ch.slot(ch.sample(it) * ch.C, j);
      k.rows_moments(x + ch.start(it), ch.length(j), ch.C, &cmean[slot], &cm2[slot], ch.per_plane);
    });
  }

  const GroupIndex index(plan);
  parallel_for(plan.num_groups(), ch.per_plane * plan.channels_per_group * 64, [&](int64_t g) {
    Moments acc;
    index.for_each_plane(g, [&](int64_t p) {
      for (int64_t j = 0; j < ch.per_plane; ++j) {
        const int64_t slot = ch.slot(p, j);
        acc = merge(acc, Moments{double(ch.length(j)), cmean[slot], cm2[slot]});
      }
    });
    if (acc.n == 0) {
      mean[g] = var[g] = std::numeric_limits<double>::quiet_NaN();
    } else if (plan.skip_mean) {
      mean[g] = 0;
      // mean of x^2 (Inf when the group holds an Inf, so finite entries normalize to 0, as torch)
      var[g] = std::isinf(acc.mean) ? acc.mean * acc.mean : acc.m2 / acc.n + acc.mean * acc.mean;
    } else {
      mean[g] = acc.mean;
      var[g] = acc.m2 / acc.n;
    }
  });
}

template <class S>
void normalize(const Plan& plan, const S* x, const double* mean, const double* rstd,
               const compute_t<S>* weight, const compute_t<S>* bias, S* y, const S* residual,
               bool relu) {
  check_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch(plan);
  const PlaneAffine<compute_t<S>> f(plan, mean, rstd, weight, bias);
  const bool col = plan.column_affine;
  if (plan.channels_last) {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      const int64_t s = ch.start(it), p0 = ch.sample(it) * ch.C;
      k.rows_affine(x + s, y + s, ch.length(ch.chunk(it)), ch.C, &f.shift[p0], &f.a[p0], &f.b[p0],
                    residual ? residual + s : nullptr, relu);
    });
    return;
  }
  parallel_for(ch.items(), ch.work(), [&](int64_t it) {
    const int64_t p = ch.plane(it), off = ch.chunk(it) * ch.step, s = ch.start(it);
    k.affine(x + s, y + s, ch.length(ch.chunk(it)), f.shift[p], f.a[p], f.b[p],
             col && weight ? weight + off : nullptr, col && bias ? bias + off : nullptr,
             residual ? residual + s : nullptr, relu);
  });
}

#define NK_INSTANTIATE(S)                                                                        \
  template void group_moments<S>(const Plan&, const S*, double*, double*);                       \
  template void normalize<S>(const Plan&, const S*, const double*, const double*,                \
                             const compute_t<S>*, const compute_t<S>*, S*, const S*, bool);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
