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
  std::vector<Moments> part(ch.count);
  parallel_for(ch.count, kChunk, [&](int64_t it) {
    const int64_t len = ch.length(it);
    Moments& m = part[it];
    m.n = double(len);
    k.moments(x + ch.start(it), len, &m.mean, &m.m2);
  });

  const GroupIndex index(plan);
  parallel_for(plan.num_groups(), ch.per_plane * plan.channels_per_group * 64, [&](int64_t g) {
    Moments acc;
    index.for_each_plane(g, [&](int64_t p) {
      for (int64_t j = 0; j < ch.per_plane; ++j) acc = merge(acc, part[p * ch.per_plane + j]);
    });
    if (acc.n == 0) {
      mean[g] = var[g] = std::numeric_limits<double>::quiet_NaN();
    } else if (plan.skip_mean) {
      mean[g] = 0;
      var[g] = acc.m2 / acc.n + acc.mean * acc.mean;  // mean of x^2
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
  parallel_for(ch.count, kChunk, [&](int64_t it) {
    const int64_t p = ch.plane(it), off = ch.offset(it), s = ch.start(it);
    k.affine(x + s, y + s, ch.length(it), f.shift[p], f.a[p], f.b[p],
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
