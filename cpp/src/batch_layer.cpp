// BatchLayerNorm2d's two steps (normkit.h: batch_layer_forward, batch_layer_backward). BLN has
// two statistics on crossing axes, the feature cells (n, hw) over C and the batch columns (c, hw)
// over N, so no one order of the memory serves both. Each step reads the batch columns first,
// along wide spans of every sample's C*HW elements; then, per block of hw columns, each sample's
// C rows for its feature cells and, while they are in L2, its output (forward) or dx (backward),
// with the batch part as a term per (c, hw) of the block. Spans and blocks cover fixed columns,
// so results never depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

namespace {

// Rows per call of the row kernels that sum in T (float for float input): a chunk's sums, then
// merges in double, as the per-sample steps' chunks.
constexpr int64_t kRowChunk = 256;

// Samples whose outputs (forward) or dx (backward) one kernel call writes, the term read once for
// all of them (table.h: rows_affine_samples): their rows stay in L2 from their sums to their apply.
constexpr int64_t kSampleGroup = 4;

// Bytes of L2 that sized a block for one sample at a time: its C rows of x, dy and dx (or x and
// y) and the block's term per (c, hw), 28 bytes per column of each channel for float input
// (other types take the same blocks). kSampleGroup samples' rows and the term are then about
// 400 KB (forward) and 700 KB (backward) at 64 channels: within a 1 MB L2 (Zen 4's).
constexpr int64_t kBlockBudget = 384 * 1024;

// The blocks of hw columns: at most 512 (LayerNorm2d's blocks) and at least two blocks where the
// plane has 32 columns, so that two threads share a small plane; and narrow enough that a sample
// group's rows and the block's term stay in L2 (kBlockBudget), the term read once per group.
// Where HW is a multiple of 16 the boundaries are too, so that where a row starts on a cache line
// (16 floats) every block's does, and its output streams (convert.h: put streams only
// line-aligned vectors); elsewhere no row start is aligned, and they are multiples of 8. The
// count is even where the plane allows, the blocks near equal, so that two threads share them
// evenly: 64x56x56 takes 14 blocks of 224 columns (7 of 512 took BLN's inference from 11 to
// 8.5 ms at 2 threads, the term read from L3); 256x14x14 takes 48, 48, 48 and 52, where widths
// of 16 made 64, 64, 64 and 4, one thread's share twice the other's. Fixed by the shape alone,
// so the bits are too.
struct ColumnBlocks {
  int64_t N, C, HW, F, align, count, width = 0;
  explicit ColumnBlocks(const Plan& feature)
      : N(feature.N), C(feature.S), HW(feature.C), F(feature.S * feature.C), align(HW % 16 == 0 ? 16 : 8) {
    const int64_t budget = std::max<int64_t>(16, kBlockBudget / (28 * C));
    const int64_t widest = std::min<int64_t>(512, std::max<int64_t>(32, (HW + 1) / 2));
    const int64_t most = std::max<int64_t>(1, HW / align);  // blocks of at least `align` columns
    count = (HW + std::min(widest, budget) - 1) / std::min(widest, budget);
    const int64_t even = ((HW + count - 1) / count + align - 1) / align * align;  // blocks of whole align
    count = std::min(most, (HW + even - 1) / even);
    if (count > 1 && count % 2 == 1 && count < most) ++count;
    for (int64_t b = 0; b < count; ++b) width = std::max(width, cols(b));
  }
  // Block b's first column: b*HW/count rounded to a multiple of align (HW for b = count).
  // Boundaries at least align apart round at least align apart, so no block is empty.
  int64_t first(int64_t b) const {
    return b >= count ? HW : (b * HW / count + align / 2) / align * align;
  }
  int64_t cols(int64_t b) const { return first(b + 1) - first(b); }
};

void check_feature_plan(const Plan& feature) {
  check_step_plan(feature);
  if (!feature.channels_last || feature.num_groups() != feature.N * feature.C || feature.skip_mean)
    throw std::invalid_argument("invalid plan: BatchLayerNorm2d's steps take its feature plan (LayerNorm2d's: a "
                                "channels-last plan of one group per column of each sample)");
}

// Mean and m2 per column of `rows` rows of `width` columns, ld apart: kRowChunk rows per
// rows_moments call, the chunks merged in order (Chan's formula).
template <class S>
void column_moments(const Kernels<S>& k, const S* x, int64_t rows, int64_t width, int64_t ld, double* mean,
                    double* m2) {
  static thread_local std::vector<double> part;
  part.resize(2 * width);
  double *const cm = part.data(), *const cq = cm + width;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t len = std::min(kRowChunk, rows - r0);
    k.rows_moments(x + r0 * ld, len, width, ld, r0 == 0 ? mean : cm, r0 == 0 ? m2 : cq);
    if (r0 == 0) continue;
    for (int64_t i = 0; i < width; ++i) {
      const Moments m = merge({double(r0), mean[i], m2[i]}, {double(len), cm[i], cq[i]});
      mean[i] = m.mean, m2[i] = m.m2;
    }
  }
}

// Sums per column of `rows` rows (A about shift, as rows_dot's), chunked as column_moments. With
// w (the feature cells'), the weighted sums, and in the same pass the row sums gsum, bsum of
// the per-column affine (a, b): the kernel's rows_dot_row_sums.
template <class S>
void column_dots(const Kernels<S>& k, const S* x, const S* dy, int64_t rows, int64_t width, int64_t ld,
                 const compute_t<S>* shift, double* A, double* B, const compute_t<S>* w = nullptr,
                 const compute_t<S>* a = nullptr, const compute_t<S>* b = nullptr, double* gsum = nullptr,
                 double* bsum = nullptr) {
  static thread_local std::vector<double> part;
  part.resize(2 * width);
  double *const ca = part.data(), *const cb = ca + width;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t len = std::min(kRowChunk, rows - r0), o = r0 * ld;
    double *const sa = r0 == 0 ? A : ca, *const sb = r0 == 0 ? B : cb;
    if (w) k.rows_dot_row_sums(x + o, dy + o, len, width, ld, shift, w + r0, a, b, sa, sb, gsum + r0, bsum + r0);
    else k.rows_dot(x + o, dy + o, len, width, ld, shift, sa, sb);
    if (r0 == 0) continue;
    for (int64_t i = 0; i < width; ++i) A[i] += ca[i], B[i] += cb[i];
  }
}

// The batch columns' pass, over the N samples of each (c, hw): spans of kBatchColumns columns
// of the C*HW that make up a sample, read along rows of 8 KB (a block's rows are a few hundred
// bytes, N rows F elements apart: their reading from memory stalls on every row). Each column's
// sums are over its N rows, chunked along them, so the span width never changes the bits.
constexpr int64_t kBatchColumns = 2048;

template <class Body>
void batch_column_spans(int64_t N, int64_t F, const Body& body) {
  parallel_for((F + kBatchColumns - 1) / kBatchColumns, 2 * N * kBatchColumns, [&](int64_t it) {
    const int64_t e0 = it * kBatchColumns;
    body(e0, std::min(kBatchColumns, F - e0));
  });
}

}  // namespace

template <class S>
void batch_layer_forward(const Plan& feature, const S* x, double eps, double feature_scale, double batch_scale,
                         bool batch_stats, double* mean_b, double* var_b, double* rstd_b,
                         const compute_t<S>* weight, const compute_t<S>* bias, S* y, double* mean_f, double* var_f,
                         double* rstd_f) {
  using T = compute_t<S>;
  check_feature_plan(feature);
  if (feature.S == 0 || feature.C == 0) {  // no element: the feature cells' moments over no channels
    const int64_t cells = feature.N * feature.C;
    std::fill_n(mean_f, cells, std::nan("")), std::fill_n(var_f, cells, std::nan("")), std::fill_n(rstd_f, cells, std::nan(""));
    return;
  }
  const Kernels<S>& k = kernels().get<S>();
  const ColumnBlocks bl(feature);
  const int64_t N = bl.N, C = bl.C, HW = bl.HW, F = bl.F;
  std::vector<T> own;
  T* const term = kept_storage<kSampleTerm>(3 * F, own);  // per (c, hw): the batch part's shift, a, b
  const bool stream = stream_output(N * F * int64_t(sizeof(S)));
  if (batch_stats)  // the batch statistics first, per (c, hw) over the N samples
    batch_column_spans(N, F, [&](int64_t e0, int64_t w) {
      column_moments(k, x + e0, N, w, F, &mean_b[e0], &var_b[e0]);
      for (int64_t e = e0; e < e0 + w; ++e) var_b[e] /= double(N);
    });
  parallel_for(bl.count, N * C * bl.width, [&](int64_t it) {
    const int64_t h0 = bl.first(it), w = bl.cols(it);
    // The batch part's term per (c, hw) of the block: the batch columns' fold (var_b is
    // already over N).
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e0 = c * HW + h0;
      k.finish_cells(w, 1.0, eps, batch_scale, &mean_b[e0], &var_b[e0], nullptr, nullptr, nullptr, nullptr,
                     &rstd_b[e0], term + e0, term + F + e0, term + 2 * F + e0);
    }
    // Then each sample's feature cells over its C rows, and the output of kSampleGroup samples
    // at a time while their rows are in cache (a block of all samples is beyond L2), the term
    // read once for the group.
    static thread_local std::vector<T> coef;
    static thread_local std::vector<double> moments;
    coef.resize(3 * kSampleGroup * w), moments.resize(2 * w);
    T *const fs = coef.data(), *const fa = fs + kSampleGroup * w, *const fb = fa + kSampleGroup * w;
    double *const pm = moments.data(), *const pq = pm + w;  // (per sample of the group, w columns each)
    const ElementTerm<T> t{term + h0, term + F + h0, term + 2 * F + h0, nullptr};
    for (int64_t n0 = 0; n0 < N; n0 += kSampleGroup) {
      const int64_t ns = std::min(kSampleGroup, N - n0);
      for (int64_t j = 0; j < ns; ++j) {
        const int64_t g = (n0 + j) * HW + h0;
        column_moments(k, x + (n0 + j) * F + h0, C, w, HW, pm, pq);
        k.finish_cells(w, double(C), eps, feature_scale, pm, pq, nullptr, nullptr, &mean_f[g], &var_f[g],
                       &rstd_f[g], fs + j * w, fa + j * w, fb + j * w);
      }
      k.rows_affine_samples(x + n0 * F + h0, y + n0 * F + h0, ns, F, C, w, HW, fs, fa, fb, w, weight, bias, t,
                            stream);
    }
  });
}

template <class S>
void batch_layer_backward(const Plan& feature, const S* x, const S* dy, const double* mean_f, const double* rstd_f,
                          const double* mean_b, const double* rstd_b, double feature_scale, double batch_scale,
                          bool batch_stats, const compute_t<S>* weight, S* dx, double* dweight, double* dbias) {
  using T = compute_t<S>;
  check_feature_plan(feature);
  if (feature.S == 0 || feature.C == 0) {  // no element: nothing to sum
    std::fill_n(dweight, feature.S, 0.0), std::fill_n(dbias, feature.S, 0.0);
    return;
  }
  const Kernels<S>& k = kernels().get<S>();
  const ColumnBlocks bl(feature);
  const int64_t N = bl.N, C = bl.C, HW = bl.HW, F = bl.F;
  std::vector<T> own_term;
  T* const term = kept_storage<kSampleTerm>(4 * F, own_term);  // per (c, hw): shift, a, b, c1
  std::vector<double> own_parts;  // per (block, channel): the weight's and the bias's partial sums
  double* const parts = kept_storage<kBatchTerms>(2 * bl.count * C, own_parts);
  const double inv_n = 1.0 / double(N), inv_c = 1.0 / double(C);
  const bool stream = stream_output(N * F * int64_t(sizeof(S)));
  // The batch columns' sums first, per (c, hw) over the N samples: A about the shift T(mu_B).
  std::vector<double> own_sums;
  double* const batch_a = kept_storage<kBatchSums>(2 * F, own_sums);
  double* const batch_b = batch_a + F;
  batch_column_spans(N, F, [&](int64_t e0, int64_t w) {
    T* const sh = term + e0;
    for (int64_t e = e0; e < e0 + w; ++e) term[e] = T(mean_b[e]);
    column_dots(k, x + e0, dy + e0, N, w, F, sh, batch_a + e0, batch_b + e0);
  });
  parallel_for(bl.count, 3 * N * C * bl.width, [&](int64_t it) {
    const int64_t h0 = bl.first(it), w = bl.cols(it);
    static thread_local std::vector<T> coef;
    static thread_local std::vector<double> sums;
    const int64_t gw = kSampleGroup * w;  // per sample of a group, w columns each:
    coef.resize(6 * gw), sums.resize(2 * w + 2 * C);
    T *const fs = coef.data(), *const fa = fs + gw, *const fb = fa + gw;  // its x_F affine
    T *const c1 = fb + gw, *const c2 = c1 + gw, *const c3 = c2 + gw;      // and its feature fold
    double *const A = sums.data(), *const B = A + w, *const rg = B + w, *const rb = rg + C;
    double *const gpart = parts + it * C, *const bpart = parts + (bl.count + it) * C;
    std::fill_n(gpart, C, 0.0), std::fill_n(bpart, C, 0.0);
    // The batch columns: from their sums of dy and dy (x - mu_B) over the N samples, the
    // weight's batch part, and the batch part of dx as a term per (c, hw).
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e0 = c * HW + h0;
      const T* const sh = term + e0;
      const double *const ba = batch_a + e0, *const bb = batch_b + e0;
      // dx's batch part: batch_scale r (w dy - w B/N - r^2 (x - mu_B) w A/N); no batch
      // statistics: batch_scale r w dy alone. The weight's: batch_scale sum r A.
      const double wn = batch_stats ? double(weight[c]) * inv_n : 0.0;
      // Column i's fold, its r a into g: four sums, columns i mod 4 (one chain of dependent
      // additions bounded this loop; with four, BLN's backward at 8x256x14x14 took 5% less).
      auto fold = [&](int64_t i, double& g) {
        const int64_t e = e0 + i;
        const double r = rstd_b[e], shift = double(sh[i]);
        const double a = ba[i] + (shift - mean_b[e]) * bb[i], br = batch_scale * r;
        g += r * a;
        const double k2 = -br * r * r * wn * a, k3 = -br * wn * bb[i];
        term[F + e] = T(k2), term[2 * F + e] = T(k3 + k2 * (shift - mean_b[e])), term[3 * F + e] = T(br);
      };
      double g0 = 0, g1 = 0, g2 = 0, g3 = 0;
      int64_t i = 0;
      for (; i + 4 <= w; i += 4) fold(i, g0), fold(i + 1, g1), fold(i + 2, g2), fold(i + 3, g3);
      for (; i < w; ++i) fold(i, g0);
      gpart[c] += batch_scale * ((g0 + g1) + (g2 + g3));
    }
    // Then each sample's feature cells: B = sum w dy, A = sum w dy (x - mu_F) over its C rows,
    // the weight's feature part (sum dy x_F, scaled) and the bias's per row, the fold per cell,
    // and the sample's dx while its rows are in cache.
    const ElementTerm<T> t{term + h0, term + F + h0, term + 2 * F + h0, term + 3 * F + h0};
    for (int64_t n0 = 0; n0 < N; n0 += kSampleGroup) {
      const int64_t ns = std::min(kSampleGroup, N - n0);
      for (int64_t j = 0; j < ns; ++j) {
        const int64_t g0 = (n0 + j) * HW + h0, s = (n0 + j) * F + h0, q = j * w;
        for (int64_t i = 0; i < w; ++i) {
          const double mu = mean_f[g0 + i], sc = feature_scale * rstd_f[g0 + i];
          const T sh = T(mu);
          fs[q + i] = sh, fa[q + i] = T(sc), fb[q + i] = T((double(sh) - mu) * sc);
        }
        column_dots(k, x + s, dy + s, C, w, HW, fs + q, A, B, weight, fa + q, fb + q, rg, rb);
        for (int64_t r = 0; r < C; ++r) gpart[r] += rg[r], bpart[r] += rb[r];
        for (int64_t i = 0; i < w; ++i) {
          const double mu = mean_f[g0 + i], r = rstd_f[g0 + i], sc = feature_scale * r;
          const double shift = double(fs[q + i]), a = A[i] + (shift - mu) * B[i];
          const double k2 = -sc * r * r * a * inv_c, k3 = -sc * B[i] * inv_c;
          c1[q + i] = T(sc), c2[q + i] = T(k2), c3[q + i] = T(k3 + k2 * (shift - mu));
        }
      }
      const int64_t s = n0 * F + h0;
      k.rows_backward_apply_samples(x + s, dy + s, dx + s, ns, F, C, w, HW, c1, c2, fs, c3, w, weight, t, stream);
    }
  });
  std::fill_n(dweight, C, 0.0), std::fill_n(dbias, C, 0.0);
  for (int64_t it = 0; it < bl.count; ++it)  // per channel, in block order
    for (int64_t c = 0; c < C; ++c) dweight[c] += parts[it * C + c], dbias[c] += parts[(bl.count + it) * C + c];
}

template <class T>
void running_update(T* running, const double* value, int64_t n, double factor, double value_scale) {
  constexpr int64_t block = 4096;
  parallel_for((n + block - 1) / block, block, [&](int64_t i) {
    for (int64_t e = i * block; e < std::min(n, (i + 1) * block); ++e)
      running[e] = T((1.0 - factor) * double(running[e]) + factor * (value_scale * value[e]));
  });
}

#define NK_INSTANTIATE(S)                                                                                   \
  template void batch_layer_forward<S>(const Plan&, const S*, double, double, double, bool, double*, double*, \
                                       double*, const compute_t<S>*, const compute_t<S>*, S*, double*,       \
                                       double*, double*);                                                   \
  template void batch_layer_backward<S>(const Plan&, const S*, const S*, const double*, const double*,        \
                                        const double*, const double*, double, double, bool,                   \
                                        const compute_t<S>*, S*, double*, double*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE
template void running_update<float>(float*, const double*, int64_t, double, double);
template void running_update<double>(double*, const double*, int64_t, double, double);

}  // namespace nk
