// BatchChannelNorm2d's folds (normkit.h: batch_channel_fold, batch_channel_fold_backward): the
// per-cell bookkeeping between its core steps, over N*C cells of S elements each. In NumPy these
// were some forty small array operations a step, several times the core's own time on a small
// tensor (8x256x14x14: 2048 cells). And its inference in one pass (batch_channel_infer): the
// shared moments and affine kernels with the fold between them, group by group.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

namespace {

// The batch part per channel: x1 = a x + b with a = bn_weight r, b = bn_bias - mu a.
struct ChannelAffine {
  std::vector<double> a, b;
  ChannelAffine(int64_t C, const BatchChannelParams& p, const double* mu, const double* r) : a(C), b(C) {
    for (int64_t c = 0; c < C; ++c) a[c] = p.bn_weight[c] * r[c], b[c] = p.bn_bias[c] - mu[c] * a[c];
  }
};

// The group part of the (n, g) groups k = n*G + g in [k0, k1), from their cells' moments m, v
// (indexed by cell n*C + c): per group its statistics of x1 per cell (mean m1 = a m + b,
// variance a^2 v), mu_g and r_g, then y = gw r_g (x1 - mu_g) + gb = scale (x - m) + offset per
// cell. Step by step over all the groups, so that their short dependent chains (a sum, a
// division, a sum of squares, a square root) run side by side; group after group, their
// latency was most of the fold.
void fold_groups(int64_t C, int64_t G, double eps, const ChannelAffine& ch, const BatchChannelParams& p,
                 const double* m, const double* v, int64_t k0, int64_t k1, double* scale, double* offset,
                 double* mu_g, double* r_g) {
  // Group k's cells are [k*cpg, (k+1)*cpg) (C = G*cpg); its group g within the sample counts
  // along with k (a 64-bit division per group and step was a fifth of the fold).
  const int64_t cpg = C / G, g0 = k0 % G;
  for (int64_t k = k0, g = g0; k < k1; ++k, g = g + 1 == G ? 0 : g + 1) {  // m1 (in offset for now), its sum
    double* const m1 = offset + k * cpg;
    const double *const mk = m + k * cpg, *const a = ch.a.data() + g * cpg, *const b = ch.b.data() + g * cpg;
    double s = 0;
    for (int64_t i = 0; i < cpg; ++i) m1[i] = a[i] * mk[i] + b[i], s += m1[i];
    mu_g[k] = s;
  }
  for (int64_t k = k0; k < k1; ++k) mu_g[k] /= double(cpg);
  for (int64_t k = k0, g = g0; k < k1; ++k, g = g + 1 == G ? 0 : g + 1) {  // the sum of squares, in r_g for now
    const double *const m1 = offset + k * cpg, *const vk = v + k * cpg, *const a = ch.a.data() + g * cpg;
    const double mean = mu_g[k];
    double q = 0;
    for (int64_t i = 0; i < cpg; ++i) q += a[i] * a[i] * vk[i] + (m1[i] - mean) * (m1[i] - mean);
    r_g[k] = q;
  }
  for (int64_t k = k0; k < k1; ++k) r_g[k] = 1.0 / std::sqrt(r_g[k] / double(cpg) + eps);
  for (int64_t k = k0, g = g0; k < k1; ++k, g = g + 1 == G ? 0 : g + 1) {
    const double e1 = p.gn_weight[g] * r_g[k], gb = p.gn_bias[g], mean = mu_g[k];
    double *const sc = scale + k * cpg, *const of = offset + k * cpg;
    const double* const a = ch.a.data() + g * cpg;
    for (int64_t i = 0; i < cpg; ++i) sc[i] = e1 * a[i], of[i] = e1 * (of[i] - mean) + gb;
  }
}

// One group's cells in batch_channel_fold_backward (its comment has the equations): c3 holds
// d1 = m1 - mu_g on entry. Unaliased, so that the compiler keeps the cells' values in
// registers (with the arrays' possible overlaps it reloaded every one after each store).
void group_cells_backward(int64_t n, double e1, double e2, double hP, double Sd, const double* __restrict__ a,
                          const double* __restrict__ B, const double* __restrict__ A, const double* __restrict__ m,
                          const double* __restrict__ v, const double* __restrict__ mu, double* __restrict__ Z,
                          double* __restrict__ ZX, double* __restrict__ c1, double* __restrict__ c2,
                          double* __restrict__ c3) {
  for (int64_t c = 0; c < n; ++c) {
    const double d1 = c3[c], f = e2 * a[c], h = e2 * d1 - hP, dm = m[c] - mu[c];
    Z[c] += e1 * B[c] + h * Sd;
    ZX[c] += e1 * (A[c] + dm * B[c]) + f * Sd * v[c] + h * Sd * dm;
    c1[c] = a[c] * e1, c2[c] = a[c] * f, c3[c] = a[c] * h;
  }
}

}  // namespace

void check_batch_channel_cells(int64_t N, int64_t C, int64_t G, int64_t S) {
  if (N < 1 || C < 1 || G < 1 || S < 1 || C % G != 0)
    throw std::invalid_argument("batch_channel_fold: expected N, C, G, S >= 1 and G dividing C");
}

void batch_channel_fold(int64_t N, int64_t C, int64_t G, int64_t S, double eps, bool pool, const double* m,
                        const double* v, double* mu, double* var, const BatchChannelParams& p, double* r,
                        double* scale, double* offset, double* mu_g, double* r_g) {
  check_batch_channel_cells(N, C, G, S);
  if (pool) {  // the batch part's statistics from the cells (Chan's pooling of equal-size cells)
    std::fill_n(mu, C, 0.0), std::fill_n(var, C, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) mu[c] += m[n * C + c];
    for (int64_t c = 0; c < C; ++c) mu[c] /= double(N);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const double d = m[n * C + c] - mu[c];
        var[c] += v[n * C + c] + d * d;
      }
    for (int64_t c = 0; c < C; ++c) var[c] /= double(N);
  }
  for (int64_t c = 0; c < C; ++c) r[c] = 1.0 / std::sqrt(var[c] + eps);
  fold_groups(C, G, eps, ChannelAffine(C, p, mu, r), p, m, v, 0, N * G, scale, offset, mu_g, r_g);
}

void batch_channel_fold_backward(int64_t N, int64_t C, int64_t G, int64_t S, bool batch, const double* B,
                                 const double* A, const double* m, const double* v, const double* mu,
                                 const double* r, const double* mu_g, const double* r_g,
                                 const BatchChannelParams& p, double* c1, double* c2, double* c3,
                                 double* d_bn_weight, double* d_bn_bias, double* d_gn_weight, double* d_gn_bias) {
  check_batch_channel_cells(N, C, G, S);
  const int64_t cpg = C / G;
  const double M1 = double(cpg * S), Sd = double(S);
  const ChannelAffine ch(C, p, mu, r);
  double *const Z = d_bn_bias, *const ZX = d_bn_weight;  // summed over the samples, then scaled
  std::fill_n(Z, C, 0.0), std::fill_n(ZX, C, 0.0), std::fill_n(d_gn_weight, G, 0.0), std::fill_n(d_gn_bias, G, 0.0);
  // The group part per (n, g): P = sum B, Q = sum (a A + d1 B) over its cells, d1 = m1 - mu_g;
  // dL/dx1 = e1 dy + f (x - m) + h per cell with e2 = -gw r_g^3 Q/M1, f = e2 a,
  // h = e2 d1 - e1 P/M1. The batch part sums z = dL/dx1 per channel: Z = sum (e1 B + h S),
  // ZX = sum (e1 (A + (m - mu) B) + f S v + h S (m - mu)).
  // Two passes over the groups, so that their short chains (two sums, then two divisions) run
  // side by side instead of each group's cells waiting for its own.
  std::vector<double> e2_of(N * G), hP_of(N * G);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k0 = n * C;
    const double *const Bn = B + k0, *const An = A + k0, *const mn = m + k0;
    double *const d1 = c3 + k0;  // d1 first, then c3
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * cpg;
      const double rg = r_g[n * G + g], e1 = p.gn_weight[g] * rg, mean = mu_g[n * G + g];
      double P = 0, Q = 0;
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        d1[c] = ch.a[c] * mn[c] + ch.b[c] - mean;
        P += Bn[c], Q += ch.a[c] * An[c] + d1[c] * Bn[c];
      }
      d_gn_weight[g] += rg * Q, d_gn_bias[g] += P;
      e2_of[n * G + g] = -p.gn_weight[g] * rg * rg * rg * Q / M1, hP_of[n * G + g] = e1 * P / M1;
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0, k0 = n * C; g < G; ++g) {
      const int64_t c0 = g * cpg, q = k0 + c0;  // the group's first channel and cell
      group_cells_backward(cpg, p.gn_weight[g] * r_g[n * G + g], e2_of[n * G + g], hP_of[n * G + g], Sd,
                           ch.a.data() + c0, B + q, A + q, m + q, v + q, mu + c0, Z + c0, ZX + c0, c1 + q, c2 + q,
                           c3 + q);
    }
  // With batch statistics the batch part's own backward: dx = bw r z - bw r Z/M
  // - bw r^3 (x - mu) ZX/M per channel, M = N*S; else dx = bw r z.
  if (batch) {
    const double M = double(N * S);
    std::vector<double> t(C), u(C);  // per channel: the terms on x - mu and on 1
    for (int64_t c = 0; c < C; ++c) t[c] = ch.a[c] * r[c] * r[c] * ZX[c] / M, u[c] = ch.a[c] * Z[c] / M;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0, k = n * C; c < C; ++c, ++k) {
        c2[k] -= t[c];
        c3[k] -= u[c] + t[c] * (m[k] - mu[c]);
      }
  }
  for (int64_t c = 0; c < C; ++c) d_bn_weight[c] *= r[c];  // dbn_weight = r ZX; dbn_bias = Z
}

template <class S>
void batch_channel_infer(int64_t N, int64_t C, int64_t G, int64_t S_, const S* x, double eps, const double* mu,
                         const double* var, const BatchChannelParams& p, S* y, double* m, double* v, double* r,
                         double* scale, double* offset, double* mu_g, double* r_g) {
  using T = compute_t<S>;
  check_batch_channel_cells(N, C, G, S_);
  const int64_t cpg = C / G, run = cpg * S_;
  for (int64_t c = 0; c < C; ++c) r[c] = 1.0 / std::sqrt(var[c] + eps);
  const ChannelAffine ch(C, p, mu, r);
  const Kernels<S>& k = kernels().get<S>();
  const bool stream = stream_output(N * C * S_ * int64_t(sizeof(S)));
  // Each plane's moments as group_moments takes a cell of one plane: chunks of kChunk, merged in
  // order (a plane of one chunk: its moments, the planes of a batch in one kernel call).
  const bool one_chunk = S_ <= kChunk;
  const GroupBatches gb(N * G, run);
  parallel_for(gb.count, gb.per_batch * run * 2, [&](int64_t b) {
    const int64_t k0 = gb.first(b), k1 = gb.end(b), p0 = k0 * cpg, p1 = k1 * cpg;
    if (one_chunk) k.moments(x + p0 * S_, S_, p1 - p0, m + p0, v + p0);
    for (int64_t q = p0; q < p1; ++q) {  // finish_group's biased variance
      if (one_chunk) {
        v[q] /= double(S_);
        continue;
      }
      Moments acc;
      for (int64_t j = 0; j * kChunk < S_; ++j) {
        const int64_t len = std::min(kChunk, S_ - j * kChunk);
        double cm, cm2;
        k.moments(x + q * S_ + j * kChunk, len, 1, &cm, &cm2);
        acc = merge(acc, Moments{double(len), cm, cm2});
      }
      m[q] = acc.mean, v[q] = acc.m2 / acc.n;
    }
    fold_groups(C, G, eps, ch, p, m, v, k0, k1, scale, offset, mu_g, r_g);
    for (int64_t q = p0; q < p1; ++q) {  // y = scale (x - m) + offset, as apply_coefficients rounds it
      const T sh = T(m[q]);
      k.affine(x + q * S_, y + q * S_, S_, sh, T(scale[q]), T(offset[q] + (double(sh) - m[q]) * scale[q]), nullptr,
               nullptr, nullptr, false, stream);
    }
  });
}

#define NK_INSTANTIATE(S)                                                                                       \
  template void batch_channel_infer<S>(int64_t, int64_t, int64_t, int64_t, const S*, double, const double*,     \
                                       const double*, const BatchChannelParams&, S*, double*, double*, double*, \
                                       double*, double*, double*, double*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
