// Reductions over one chunk: moments (forward statistics), dot (backward sums) and dot_columns
// (dot plus a per-column affine's gradient sums).
// Accumulate in T with four independent vector accumulators, combine in a fixed order, finish
// in double. Stability comes from shifting: x - shift is exact when x is near the shift, so a
// large mean (x = 1e4 + noise) costs no precision in the deviations.
// A float or double chunk that is not a whole number of vectors ends in one masked vector (its
// lanes past the end add zero) where the ISA has masks: a 196-element plane's tail is then one
// step of the reduction's chain, not four scalar ones.
#include "convert.h"
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

// moments' pass 1, scalar math: s = sum x  (a rough mean, used only as the shift of pass 2)
template <class S>
static double moments_sum(const S* x, int64_t n) {
  using T = compute_t<S>;
  constexpr int64_t L = lanes<T>;
  vec<T> s0{}, s1{}, s2{}, s3{};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    s0 += load_as(x + i); s1 += load_as(x + i + L); s2 += load_as(x + i + 2 * L); s3 += load_as(x + i + 3 * L);
  }
  for (; i + L <= n; i += L) s0 += load_as(x + i);
  if constexpr (masked_tail<S>)
    if (i < n) s1 += load_tail(x + i, n - i), i = n;
  double s = hsum<T>((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += to_compute(x[i]);
  return s;
}

// moments' pass 2, scalar math: d = x - shift; sd = sum d; sdd = sum d*d; then the corrected
// two-pass result: the rough shift's error leaves sd != 0, and its share of sdd is removed.
template <class S, class T = compute_t<S>>
static void moments_deviations(const S* x, int64_t n, T shift, double inv_n, double* mean_out, double* m2_out) {
  constexpr int64_t L = lanes<T>;
  const vec<T> vs = splat(shift);
  vec<T> d0{}, d1{}, d2{}, d3{}, q0{}, q1{}, q2{}, q3{};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    vec<T> a = load_as(x + i) - vs, b = load_as(x + i + L) - vs;
    vec<T> c = load_as(x + i + 2 * L) - vs, e = load_as(x + i + 3 * L) - vs;
    d0 += a; d1 += b; d2 += c; d3 += e;
    q0 += a * a; q1 += b * b; q2 += c * c; q3 += e * e;
  }
  for (; i + L <= n; i += L) {
    vec<T> a = load_as(x + i) - vs;
    d0 += a; q0 += a * a;
  }
  if constexpr (masked_tail<S>)
    if (i < n) {
      const vec<T> a = zero_past(load_tail(x + i, n - i) - vs, n - i);
      d1 += a; q1 += a * a; i = n;
    }
  double sd = hsum<T>((d0 + d1) + (d2 + d3)), sdd = hsum<T>((q0 + q1) + (q2 + q3));
  for (; i < n; ++i) {
    double d = double(to_compute(x[i]) - shift);
    sd += d; sdd += d * d;
  }
  *mean_out = double(shift) + sd * inv_n;
  double m2 = sdd - sd * sd * inv_n;
  *m2_out = m2 < 0 ? 0 : m2;  // rounding can dip below 0; NaN stays NaN
}

// Each chunk's pass 1 for a batch of chunks, then each one's pass 2: a short chunk's passes are
// one dependent chain (sum, mean, shift, deviations), and its neighbours' chains are independent,
// so in this order the CPU overlaps them. Every chunk gets the same bits as alone.
constexpr int64_t kMomentsBatch = 16;

template <class S>
void moments(const S* x, int64_t n, int64_t count, double* mean_out, double* m2_out) {
  using T = compute_t<S>;
  const double inv_n = 1.0 / double(n);  // one division: short chunks are latency-bound
  for (int64_t k0 = 0; k0 < count; k0 += kMomentsBatch) {
    const int64_t kn = std::min(kMomentsBatch, count - k0);
    const S* xb = x + k0 * n;
    double sums[kMomentsBatch];
    for (int64_t k = 0; k < kn; ++k) sums[k] = moments_sum(xb + k * n, n);
    for (int64_t k = 0; k < kn; ++k) {
      const T shift = T(sums[k] * inv_n);
      if (!std::isfinite(shift)) {  // an Inf (or NaN) in the chunk: mean +-Inf or NaN, variance NaN
        mean_out[k0 + k] = sums[k] * inv_n;
        m2_out[k0 + k] = std::numeric_limits<double>::quiet_NaN();
      } else {
        moments_deviations(xb + k * n, n, shift, inv_n, &mean_out[k0 + k], &m2_out[k0 + k]);
      }
    }
  }
}

template <class S>
void sum_squares(const S* x, int64_t n, double* out) {
  using T = compute_t<S>;
  constexpr int64_t L = lanes<T>;
  // Scalar math: q = sum x*x  (RMSNorm's statistic: positive terms, nothing to cancel)
  vec<T> q0{}, q1{}, q2{}, q3{};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const vec<T> a = load_as(x + i), b = load_as(x + i + L), c = load_as(x + i + 2 * L), d = load_as(x + i + 3 * L);
    q0 += a * a; q1 += b * b; q2 += c * c; q3 += d * d;
  }
  for (; i + L <= n; i += L) {
    const vec<T> a = load_as(x + i);
    q0 += a * a;
  }
  if constexpr (masked_tail<S>)
    if (i < n) {
      const vec<T> a = load_tail(x + i, n - i);
      q1 += a * a; i = n;
    }
  double q = hsum<T>((q0 + q1) + (q2 + q3));
  for (; i < n; ++i) {
    const double v = double(to_compute(x[i]));
    q += v * v;
  }
  *out = q;
}

template <class S, bool Weighted, class T = compute_t<S>>
static void dot_impl(const S* x, const S* dy, const T* w, int64_t n, T shift, double* A, double* B) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: g = dy*w; A = sum g*(x - shift); B = sum g
  const vec<T> vs = splat(shift);
  vec<T> a0{}, a1{}, b0{}, b1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    vec<T> g0 = load_as(dy + i), g1 = load_as(dy + i + L);
    if (Weighted) { g0 *= load(w + i); g1 *= load(w + i + L); }
    a0 += g0 * (load_as(x + i) - vs); a1 += g1 * (load_as(x + i + L) - vs);
    b0 += g0; b1 += g1;
  }
  for (; i + L <= n; i += L) {
    vec<T> g0 = load_as(dy + i);
    if (Weighted) g0 *= load(w + i);
    a0 += g0 * (load_as(x + i) - vs); b0 += g0;
  }
  if constexpr (masked_tail<S>)
    if (const int64_t r = n - i; r > 0) {  // the same steps as dot_columns' tail
      vec<T> g1 = load_tail(dy + i, r);
      if (Weighted) g1 *= load_tail(w + i, r);
      a1 += g1 * zero_past(load_tail(x + i, r) - vs, r); b1 += g1; i = n;
    }
  double sa = hsum<T>(a0 + a1), sb = hsum<T>(b0 + b1);
  for (; i < n; ++i) {
    T g = Weighted ? to_compute(dy[i]) * w[i] : to_compute(dy[i]);
    sa += double(g * (to_compute(x[i]) - shift)); sb += double(g);
  }
  *A = sa; *B = sb;
}

template <class S>
void dot(const S* x, const S* dy, const compute_t<S>* w, int64_t n, compute_t<S> shift, double* A,
         double* B) {
  if (w) dot_impl<S, true>(x, dy, w, n, shift, A, B);
  else dot_impl<S, false>(x, dy, w, n, shift, A, B);
}

template <class S, bool Weighted, class T = compute_t<S>>
static void dot_columns_impl(const S* x, const S* dy, const T* w, int64_t n, T shift, T a, T b,
                             double* A, double* B, T* gsum, T* bsum) {
  constexpr int64_t L = lanes<T>;
  // dot's sums (the same accumulators, so the same bits) and, in the same pass over x and dy:
  // scalar math: xhat = (x - shift)*a + b; gsum += dy*xhat; bsum += dy
  const vec<T> vs = splat(shift), va = splat(a), vb = splat(b);
  vec<T> a0{}, a1{}, b0{}, b1{};
  auto columns = [&](int64_t i, vec<T> d, vec<T> xs) {
    store(gsum + i, load(gsum + i) + d * (xs * va + vb));
    store(bsum + i, load(bsum + i) + d);
  };
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const vec<T> d0 = load_as(dy + i), d1 = load_as(dy + i + L);
    const vec<T> x0 = load_as(x + i) - vs, x1 = load_as(x + i + L) - vs;
    vec<T> g0 = d0, g1 = d1;
    if (Weighted) { g0 *= load(w + i); g1 *= load(w + i + L); }
    a0 += g0 * x0; a1 += g1 * x1;
    b0 += g0; b1 += g1;
    columns(i, d0, x0);
    columns(i + L, d1, x1);
  }
  for (; i + L <= n; i += L) {
    const vec<T> d0 = load_as(dy + i), x0 = load_as(x + i) - vs;
    vec<T> g0 = d0;
    if (Weighted) g0 *= load(w + i);
    a0 += g0 * x0; b0 += g0;
    columns(i, d0, x0);
  }
  if constexpr (masked_tail<S>)
    if (const int64_t r = n - i; r > 0) {
      const vec<T> d1 = load_tail(dy + i, r), x1 = zero_past(load_tail(x + i, r) - vs, r);
      vec<T> g1 = d1;
      if (Weighted) g1 *= load_tail(w + i, r);
      a1 += g1 * x1; b1 += g1;
      store_tail(gsum + i, load_tail(gsum + i, r) + d1 * (x1 * va + vb), r);
      store_tail(bsum + i, load_tail(bsum + i, r) + d1, r);
      i = n;
    }
  double sa = hsum<T>(a0 + a1), sb = hsum<T>(b0 + b1);
  for (; i < n; ++i) {
    const T d = to_compute(dy[i]), xs = to_compute(x[i]) - shift, g = Weighted ? d * w[i] : d;
    sa += double(g * xs); sb += double(g);
    gsum[i] += d * (xs * a + b);
    bsum[i] += d;
  }
  *A = sa; *B = sb;
}

template <class S, class T>
void dot_columns(const S* x, const S* dy, const T* w, int64_t n, T shift, T a, T b, double* A,
                 double* B, T* gsum, T* bsum) {
  if (w) dot_columns_impl<S, true>(x, dy, w, n, shift, a, b, A, B, gsum, bsum);
  else dot_columns_impl<S, false>(x, dy, w, n, shift, a, b, A, B, gsum, bsum);
}

#define NK_INSTANTIATE(S, T)                                                         \
  template void moments<S>(const S*, int64_t, int64_t, double*, double*);                     \
  template void sum_squares<S>(const S*, int64_t, double*);                          \
  template void dot<S>(const S*, const S*, const T*, int64_t, T, double*, double*);  \
  template void dot_columns<S, T>(const S*, const S*, const T*, int64_t, T, T, T, double*, double*, T*, T*);
NK_INSTANTIATE(float, float)
NK_INSTANTIATE(double, double)
NK_INSTANTIATE(f16, float)
NK_INSTANTIATE(bf16, float)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
