// Conversions between the half storage types and float32, one vector at a time. F16C (part
// of the avx2 and avx512 levels) converts float16 in hardware, AVX512-BF16 (the avx512bf16
// level) float32 to bfloat16; elsewhere integer vector ops do it exactly: round to nearest
// even, NaN stays NaN, Inf stays Inf.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "normkit/dtypes.h"
#include "vec.h"

#if defined(__F16C__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace nk {
namespace NK_ISA_NS {

// Float and double data end a run in one masked vector on AVX-512 and AVX2 (vec.h: kMaskedTails):
// a 14x14 plane's last 4 elements, or a row's last C % L columns, then take one vector step
// instead of scalar ones. Half types and other targets take the scalar tail.
template <class S>
constexpr bool masked_tail = kMaskedTails && std::is_same_v<S, compute_t<S>>;

typedef uint32_t vu32 __attribute__((vector_size(NK_VEC_BYTES)));
typedef int32_t vi32 __attribute__((vector_size(NK_VEC_BYTES)));
typedef uint16_t vu16 __attribute__((vector_size(NK_VEC_BYTES / 2)));
constexpr int64_t kHalfLanes = NK_VEC_BYTES / 4;

template <class To, class From> inline To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}

// binary16 bits -> float32 bits (exact for every input).
inline vu32 half_to_float_bits(vu32 h) {
  const vu32 sign = (h & 0x8000u) << 16;
  const vu32 em = h & 0x7fffu;
  const vu32 exp = em & 0x7c00u;
  vu32 normal = (em << 13) + ((127u - 15u) << 23);                  // rebias the exponent
  normal = exp == 0x7c00u ? normal + ((128u - 16u) << 23) : normal;  // Inf/NaN: all-ones exponent
  // Subnormals: let the FPU normalize (m * 2^-24) through a magic float.
  const vec<float> sub = bit_cast<vec<float>>((em << 13) + (113u << 23)) - bit_cast<vec<float>>(vu32{} + (113u << 23));
  const vu32 out = exp == 0 ? bit_cast<vu32>(sub) : normal;
  return out | sign;
}

// float32 -> binary16 bits, round to nearest even, overflow to Inf, NaN to quiet NaN.
inline vu32 float_to_half_bits(vec<float> f) {
  vu32 u = bit_cast<vu32>(f);
  const vu32 sign = u & 0x80000000u;
  u ^= sign;
  const vu32 big = (u > 0x7f800000u) ? vu32{} + 0x7e00u : vu32{} + 0x7c00u;  // NaN : Inf
  // Subnormal results: adding a magic float aligns the bits and rounds to nearest even.
  const vec<float> magic = bit_cast<vec<float>>(vu32{} + (((127u - 15u) + (23u - 10u) + 1u) << 23));
  const vu32 sub = bit_cast<vu32>(bit_cast<vec<float>>(u) + magic) - bit_cast<vu32>(magic);
  const vu32 odd = (u >> 13) & 1u;
  const vu32 norm = (u + (vu32{} + ((15u - 127u) << 23) + 0xfffu) + odd) >> 13;
  vu32 out = u >= (143u << 23) ? big : (u < (113u << 23) ? sub : norm);
  return out | (sign >> 16);
}

inline vu32 widen(const uint16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vu32);
}

inline void narrow(uint16_t* p, vu32 v) {
  const vu16 h = __builtin_convertvector(v, vu16);
  std::memcpy(p, &h, sizeof h);
}

// Loads and stores of storage type S as a vector of its compute type.
inline vec<float> load_as(const float* p) { return load(p); }
inline vec<double> load_as(const double* p) { return load(p); }
inline void store_as(float* p, vec<float> v) { store(p, v); }
inline void store_as(double* p, vec<double> v) { store(p, v); }

inline vec<float> load_as(const f16* p) {
#if defined(__F16C__) && NK_VEC_BYTES == 64
  return bit_cast<vec<float>>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__) && NK_VEC_BYTES == 32
  return bit_cast<vec<float>>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return bit_cast<vec<float>>(half_to_float_bits(widen(&p->bits)));
#endif
}

inline void store_as(f16* p, vec<float> v) {
#if defined(__F16C__) && NK_VEC_BYTES == 64
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(bit_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && NK_VEC_BYTES == 32
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(bit_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  narrow(&p->bits, float_to_half_bits(v));
#endif
}

inline vec<float> load_as(const bf16* p) { return bit_cast<vec<float>>(widen(&p->bits) << 16); }

inline void store_as(bf16* p, vec<float> v) {
#if defined(__AVX512BF16__) && NK_VEC_BYTES == 64
  // VCVTNEPS2BF16: the same round-to-nearest-even and quiet NaN as below, in one instruction,
  // except that float32 denormal inputs become a signed zero (the instruction's DAZ).
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      bit_cast<__m256i>(_mm512_cvtneps_pbh(bit_cast<__m512>(v))));
  return;
#endif
  const vu32 u = bit_cast<vu32>(v);
  const vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even
  const vu32 nan = (u >> 16) | 0x40u;                             // keep NaN quiet
  narrow(&p->bits, v != v ? nan : rounded);
}

// Streaming stores (vec.h: stream) for float and double; the half types store plainly.
inline void stream_as(float* p, vec<float> v) { stream(p, v); }
inline void stream_as(double* p, vec<double> v) { stream(p, v); }
inline void stream_as(f16* p, vec<float> v) { store_as(p, v); }
inline void stream_as(bf16* p, vec<float> v) { store_as(p, v); }
template <class S> constexpr bool streams() { return kStreams && (sizeof(S) == 4 || sizeof(S) == 8); }

// A vector store: streamed when asked and p is on a vector boundary, plain otherwise (rows of
// channels-last data start wherever C puts them).
template <class S, class V>
inline void put(S* p, V v, bool stream) {
  if (stream && vec_aligned(p)) stream_as(p, v);
  else store_as(p, v);
}

// Scalar versions for loop tails: through a one-element-at-a-time copy of the vector path,
// so tails round exactly as the body does.
template <class S> inline compute_t<S> to_compute(S s) { return s; }
template <class S> inline S from_compute(compute_t<S> v) { return v; }

template <> inline float to_compute<f16>(f16 s) {
  alignas(64) f16 buf[kHalfLanes * 2] = {};
  buf[0] = s;
  return load_as(buf)[0];
}
template <> inline float to_compute<bf16>(bf16 s) { return bit_cast<float>(uint32_t(s.bits) << 16); }
template <> inline f16 from_compute<f16>(float v) {
  alignas(64) f16 buf[kHalfLanes * 2];
  store_as(buf, vec<float>{} + v);
  return buf[0];
}
template <> inline bf16 from_compute<bf16>(float v) {
  alignas(64) bf16 buf[kHalfLanes * 2];
  store_as(buf, vec<float>{} + v);
  return buf[0];
}

}  // namespace NK_ISA_NS
}  // namespace nk
