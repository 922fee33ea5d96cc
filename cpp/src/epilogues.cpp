// The pointwise epilogue steps (normkit.h: apply_pointwise): a variant whose output is not an
// affine of x (FRN+TLU, EvoNorm, Proxy Norm) folds its statistics into per-cell coefficients,
// then one pass applies them; its backward is one sums pass and one apply pass, like the
// standard layers'. Channels-first plans; cells are (set, channel), as apply_coefficients'.
#include <algorithm>
#include <vector>

#include "fold.h"
#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

namespace {

void check_pointwise_plan(const Plan& plan, Pointwise op) {
  check_step_plan(plan);
  if (plan.channels_last) throw std::invalid_argument("invalid plan: the pointwise epilogues read channels-first memory");
  if (int(op) < 0 || int(op) >= kPointwiseOps) throw std::invalid_argument("invalid pointwise epilogue");
}

// Per plane, from per-cell coefficients: the shift and the center rounded to T, b and the
// backward's c3 carrying their roundings (as fold.h's channel_coef).
template <class T>
struct PointwisePlanes {
  std::vector<PointwisePlane<T>> plane;
  std::vector<double> center_error;  // center - T(center), per plane
  PointwisePlanes(const Plan& plan, const PointwiseCoefficients& k) : plane(plan.planes()), center_error(plan.planes()) {
    for (int64_t n = 0, p = 0; n < plan.N; ++n)
      for (int64_t c = 0; c < plan.C; ++c, ++p) {
        const int64_t q = set_channel(plan, n, c);
        const T sh = T(k.shift[q]), ce = T(k.center[q]);
        plane[p] = {sh, T(k.a[q]), T(k.b[q] + (double(sh) - k.shift[q]) * k.a[q]), T(k.p[q]), T(k.q[q]),
                    T(k.r[q]), T(k.scale[q]), T(k.offset[q]), ce};
        center_error[p] = double(ce) - k.center[q];
      }
  }
};

}  // namespace

template <class S>
void apply_pointwise(const Plan& plan, Pointwise op, const S* x, const PointwiseCoefficients& coef, S* y) {
  using T = compute_t<S>;
  check_pointwise_plan(plan, op);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const PointwisePlanes<T> f(plan, coef);
  parallel_for(ch.items(), ch.work(), [&](int64_t it) {
    const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
    k.pointwise(int(op), x + s, y + s, ch.length(j), f.plane[p]);
  });
}

template <class S>
void pointwise_sums(const Plan& plan, Pointwise op, const S* x, const S* dy, const PointwiseCoefficients& coef,
                    double* sums) {
  using T = compute_t<S>;
  check_pointwise_plan(plan, op);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const PointwisePlanes<T> f(plan, coef);
  constexpr int J = kPointwiseSums;
  std::vector<double> chunk_sums(ch.count * J);  // chunk slot s's sums at [s*J, (s+1)*J)
  parallel_for(ch.items(), ch.work() * 4, [&](int64_t it) {
    const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
    k.pointwise_sums(int(op), x + s, dy + s, ch.length(j), f.plane[p], &chunk_sums[ch.slot(p, j) * J]);
  });
  // Per cell: its planes in sample order, each plane's chunks in chunk order. The x - center
  // sum about T(center) becomes one about center: + (T(center) - center) * sum g.
  const int64_t K = plan.num_sample_sets * plan.C;
  std::fill_n(sums, J * K, 0.0);
  for (int64_t n = 0, p = 0; n < plan.N; ++n)
    for (int64_t c = 0; c < plan.C; ++c, ++p) {
      double plane[J] = {};
      for (int64_t j = 0; j < ch.per_seg; ++j)
        for (int i = 0; i < J; ++i) plane[i] += chunk_sums[ch.slot(p, j) * J + i];
      plane[3] += f.center_error[p] * plane[2];
      const int64_t q = set_channel(plan, n, c);
      for (int i = 0; i < J; ++i) sums[i * K + q] += plane[i];
    }
}

template <class S>
void pointwise_backward(const Plan& plan, Pointwise op, const S* x, const S* dy, const PointwiseCoefficients& coef,
                        const double* c1, const double* c2, const double* c3, S* dx) {
  using T = compute_t<S>;
  check_pointwise_plan(plan, op);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const PointwisePlanes<T> f(plan, coef);
  std::vector<T> a(plan.planes()), b(plan.planes()), c(plan.planes());
  for (int64_t n = 0, p = 0; n < plan.N; ++n)
    for (int64_t ci = 0; ci < plan.C; ++ci, ++p) {
      const int64_t q = set_channel(plan, n, ci);
      // c2*(x - center) = c2*(x - T(center)) + c2*(T(center) - center)
      a[p] = T(c1[q]), b[p] = T(c2[q]), c[p] = T(c3[q] + c2[q] * f.center_error[p]);
    }
  parallel_for(ch.items(), ch.work() * 4, [&](int64_t it) {
    const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
    k.pointwise_backward(int(op), x + s, dy + s, dx + s, ch.length(j), f.plane[p], a[p], b[p], c[p]);
  });
}

#define NK_INSTANTIATE(S)                                                                          \
  template void apply_pointwise<S>(const Plan&, Pointwise, const S*, const PointwiseCoefficients&, S*); \
  template void pointwise_sums<S>(const Plan&, Pointwise, const S*, const S*,                      \
                                  const PointwiseCoefficients&, double*);                          \
  template void pointwise_backward<S>(const Plan&, Pointwise, const S*, const S*,                  \
                                      const PointwiseCoefficients&, const double*, const double*,  \
                                      const double*, S*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
