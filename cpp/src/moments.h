// Chunk statistics and their merges, all in double and always in a caller-fixed order.
#pragma once
#include <algorithm>
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
  const double n = a.n + b.n, delta = b.mean - a.mean;
  return {n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// How the (N, C, S) tensor splits into fixed-size chunks: plane p, chunk j covers elements
// [p*S + j*kChunk, p*S + j*kChunk + len).
struct Chunks {
  int64_t per_plane, count, S;
  explicit Chunks(const Plan& plan)
      : per_plane(plan.S == 0 ? 0 : (plan.S + kChunk - 1) / kChunk),
        count(plan.planes() * per_plane),
        S(plan.S) {}
  int64_t plane(int64_t item) const { return item / per_plane; }
  int64_t offset(int64_t item) const { return (item % per_plane) * kChunk; }  // within the plane
  int64_t start(int64_t item) const { return plane(item) * S + offset(item); }
  int64_t length(int64_t item) const { return std::min(kChunk, S - offset(item)); }
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
