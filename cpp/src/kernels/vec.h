// Vector helpers for the kernels, written once with GCC/Clang vector extensions and compiled
// once per ISA level: NK_VEC_BYTES is 64 for AVX-512, 32 for AVX2, 16 for SSE2 and NEON.
// Loads and stores are unaligned (memcpy folds to one instruction); no -ffast-math anywhere,
// so reductions keep a fixed order: lane l of accumulator k always sums the same elements.
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifndef NK_VEC_BYTES
#define NK_VEC_BYTES 16
#endif

namespace nk {
namespace NK_ISA_NS {

template <class T> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(NK_VEC_BYTES))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(NK_VEC_BYTES))); };

template <class T> using vec = typename VecOf<T>::type;
template <class T> constexpr int64_t lanes = NK_VEC_BYTES / sizeof(T);

template <class T> inline vec<T> load(const T* p) { vec<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <class T> inline void store(T* p, vec<T> v) { std::memcpy(p, &v, sizeof v); }
template <class T> inline vec<T> splat(T s) { return vec<T>{} + s; }

// Non-temporal store of a whole vector to an address aligned to NK_VEC_BYTES (x86): the line
// goes to memory without first being read into cache. An output too large to stay in cache is
// then written with two thirds of the traffic of a plain store (no read for ownership). Other
// targets: a plain store. The kernels do not fence: parallel_for does, once per thread
// (parallel.h: store_fence).
constexpr bool kStreams =
#if defined(__SSE2__)
    true;
#else
    false;
#endif

template <class T> inline void stream(T* p, vec<T> v) {
#if NK_VEC_BYTES == 64 && defined(__AVX512F__)
  __m512i r;
  std::memcpy(&r, &v, sizeof r);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), r);
#elif NK_VEC_BYTES == 32 && defined(__AVX__)
  __m256i r;
  std::memcpy(&r, &v, sizeof r);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
#elif NK_VEC_BYTES == 16 && defined(__SSE2__)
  __m128i r;
  std::memcpy(&r, &v, sizeof r);
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), r);
#else
  store(p, v);
#endif
}

// The last n < L elements of a chunk as one vector (lanes past n are zero) and back, through
// AVX-512 masks or AVX2's vmaskmov: a 196-element plane then ends in one masked vector instead
// of four scalar steps. Elsewhere kMaskedTails is false and the kernels take the tail one
// element at a time.
#if NK_VEC_BYTES == 64 && defined(__AVX512F__)
constexpr bool kMaskedTails = true;
inline vec<float> load_tail(const float* p, int64_t n) {
  const __m512 r = _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
  vec<float> v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline vec<double> load_tail(const double* p, int64_t n) {
  const __m512d r = _mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p);
  vec<double> v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline void store_tail(float* p, vec<float> v, int64_t n) {
  __m512 r;
  std::memcpy(&r, &v, sizeof r);
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), r);
}
inline void store_tail(double* p, vec<double> v, int64_t n) {
  __m512d r;
  std::memcpy(&r, &v, sizeof r);
  _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), r);
}
// v with lanes n and up set to zero: a reduction's masked tail adds nothing from them.
inline vec<float> zero_past(vec<float> v, int64_t n) {
  __m512 r;
  std::memcpy(&r, &v, sizeof r);
  r = _mm512_maskz_mov_ps(__mmask16((1u << n) - 1), r);
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline vec<double> zero_past(vec<double> v, int64_t n) {
  __m512d r;
  std::memcpy(&r, &v, sizeof r);
  r = _mm512_maskz_mov_pd(__mmask8((1u << n) - 1), r);
  std::memcpy(&v, &r, sizeof v);
  return v;
}
#elif NK_VEC_BYTES == 32 && defined(__AVX2__)
// AVX2: the same through vmaskmov, whose masked-off lanes read as zero and never fault.
constexpr bool kMaskedTails = true;
inline __m256i tail_mask32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i tail_mask64(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
inline vec<float> load_tail(const float* p, int64_t n) {
  const __m256 r = _mm256_maskload_ps(p, tail_mask32(n));
  vec<float> v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline vec<double> load_tail(const double* p, int64_t n) {
  const __m256d r = _mm256_maskload_pd(p, tail_mask64(n));
  vec<double> v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline void store_tail(float* p, vec<float> v, int64_t n) {
  __m256 r;
  std::memcpy(&r, &v, sizeof r);
  _mm256_maskstore_ps(p, tail_mask32(n), r);
}
inline void store_tail(double* p, vec<double> v, int64_t n) {
  __m256d r;
  std::memcpy(&r, &v, sizeof r);
  _mm256_maskstore_pd(p, tail_mask64(n), r);
}
inline vec<float> zero_past(vec<float> v, int64_t n) {
  __m256 r;
  std::memcpy(&r, &v, sizeof r);
  r = _mm256_and_ps(r, _mm256_castsi256_ps(tail_mask32(n)));
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline vec<double> zero_past(vec<double> v, int64_t n) {
  __m256d r;
  std::memcpy(&r, &v, sizeof r);
  r = _mm256_and_pd(r, _mm256_castsi256_pd(tail_mask64(n)));
  std::memcpy(&v, &r, sizeof v);
  return v;
}
#else
constexpr bool kMaskedTails = false;
template <class T> inline vec<T> load_tail(const T*, int64_t) { return vec<T>{}; }
template <class T> inline void store_tail(T*, vec<T>, int64_t) {}
template <class T> inline vec<T> zero_past(vec<T> v, int64_t) { return v; }
#endif

// Whether p sits on a vector boundary (where stream() may write).
template <class T> inline bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % NK_VEC_BYTES == 0;
}

// Horizontal sum in double, as a fixed pairwise tree (lanes l and l + N/2 added, then halved
// again): log2(L) dependent adds in registers instead of L, which matters on short chunks. The
// halves come from shuffles: a memcpy split goes through the stack, and its narrower reload of a
// wide store stalls store forwarding (measured: a quarter of moments() on 196-element planes).
template <int N> struct DoubleVec { typedef double type __attribute__((vector_size(N * 8))); };

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define NK_HAS_SHUFFLEVECTOR 1
#endif
#endif

template <int N, std::size_t... I>
inline typename DoubleVec<N / 2>::type add_halves(const typename DoubleVec<N>::type& v, std::index_sequence<I...>) {
#ifdef NK_HAS_SHUFFLEVECTOR
  return __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + N / 2)...);
#else
  typename DoubleVec<N / 2>::type lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  return lo + hi;
#endif
}

template <int N>
inline double tree_sum(const typename DoubleVec<N>::type& v) {  // by reference: no psabi note
  if constexpr (N == 1) return v[0];
  else if constexpr (N == 2) return v[0] + v[1];
  else return tree_sum<N / 2>(add_halves<N>(v, std::make_index_sequence<N / 2>{}));
}

template <class T> inline double hsum(vec<T> v) {
  return tree_sum<int(lanes<T>)>(__builtin_convertvector(v, typename DoubleVec<int(lanes<T>)>::type));
}

}  // namespace NK_ISA_NS
}  // namespace nk
