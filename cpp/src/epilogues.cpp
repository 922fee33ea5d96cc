// The pointwise epilogue steps (normkit.h: apply_pointwise): a variant whose output is not an
// affine of x (FRN+TLU, EvoNorm, Proxy Norm) folds its statistics into per-cell coefficients,
// then one pass applies them; its backward is one sums pass and one apply pass, like the
// standard layers'. Channels-first plans; cells are (set, channel), as apply_coefficients'.
#include <algorithm>
#include <string>
#include <type_traits>
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

// The planes of the `count` consecutive cells from q0, to out[i]: the shift and the center
// rounded to T, b carrying the shift's rounding (as fold.h's channel_coef), and center_error[i]
// = T(center) - center where given (the backward's c3 carries it). Each coefficient row is read
// along its length: plane by plane, the nine rows K doubles apart (16 KB at 2048 cells) fell in
// one L1 set, more lines than its ways.
template <class T>
void planes_of(const PointwiseCoefficients& k, int64_t q0, int64_t count, PointwisePlane<T>* out,
               double* center_error) {
  const double *sh = k.shift + q0, *a = k.a + q0, *b = k.b + q0;
  for (int64_t i = 0; i < count; ++i) out[i].shift = T(sh[i]);
  for (int64_t i = 0; i < count; ++i) out[i].a = T(a[i]);
  for (int64_t i = 0; i < count; ++i) out[i].b = T(b[i] + (double(out[i].shift) - sh[i]) * a[i]);
  for (int64_t i = 0; i < count; ++i) out[i].p = T(k.p[q0 + i]);
  for (int64_t i = 0; i < count; ++i) out[i].q = T(k.q[q0 + i]);
  for (int64_t i = 0; i < count; ++i) out[i].r = T(k.r[q0 + i]);
  for (int64_t i = 0; i < count; ++i) out[i].scale = T(k.scale[q0 + i]);
  for (int64_t i = 0; i < count; ++i) out[i].offset = T(k.offset[q0 + i]);
  for (int64_t i = 0; i < count; ++i) out[i].center = T(k.center[q0 + i]);
  if (center_error)
    for (int64_t i = 0; i < count; ++i) center_error[i] = double(out[i].center) - k.center[q0 + i];
}

template <class T>
struct PointwisePlanes {
  std::vector<PointwisePlane<T>> plane;
  std::vector<double> center_error;  // center - T(center), per plane
  // Sample by sample on the threads: 2048 small planes' conversions, one after another, were a
  // fifth of a small FRN backward.
  PointwisePlanes(const Plan& plan, const PointwiseCoefficients& k) : plane(plan.planes()), center_error(plan.planes()) {
    parallel_for(plan.N, plan.C * 64, [&](int64_t n) {
      planes_of(k, set_channel(plan, n, 0), plan.C, plane.data() + n * plan.C, center_error.data() + n * plan.C);
    });
  }
};

// The cells' sums (7 x K) from the chunks' (chunk slot s's at [s*7, (s+1)*7)): per cell its
// planes in sample order, each plane's chunks in chunk order. The x - center sum about
// T(center) becomes one about center: + (T(center) - center) * sum g.
void cell_sums(const Plan& plan, const Chunks& ch, const std::vector<double>& center_error,
               const std::vector<double>& chunk_sums, double* sums) {
  constexpr int J = kPointwiseSums;
  const int64_t K = plan.num_sample_sets * plan.C;
  std::fill_n(sums, J * K, 0.0);
  for (int64_t n = 0, p = 0; n < plan.N; ++n)
    for (int64_t c = 0; c < plan.C; ++c, ++p) {
      double plane[J] = {};
      for (int64_t j = 0; j < ch.per_seg; ++j)
        for (int i = 0; i < J; ++i) plane[i] += chunk_sums[ch.slot(p, j) * J + i];
      plane[3] += center_error[p] * plane[2];
      const int64_t q = set_channel(plan, n, c);
      for (int i = 0; i < J; ++i) sums[i * K + q] += plane[i];
    }
}

void check_plane_cells(const Plan& plan, int64_t cluster, const char* step) {
  if (plan.num_sample_sets != plan.N) throw std::invalid_argument("invalid plan: a local fold's cells are the planes");
  for (int64_t n = 0; n < plan.N; ++n)
    if (plan.sample_group[n] != n) throw std::invalid_argument("invalid plan: a local fold's cells are the planes");
  if (cluster < 1 || plan.C % cluster != 0) throw std::invalid_argument(std::string(step) + ": cluster must divide the channels");
}

}  // namespace

template <class S>
void apply_pointwise(const Plan& plan, Pointwise op, const S* x, const PointwiseCoefficients& coef, S* y) {
  using T = compute_t<S>;
  check_pointwise_plan(plan, op);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const PointwisePlanes<T> f(plan, coef);
  const bool stream = stream_output(plan.planes() * plan.S * int64_t(sizeof(S)));
  parallel_for(ch.items(), ch.work(), [&](int64_t it) {
    const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
    k.pointwise(int(op), x + s, y + s, ch.length(j), f.plane[p], stream);
  });
}

template <class S>
void normalize_pointwise(const Plan& plan_in, Pointwise op, const S* x, const PointwiseFold& fold,
                         const PointwiseCoefficients& channel, S* y, double* mean, double* var, double* cell) {
  using T = compute_t<S>;
  check_pointwise_plan(plan_in, op);
  if (plan_in.N == 0) return;
  if (!one_set_per_sample(plan_in)) throw std::invalid_argument("invalid plan: normalize_pointwise takes a plan of each sample's own groups");
  Plan plan = plan_in;
  plan.skip_mean = fold.skip_mean;
  const int64_t P = plan.planes(), cpg = plan.channels_per_group;
  double* row[9];
  for (int i = 0; i < 9; ++i) row[i] = cell + i * P;
  const PointwiseCoefficients cells{row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8]};
  // Groups [g0, g1)'s planes' coefficients from their statistics, one row at a time along its
  // length (as planes_of reads them; plane by plane, these stores were a third of a small FRN's
  // forward).
  auto fold_groups = [&](int64_t g0, int64_t g1) {
    // kStep planes at a time: per plane its channel, its group's r and mean, from counters (a
    // 64-bit division per plane and row was most of the fold), then the rows.
    // With std_into_r, r[i] is the group's sqrt(var + eps), the cells' r, and a and scale the
    // channel's.
    constexpr int64_t kStep = 256;
    const bool into_r = fold.std_into_r, into_scale = fold.rstd_into_scale && !into_r, into_a = !into_scale && !into_r;
    int64_t g = g0, j = 0, c = (g0 * cpg) % plan.C;  // the next plane's group, place in it, channel
    double rg = 0;
    for (int64_t p0 = g0 * cpg; p0 < g1 * cpg; p0 += kStep) {
      const int64_t count = std::min(kStep, g1 * cpg - p0);
      int64_t chan[kStep];
      double r[kStep], mu[kStep];
      for (int64_t i = 0; i < count; ++i) {
        if (j == 0) rg = into_r ? std::sqrt(var[g] + fold.eps) : 1.0 / std::sqrt(var[g] + fold.eps);
        chan[i] = c, r[i] = rg, mu[i] = mean[g];
        if (++c == plan.C) c = 0;
        if (++j == cpg) j = 0, ++g;
      }
      double* out[9];
      for (int i = 0; i < 9; ++i) out[i] = row[i] + p0;
      for (int64_t i = 0; i < count; ++i) out[0][i] = fold.center ? mu[i] : channel.shift[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[1][i] = into_a ? channel.a[chan[i]] * r[i] : channel.a[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[2][i] = channel.b[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[3][i] = channel.p[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[4][i] = channel.q[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[5][i] = into_r ? r[i] : channel.r[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[6][i] = into_scale ? channel.scale[chan[i]] * r[i] : channel.scale[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[7][i] = channel.offset[chan[i]];
      for (int64_t i = 0; i < count; ++i) out[8][i] = mu[i];
    }
  };
  if (plan.S == 0) {
    for (int64_t g = 0; g < plan.num_groups(); ++g) mean[g] = var[g] = 0;
    fold_groups(0, plan.num_groups());
    return;
  }
  const Kernels<S>& k = kernels().get<S>();
  if (const int64_t run = single_chunk_run(plan)) {
    // As group_moments' one-chunk path (the same bits), each batch's output right after its
    // statistics.
    const bool stream = stream_output(P * plan.S * int64_t(sizeof(S)));
    single_chunk_groups(k, plan, run, x, mean, var, [&](int64_t g0, int64_t g1) {
      fold_groups(g0, g1);
      static thread_local std::vector<PointwisePlane<T>> planes;  // at most kChunk planes: a batch has at most kChunk elements
      const int64_t p0 = g0 * cpg, count = (g1 - g0) * cpg;
      if (int64_t(planes.size()) < count) planes.resize(count);
      planes_of(cells, p0, count, planes.data(), nullptr);
      for (int64_t p = p0; p < p0 + count; ++p)
        k.pointwise(int(op), x + p * plan.S, y + p * plan.S, plan.S, planes[p - p0], stream);
    });
    return;
  }
  group_moments(plan, x, mean, var);
  fold_groups(0, plan.num_groups());
  std::vector<int64_t> own(plan.N);
  for (int64_t n = 0; n < plan.N; ++n) own[n] = n;
  apply_pointwise(plan_per_channel_in_sets(plan.N, plan.C, plan.S, std::move(own)), op, x, cells, y);
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
    k.pointwise_sums(int(op), x + s, dy + s, ch.length(j), f.plane[p], &chunk_sums[ch.slot(p, j) * J], nullptr);
  });
  cell_sums(plan, ch, f.center_error, chunk_sums, sums);
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
  const bool stream = stream_output(plan.planes() * plan.S * int64_t(sizeof(S)));
  parallel_for(ch.items(), ch.work() * 4, [&](int64_t it) {
    const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
    k.pointwise_backward(int(op), x + s, dy + s, dx + s, ch.length(j), f.plane[p], a[p], b[p], c[p], stream);
  });
}

template <class S>
void pointwise_backward_fused(const Plan& plan, Pointwise op, const S* x, const S* dy, const PointwiseCoefficients& coef,
                              const double* c1, const double* c2, const double* c3, int64_t cluster,
                              const double* k2, const double* k3, double* sums, S* dx) {
  using T = compute_t<S>;
  check_pointwise_plan(plan, op);
  const bool local = k2 || k3;
  if (local) check_plane_cells(plan, cluster, "pointwise_backward_fused");
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const PointwisePlanes<T> f(plan, coef);
  constexpr int J = kPointwiseSums;
  const int64_t K = plan.num_sample_sets * plan.C;
  const bool stream = stream_output(plan.planes() * plan.S * int64_t(sizeof(S)));
  // dx of one plane chunk with the plane's coefficients plus q2, q3: from g = dy*f'(u) where the
  // sums pass kept it (float and double: an affine of g and x, the activation not evaluated
  // again; for GELU or SiLU that is half the backward's arithmetic), else from dy.
  constexpr bool keeps_g = std::is_same_v<S, T>;
  // Plane p's cell: p itself on the local path (its cells are the planes), else its set's
  // channel, from a table (not a division per plane).
  std::vector<int64_t> cell_of;
  if (!local) {
    cell_of.resize(plan.planes());
    for (int64_t n = 0, p = 0; n < plan.N; ++n)
      for (int64_t c = 0; c < plan.C; ++c, ++p) cell_of[p] = set_channel(plan, n, c);
  }
  auto backward_chunk = [&](int64_t p, int64_t j, double q2, double q3, const T* g) {
    const int64_t s = ch.start(p, j), q = local ? p : cell_of[p];
    const double b2 = c2[q] + q2;
    const T a1 = T(c1[q]), a2 = T(b2), a3 = T(c3[q] + q3 + b2 * f.center_error[p]);
    if constexpr (keeps_g) {
      if (g) return k.backward_apply(x + s, g, dx + s, ch.length(j), a1, a2, f.plane[p].center, a3, nullptr, stream);
    }
    k.pointwise_backward(int(op), x + s, dy + s, dx + s, ch.length(j), f.plane[p], a1, a2, a3, stream);
  };
  // The kept g of a chunk (no-fold path) or of a cluster (local path), per thread; a cluster
  // larger than kKeptG elements goes without.
  constexpr int64_t kKeptG = int64_t(1) << 18;
  auto kept_g = [&](int64_t n) -> T* {
    static thread_local std::vector<T> buf;
    if (!keeps_g || n > kKeptG) return nullptr;
    if (int64_t(buf.size()) < n) buf.resize(n);
    return buf.data();
  };
  if (!local) {
    // The sums are for the parameters only: each chunk's sums, then its dx while in cache; the
    // cells' sums after, added as pointwise_sums adds them.
    std::vector<double> chunk_sums(ch.count * J);
    parallel_for(ch.items(), ch.work() * 6, [&](int64_t it) {
      const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
      T* const g = kept_g(ch.length(j));
      k.pointwise_sums(int(op), x + s, dy + s, ch.length(j), f.plane[p], &chunk_sums[ch.slot(p, j) * J], g);
      backward_chunk(p, j, 0.0, 0.0, g);
    });
    cell_sums(plan, ch, f.center_error, chunk_sums, sums);
    return;
  }
  // Per cluster of planes while it is in cache: each plane's sums (as pointwise_sums'), the
  // fold's q2 = sum k2 . sums and q3 over the cluster's planes, then their dx. A work item takes
  // consecutive clusters, up to kBatchPlanes planes of at most kBatchElements elements in all,
  // and reads their k2, k3 and writes their sums one row at a time along its length: plane by
  // plane, the fourteen rows K doubles apart (16 KB at 2048 planes) fell in one L1 set, and
  // their misses were an eighth of a small FRN's backward.
  constexpr int64_t kBatchPlanes = 64, kBatchElements = 8 * kChunk;
  const int64_t P = plan.planes(), clusters = P / cluster;
  const int64_t per_item = std::clamp<int64_t>(std::min(kBatchPlanes / cluster, kBatchElements / std::max<int64_t>(1, cluster * ch.len)),
                                               1, std::max<int64_t>(1, clusters));  // clusters
  const int64_t items = (clusters + per_item - 1) / per_item;
  parallel_for(items, per_item * cluster * ch.len * 6, [&](int64_t it) {
    const int64_t p0 = it * per_item * cluster, p1 = std::min(P, p0 + per_item * cluster), np = p1 - p0;
    std::vector<double> own;  // per plane: its sums, k2 and k3, J each
    double *const ps = kept_storage<kClusterSums>(3 * J * np, own), *const w2 = ps + J * np, *const w3 = w2 + J * np;
    for (int i = 0; i < J; ++i)
      for (int64_t p = p0; p < p1; ++p) {
        if (k2) w2[(p - p0) * J + i] = k2[i * K + p];
        if (k3) w3[(p - p0) * J + i] = k3[i * K + p];
      }
    T* const kept = kept_g(cluster * ch.len);  // a cluster's g, in memory order
    for (int64_t c0 = p0; c0 < p1; c0 += cluster) {
      double q2 = 0, q3 = 0;
      for (int64_t p = c0; p < c0 + cluster; ++p) {
        double* const plane = ps + (p - p0) * J;
        std::fill_n(plane, J, 0.0);
        for (int64_t j = 0; j < ch.per_seg; ++j) {
          double cs[J];
          const int64_t s = ch.start(p, j);
          k.pointwise_sums(int(op), x + s, dy + s, ch.length(j), f.plane[p], cs,
                           kept ? kept + (s - c0 * ch.len) : nullptr);
          for (int i = 0; i < J; ++i) plane[i] += cs[i];
        }
        plane[3] += f.center_error[p] * plane[2];
        for (int i = 0; i < J; ++i) {
          if (k2) q2 += w2[(p - p0) * J + i] * plane[i];
          if (k3) q3 += w3[(p - p0) * J + i] * plane[i];
        }
      }
      for (int64_t p = c0; p < c0 + cluster; ++p)
        for (int64_t j = 0; j < ch.per_seg; ++j)
          backward_chunk(p, j, q2, q3, kept ? kept + (ch.start(p, j) - c0 * ch.len) : nullptr);
    }
    for (int i = 0; i < J; ++i)
      for (int64_t p = p0; p < p1; ++p) sums[i * K + p] = ps[(p - p0) * J + i];
  });
}

#define NK_INSTANTIATE(S)                                                                          \
  template void apply_pointwise<S>(const Plan&, Pointwise, const S*, const PointwiseCoefficients&, S*); \
  template void pointwise_sums<S>(const Plan&, Pointwise, const S*, const S*,                      \
                                  const PointwiseCoefficients&, double*);                          \
  template void pointwise_backward<S>(const Plan&, Pointwise, const S*, const S*,                  \
                                      const PointwiseCoefficients&, const double*, const double*,  \
                                      const double*, S*);                                          \
  template void pointwise_backward_fused<S>(const Plan&, Pointwise, const S*, const S*,            \
                                            const PointwiseCoefficients&, const double*, const double*, \
                                            const double*, int64_t, const double*, const double*,  \
                                            double*, S*);                                 \
  template void normalize_pointwise<S>(const Plan&, Pointwise, const S*, const PointwiseFold&,     \
                                       const PointwiseCoefficients&, S*, double*, double*, double*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
