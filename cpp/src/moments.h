// Chunk statistics and their merges, all in double and always in a caller-fixed order.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

#include "kernels/table.h"
#include "normkit/plan.h"
#include "parallel.h"

namespace nk {

// Storage for n values of T, not zeroed: the calling thread's kept buffer (one per Tag and T)
// when it is at most kKeptBytes, else `own`. A fresh allocation that large costs its page faults
// on every call while the other threads wait: channels-last 64x128x56x56 keeps 6 MB of chunk
// moments, and their allocation was a sixth of group_moments. A caller holds one per Tag.
constexpr int64_t kKeptBytes = int64_t(16) << 20;
enum KeptTag { kChunkResults, kColumnPartials, kPlaneCoefs, kPlaneMoments, kSampleTerm, kBatchTerms,
               kBatchSums, kClusterSums };

// The storage starts on a cache line: a vector of it read along rows (BatchLayerNorm2d's term)
// then never spans two lines (from std::vector's 16-byte alignment, its loads were 10-25% slower).
template <KeptTag Tag, class T>
T* kept_storage(int64_t n, std::vector<T>& own) {
  static_assert(64 % sizeof(T) == 0, "a cache line holds a whole number of T");
  constexpr int64_t pad = 64 / sizeof(T);
  static thread_local std::vector<T> kept;
  std::vector<T>& buf = n * int64_t(sizeof(T)) <= kKeptBytes ? kept : own;
  if (int64_t(buf.size()) < n + pad) buf.resize(n + pad);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
}

// Two values per chunk slot (mean and m2, or a backward's A and B), each written by its chunk
// before anything reads it.
struct ChunkResults {
  std::vector<double> own;
  double *first, *second;
  explicit ChunkResults(int64_t count)
      : first(kept_storage<kChunkResults>(2 * count, own)), second(first + count) {}
};

// count, mean and sum of squared deviations of a set of elements.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

// Chan et al.'s pairwise merge: exact in real arithmetic, stable in floating point.
inline Moments merge(const Moments& a, const Moments& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const double n = a.n + b.n;
  // An Inf in either side: the mean is that Inf (NaN for +Inf with -Inf), the spread unknown.
  if (!std::isfinite(a.mean) || !std::isfinite(b.mean))
    return {n, a.mean + b.mean, std::numeric_limits<double>::quiet_NaN()};
  const double delta = b.mean - a.mean, wb = b.n / n;  // one division: merges are many
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * (a.n * wb)};
}

// How the passes split the tensor. A segment is `seg_planes` consecutive planes, contiguous in
// channels-first memory: one plane for the per-plane passes (apply, backward), a whole run of a
// group's channels for statistics (GroupNorm's group of C/G planes is contiguous, so its moments
// need not be cut at every small plane). Chunk j of segment s covers its positions
// [j*step, min(len, (j+1)*step)) and its partial results live in slot(s, j), so everything
// after a pass is layout-free.
//   channels-first (N, C, S): a chunk is contiguous; one work item per (segment, chunk).
//   channels-last (N, S, C): segments are planes; chunk j of sample n's C planes is one block of
//   `step` rows of C channels; one work item per (sample, chunk).
// Channels-last chunks hold about this many elements: the per-column passes keep C accumulators
// and read a chunk twice from L1/L2, and every chunk adds C moments to merge, so they are longer
// than a channels-first chunk.
constexpr int64_t kRowsChunk = 8192;
// Rows of more than kWideRow channels go kWideRows rows to a chunk: every chunk keeps C results,
// so chunks of one or two very wide rows (LayerNorm2d reads NCHW as rows of H*W columns) kept
// more results than they had elements, and their merges and finishes cost ten times the
// reduction. (Narrower rows keep kRowsChunk / C rows, the chunks the NHWC layers were tuned on.)
constexpr int64_t kWideRow = 512, kWideRows = 64;
// A sample of at most kOneChunk elements (256 KB of floats, within L2) is one chunk: split into
// pieces of kRowsChunk elements, each piece's C finishes and C merges cost more than its
// reduction (LayerNorm2d at 8x256x14x14 reads 256 rows of 196 columns: 7 pieces before). Its
// columns still sum at most kRowsChunk rows in the compute type, as narrow rows' chunks do.
constexpr int64_t kOneChunk = 65536;

struct Chunks {
  int64_t seg_planes, len, step, per_seg, count, C;
  bool channels_last;
  Chunks(const Plan& plan, int64_t planes_per_segment)
      : seg_planes(plan.channels_last ? 1 : planes_per_segment),
        len(seg_planes * plan.S),
        step(!plan.channels_last ? kChunk
             : plan.C > kWideRow ? kWideRows
             : seg_planes * plan.S <= kRowsChunk && seg_planes * plan.S * plan.C <= kOneChunk
                 ? std::max<int64_t>(1, seg_planes * plan.S)
             : std::max<int64_t>(1, kRowsChunk / std::max<int64_t>(1, plan.C))),
        per_seg(len == 0 ? 0 : (len + step - 1) / step),
        count(plan.planes() / std::max<int64_t>(1, seg_planes) * per_seg),
        C(plan.C),
        channels_last(plan.channels_last) {}
  // The per-plane split (apply and backward passes).
  static Chunks planes(const Plan& plan) { return Chunks(plan, 1); }
  // The statistics split: segments are a group's runs of consecutive channels.
  static Chunks moments(const Plan& plan) { return Chunks(plan, plan.channels_per_group); }

  int64_t length(int64_t j) const { return std::min(step, len - j * step); }  // positions in chunk j
  // Elements of one work item at most (the parallel_for cost hint): a small plane is one short chunk.
  int64_t work() const { return std::min(step, len) * (channels_last ? C : 1); }
  // Where chunk j of segment seg keeps its partial results. Channels-first: a segment's chunks
  // side by side, so that a merge reads a few lines per segment. Channels-last: chunk j of
  // sample n keeps its C planes' results side by side from slot(n*C, j), as a rows kernel writes
  // them and merge_columns reads them.
  int64_t slot(int64_t seg, int64_t j) const {
    if (!channels_last) return seg * per_seg + j;
    return C > 0 ? ((seg / C) * per_seg + j) * C + seg % C : 0;  // C = 0: no slots at all
  }
  // First element of chunk j of segment seg (channels-first).
  int64_t start(int64_t seg, int64_t j) const { return seg * len + j * step; }
  // Work items of a pass: (segment, chunk) channels-first, (sample, chunk) channels-last.
  int64_t items() const { return channels_last ? count / std::max<int64_t>(1, C) : count; }
  // (A plane of one chunk skips the 64-bit division, tens of cycles for each small plane.)
  int64_t chunk(int64_t item) const { return per_seg == 1 ? 0 : item % per_seg; }
  int64_t segment(int64_t item) const { return per_seg == 1 ? item : item / per_seg; }  // channels-first
  int64_t sample(int64_t item) const { return segment(item); }                          // channels-last
  // First element of the item's data: a contiguous chunk, or the first of its rows.
  int64_t start(int64_t item) const {
    return channels_last ? (sample(item) * len + chunk(item) * step) * C
                         : start(segment(item), chunk(item));
  }
  // Channels-last rows wider than kWideRow split each item into blocks of kWideRow columns:
  // one sample of wide rows (BatchNorm1d on many features, BatchLayerNorm2d's batch columns)
  // then spreads over the threads, and a block's two passes find it in L2. Each column's
  // arithmetic is the same in any block, and its results are where the whole row's were.
  int64_t col_blocks() const { return channels_last && C > kWideRow ? (C + kWideRow - 1) / kWideRow : 1; }
};

// f(item, c0, width) for every item of a channels-last pass and each of its column blocks
// [c0, c0 + width), in parallel; work_scale: the pass's cost per element, as parallel_for's hint.
template <class F>
void parallel_column_blocks(const Chunks& ch, int64_t work_scale, const F& f) {
  const int64_t nb = ch.col_blocks();
  parallel_for(ch.items() * nb, work_scale * ch.work() / nb, [&](int64_t i) {
    const int64_t it = i / nb, c0 = (i % nb) * kWideRow;
    f(it, c0, nb == 1 ? ch.C : std::min(kWideRow, ch.C - c0));
  });
}

// The planes (or segments of consecutive planes) of each statistics group, visited in a fixed
// order: sample-major, then channel.
class GroupIndex {
 public:
  // The samples of each set, sample-ordered, as one flat table (a counting sort): two
  // allocations whatever N, which matters for LayerNorm's thousands of one-row "samples".
  explicit GroupIndex(const Plan& plan) : plan_(plan), first_(plan.num_sample_sets + 1, 0), samples_(plan.N) {
    for (int64_t n = 0; n < plan.N; ++n) ++first_[plan.sample_group[n] + 1];
    for (int64_t s = 0; s < plan.num_sample_sets; ++s) first_[s + 1] += first_[s];
    std::vector<int64_t> next(first_.begin(), first_.end() - 1);
    for (int64_t n = 0; n < plan.N; ++n) samples_[next[plan.sample_group[n]]++] = n;
  }
  // f(p, c) for each plane p of group g and its channel c.
  template <class F>
  void for_each_plane(int64_t g, const F& f) const {
    const int64_t gps = plan_.groups_per_set(), cpg = plan_.channels_per_group;
    const int64_t set = g / gps, c0 = (g % gps) * cpg;
    for (int64_t i = first_[set]; i < first_[set + 1]; ++i)
      for (int64_t c = c0; c < c0 + cpg; ++c) f(samples_[i] * plan_.C + c, c);
  }
  // Segments of seg_planes planes (a divisor of channels_per_group), by index.
  template <class F>
  void for_each_segment(int64_t g, int64_t seg_planes, const F& f) const {
    if (seg_planes == 1) return for_each_plane(g, [&](int64_t p, int64_t) { f(p); });
    const int64_t gps = plan_.groups_per_set(), cpg = plan_.channels_per_group;
    const int64_t set = g / gps, c0 = (g % gps) * cpg;
    for (int64_t i = first_[set]; i < first_[set + 1]; ++i)
      for (int64_t c = c0; c < c0 + cpg; c += seg_planes) f((samples_[i] * plan_.C + c) / seg_planes);
  }

 private:
  const Plan& plan_;
  std::vector<int64_t> first_, samples_;  // samples of set s: samples_[first_[s], first_[s+1])
};

// Parts' moments merged in the order each(add) hands them to add, alternately into two
// accumulators, then the two. Two chains, because each merge waits for the previous one of its
// chain: one chain made the merges of a BatchNorm channel of 8 samples' 7 channels-last chunks
// most of its statistics at one thread.
template <class F>
Moments merge_in_two_chains(const F& each) {
  Moments even, odd;
  bool to_odd = false;
  each([&](const Moments& m) {
    if (to_odd) odd = merge(odd, m);
    else even = merge(even, m);
    to_odd = !to_odd;
  });
  return merge(even, odd);
}

// Channels-first: group g's moments from its chunks' moments stored by slot (cmean, cm2),
// chunks as GroupIndex visits their segments.
inline Moments merge_stored(const Chunks& ch, const GroupIndex& index, int64_t g,
                            const double* cmean, const double* cm2) {
  return merge_in_two_chains([&](const auto& add) {
    index.for_each_segment(g, ch.seg_planes, [&](int64_t seg) {
      for (int64_t j = 0, slot = ch.slot(seg, 0); j < ch.per_seg; ++j, ++slot)
        add(Moments{double(ch.length(j)), cmean[slot], cm2[slot]});
    });
  });
}

// Channels-last statistics, in two steps that every channels-last path takes (so they give
// the same bits). First each plane's chunks merge into the plane's moments: columns [c0, c1)
// of sample n at once, C planes' chunk results lying side by side (KernelTable: merge_columns).
// A chunk holds C moments, so chunk by chunk in scalar merges these were as costly as the
// reduction itself. Columns from c0, a multiple of 64: the vectors are those of a whole-row call.
constexpr int64_t kMergeColumns = 64;

inline void merge_plane_chunks(const Chunks& ch, int64_t n, int64_t c0, int64_t c1, const double* cmean,
                               const double* cm2, double* pmean, double* pm2) {
  const int64_t s = ch.slot(n * ch.C, 0) + c0, last = ch.per_seg > 0 ? ch.length(ch.per_seg - 1) : 0;
  kernels().merge_columns(cmean + s, cm2 + s, ch.C, c1 - c0, ch.per_seg, ch.step, last,
                          pmean + n * ch.C + c0, pm2 + n * ch.C + c0);
}

// Then each group's planes (plane_n elements each) merge as GroupIndex visits them.
inline Moments merge_planes(const GroupIndex& index, int64_t g, int64_t plane_n, const double* pmean,
                            const double* pm2) {
  return merge_in_two_chains([&](const auto& add) {
    index.for_each_plane(g, [&](int64_t p, int64_t) { add(Moments{double(plane_n), pmean[p], pm2[p]}); });
  });
}

// A group's (mean, biased variance) from its moments: NaN for no elements; with skip_mean (RMS)
// 0 and the mean of x^2 (Inf when the group holds an Inf, so finite entries normalize to 0, as
// torch).
inline void finish_group(const Plan& plan, const Moments& acc, double* mean, double* var) {
  if (acc.n == 0) {
    *mean = *var = std::numeric_limits<double>::quiet_NaN();
  } else if (plan.skip_mean) {
    *mean = 0;
    *var = std::isinf(acc.mean) ? acc.mean * acc.mean : acc.m2 / acc.n + acc.mean * acc.mean;
  } else {
    *mean = acc.mean;
    *var = acc.m2 / acc.n;
  }
}

// Traversal. Block by block of consecutive groups (statistics of the block's groups, then their
// apply while their data is still in cache: one read of x from memory instead of two) where
// memory is channels-first and there are enough blocks to keep every thread busy; pass by pass
// (each pass over the whole tensor in parallel) otherwise. A block holds about kBlockElements
// elements (at least one group), so that short groups (LayerNorm rows) share their fixed costs
// and a block stays in L2. Within a block each step loops over all its groups, so independent
// groups overlap in the CPU. Both orders run the same chunks and merges: the same bits.
constexpr int64_t kBlockElements = 1 << 15;
// A group pooled over several samples (BatchNorm's channel) is strided in memory: a block then
// takes enough channels that each sample's part of it, kRunElements or more, is one contiguous
// run the hardware prefetcher can follow; but no more than kMaxBlockElements in all (over all
// the tensors a pass reads: x, or x and dy), so that every thread's block stays in the
// last-level cache between its two reads.
constexpr int64_t kRunElements = 1 << 14;
constexpr int64_t kMaxBlockElements = 1 << 20;

struct GroupBlocks {
  int64_t groups, per_block, count;
  // inputs: tensors the pass reads (1 forward, 2 backward); align: blocks hold a multiple of
  // this many groups (column-affine backward partials).
  GroupBlocks(const Plan& plan, int64_t inputs, int64_t align = 1)
      : groups(plan.num_groups()),
        per_block(round_up(groups_per_block(plan, inputs), align)),
        count((groups + per_block - 1) / per_block) {}
  int64_t first(int64_t b) const { return b * per_block; }
  int64_t end(int64_t b) const { return std::min(groups, (b + 1) * per_block); }
  // Block by block, or pass by pass (see above). Blocks of strided groups (BatchNorm's channels)
  // are walked as many short runs, which the prefetchers follow worse than one sequential pass:
  // they pay only when the pass's inputs (`bytes`) do not fit in the last-level cache anyway.
  bool by_block(const Plan& plan, int threads, int64_t bytes) const {
    if (plan.channels_last || (threads > 1 && count < 4 * int64_t(threads))) return false;
    return plan.N <= plan.num_sample_sets || bytes >= last_level_cache_bytes();
  }

 private:
  static int64_t groups_per_block(const Plan& plan, int64_t inputs) {
    const int64_t G = plan.num_groups();
    const int64_t size = G > 0 ? std::max<int64_t>(1, plan.planes() * plan.S / G) : 1;  // average
    int64_t k = std::max<int64_t>(1, kBlockElements / size);
    const int64_t run = plan.channels_per_group * plan.S;  // one sample's part of one group
    if (plan.N > plan.num_sample_sets && run > 0)       // groups span samples: strided
      k = std::max(k, std::min((kRunElements + run - 1) / run, kMaxBlockElements / inputs / size));
    return std::max<int64_t>(1, k);
  }
  static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
};

// The segments (of seg_planes planes) and planes of groups [g0, g1), each list in memory order:
// a block's passes walk memory forward whatever its groups' order (merges keep theirs).
struct BlockParts {
  std::vector<int64_t> segments, planes;
  BlockParts(const GroupIndex& index, int64_t seg_planes, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      index.for_each_segment(g, seg_planes, [&](int64_t s) { segments.push_back(s); });
      index.for_each_plane(g, [&](int64_t p, int64_t) { planes.push_back(p); });
    }
    std::sort(segments.begin(), segments.end());
    std::sort(planes.begin(), planes.end());
  }
};

// Channels-first with every sample its own statistics set, and every group's run of C/G planes
// one chunk (small InstanceNorm planes, LayerNorm rows up to kChunk, small GroupNorm groups):
// group g is then the contiguous elements [g*run, (g+1)*run), one chunk, and a group can go
// from its moments to its output in one step, while it sits in L1, with nothing stored between.
inline bool one_set_per_sample(const Plan& plan) {
  if (plan.N == 0 || plan.num_sample_sets != plan.N) return false;  // N = 0 still has one set
  for (int64_t n = 0; n < plan.N; ++n)
    if (plan.sample_group[n] != n) return false;
  return true;
}

// Every group one plane (InstanceNorm, LayerNorm2d's columns): a group's moments are its plane's.
inline bool plane_groups(const Plan& plan) {
  return plan.channels_per_group == 1 && one_set_per_sample(plan);
}

inline int64_t single_chunk_run(const Plan& plan) {
  const int64_t run = plan.channels_per_group * plan.S;
  if (plan.channels_last || run == 0 || run > kChunk || !one_set_per_sample(plan)) return 0;
  return run;
}

// The moments of `count` consecutive chunks of n elements from x, to mean[k] and m2[k]. A
// skip_mean (RMS) plan needs only the sum of squares, one pass: as moments with mean 0 and
// m2 = sum x*x, which merge and finish_group treat alike.
template <class S>
inline void chunk_moments(const Kernels<S>& k, const Plan& plan, const S* x, int64_t n, int64_t count,
                         double* mean, double* m2) {
  if (!plan.skip_mean) return k.moments(x, n, count, mean, m2);
  for (int64_t i = 0; i < count; ++i) {
    mean[i] = 0;
    k.sum_squares(x + i * n, n, &m2[i]);
  }
}

// Consecutive one-chunk groups taken together, up to kChunk elements per batch (at least one
// group, at most kMaxBatch): each step (moments or sums, then coefficients, then output) runs
// over the whole batch, so the short dependent chains of independent groups overlap in the CPU
// instead of each group waiting for its own. A batch stays in L1 between its steps.
struct GroupBatches {
  static constexpr int64_t kMaxBatch = 64;
  int64_t groups, per_batch, count;
  GroupBatches(int64_t num_groups, int64_t run)
      : groups(num_groups),
        per_batch(std::clamp<int64_t>(kChunk / std::max<int64_t>(1, run), 1, kMaxBatch)),
        count((groups + per_batch - 1) / per_batch) {}
  int64_t first(int64_t b) const { return b * per_batch; }
  int64_t end(int64_t b) const { return std::min(groups, (b + 1) * per_batch); }
};

// Every group of a plan one chunk of `run` elements (single_chunk_run): batch by batch on the
// threads, the batch's chunk moments finished as they are (merge_stored's bits for a single
// chunk, without a GroupIndex or a merge per group), then then(g0, g1) on its groups while their
// data is in cache (an apply pass; nothing for statistics alone).
template <class S, class Then>
void single_chunk_groups(const Kernels<S>& k, const Plan& plan, int64_t run, const S* x, double* mean,
                         double* var, const Then& then) {
  const GroupBatches gb(plan.num_groups(), run);
  parallel_for(gb.count, gb.per_batch * run, [&](int64_t b) {
    const int64_t g0 = gb.first(b), g1 = gb.end(b);
    double cmean[GroupBatches::kMaxBatch], cm2[GroupBatches::kMaxBatch];  // not zeroed: all written
    chunk_moments(k, plan, x + g0 * run, run, g1 - g0, cmean, cm2);
    for (int64_t g = g0; g < g1; ++g)
      finish_group(plan, merge(Moments{}, Moments{double(run), cmean[g - g0], cm2[g - g0]}), &mean[g], &var[g]);
    then(g0, g1);
  });
}

// Channels-last with every sample its own statistics set (GroupNorm, InstanceNorm): a sample's
// rows are contiguous and hold all its groups, so the work goes sample by sample (statistics,
// then output, while the sample is in cache), where there are enough samples for the threads.
inline bool by_sample(const Plan& plan, int threads) {
  if (!plan.channels_last || (threads > 1 && plan.N < 4 * int64_t(threads))) return false;
  return one_set_per_sample(plan);
}

}  // namespace nk
