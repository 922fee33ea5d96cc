// The fold: per-group statistics and per-channel parameters become per-plane scalars, so the
// passes over the tensor are one fused multiply-add per element. O(planes), in double.
#pragma once
#include <algorithm>
#include <vector>

#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "normkit/plan.h"

namespace nk {

// Per plane: y = (x - shift)*a + b (then * weight[s] + bias[s] for a per-column affine).
// shift is the group mean rounded to T, so x - shift is exact near the mean; b carries the
// rounding: (x - mean)*a = (x - shift)*a + (shift - mean)*a.
template <class T>
struct PlaneCoef {
  T shift, a, b;
};

// Of a plane of channel c in group g.
template <class T>
PlaneCoef<T> channel_coef(const Plan& plan, int64_t g, int64_t c, const double* mean,
                          const double* rstd, const T* weight, const T* bias) {
  const double mu = plan.skip_mean ? 0.0 : mean[g];
  const T sh = T(mu);
  double scale = rstd[g], offset = 0;
  if (!plan.column_affine) {
    if (weight) scale *= double(weight[c]);
    if (bias) offset = double(bias[c]);
  }
  return {sh, T(scale), T(offset + (double(sh) - mu) * scale)};
}

// Of plane p.
template <class T>
PlaneCoef<T> plane_coef(const Plan& plan, int64_t p, const double* mean, const double* rstd,
                        const T* weight, const T* bias) {
  const int64_t c = p % plan.C;
  return channel_coef(plan, plan.group_of(p / plan.C, c), c, mean, rstd, weight, bias);
}

// f(p, c, g) for every plane p = n*C + c of the first `samples` samples (all by default), in
// order, with its group g: no division per plane.
template <class F>
void for_each_plane_of_groups(const Plan& plan, const F& f, int64_t samples = -1) {
  const int64_t cpg = plan.channels_per_group, gps = plan.groups_per_set();
  for (int64_t n = 0, p = 0; n < (samples < 0 ? plan.N : samples); ++n)
    for (int64_t gi = 0, c = 0; gi < gps; ++gi)
      for (int64_t i = 0; i < cpg; ++i, ++c, ++p) f(p, c, plan.sample_group[n] * gps + gi);
}

// plane_coef of every plane, as three arrays.
template <class T>
struct PlaneAffine {
  std::vector<T> shift, a, b;
  explicit PlaneAffine(int64_t planes) : shift(planes), a(planes), b(planes) {}
  PlaneAffine(const Plan& plan, const double* mean, const double* rstd, const T* weight,
              const T* bias)
      : shift(plan.planes()), a(plan.planes()), b(plan.planes()) {
    // Without a division per plane: 2048 planes' worth of integer divisions was a tenth of a
    // small GroupNorm backward, all of it before the threads start. With one statistics set
    // (BatchNorm) every sample's planes have the first sample's coefficients: copied, not
    // recomputed.
    const int64_t computed = plan.num_sample_sets == 1 ? std::min<int64_t>(plan.N, 1) : plan.N;
    for_each_plane_of_groups(plan, [&](int64_t p, int64_t c, int64_t g) {
      const PlaneCoef<T> f = channel_coef(plan, g, c, mean, rstd, weight, bias);
      shift[p] = f.shift, a[p] = f.a, b[p] = f.b;
    }, computed);
    for (std::vector<T>* v : {&shift, &a, &b})
      for (int64_t p = computed * plan.C; p < plan.planes(); p += plan.C) std::copy_n(v->begin(), plan.C, v->begin() + p);
  }
};

// The coefficient index of plane (n, c) for the steps a variant calls one by one (normkit.h:
// apply_coefficients): its sample's set, then its channel, so sets*C coefficients.
inline int64_t set_channel(const Plan& plan, int64_t n, int64_t c) { return plan.sample_group[n] * plan.C + c; }

// Per plane, from per-(set, channel) coefficients: y = (x - mean)*scale + offset, as
// channel_coef does it (the shift is the mean rounded to T; b carries the rounding).
template <class T>
PlaneAffine<T> set_channel_affine(const Plan& plan, const double* mean, const double* scale,
                                  const double* offset) {
  PlaneAffine<T> f(plan.planes());
  for (int64_t n = 0, p = 0; n < plan.N; ++n)
    for (int64_t c = 0; c < plan.C; ++c, ++p) {
      const int64_t k = set_channel(plan, n, c);
      const T sh = T(mean[k]);
      f.shift[p] = sh, f.a[p] = T(scale[k]), f.b[p] = T(offset[k] + (double(sh) - mean[k]) * scale[k]);
    }
  return f;
}

// Per plane, from per-cell coefficients of dx = c1*dy + c2*(x - mean) + c3: the shift (mean
// rounded to T) and c3 carrying its rounding, c3 + c2*(shift - mean); the backward apply steps'.
template <class T>
struct BackwardPlanes {
  std::vector<T> c1, c2, shift, c3;
  BackwardPlanes(const Plan& plan, const double* mean, const double* k1, const double* k2, const double* k3)
      : c1(plan.planes()), c2(plan.planes()), shift(plan.planes()), c3(plan.planes()) {
    for (int64_t n = 0, p = 0; n < plan.N; ++n)
      for (int64_t c = 0; c < plan.C; ++c, ++p) {
        const int64_t q = set_channel(plan, n, c);
        shift[p] = T(mean[q]), c1[p] = T(k1[q]), c2[p] = T(k2[q]);
        c3[p] = T(k3[q] + k2[q] * (double(shift[p]) - mean[q]));
      }
  }
};

// A SampleTerm (normkit.h) in T, over one sample's n elements, as set_channel_affine and
// BackwardPlanes do it: the shift is the mean rounded to T and b carries the rounding,
// offset + scale*(shift - mean); made on the threads, in kept storage (BatchLayerNorm2d's term
// is C*H*W elements). `at(e)` points the kernels' ElementTerm at element e; no term: none.
template <class T>
struct SampleTermPlanes {
  std::vector<T> own;
  T *shift = nullptr, *a = nullptr, *b = nullptr, *c1 = nullptr;
  SampleTermPlanes(const SampleTerm* t, int64_t n) {
    if (!t) return;
    shift = kept_storage<kSampleTerm>(4 * n, own), a = shift + n, b = a + n, c1 = t->c1 ? b + n : nullptr;
    constexpr int64_t block = 4096;
    parallel_for((n + block - 1) / block, block, [&](int64_t i) {
      for (int64_t e = i * block; e < std::min(n, (i + 1) * block); ++e) {
        shift[e] = T(t->mean[e]), a[e] = T(t->scale[e]);
        b[e] = T(t->offset[e] + t->scale[e] * (double(shift[e]) - t->mean[e]));
        if (c1) c1[e] = T(t->c1[e]);
      }
    });
  }
  ElementTerm<T> at(int64_t e) const { return {shift + e, a + e, b + e, c1 ? c1 + e : nullptr}; }
};

}  // namespace nk
