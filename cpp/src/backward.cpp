// Backward: per-chunk sums, an O(planes) fold, one apply pass; block by block of groups where
// the tensor allows (moments.h: GroupBlocks), so that x and dy come from memory once.
//
// Derivation (checked by tests/test_reference.py through finite differences). Per group: mean mu,
// rstd r, M elements, xhat = (x - mu)*r, y = w*xhat + b, g = dy*w.
//   dx = r*g - r*B/M - r*xhat*mean(g*xhat),      B = sum g
//   mean(g*xhat) = P = r*(A + (sh - mu)*B)/M,     A = sum g*(x - sh), sh = mu rounded to T
//   so dx = c1*dy*w + c2*(x - sh) + c3 with
//   c1 = r, c2 = -r^2*P, c3 = -r^2*P*(sh - mu) - r*B/M
// RMSNorm (skip_mean) has mu = sh = 0 and no mean term: c3 = 0. With running statistics (eval)
// mean and rstd are constants: c2 = c3 = 0.
//   dweight = sum dy*xhat, dbias = sum dy (per channel, or per column for a column affine)
#include <algorithm>

#include "fold.h"
#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

// Rows per block of a column-affine gradient: each block sums its rows into its own partial.
constexpr int64_t kRowBlock = 16;

// The per-block column partials of a column-affine gradient (g: dy*xhat, b: dy), `cols` per
// block, in kept storage (moments.h: kept_storage; LayerNorm 8192x1024 keeps 4 MB); each pass
// zeroes the part it is about to sum into, while that part is in cache.
template <class T>
struct ColumnPartials {
  std::vector<T> own;
  T *g = nullptr, *b = nullptr;
  int64_t cols = 0;
  ColumnPartials(int64_t blocks, int64_t cols_) : cols(cols_) {
    if (blocks * cols == 0) return;
    g = kept_storage<kColumnPartials>(2 * blocks * cols, own), b = g + blocks * cols;
  }
  // Columns [c0, c0 + len) of blocks [blk0, blk1) to zero.
  void zero(int64_t blk0, int64_t blk1, int64_t c0, int64_t len) const {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      std::fill_n(g + blk * cols + c0, len, T(0));
      std::fill_n(b + blk * cols + c0, len, T(0));
    }
  }
};

// Pass by pass, per plane p: Ap[p] = sum dy*(x - shift[p]), Bp[p] = sum dy, each chunk's sums
// in its slot of (A, B) (scratch of ch.count), then each plane's chunks added in chunk order:
// the order of every backward path, so the same bits whatever the traversal.
template <class S>
void plane_dot_sums(const Plan& plan, const Chunks& ch, const S* x, const S* dy,
                    const compute_t<S>* shift, double* A, double* B, double* Ap, double* Bp) {
  const Kernels<S>& k = kernels().get<S>();
  const int64_t C = plan.C;
  if (plan.channels_last) {
    parallel_column_blocks(ch, 2, [&](int64_t it, int64_t c0, int64_t width) {
      const int64_t j = ch.chunk(it), p0 = ch.sample(it) * C + c0, slot = ch.slot(ch.sample(it) * C, j) + c0;
      const int64_t s = ch.start(it) + c0;
      k.rows_dot(x + s, dy + s, ch.length(j), width, C, &shift[p0], &A[slot], &B[slot]);
    });
  } else {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j), slot = ch.slot(p, j);
      k.dot(x + s, dy + s, nullptr, ch.length(j), shift[p], &A[slot], &B[slot]);
    });
  }
  parallel_for(plan.planes(), ch.per_seg * 4, [&](int64_t p) {
    double a = 0, b = 0;
    for (int64_t j = 0; j < ch.per_seg; ++j) a += A[ch.slot(p, j)], b += B[ch.slot(p, j)];
    Ap[p] = a, Bp[p] = b;
  });
}

template <class S>
void normalize_backward(const Plan& plan, const S* x, const S* dy, const double* mean,
                        const double* rstd, const compute_t<S>* weight, bool batch_stats, S* dx,
                        compute_t<S>* dweight, compute_t<S>* dbias) {
  using T = compute_t<S>;  // shifts, coefficients, weights and their gradients
  if (Plan rows; pooled_rows(plan, &rows)) return normalize_backward<S>(rows, x, dy, mean, rstd, weight, batch_stats, dx, dweight, dbias);
  check_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const int64_t P = plan.planes(), Sp = plan.S, C = plan.C, G = plan.num_groups();
  const bool col = plan.column_affine;
  const T* wcol = col ? weight : nullptr;
  const PlaneAffine<T> xhat(plan, mean, rstd, nullptr, nullptr);  // xhat = (x - shift)*a + b
  const std::vector<int64_t> count = group_counts(plan);
  const GroupIndex index(plan);
  // With constant statistics and no parameter gradients, dx needs no sums at all.
  const bool sums = batch_stats || dweight || dbias;
  const bool col_sums = col && (dweight || dbias);
  auto channel_weight = [&](int64_t c) { return !col && weight ? double(weight[c]) : 1.0; };
  const bool one_set = plan.num_sample_sets == 1;  // every sample's group c/cpg pools all samples

  // Per chunk of plane p: A = sum dy*w*(x - shift), B = sum dy*w (slot(p, j)); then
  // per plane, summed in chunk order. Chunks of one plane may run on different threads. With a
  // per-column affine's gradients, the same pass adds the chunk's dy*xhat and dy into its row
  // block's column partial (rows [blk*kRowBlock, (blk+1)*kRowBlock) share one).
  const ChunkResults sums_of_chunks(ch.count);
  double *const A = sums_of_chunks.first, *const B = sums_of_chunks.second;
  std::vector<double> Ap(P, 0.0), Bp(P, 0.0);
  const int64_t blocks = (P + kRowBlock - 1) / kRowBlock;
  const ColumnPartials<T> partials(col_sums ? blocks : 0, Sp);
  auto chunk_sums = [&](int64_t p, int64_t j) {
    const int64_t off = j * ch.step, s = ch.start(p, j), slot = ch.slot(p, j);
    const T* w = wcol ? wcol + off : nullptr;
    if (col_sums) {
      const int64_t part = (p / kRowBlock) * Sp + off;
      k.dot_columns(x + s, dy + s, w, ch.length(j), xhat.shift[p], xhat.a[p], xhat.b[p], &A[slot],
                    &B[slot], partials.g + part, partials.b + part);
    } else {
      k.dot(x + s, dy + s, w, ch.length(j), xhat.shift[p], &A[slot], &B[slot]);
    }
  };
  auto plane_sums = [&](int64_t p) {  // in registers: through Ap[p] each add waited on a store
    double a = 0, b = 0;
    for (int64_t j = 0, slot = ch.slot(p, 0); j < ch.per_seg; ++j, ++slot) a += A[slot], b += B[slot];
    Ap[p] = a, Bp[p] = b;
  };
  // Channels-last: sample n's plane sums, chunk after chunk of C sums side by side (the same
  // order per plane as plane_sums).
  auto sample_plane_sums = [&](int64_t n) {
    double *const ap = &Ap[n * C], *const bp = &Bp[n * C];
    std::fill_n(ap, C, 0.0), std::fill_n(bp, C, 0.0);
    for (int64_t j = 0; j < ch.per_seg; ++j) {
      const double *const a = &A[ch.slot(n * C, j)], *const b = &B[ch.slot(n * C, j)];
      for (int64_t c = 0; c < C; ++c) ap[c] += a[c], bp[c] += b[c];
    }
  };
  // dx = c1*dy*w + c2*(x - shift) + c3. c2 and c3 belong to the group (its planes share its
  // shift), so they are computed once per group; c1 is rstd times the plane's channel weight.
  struct Coef { T c1 = 0, c2 = 0, c3 = 0; };
  struct GroupCoef { double r = 0; T c2 = 0, c3 = 0; };
  auto group_coefficients = [&](int64_t g, double Ag, double Bg) {
    GroupCoef c;
    const double r = c.r = rstd[g];
    if (!batch_stats) return c;
    const double M = double(count[g]);
    const double mu = plan.skip_mean ? 0.0 : mean[g], d = double(T(mu)) - mu;  // T(mu): the shift
    const double Pg = r * (Ag + d * Bg) / M;
    c.c2 = T(-r * r * Pg);
    c.c3 = T(-r * r * Pg * d - (plan.skip_mean ? 0.0 : r * Bg / M));
    return c;
  };
  auto coefficients = [&](const GroupCoef& gc, int64_t c) {
    return Coef{T(gc.r * channel_weight(c)), gc.c2, gc.c3};
  };
  // With constant statistics dx does not depend on x (c2 = c3 = 0): skip reading it, which also
  // keeps a NaN in x out of dx, as in torch.
  const S* xs = batch_stats ? x : nullptr;
  const bool stream = stream_output(P * Sp * int64_t(sizeof(S)));
  auto apply_chunk = [&](int64_t p, int64_t j, const Coef& c) {
    const int64_t off = j * ch.step, s = ch.start(p, j);
    k.backward_apply(xs ? xs + s : nullptr, dy + s, dx + s, ch.length(j), c.c1, c.c2,
                     xhat.shift[p], c.c3, wcol ? wcol + off : nullptr, stream);
  };
  auto apply_plane = [&](int64_t p, const Coef& c) {
    for (int64_t j = 0; j < ch.per_seg; ++j) apply_chunk(p, j, c);
  };
  // A group's sums: its planes' sums weighted by their channel's weight, in plane order.
  auto add_plane = [&](int64_t p, int64_t c, double* Ag, double* Bg) {
    const double w = channel_weight(c);
    *Ag += w * Ap[p];
    *Bg += w * Bp[p];
  };
  auto group_sums = [&](int64_t g, double* Ag, double* Bg) {
    *Ag = *Bg = 0;
    if (batch_stats) index.for_each_plane(g, [&](int64_t p, int64_t c) { add_plane(p, c, Ag, Bg); });
  };

  std::vector<double> Ag(G), Bg(G);
  const GroupBlocks gb(plan, 2, col ? kRowBlock : 1);  // a column partial belongs to one block
  const int64_t run = col ? 0 : single_chunk_run(plan);
  if (run) {
    // Group by group, each one chunk of contiguous planes (moments.h: single_chunk_run): its
    // sums, coefficients and dx while it sits in L1. The same calls and order as the block path.
    const int64_t cpg = plan.channels_per_group, gps = plan.groups_per_set();
    const GroupBatches batches(G, run);
    parallel_for(batches.count, 2 * batches.per_batch * run, [&](int64_t b) {
      // Group g is planes [g*cpg, (g+1)*cpg), channels [c0, c0 + cpg) of sample g/gps.
      const int64_t g0 = batches.first(b), g1 = batches.end(b);
      if (sums)
        for (int64_t p = g0 * cpg; p < g1 * cpg; ++p) chunk_sums(p, 0), plane_sums(p);
      if (!dx) return;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t p0 = g * cpg, c0 = (g % gps) * cpg;
        double Asum = 0, Bsum = 0;  // group_sums over the known planes: no index divisions
        if (batch_stats)
          for (int64_t i = 0; i < cpg; ++i) add_plane(p0 + i, c0 + i, &Asum, &Bsum);
        const GroupCoef gc = group_coefficients(g, Asum, Bsum);
        for (int64_t i = 0; i < cpg; ++i) apply_chunk(p0 + i, 0, coefficients(gc, c0 + i));
      }
    });
  } else if (by_sample(plan, get_num_threads())) {
    // Channels-last, sample by sample: its sums, its coefficients, its dx while it is in cache.
    std::vector<T> c1(P), c2(P), c3(P);
    const int64_t gps = plan.groups_per_set();
    parallel_for(plan.N, C * Sp, [&](int64_t n) {
      const int64_t p0 = n * C;
      if (sums) {
        for (int64_t j = 0; j < ch.per_seg; ++j) {
          const int64_t s = ch.start(n * ch.per_seg + j), slot = ch.slot(p0, j);
          k.rows_dot(x + s, dy + s, ch.length(j), C, C, &xhat.shift[p0], &A[slot], &B[slot]);
        }
        sample_plane_sums(n);
      }
      if (!dx) return;
      const int64_t cpg = plan.channels_per_group;
      for (int64_t gi = 0; gi < gps; ++gi) {  // group n*gps + gi: channels [gi*cpg, (gi+1)*cpg)
        const int64_t g = n * gps + gi;
        group_sums(g, &Ag[g], &Bg[g]);
        const GroupCoef gc = group_coefficients(g, Ag[g], Bg[g]);
        for (int64_t c = gi * cpg; c < (gi + 1) * cpg; ++c) {
          const Coef e = coefficients(gc, c);
          c1[p0 + c] = e.c1, c2[p0 + c] = e.c2, c3[p0 + c] = e.c3;
        }
      }
      for (int64_t j = 0; j < ch.per_seg; ++j) {
        const int64_t s = ch.start(n * ch.per_seg + j);
        k.rows_backward_apply(xs ? xs + s : nullptr, dy + s, dx + s, ch.length(j), C, C, &c1[p0], &c2[p0],
                              &xhat.shift[p0], &c3[p0], stream);
      }
    });
  } else if (gb.by_block(plan, get_num_threads(), 2 * P * Sp * int64_t(sizeof(S))) &&
             (!col_sums || one_set_per_sample(plan))) {
    // Block by block of groups: their sums, then their dx while their planes are in cache. (A
    // column partial belongs to kRowBlock consecutive rows, so rows numbered out of order, whose
    // blocks would share partials, go pass by pass.)
    parallel_for(gb.count, kBlockElements, [&](int64_t b) {
      const int64_t g0 = gb.first(b), g1 = gb.end(b);
      const std::vector<int64_t> planes = BlockParts(index, 1, g0, g1).planes;  // memory order
      if (col_sums && !planes.empty())  // consecutive rows, from a multiple of kRowBlock
        partials.zero(planes.front() / kRowBlock, (planes.back() + kRowBlock) / kRowBlock, 0, Sp);
      if (sums)
        for (int64_t p : planes)
          for (int64_t j = 0; j < ch.per_seg; ++j) chunk_sums(p, j);
      if (sums)
        for (int64_t p : planes) plane_sums(p);
      if (!dx) return;
      std::vector<GroupCoef> gcoef(g1 - g0);
      for (int64_t g = g0; g < g1; ++g) {
        group_sums(g, &Ag[g], &Bg[g]);
        gcoef[g - g0] = group_coefficients(g, Ag[g], Bg[g]);
      }
      for (int64_t p : planes) {
        const int64_t g = plan.group_of(p / C, p % C);
        apply_plane(p, coefficients(gcoef[g - g0], p % C));
      }
    });
  } else {
    // Pass by pass: sums over the whole tensor, the fold, then dx over the whole tensor.
    if (col_sums) {
      // Items are (block, chunk): a block's rows write their own chunk columns of its partial.
      parallel_for(blocks * ch.per_seg, kRowBlock * ch.work(), [&](int64_t item) {
        const int64_t blk = item / ch.per_seg, j = item % ch.per_seg;
        partials.zero(blk, blk + 1, j * ch.step, ch.length(j));
        for (int64_t p = blk * kRowBlock; p < std::min(P, (blk + 1) * kRowBlock); ++p) chunk_sums(p, j);
      });
      for (int64_t p = 0; p < P; ++p) plane_sums(p);
    } else if (sums) {
      plane_dot_sums(plan, ch, x, dy, xhat.shift.data(), A, B, Ap.data(), Bp.data());
    }
    if (dx) {
      std::vector<GroupCoef> gcoef(G);
      if (one_set && plan.channels_per_group == 1) {
        // BatchNorm: group c is channel c of every sample. Sample after sample over all
        // channels: each group's sum in group_sums' order, a row of planes at a time.
        std::fill(Ag.begin(), Ag.end(), 0.0), std::fill(Bg.begin(), Bg.end(), 0.0);
        if (batch_stats)
          for (int64_t n = 0; n < plan.N; ++n)
            for (int64_t c = 0; c < C; ++c) add_plane(n * C + c, c, &Ag[c], &Bg[c]);
      } else {
        for (int64_t g = 0; g < G; ++g) group_sums(g, &Ag[g], &Bg[g]);
      }
      for (int64_t g = 0; g < G; ++g) gcoef[g] = group_coefficients(g, Ag[g], Bg[g]);
      if (plan.channels_last) {
        // Per plane of the samples whose coefficients differ: with one set, the first sample's
        // serve every sample.
        const int64_t samples = one_set ? std::min<int64_t>(plan.N, 1) : plan.N;
        std::vector<T> c1(samples * C), c2(samples * C), c3(samples * C);
        for_each_plane_of_groups(plan, [&](int64_t p, int64_t c, int64_t g) {
          const Coef e = coefficients(gcoef[g], c);
          c1[p] = e.c1, c2[p] = e.c2, c3[p] = e.c3;
        }, samples);
        parallel_column_blocks(ch, 1, [&](int64_t it, int64_t c0, int64_t width) {
          const int64_t s = ch.start(it) + c0, p0 = ch.sample(it) * C + c0, q0 = (one_set ? 0 : ch.sample(it) * C) + c0;
          k.rows_backward_apply(xs ? xs + s : nullptr, dy + s, dx + s, ch.length(ch.chunk(it)), width, C,
                                &c1[q0], &c2[q0], &xhat.shift[p0], &c3[q0], stream);
        });
      } else {
        std::vector<Coef> coef(P);
        for_each_plane_of_groups(plan, [&](int64_t p, int64_t c, int64_t g) { coef[p] = coefficients(gcoef[g], c); });
        parallel_for(ch.items(), ch.work(), [&](int64_t it) {
          apply_chunk(ch.segment(it), ch.chunk(it), coef[ch.segment(it)]);
        });
      }
    }
  }

  // Parameter gradients, in a fixed order: per column from the block partials, or per channel.
  if (col_sums) {
    // Block after block into double accumulators for a run of columns: memory order (a column
    // at a time would stride by a whole row), each column's sum still in block order.
    constexpr int64_t kCols = 256;
    parallel_for((Sp + kCols - 1) / kCols, blocks * kCols, [&](int64_t r) {
      const int64_t s0 = r * kCols, n = std::min(kCols, Sp - s0);
      double gs[kCols] = {}, bs[kCols] = {};
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const T *gp = partials.g + blk * Sp + s0, *bp = partials.b + blk * Sp + s0;
        for (int64_t i = 0; i < n; ++i) gs[i] += double(gp[i]), bs[i] += double(bp[i]);
      }
      for (int64_t i = 0; i < n; ++i) {
        if (dweight) dweight[s0 + i] = T(gs[i]);
        if (dbias) dbias[s0 + i] = T(bs[i]);
      }
    });
  } else if (!col && (dweight || dbias)) {
    // Per channel, its planes in sample order; sample after sample over all channels.
    std::vector<double> gs(C, 0.0), bs(C, 0.0);
    for (int64_t n = 0; n < plan.N; ++n)
      for (int64_t c = 0, p = n * C; c < C; ++c, ++p) {
        gs[c] += double(xhat.a[p]) * Ap[p] + double(xhat.b[p]) * Bp[p];
        bs[c] += Bp[p];
      }
    for (int64_t c = 0; c < C; ++c) {
      if (dweight) dweight[c] = T(gs[c]);
      if (dbias) dbias[c] = T(bs[c]);
    }
  }
}

// The steps a variant calls one by one (normkit.h), coefficients per (set, channel) k.
// sum_dy_xmu is about the caller's mean: the chunks sum about its rounding to T, the shift,
// and the difference is added back in double: sum dy*(x - mean) = A + (shift - mean)*B.
template <class S>
void backward_sums(const Plan& plan, const S* x, const S* dy, const double* mean, double* sum_dy,
                   double* sum_dy_xmu) {
  using T = compute_t<S>;
  if (Plan rows; pooled_rows(plan, &rows)) return backward_sums<S>(rows, x, dy, mean, sum_dy, sum_dy_xmu);
  check_step_plan(plan);
  const int64_t P = plan.planes(), K = plan.num_sample_sets * plan.C;
  const Chunks ch = Chunks::planes(plan);
  std::vector<T> shift(P);
  for (int64_t n = 0, p = 0; n < plan.N; ++n)
    for (int64_t c = 0; c < plan.C; ++c, ++p) shift[p] = T(mean[set_channel(plan, n, c)]);
  const ChunkResults scratch(ch.count);
  std::vector<double> Ap(P), Bp(P);
  plane_dot_sums(plan, ch, x, dy, shift.data(), scratch.first, scratch.second, Ap.data(), Bp.data());
  std::fill_n(sum_dy, K, 0.0), std::fill_n(sum_dy_xmu, K, 0.0);
  for (int64_t n = 0, p = 0; n < plan.N; ++n)  // sample order
    for (int64_t c = 0; c < plan.C; ++c, ++p) {
      const int64_t k = set_channel(plan, n, c);
      sum_dy[k] += Bp[p];
      sum_dy_xmu[k] += Ap[p] + (double(shift[p]) - mean[k]) * Bp[p];
    }
}

// dx = c1*dy + c2*(x - mean) + c3 = c1*dy + c2*(x - shift) + (c3 + c2*(shift - mean)).
template <class S>
void backward_apply_coefficients(const Plan& plan, const S* x, const S* dy, const double* mean,
                                 const double* c1, const double* c2, const double* c3, S* dx) {
  using T = compute_t<S>;
  if (Plan rows; pooled_rows(plan, &rows)) return backward_apply_coefficients<S>(rows, x, dy, mean, c1, c2, c3, dx);
  check_step_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const int64_t P = plan.planes(), C = plan.C;
  const BackwardPlanes<T> f(plan, mean, c1, c2, c3);
  const bool stream = stream_output(P * plan.S * int64_t(sizeof(S)));
  if (plan.channels_last) {
    parallel_column_blocks(ch, 1, [&](int64_t it, int64_t c0, int64_t width) {
      const int64_t s = ch.start(it) + c0, p0 = ch.sample(it) * C + c0;
      k.rows_backward_apply(x ? x + s : nullptr, dy + s, dx + s, ch.length(ch.chunk(it)), width, C, &f.c1[p0],
                            &f.c2[p0], &f.shift[p0], &f.c3[p0], stream);
    });
    return;
  }
  parallel_for(ch.items(), ch.work(), [&](int64_t it) {
    const int64_t p = ch.segment(it), j = ch.chunk(it), s = ch.start(p, j);
    k.backward_apply(x ? x + s : nullptr, dy + s, dx + s, ch.length(j), f.c1[p], f.c2[p], f.shift[p], f.c3[p],
                     nullptr, stream);
  });
}

#define NK_INSTANTIATE(S)                                                                    \
  template void normalize_backward<S>(const Plan&, const S*, const S*, const double*,        \
                                      const double*, const compute_t<S>*, bool, S*,          \
                                      compute_t<S>*, compute_t<S>*);          \
  template void backward_sums<S>(const Plan&, const S*, const S*, const double*, double*,    \
                                 double*);                                                   \
  template void backward_apply_coefficients<S>(const Plan&, const S*, const S*,              \
                                               const double*, const double*, const double*,  \
                                               const double*, S*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
