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

template <class V, class S, class T>
inline V load_one(const S* p) {
  if constexpr (std::is_same_v<V, T>) return to_compute(*p);
  else return load_as(p);
}

template <class V, class S>
inline void store_one(S* p, V v) {
  if constexpr (std::is_same_v<V, compute_t<S>>) *p = from_compute<S>(v);
  else store_as(p, v);
}

// d_c = k + alpha/size * sum of x_j^2 over channel c's window, at positions [i, i + width).
template <class V, class S, class T>
inline V denominator(const S* x, int64_t C, int64_t stride, int64_t i, int64_t c, int64_t size, T alpha, T k) {
  int64_t lo, hi;
  window(c, C, size, &lo, &hi);
  V sq = V{} + T(0);
  for (int64_t j = lo; j <= hi; ++j) {
    const V v = load_one<V, S, T>(x + j * stride + i);
    sq += v * v;
  }
  return sq * (alpha / T(size)) + k;
}

// Forward of positions [i, i + width) of the block, width one vector (V = vec<T>) or one (V = T).
template <class V, class S, class T>
void forward_at(const S* x, S* y, int64_t C, int64_t stride, int64_t i, int64_t size, T alpha, T beta, T k) {
  for (int64_t c = 0; c < C; ++c) {
    const V d = denominator<V, S, T>(x, C, stride, i, c, size, alpha, k);
    store_one<V>(y + c * stride + i, load_one<V, S, T>(x + c * stride + i) * neg_pow(d, beta));
  }
}

// Backward: with p_c = d_c^-beta and u_c = dy_c x_c d_c^(-beta - 1) (kept in `scratch`, C rows of
// one width), dx_j = dy_j p_j - 2 alpha beta/size x_j sum over the c whose window holds j of u_c,
// those c being [j - (size - 1)/2, j + size/2].
template <class V, class S, class T>
void backward_at(const S* x, const S* dy, S* dx, int64_t C, int64_t stride, int64_t i, int64_t size, T alpha,
                 T beta, T k, V* u, V* p) {
  for (int64_t c = 0; c < C; ++c) {
    const V d = denominator<V, S, T>(x, C, stride, i, c, size, alpha, k);
    p[c] = neg_pow(d, beta);
    u[c] = load_one<V, S, T>(dy + c * stride + i) * load_one<V, S, T>(x + c * stride + i) * p[c] / d;
  }
  const T coef = T(2) * (alpha / T(size)) * beta;
  for (int64_t j = 0; j < C; ++j) {
    const int64_t first = j - (size - 1) / 2 < 0 ? 0 : j - (size - 1) / 2;
    const int64_t last = j + size / 2 >= C ? C - 1 : j + size / 2;
    V s = V{} + T(0);
    for (int64_t c = first; c <= last; ++c) s += u[c];
    const V xj = load_one<V, S, T>(x + j * stride + i);
    store_one<V>(dx + j * stride + i, load_one<V, S, T>(dy + j * stride + i) * p[j] - coef * xj * s);
  }
}

}  // namespace

template <class S, class T>
void lrn_forward(const S* x, S* y, int64_t C, int64_t stride, int64_t len, int64_t size, T alpha, T beta, T k) {
  constexpr int64_t L = lanes<T>;
  int64_t i = 0;
  for (; i + L <= len; i += L) forward_at<vec<T>, S, T>(x, y, C, stride, i, size, alpha, beta, k);
  for (; i < len; ++i) forward_at<T, S, T>(x, y, C, stride, i, size, alpha, beta, k);
}

template <class S, class T>
void lrn_backward(const S* x, const S* dy, S* dx, int64_t C, int64_t stride, int64_t len, int64_t size, T alpha,
                  T beta, T k) {
  constexpr int64_t L = lanes<T>;
  // u and p of one vector of positions, C of each, in the calling thread's kept (vector-aligned) storage
  static thread_local std::vector<vec<T>> scratch;
  if (int64_t(scratch.size()) < 2 * C) scratch.resize(2 * C);
  vec<T>* u = scratch.data();
  vec<T>* p = u + C;
  int64_t i = 0;
  for (; i + L <= len; i += L) backward_at<vec<T>, S, T>(x, dy, dx, C, stride, i, size, alpha, beta, k, u, p);
  T* us = reinterpret_cast<T*>(u);
  T* ps = us + C;
  for (; i < len; ++i) backward_at<T, S, T>(x, dy, dx, C, stride, i, size, alpha, beta, k, us, ps);
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
