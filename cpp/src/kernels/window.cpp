// Local response normalization's sliding window over channels (torch's local_response_norm):
// per position, d_c = k + alpha/size * sum of x_j^2 over the window of channels
// j in [c - size/2, c + (size - 1)/2] (clipped to the channels there are: torch's zero padding),
// y_c = x_c * d_c^-beta. One block of `len` positions of one sample at a time, channels `stride`
// apart, vectors over the positions; every rank is this (N, C, positions) view.
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

namespace {

template <class T>
inline T neg_pow(T d, T beta) {  // d^-beta, d > 0; 3/4 as the vector form computes it
  if (beta == T(0.75)) {
    const T r = std::sqrt(d);
    return T(1) / (r * std::sqrt(r));
  }
  return std::pow(d, -beta);
}

// Vector square roots (correctly rounded, as the scalar sqrt): the instruction of the ISA level.
template <class T>
inline vec<T> vsqrt(vec<T> v) {
#if NK_VEC_BYTES == 64 && defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 r;
    std::memcpy(&r, &v, sizeof r);
    r = _mm512_sqrt_ps(r);
    std::memcpy(&v, &r, sizeof v);
  } else {
    __m512d r;
    std::memcpy(&r, &v, sizeof r);
    r = _mm512_sqrt_pd(r);
    std::memcpy(&v, &r, sizeof v);
  }
#elif NK_VEC_BYTES == 32 && defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    __m256 r;
    std::memcpy(&r, &v, sizeof r);
    r = _mm256_sqrt_ps(r);
    std::memcpy(&v, &r, sizeof v);
  } else {
    __m256d r;
    std::memcpy(&r, &v, sizeof r);
    r = _mm256_sqrt_pd(r);
    std::memcpy(&v, &r, sizeof v);
  }
#elif NK_VEC_BYTES == 16 && defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    __m128 r;
    std::memcpy(&r, &v, sizeof r);
    r = _mm_sqrt_ps(r);
    std::memcpy(&v, &r, sizeof v);
  } else {
    __m128d r;
    std::memcpy(&r, &v, sizeof r);
    r = _mm_sqrt_pd(r);
    std::memcpy(&v, &r, sizeof v);
  }
#else
  for (int64_t l = 0; l < lanes<T>; ++l) v[l] = std::sqrt(v[l]);
#endif
  return v;
}

template <class T>
inline vec<T> neg_pow(vec<T> d, T beta) {
  // beta = 3/4 (torch's default): 1/(sqrt(d) sqrt(sqrt(d))), in vector square roots; else per lane.
  if (beta == T(0.75)) {
    const vec<T> r = vsqrt<T>(d);
    return T(1) / (r * vsqrt<T>(r));
  }
  for (int64_t l = 0; l < lanes<T>; ++l) d[l] = std::pow(d[l], -beta);
  return d;
}

// The window of channel c: [lo, hi] within [0, C).
inline void window(int64_t c, int64_t C, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = c - size / 2 < 0 ? 0 : c - size / 2;
  *hi = c + (size - 1) / 2 >= C ? C - 1 : c + (size - 1) / 2;
}

// A block's positions end in one masked vector where masked_tail (convert.h): a 14x14 plane's 196
// positions are 24 vectors and a masked one, not 4 steps of scalar square roots and divisions.

// One position (V = T) or n of a vector's lanes (n < L only where masked_tail<S>; lanes past n
// read as zero and are not written).
template <class V, class S, class T>
inline V load_one(const S* p, int64_t n) {
  if constexpr (std::is_same_v<V, T>) return to_compute(*p);
  else if constexpr (masked_tail<S>) return n < lanes<T> ? load_tail(p, n) : load(p);
  else return load_as(p);
}

template <class V, class S>
inline void store_one(S* p, V v, int64_t n) {
  if constexpr (std::is_same_v<V, compute_t<S>>) *p = from_compute<S>(v);
  else if constexpr (masked_tail<S>) n < lanes<compute_t<S>> ? store_tail(p, v, n) : store(p, v);
  else store_as(p, v);
}

// d_c = k + alpha/size * sum of x_j^2 over channel c's window, at positions [i, i + width).
template <class V, class S, class T>
inline V denominator(const S* x, int64_t C, int64_t stride, int64_t i, int64_t c, int64_t size, T alpha, T k,
                     int64_t n) {
  int64_t lo, hi;
  window(c, C, size, &lo, &hi);
  V sq = V{} + T(0);
  for (int64_t j = lo; j <= hi; ++j) {
    const V v = load_one<V, S, T>(x + j * stride + i, n);
    sq += v * v;
  }
  return sq * (alpha / T(size)) + k;
}

// One channel row of the forward at positions [i, i + n), n lanes of a vector (V = vec<T>) or
// one position (V = T).
template <class V, class S, class T>
inline void forward_at(const S* x, S* y, int64_t C, int64_t stride, int64_t i, int64_t c, int64_t size, T alpha,
                       T beta, T k, int64_t n) {
  const V d = denominator<V, S, T>(x, C, stride, i, c, size, alpha, k, n);
  store_one<V>(y + c * stride + i, load_one<V, S, T>(x + c * stride + i, n) * neg_pow(d, beta), n);
}

// Backward: with p_c = d_c^-beta and u_c = dy_c x_c d_c^(-beta - 1), dx_j = dy_j p_j - 2 alpha
// beta/size x_j sum over the c whose window holds j of u_c, those c being [j - (size - 1)/2,
// j + size/2]. Rows of p and u go to a ring of min(size, C) rows of the block's positions (row c
// in slot c % min(size, C)): row j needs rows up to j + size/2, none before j - (size - 1)/2.
template <class V, class S, class T>
inline void backward_row(const S* x, const S* dy, int64_t C, int64_t stride, int64_t i, int64_t c, int64_t size,
                         T alpha, T beta, T k, T* u, T* p, int64_t n) {
  const V d = denominator<V, S, T>(x, C, stride, i, c, size, alpha, k, n);
  const V g = load_one<V, S, T>(dy + c * stride + i, n) * load_one<V, S, T>(x + c * stride + i, n);
  const V pc = neg_pow(d, beta);
  store_one<V>(p + i, pc, n);
  store_one<V>(u + i, g * pc / d, n);
}

// dx of channel j at positions [i, i + width), from the rows of u of its window (`rows` of them).
template <class V, class S, class T>
inline void backward_at(const S* x, const S* dy, S* dx, int64_t stride, int64_t i, int64_t j, T coef,
                        const T* const* u, int64_t rows, const T* pj, int64_t n) {
  V s = V{} + T(0);
  for (int64_t r = 0; r < rows; ++r) s += load_one<V, T, T>(u[r] + i, n);
  const V xj = load_one<V, S, T>(x + j * stride + i, n);
  store_one<V>(dx + j * stride + i,
               load_one<V, S, T>(dy + j * stride + i, n) * load_one<V, T, T>(pj + i, n) - coef * xj * s, n);
}

// Calls f(V{}, i, n) over positions [0, len): whole vectors (V = vec<T>, n = L), then the tail:
// one masked vector where masked_tail<S>, else one position at a time (V = T, n = 1).
template <class S, class T, class F>
inline void over_positions(int64_t len, const F& f) {
  constexpr int64_t L = lanes<T>;
  int64_t i = 0;
  for (; i + L <= len; i += L) f(vec<T>{}, i, L);
  if constexpr (masked_tail<S>) {
    if (i < len) f(vec<T>{}, i, len - i);
  } else {
    for (; i < len; ++i) f(T{}, i, int64_t(1));
  }
}

}  // namespace

// Channel rows outer, positions inner: each row of the window is read along its length (a
// channel is `stride` elements from the next, and going down the channels a vector at a time
// touched a new line and a new page every step: 2-3x slower at 32x64x56x56). The sums are those of
// the position-by-position order, in the same order.
template <class S, class T>
void lrn_forward(const S* x, S* y, int64_t C, int64_t stride, int64_t len, int64_t size, T alpha, T beta, T k) {
  for (int64_t c = 0; c < C; ++c)
    over_positions<S, T>(len, [&](auto v, int64_t i, int64_t n) {
      forward_at<decltype(v), S, T>(x, y, C, stride, i, c, size, alpha, beta, k, n);
    });
}

template <class S, class T>
void lrn_backward(const S* x, const S* dy, S* dx, int64_t C, int64_t stride, int64_t len, int64_t size, T alpha,
                  T beta, T k) {
  // u's and p's ring: `slots` = min(size, C) rows of len each, kept by the calling thread.
  const int64_t slots = size < C ? size : C, ld = len;
  static thread_local std::vector<T> scratch;
  if (int64_t(scratch.size()) < 2 * slots * ld) scratch.resize(2 * slots * ld);
  T* const u = scratch.data();
  T* const p = u + slots * ld;
  static thread_local std::vector<const T*> window_rows;  // u's rows of channel j's window, in order
  window_rows.resize(slots);
  const T coef = T(2) * (alpha / T(size)) * beta;
  int64_t next = 0;  // the next channel whose row of u and p is to be made
  for (int64_t j = 0; j < C; ++j) {
    const int64_t first = j - (size - 1) / 2 < 0 ? 0 : j - (size - 1) / 2;
    const int64_t last = j + size / 2 >= C ? C - 1 : j + size / 2;
    for (; next <= last; ++next) {
      T *const un = u + (next % slots) * ld, *const pn = p + (next % slots) * ld;
      over_positions<S, T>(len, [&](auto v, int64_t i, int64_t n) {
        backward_row<decltype(v), S, T>(x, dy, C, stride, i, next, size, alpha, beta, k, un, pn, n);
      });
    }
    for (int64_t c = first; c <= last; ++c) window_rows[c - first] = u + (c % slots) * ld;
    const T* const pj = p + (j % slots) * ld;
    const int64_t rows = last - first + 1;
    over_positions<S, T>(len, [&](auto v, int64_t i, int64_t n) {
      backward_at<decltype(v), S, T>(x, dy, dx, stride, i, j, coef, window_rows.data(), rows, pj, n);
    });
  }
}

#define NK_INSTANTIATE(S, T)                                                                             \
  template void lrn_forward<S, T>(const S*, S*, int64_t, int64_t, int64_t, int64_t, T, T, T);           \
  template void lrn_backward<S, T>(const S*, const S*, S*, int64_t, int64_t, int64_t, int64_t, T, T, T);
NK_INSTANTIATE(float, float)
NK_INSTANTIATE(double, double)
NK_INSTANTIATE(f16, float)
NK_INSTANTIATE(bf16, float)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
