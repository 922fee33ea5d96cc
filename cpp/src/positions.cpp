// The steps with a per-position affine after the cells' normalization (normkit.h:
// apply_coefficients_positions), for channels-last plans: LayerNorm2d reads NCHW memory as a
// channels-last plan of N samples, HW "channels" and C positions, whose cells (n, hw) are its
// statistics groups and whose positions (rows) are its channels, so its per-channel affine is
// per row. Cells and their coefficients as apply_coefficients'; the same chunks and orders.
#include <algorithm>
#include <vector>

#include "fold.h"
#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

namespace {

void check_positions_plan(const Plan& plan) {
  check_step_plan(plan);
  if (!plan.channels_last) throw std::invalid_argument("invalid plan: the per-position affine steps read channels-last memory");
}

}  // namespace

template <class S>
void apply_coefficients_positions(const Plan& plan, const S* x, const double* mean, const double* scale,
                                  const double* offset, const compute_t<S>* weight, const compute_t<S>* bias,
                                  S* y) {
  using T = compute_t<S>;
  check_positions_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const PlaneAffine<T> f = set_channel_affine<T>(plan, mean, scale, offset);
  const bool stream = stream_output(plan.planes() * plan.S * int64_t(sizeof(S)));
  parallel_column_blocks(ch, 1, [&](int64_t it, int64_t c0, int64_t width) {
    const int64_t s = ch.start(it) + c0, p0 = ch.sample(it) * ch.C + c0, r0 = ch.chunk(it) * ch.step;
    k.rows_affine_rows(x + s, y + s, ch.length(ch.chunk(it)), width, ch.C, &f.shift[p0], &f.a[p0], &f.b[p0],
                       weight + r0, bias + r0, stream);
  });
}

template <class S>
void backward_sums_positions(const Plan& plan, const S* x, const S* dy, const double* mean, const double* scale,
                             const double* offset, const compute_t<S>* weight, double* sum_dy,
                             double* sum_dy_xmu, double* dweight, double* dbias) {
  using T = compute_t<S>;
  check_positions_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const int64_t C = plan.C, S_ = plan.S, K = plan.num_sample_sets * C;
  const PlaneAffine<T> xhat = set_channel_affine<T>(plan, mean, scale, offset);
  const ChunkResults cr(ch.count);
  double *const A = cr.first, *const B = cr.second;
  // Per (sample, column block, position): dy*xhat and dy over the block's columns.
  const int64_t nb = ch.col_blocks();
  std::vector<double> rg(plan.N * nb * S_), rb(plan.N * nb * S_);
  parallel_column_blocks(ch, 2, [&](int64_t it, int64_t c0, int64_t width) {
    const int64_t s = ch.start(it) + c0, j = ch.chunk(it), n = ch.sample(it), p0 = n * C + c0;
    const int64_t slot = ch.slot(n * C, j) + c0, r0 = j * ch.step, rows = ch.length(j);
    const int64_t rs = (n * nb + c0 / kWideRow) * S_ + r0;
    k.rows_dot_row_sums(x + s, dy + s, rows, width, C, &xhat.shift[p0], weight + r0, &xhat.a[p0], &xhat.b[p0],
                        &A[slot], &B[slot], &rg[rs], &rb[rs]);
  });
  // Per cell: its planes in sample order, each plane's chunks in chunk order; the sums about
  // the shift (mean rounded to T) become sums about the mean.
  std::fill_n(sum_dy, K, 0.0), std::fill_n(sum_dy_xmu, K, 0.0);
  for (int64_t n = 0, p = 0; n < plan.N; ++n)
    for (int64_t c = 0; c < C; ++c, ++p) {
      double a = 0, b = 0;
      for (int64_t j = 0; j < ch.per_seg; ++j) a += A[ch.slot(p, j)], b += B[ch.slot(p, j)];
      const int64_t q = set_channel(plan, n, c);
      sum_dy[q] += b;
      sum_dy_xmu[q] += a + (double(xhat.shift[p]) - mean[q]) * b;
    }
  std::fill_n(dweight, S_, 0.0), std::fill_n(dbias, S_, 0.0);
  for (int64_t i = 0; i < plan.N * nb; ++i)  // per position, in (sample, block) order
    for (int64_t r = 0; r < S_; ++r) dweight[r] += rg[i * S_ + r], dbias[r] += rb[i * S_ + r];
}

template <class S>
void backward_apply_positions(const Plan& plan, const S* x, const S* dy, const double* mean, const double* c1,
                              const double* c2, const double* c3, const compute_t<S>* weight, S* dx,
                              const SampleTerm* term) {
  using T = compute_t<S>;
  check_positions_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const int64_t P = plan.planes(), C = plan.C;
  const BackwardPlanes<T> f(plan, mean, c1, c2, c3);
  const bool stream = stream_output(P * plan.S * int64_t(sizeof(S)));
  if (term && !term->c1) throw std::invalid_argument("backward_apply_positions: the sample term needs its c1");
  const SampleTermPlanes<T> t(term, C * plan.S);
  parallel_column_blocks(ch, 1, [&](int64_t it, int64_t c0, int64_t width) {
    const int64_t s = ch.start(it) + c0, p0 = ch.sample(it) * C + c0, r0 = ch.chunk(it) * ch.step;
    if (term)
      k.rows_backward_apply_samples(x + s, dy + s, dx + s, 1, 0, ch.length(ch.chunk(it)), width, C, &f.c1[p0],
                                    &f.c2[p0], &f.shift[p0], &f.c3[p0], 0, weight + r0, t.at(r0 * C + c0), stream);
    else
      k.rows_backward_apply_weighted(x + s, dy + s, dx + s, ch.length(ch.chunk(it)), width, C, &f.c1[p0],
                                     &f.c2[p0], &f.shift[p0], &f.c3[p0], weight + r0, stream);
  });
}

template <class S>
void normalize_backward_positions(const Plan& plan, const S* x, const S* dy, const double* mean,
                                  const double* rstd, const compute_t<S>* weight, S* dx, double* dweight,
                                  double* dbias) {
  using T = compute_t<S>;
  check_positions_plan(plan);
  if (!plane_groups(plan) || plan.skip_mean)
    throw std::invalid_argument("invalid plan: normalize_backward_positions takes a channels-last plan of one group per column of each sample");
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const int64_t C = plan.C, S_ = plan.S, nb = ch.col_blocks();
  const double inv_m = 1.0 / double(S_);
  const bool stream = stream_output(plan.planes() * S_ * int64_t(sizeof(S)));
  std::vector<double> rg(plan.N * nb * S_), rb(plan.N * nb * S_);  // per (sample, block, position)
  parallel_for(plan.N * nb, 3 * S_ * (C / nb), [&](int64_t item) {
    const int64_t n = item / nb, c0 = nb == 1 ? 0 : (item % nb) * kWideRow;
    const int64_t width = nb == 1 ? C : std::min(kWideRow, C - c0), p0 = n * C + c0;
    // The block's columns: x_hat's affine (as set_channel_affine), then the chunks' sums.
    static thread_local std::vector<T> coef;
    static thread_local std::vector<double> sums;
    coef.resize(6 * width), sums.resize(2 * ch.per_seg * width);
    T *const shift = coef.data(), *const a = shift + width, *const b = a + width;
    T *const c1 = b + width, *const c2 = c1 + width, *const c3 = c2 + width;
    for (int64_t c = 0; c < width; ++c) {
      const double mu = mean[p0 + c], r = rstd[p0 + c];
      shift[c] = T(mu), a[c] = T(r), b[c] = T((double(shift[c]) - mu) * r);
    }
    double *const A = sums.data(), *const B = A + ch.per_seg * width;
    for (int64_t j = 0; j < ch.per_seg; ++j) {
      const int64_t s = ch.start(n * ch.per_seg + j) + c0, r0 = j * ch.step, rows = ch.length(j);
      const int64_t rs = item * S_ + r0;
      k.rows_dot_row_sums(x + s, dy + s, rows, width, C, shift, weight + r0, a, b, &A[j * width], &B[j * width],
                          &rg[rs], &rb[rs]);
    }
    for (int64_t c = 0; c < width; ++c) {  // chunks in order, about the mean, then the fold
      double sa = 0, sb = 0;
      for (int64_t j = 0; j < ch.per_seg; ++j) sa += A[j * width + c], sb += B[j * width + c];
      const double mu = mean[p0 + c], r = rstd[p0 + c];
      sa += (double(shift[c]) - mu) * sb;
      const double k2 = -r * r * r * sa * inv_m, k3 = -r * sb * inv_m;
      c1[c] = T(r), c2[c] = T(k2), c3[c] = T(k3 + k2 * (double(shift[c]) - mu));
    }
    for (int64_t j = 0; j < ch.per_seg; ++j) {
      const int64_t s = ch.start(n * ch.per_seg + j) + c0, r0 = j * ch.step;
      k.rows_backward_apply_weighted(x + s, dy + s, dx + s, ch.length(j), width, C, c1, c2, shift, c3,
                                     weight + r0, stream);
    }
  });
  std::fill_n(dweight, S_, 0.0), std::fill_n(dbias, S_, 0.0);
  for (int64_t i = 0; i < plan.N * nb; ++i)  // per position, in (sample, block) order
    for (int64_t r = 0; r < S_; ++r) dweight[r] += rg[i * S_ + r], dbias[r] += rb[i * S_ + r];
}

#define NK_INSTANTIATE(S)                                                                              \
  template void apply_coefficients_positions<S>(const Plan&, const S*, const double*, const double*,   \
                                                const double*, const compute_t<S>*, const compute_t<S>*, S*); \
  template void backward_sums_positions<S>(const Plan&, const S*, const S*, const double*, const double*, \
                                           const double*, const compute_t<S>*, double*, double*, double*, \
                                           double*);                                                   \
  template void backward_apply_positions<S>(const Plan&, const S*, const S*, const double*, const double*, \
                                            const double*, const double*, const compute_t<S>*, S*,         \
                                            const SampleTerm*);                                     \
  template void normalize_backward_positions<S>(const Plan&, const S*, const S*, const double*,          \
                                                const double*, const compute_t<S>*, S*, double*, double*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
