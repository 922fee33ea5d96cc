// Forward: statistics per group, then one affine pass. The fold between them turns each
// plane's (mean, rstd, weight, bias) into a shift and two scalars so the pass is one FMA.
// With statistics from x, the two run block by block of groups where that keeps a block in
// cache (moments.h: GroupBlocks), so x comes from memory once.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/table.h"
#include "fold.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

namespace {

// y over plane p's chunks: y = (x - shift)*a + b [* weight + bias per column] [+ residual] [relu].
template <class S>
void apply_plane(const Kernels<S>& k, const Plan& plan, const Chunks& pc, int64_t p, int64_t j,
                 const PlaneCoef<compute_t<S>>& f, const S* x, S* y, const compute_t<S>* weight,
                 const compute_t<S>* bias, const S* residual, bool relu, bool stream) {
  const bool col = plan.column_affine;
  const int64_t off = j * pc.step, s = pc.start(p, j);
  k.affine(x + s, y + s, pc.length(j), f.shift, f.a, f.b, col && weight ? weight + off : nullptr,
           col && bias ? bias + off : nullptr, residual ? residual + s : nullptr, relu, stream);
}

// Chunks that are whole segments (one chunk per segment) go to the kernel in batches of
// consecutive ones, up to kChunk elements: their short chains then overlap (reduce.cpp).
inline int64_t segments_per_batch(const Chunks& ch) {
  return ch.per_seg == 1 ? std::clamp<int64_t>(kChunk / std::max<int64_t>(1, ch.len), 1, 64) : 1;
}

template <class S>
bool large_output(const Plan& plan) {
  return stream_output(plan.planes() * plan.S * int64_t(sizeof(S)));
}

}  // namespace

template <class S>
void group_moments(const Plan& plan, const S* x, double* mean, double* var) {
  check_plan(plan);
  if (Plan rows; pooled_rows(plan, &rows)) return group_moments<S>(rows, x, mean, var);
  const Kernels<S>& k = kernels().get<S>();
  if (const int64_t run = single_chunk_run(plan)) {
    // Every group one chunk (InstanceNorm-like cells, FRN's planes): batches of groups.
    single_chunk_groups(k, plan, run, x, mean, var, [](int64_t, int64_t) {});
    return;
  }
  const Chunks ch = Chunks::moments(plan);
  const ChunkResults cr(ch.count);
  double *const cmean = cr.first, *const cm2 = cr.second;
  if (!plan.channels_last && segments_per_batch(ch) > 1) {
    const int64_t per = segments_per_batch(ch), items = ch.items();
    parallel_for((items + per - 1) / per, per * ch.len, [&](int64_t b) {
      const int64_t it = b * per;
      chunk_moments(k, plan, x + ch.start(it), ch.len, std::min(per, items - it), &cmean[it], &cm2[it]);
    });
  } else if (!plan.channels_last) {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      chunk_moments(k, plan, x + ch.start(it), ch.length(ch.chunk(it)), 1, &cmean[it], &cm2[it]);
    });
  } else {
    parallel_column_blocks(ch, 1, [&](int64_t it, int64_t c0, int64_t width) {
      const int64_t j = ch.chunk(it), slot = ch.slot(ch.sample(it) * ch.C, j) + c0;
      k.rows_moments(x + ch.start(it) + c0, ch.length(j), width, ch.C, &cmean[slot], &cm2[slot]);
    });
  }

  const GroupIndex index(plan);
  if (!plan.channels_last) {
    parallel_for(plan.num_groups(), ch.per_seg * plan.channels_per_group * 64, [&](int64_t g) {
      finish_group(plan, merge_stored(ch, index, g, cmean, cm2), &mean[g], &var[g]);
    });
    return;
  }
  // Channels-last (moments.h): per plane, then per group.
  std::vector<double> pmean(plan.planes()), pm2(plan.planes());
  const int64_t col_blocks = (plan.C + kMergeColumns - 1) / kMergeColumns;
  parallel_for(plan.N * col_blocks, ch.per_seg * kMergeColumns * 4, [&](int64_t it) {
    const int64_t n = it / col_blocks, c0 = (it % col_blocks) * kMergeColumns;
    merge_plane_chunks(ch, n, c0, std::min(plan.C, c0 + kMergeColumns), cmean, cm2, pmean.data(), pm2.data());
  });
  if (plane_groups(plan)) {  // group g is plane g: its moments as they are (merge_planes' bits)
    for (int64_t g = 0; g < plan.num_groups(); ++g)
      finish_group(plan, Moments{double(plan.S), pmean[g], pm2[g]}, &mean[g], &var[g]);
    return;
  }
  parallel_for(plan.num_groups(), plan.N * plan.channels_per_group * 16, [&](int64_t g) {
    finish_group(plan, merge_planes(index, g, plan.S, pmean.data(), pm2.data()), &mean[g], &var[g]);
  });
}

// y over every plane with its coefficients f (per plane): the one output pass of normalize and
// apply_coefficients.
template <class S>
void apply_planes(const Plan& plan, const S* x, const PlaneAffine<compute_t<S>>& f,
                  const compute_t<S>* weight, const compute_t<S>* bias, S* y, const S* residual,
                  bool relu) {
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::planes(plan);
  const bool stream = large_output<S>(plan);
  if (plan.channels_last) {
    parallel_column_blocks(ch, 1, [&](int64_t it, int64_t c0, int64_t width) {
      const int64_t s = ch.start(it) + c0, p0 = ch.sample(it) * ch.C + c0;
      k.rows_affine(x + s, y + s, ch.length(ch.chunk(it)), width, ch.C, &f.shift[p0], &f.a[p0], &f.b[p0],
                    residual ? residual + s : nullptr, relu, stream);
    });
    return;
  }
  parallel_for(ch.items(), ch.work(), [&](int64_t it) {
    const int64_t p = ch.segment(it);
    apply_plane(k, plan, ch, p, ch.chunk(it), {f.shift[p], f.a[p], f.b[p]}, x, y, weight, bias,
                residual, relu, stream);
  });
}

template <class S>
void normalize(const Plan& plan, const S* x, const double* mean, const double* rstd,
               const compute_t<S>* weight, const compute_t<S>* bias, S* y, const S* residual,
               bool relu) {
  check_plan(plan);
  if (Plan rows; pooled_rows(plan, &rows)) return normalize<S>(rows, x, mean, rstd, weight, bias, y, residual, relu);
  apply_planes(plan, x, PlaneAffine<compute_t<S>>(plan, mean, rstd, weight, bias), weight, bias, y,
               residual, relu);
}

template <class S>
void apply_coefficients(const Plan& plan, const S* x, const double* mean, const double* scale,
                        const double* offset, S* y, const S* residual, bool relu) {
  check_step_plan(plan);
  if (Plan rows; pooled_rows(plan, &rows)) return apply_coefficients<S>(rows, x, mean, scale, offset, y, residual, relu);
  apply_planes<S>(plan, x, set_channel_affine<compute_t<S>>(plan, mean, scale, offset), nullptr,
                  nullptr, y, residual, relu);
}

// normalize_batch_stats sample by sample, for channels-last per-sample plans (moments.h: by_sample).
// With row_weight/row_bias (per row, a position of the plan's S; per-position plans only,
// without residual or relu): y = ((x - shift)*a + b)*row_weight + row_bias.
template <class S>
void normalize_by_sample(const Plan& plan, const S* x, double eps, const compute_t<S>* weight,
                         const compute_t<S>* bias, S* y, double* mean, double* var, double* rstd,
                         const S* residual, bool relu, const compute_t<S>* row_weight = nullptr,
                         const compute_t<S>* row_bias = nullptr, const SampleTerm* term = nullptr) {
  using T = compute_t<S>;
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch = Chunks::moments(plan);  // channels-last: one plane per segment
  const GroupIndex index(plan);
  const int64_t C = plan.C, gps = plan.groups_per_set(), cpg = plan.channels_per_group;
  const ChunkResults cr(ch.count);
  double *const cmean = cr.first, *const cm2 = cr.second;
  // Per plane: its coefficients and its moments (kept: LayerNorm2d has a plane per (n, h, w)).
  const int64_t P = plan.planes();
  std::vector<T> own_coefs;
  std::vector<double> own_moments;
  T* const shift = kept_storage<kPlaneCoefs>(3 * P, own_coefs);
  T *const a = shift + P, *const b = a + P;
  double* const pmean = kept_storage<kPlaneMoments>(2 * P, own_moments);
  double* const pm2 = pmean + P;
  const bool stream = large_output<S>(plan);
  const SampleTermPlanes<T> t(term, C * plan.S);
  const bool planes = plane_groups(plan);
  // Where every column is its own group (LayerNorm2d's columns), a sample's wide rows go in
  // blocks of kWideRow columns, each block's statistics then its output while it is in L2: a
  // sample of 64 rows of 3136 columns is 800 KB, and its three passes went to memory.
  const int64_t nb = planes ? ch.col_blocks() : 1;
  parallel_for(plan.N * nb, C * plan.S / nb, [&](int64_t item) {
    const int64_t n = item / nb, c0 = nb == 1 ? 0 : (item % nb) * kWideRow;
    const int64_t width = nb == 1 ? C : std::min(kWideRow, C - c0);
    // A sample of one chunk (LayerNorm2d's 64 rows) writes its planes' moments in place: its
    // slots are the planes' own indices, and merging one chunk is a copy.
    double *const dm = ch.per_seg == 1 ? pmean : cmean, *const dq = ch.per_seg == 1 ? pm2 : cm2;
    for (int64_t j = 0; j < ch.per_seg; ++j) {
      const int64_t slot = ch.slot(n * C, j) + c0;
      k.rows_moments(x + ch.start(n * ch.per_seg + j) + c0, ch.length(j), width, C, &dm[slot], &dq[slot]);
    }
    if (ch.per_seg != 1) merge_plane_chunks(ch, n, c0, c0 + width, cmean, cm2, pmean, pm2);  // in chunk order
    if (planes && !plan.skip_mean && !term && plan.S > 0 && !plan.column_affine) {
      // Every column its own group: finish_group and channel_coef's arithmetic as one vector
      // kernel (LayerNorm2d's cells have C elements each, and their scalar finishing was as
      // long as their moments).
      const int64_t g = n * C + c0;
      k.finish_cells(width, double(plan.S), eps, 1.0, pmean + g, pm2 + g, weight ? weight + c0 : nullptr,
                     bias ? bias + c0 : nullptr, mean + g, var + g, rstd + g, shift + g, a + g, b + g);
    } else  // then per group: channels [gi*cpg, (gi+1)*cpg) (with blocks, the block's columns)
    for (int64_t gi = c0 / cpg; gi < (c0 + width) / cpg; ++gi) {
      const int64_t g = n * gps + gi;
      finish_group(plan, planes ? Moments{double(plan.S), pmean[g], pm2[g]}
                                : merge_planes(index, g, plan.S, pmean, pm2), &mean[g], &var[g]);
      rstd[g] = 1.0 / std::sqrt(var[g] + eps);
      for (int64_t c = gi * cpg; c < (gi + 1) * cpg; ++c) {
        PlaneCoef<T> f = channel_coef(plan, g, c, mean, rstd, weight, bias);
        if (term) {  // a row-affine plan (no weight, no skip_mean): the standardized value times cell_scale
          const double sc = rstd[g] * term->cell_scale;
          f = {f.shift, T(sc), T((double(f.shift) - mean[g]) * sc)};
        }
        shift[n * C + c] = f.shift, a[n * C + c] = f.a, b[n * C + c] = f.b;
      }
    }
    const int64_t p0 = n * C + c0;
    for (int64_t j = 0; j < ch.per_seg; ++j) {
      const int64_t s = ch.start(n * ch.per_seg + j) + c0;
      if (term)  // only from normalize_batch_stats_positions, whose weight (row_weight) is required
        k.rows_affine_samples(x + s, y + s, 1, 0, ch.length(j), width, C, shift + p0, a + p0, b + p0, 0,
                              row_weight + j * ch.step, row_bias + j * ch.step, t.at(j * ch.step * C + c0), stream);
      else if (row_weight)
        k.rows_affine_rows(x + s, y + s, ch.length(j), width, C, shift + p0, a + p0, b + p0,
                           row_weight + j * ch.step, row_bias + j * ch.step, stream);
      else
        k.rows_affine(x + s, y + s, ch.length(j), width, C, shift + p0, a + p0, b + p0,
                      residual ? residual + s : nullptr, relu, stream);
    }
  });
}

template <class S>
void normalize_batch_stats_positions(const Plan& plan, const S* x, double eps, const compute_t<S>* weight,
                                     const compute_t<S>* bias, S* y, double* mean, double* var, double* rstd,
                                     const SampleTerm* term) {
  check_step_plan(plan);
  if (!plan.channels_last || !one_set_per_sample(plan) || plan.channels_per_group != 1)
    throw std::invalid_argument("invalid plan: normalize_batch_stats_positions takes a channels-last plan of one group per column of each sample");
  normalize_by_sample<S>(plan, x, eps, nullptr, nullptr, y, mean, var, rstd, nullptr, false, weight, bias, term);
}

template <class S>
void normalize_batch_stats(const Plan& plan, const S* x, double eps, const compute_t<S>* weight,
                           const compute_t<S>* bias, S* y, double* mean, double* var, double* rstd,
                           const S* residual, bool relu) {
  check_plan(plan);
  if (Plan rows; pooled_rows(plan, &rows)) return normalize_batch_stats<S>(rows, x, eps, weight, bias, y, mean, var, rstd, residual, relu);
  if (const int64_t run = single_chunk_run(plan)) {
    // Group by group, each one chunk: the same chunk moments, merge, fold and apply calls as the
    // general paths below make, so the same bits.
    const Kernels<S>& k = kernels().get<S>();
    const Chunks pc = Chunks::planes(plan);
    const bool stream = large_output<S>(plan);
    single_chunk_groups(k, plan, run, x, mean, var, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) rstd[g] = 1.0 / std::sqrt(var[g] + eps);
      const int64_t cpg = plan.channels_per_group, gps = plan.groups_per_set();
      for (int64_t g = g0; g < g1; ++g)  // group g: planes [g*cpg, (g+1)*cpg), from channel c0
        for (int64_t i = 0, c0 = (g % gps) * cpg; i < cpg; ++i)
          apply_plane(k, plan, pc, g * cpg + i, 0, channel_coef(plan, g, c0 + i, mean, rstd, weight, bias),
                      x, y, weight, bias, residual, relu, stream);
    });
    return;
  }
  const int threads = get_num_threads();
  if (by_sample(plan, threads)) return normalize_by_sample(plan, x, eps, weight, bias, y, mean, var, rstd, residual, relu);
  const GroupBlocks blocks(plan, 1);
  if (!blocks.by_block(plan, threads, plan.planes() * plan.S * int64_t(sizeof(S)))) {
    group_moments(plan, x, mean, var);
    for (int64_t g = 0; g < blocks.groups; ++g) rstd[g] = 1.0 / std::sqrt(var[g] + eps);
    normalize(plan, x, mean, rstd, weight, bias, y, residual, relu);
    return;
  }
  const Kernels<S>& k = kernels().get<S>();
  const Chunks mc = Chunks::moments(plan), pc = Chunks::planes(plan);
  const GroupIndex index(plan);
  const ChunkResults cr(mc.count);
  double *const cmean = cr.first, *const cm2 = cr.second;
  const bool stream = large_output<S>(plan);
  parallel_for(blocks.count, kBlockElements, [&](int64_t b) {
    // The block's moments, its statistics and coefficients, then its output (memory order).
    const int64_t g0 = blocks.first(b), g1 = blocks.end(b);
    const BlockParts parts(index, mc.seg_planes, g0, g1);
    const std::vector<int64_t>& segs = parts.segments;
    if (const int64_t per = segments_per_batch(mc); per > 1) {
      for (size_t i = 0, e; i < segs.size(); i = e) {  // runs of consecutive segments
        for (e = i + 1; e < segs.size() && int64_t(e - i) < per && segs[e] == segs[e - 1] + 1;) ++e;
        chunk_moments(k, plan, x + mc.start(segs[i], 0), mc.len, int64_t(e - i), &cmean[segs[i]], &cm2[segs[i]]);
      }
    } else {
      for (int64_t seg : segs)
        for (int64_t j = 0; j < mc.per_seg; ++j) {
          const int64_t slot = mc.slot(seg, j);
          chunk_moments(k, plan, x + mc.start(seg, j), mc.length(j), 1, &cmean[slot], &cm2[slot]);
        }
    }
    for (int64_t g = g0; g < g1; ++g) {
      finish_group(plan, merge_stored(mc, index, g, cmean, cm2), &mean[g], &var[g]);
      rstd[g] = 1.0 / std::sqrt(var[g] + eps);
    }
    for (int64_t p : parts.planes) {
      const PlaneCoef<compute_t<S>> f = plane_coef(plan, p, mean, rstd, weight, bias);
      for (int64_t j = 0; j < pc.per_seg; ++j) apply_plane(k, plan, pc, p, j, f, x, y, weight, bias, residual, relu, stream);
    }
  });
}

#define NK_INSTANTIATE(S)                                                                        \
  template void group_moments<S>(const Plan&, const S*, double*, double*);                       \
  template void normalize<S>(const Plan&, const S*, const double*, const double*,                \
                             const compute_t<S>*, const compute_t<S>*, S*, const S*, bool);      \
  template void normalize_batch_stats<S>(const Plan&, const S*, double, const compute_t<S>*,     \
                                         const compute_t<S>*, S*, double*, double*, double*,     \
                                         const S*, bool);                             \
  template void apply_coefficients<S>(const Plan&, const S*, const double*, const double*,       \
                                      const double*, S*, const S*, bool);                         \
  template void normalize_batch_stats_positions<S>(const Plan&, const S*, double,                \
                                                   const compute_t<S>*, const compute_t<S>*, S*,  \
                                                   double*, double*, double*, const SampleTerm*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
