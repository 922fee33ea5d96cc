// Chunk statistics and their merges, all in double and always in a caller-fixed order.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

#include "kernels/table.h"
#include "normkit/plan.h"

namespace nk {

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
  const double delta = b.mean - a.mean;
  return {n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// How the passes split the tensor. Chunk j of plane p covers the plane's spatial positions
// [j*step, min(S, (j+1)*step)) and its partial results live in slot p*per_plane + j, in either
// memory order, so everything after a pass is layout-free.
//   channels-first (N, C, S): a chunk is contiguous; one work item per (plane, chunk).
//   channels-last (N, S, C): chunk j of sample n's C planes is one block of `step` rows of C
//   channels; one work item per (sample, chunk).
struct Chunks {
  int64_t step, per_plane, count, S, C;
  bool channels_last;
  explicit Chunks(const Plan& plan)
      : step(plan.channels_last ? std::max<int64_t>(1, kChunk / std::max<int64_t>(1, plan.C)) : kChunk),
        per_plane(plan.S == 0 ? 0 : (plan.S + step - 1) / step),
        count(plan.planes() * per_plane),
        S(plan.S),
        C(plan.C),
        channels_last(plan.channels_last) {}
  int64_t length(int64_t j) const { return std::min(step, S - j * step); }  // positions in chunk j
  // Elements of one work item at most (the parallel_for cost hint): a small plane is one short chunk.
  int64_t work() const { return std::min(step, S) * (channels_last ? C : 1); }
  int64_t slot(int64_t p, int64_t j) const { return p * per_plane + j; }
  // Work items of a pass: (plane, chunk) channels-first, (sample, chunk) channels-last.
  int64_t items() const { return channels_last ? count / std::max<int64_t>(1, C) : count; }
  int64_t chunk(int64_t item) const { return item % per_plane; }
  int64_t plane(int64_t item) const { return item / per_plane; }   // channels-first
  int64_t sample(int64_t item) const { return item / per_plane; }  // channels-last
  // First element of the item's data: a contiguous chunk, or the first of its rows.
  int64_t start(int64_t item) const {
    return channels_last ? (sample(item) * S + chunk(item) * step) * C
                         : plane(item) * S + chunk(item) * step;
  }
};

// The planes of each statistics group, visited in a fixed order (sample-major, then channel).
class GroupIndex {
 public:
  explicit GroupIndex(const Plan& plan) : plan_(plan), samples_of_set_(plan.num_sample_sets) {
    for (int64_t n = 0; n < plan.N; ++n) samples_of_set_[plan.sample_group[n]].push_back(n);
  }
  template <class F>
  void for_each_plane(int64_t g, const F& f) const {
    const int64_t set = g / plan_.groups_per_set(), c0 = (g % plan_.groups_per_set()) * plan_.channels_per_group;
    for (int64_t n : samples_of_set_[set])
      for (int64_t c = c0; c < c0 + plan_.channels_per_group; ++c) f(n * plan_.C + c);
  }

 private:
  const Plan& plan_;
  std::vector<std::vector<int64_t>> samples_of_set_;
};

}  // namespace nk
