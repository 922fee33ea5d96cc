// Pointwise epilogues: an elementwise function with per-plane parameters around the
// normalization's affine, for the layers whose output is not an affine of x (FRN's TLU, EvoNorm,
// Proxy Norm's activation). One chunk at a time, like apply.cpp's passes, so a layer that uses
// one reads the tensor as often as a standard layer. With u = (x - shift)*a + b:
//   pointwise           y = f(u)*scale + offset
//   pointwise_sums      sums[0..6] = dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr
//                       (the last three 0, not summed, where f has no such derivative)
//                       with g = dy*f'(u), summed in T vector lanes 32 vectors at a time, then in
//                       double; g itself into g_out when given (a fused backward's dx from it)
//   pointwise_backward  dx = c1*g + c2*(x - center) + c3
// Vector code (vec.h) with a scalar tail. Float vectors take 2^t and the GELU's erf in vector
// arithmetic (below); double vectors and the scalar tails go through libm.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "convert.h"
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

namespace {

// The functions are written once for a scalar T and for a vector of T (GCC's vector
// extensions take the same ?: and arithmetic). exp2 and erfc: libm for scalars and lane by lane
// for double vectors; float vectors have their own forms below.
template <class V, class T>
inline V cst(T c) {
  if constexpr (std::is_same_v<V, T>) return c;
  else return splat(c);
}

template <class T> inline T exp2_of(T v) { return std::exp2(v); }
template <class T> inline T erfc_of(T v) { return std::erfc(v); }
inline vec<double> exp2_of(vec<double> v) { for (int64_t l = 0; l < lanes<double>; ++l) v[l] = std::exp2(v[l]); return v; }
inline vec<double> erfc_of(vec<double> v) { for (int64_t l = 0; l < lanes<double>; ++l) v[l] = std::erfc(v[l]); return v; }

// min(x, hi) and max(x, lo) of float vectors that keep a NaN x: SSE's and AVX's min/max return
// their second operand where either is NaN. One instruction each, where the ?: form compiled to a
// compare and a blend on exp's critical path.
inline vec<float> min_of(vec<float> x, vec<float> hi) {
#if NK_VEC_BYTES == 64 && defined(__AVX512F__)
  return bit_cast<vec<float>>(_mm512_min_ps(bit_cast<__m512>(hi), bit_cast<__m512>(x)));
#elif NK_VEC_BYTES == 32 && defined(__AVX__)
  return bit_cast<vec<float>>(_mm256_min_ps(bit_cast<__m256>(hi), bit_cast<__m256>(x)));
#elif NK_VEC_BYTES == 16 && defined(__SSE2__)
  return bit_cast<vec<float>>(_mm_min_ps(bit_cast<__m128>(hi), bit_cast<__m128>(x)));
#else
  return hi < x ? hi : x;
#endif
}
inline vec<float> max_of(vec<float> x, vec<float> lo) {
#if NK_VEC_BYTES == 64 && defined(__AVX512F__)
  return bit_cast<vec<float>>(_mm512_max_ps(bit_cast<__m512>(lo), bit_cast<__m512>(x)));
#elif NK_VEC_BYTES == 32 && defined(__AVX__)
  return bit_cast<vec<float>>(_mm256_max_ps(bit_cast<__m256>(lo), bit_cast<__m256>(x)));
#elif NK_VEC_BYTES == 16 && defined(__SSE2__)
  return bit_cast<vec<float>>(_mm_max_ps(bit_cast<__m128>(lo), bit_cast<__m128>(x)));
#else
  return lo > x ? lo : x;
#endif
}

// float vectors: 2^t and the normal CDF in vector arithmetic (a libm call per lane made
// EvoNorm-S0 and the GELU ten to forty times slower than a normalization). These functions are
// limited by their dependency chains (two vectors per step measured no faster), so they are
// written for short ones: one instruction per clamp, a rounding by a magic number instead of
// float-int-float conversions, and Estrin's scheme for the polynomials.
// 2^t: t = n + f with n the nearest integer and |f| <= 1/2, 2^f by a degree-6 polynomial
// (fitted here for its relative error, 2e-9 in exact arithmetic, about 2 ulp in float), 2^n
// into the exponent bits. The callers fold their exponential's log2(e) into a per-plane
// constant (e^(-p u) = 2^((-p log2 e) u)): where Cephes' e^x reduced x by n ln 2 in two
// fused steps, and e^x took its argument's product and a negation first, this takes one
// product, and SiLU's and EvoNorm-S0's forward ran 20-25% faster (AVX2, in L1). That product's
// rounding, about 2|t| ulp of 2^t, is of the order of the rounding of p u itself, which the
// old form carried too; test_core_pointwise checks SiLU and the GELU to 1e-6.
inline vec<float> exp2_of(vec<float> t) {
  t = max_of(min_of(t, splat(127.0f)), splat(-126.0f));  // NaN stays NaN
  // t + 1.5*2^23 rounds to the nearest integer n, which sits in the low mantissa bits.
  const vec<float> big = t + 12582912.0f, n = big - 12582912.0f, f = t - n, f2 = f * f;
  const vec<float> a = f * 0.6931471824645996f + 1.0f, b = f * 0.055503323674201965f + 0.24022647738456726f,
                   c = (f * 0.00015353583148680627f + 0.0013398966984823346f) * f + 0.00961843691766262f;
  const vec<float> y = (c * f2 + b) * f2 + a;
  const vi32 scale = (bit_cast<vi32>(big) + 127) << 23;  // 2^n as float bits, n in [-126, 127]
  return y * bit_cast<vec<float>>(scale);
}

// The standard normal CDF Phi(u) = (1 + erf(u/sqrt 2))/2 for the GELU: 1/2 + u P(u^2)/Q(u^2), a
// rational approximation of erf of degree (11, 10) fitted for its absolute error (3e-8) on
// |u| <= 4 sqrt 2, where erf reaches 1 in float, and 0 or 1 beyond. In float the error is
// within 2.5e-7 of Phi (4 ulp of 1), no exp and one division, where erfc's exp and division
// made the GELU eight times the identity epilogue. Like torch's 0.5 (1 + erf), the far
// negative tail is accurate to that absolute error, not relatively.
inline vec<float> normal_cdf(vec<float> x) {
  const vec<float> hi = splat(5.656854f), lo = -hi;
  const vec<float> u = max_of(min_of(x, hi), lo), s = u * u, s2 = s * s;
  const vec<float> p = (s * 2.203060503e-08f + 6.339194069e-06f) * (s2 * s2) +
                       ((s * 1.737493293e-04f + 4.706281259e-03f) * s2 + (s * 3.438347308e-02f + 3.989422262e-01f));
  const vec<float> q = (s * 1.175604684e-06f + 7.498423900e-05f) * (s2 * s2) +
                       ((s * 1.912409507e-03f + 2.894063573e-02f) * s2 + (s * 2.528523591e-01f + 1.0f));
  const vec<float> cdf = (u * p) / q + 0.5f;
  // Past the clamp, exactly 0 and 1 (Phi(-4 sqrt 2) = 8e-9): the rational's few-ulp error at
  // the clamp, times u, grew without bound in u Phi(u) (6e-5 at u = -1000 without FMA).
  return x < lo ? vec<float>{} : (x > hi ? splat(1.0f) : cdf);
}
template <class T> inline T normal_cdf(T u) { return T(0.5) * erfc_of(u * T(-0.70710678118654752440)); }
inline vec<double> normal_cdf(vec<double> u) { return 0.5 * erfc_of(u * -0.70710678118654752440); }

// Chunks end in one masked vector where masked_tail (convert.h): a 14x14 plane's last 4 elements
// went through libm's exp and erfc one at a time, a fifth of a small EvoNorm-S0's time.

constexpr double kLog2e = 1.44269504088896340736;

// The sigmoid s(v) = 1/(1 + e), e = e^(-v) = 2^t with t = -v log2(e) (the caller's product), and
// 1 - s: e s where t < 0 (v > 0), where 1 - s cancelled (SiLU's float32 f' was off by 1e-6 near
// v = 16, u (1 - s) carrying s's rounding); 1 - s elsewhere, where e may be Inf.
template <class V>
struct Sigmoid {
  V s, rest;  // s(v), 1 - s(v)
  Sigmoid(V t, V zero, V one) {
    const V e = exp2_of(t);
    s = one / (one + e);
    rest = t < zero ? e * s : one - s;
  }
};

// f(u), f'(u) and df/dp, df/dq, df/dr of each function (normkit/pointwise.h).
template <class V>
struct Value {
  V f, df, dp, dq, dr;
};

template <int Op, class T, class V>
inline Value<V> value(V u, V p, V q, V r) {
  const V zero = cst<V>(T(0)), one = cst<V>(T(1));
  if constexpr (Op == int(Pointwise::identity)) {
    return {u, one, zero, zero, zero};
  } else if constexpr (Op == int(Pointwise::relu)) {  // torch: derivative 0 at 0; NaN stays NaN
    return {u < zero ? zero : u, u > zero ? one : zero, zero, zero, zero};
  } else if constexpr (Op == int(Pointwise::silu)) {  // u s(u); f' = s (1 + u (1 - s))
    const Sigmoid<V> g(u * cst<V>(T(-kLog2e)), zero, one);
    return {u * g.s, g.s * (one + u * g.rest), zero, zero, zero};
  } else if constexpr (Op == int(Pointwise::gelu)) {  // u Phi(u) (erf form); f' = Phi(u) + u phi(u)
    const V Phi = normal_cdf(u);
    const V phi = cst<V>(T(0.39894228040143267794)) * exp2_of(u * u * cst<V>(T(-0.5 * kLog2e)));
    return {u * Phi, Phi + u * phi, zero, zero, zero};
  } else if constexpr (Op == int(Pointwise::tlu)) {  // max(u, p); at u == p the gradient goes to p
    return {u <= p ? p : u, u <= p ? zero : one, u <= p ? one : zero, zero, zero};  // NaN u stays NaN
  } else if constexpr (Op == int(Pointwise::swish_gate)) {  // u s(p u) (EvoNorm-S0); f' = s + p u s (1 - s)
    const Sigmoid<V> g((p * cst<V>(T(-kLog2e))) * u, zero, one);  // p's factor is per plane: hoisted
    const V s = g.s, ds = s * g.rest;
    return {u * s, s + p * u * ds, u * u * ds, zero, zero};
  } else {  // evo_b0: u / max(p, q u + r); an exact tie splits the gradient evenly (torch.maximum)
    const V d2 = q * u + r, half = cst<V>(T(0.5));
    const V wl = p > d2 ? one : (d2 > p ? zero : half), wr = one - wl;  // the sides' shares
    // One division: a side with a share is the max d (at a tie both are), so 1/p and 1/d2 are
    // 1/d wherever they are weighted; where p wins, d2 may be 0 and 1/d2 is never taken.
    const V id = one / (p > d2 ? p : d2), id2 = id * id, uid2 = u * id2;
    return {u * id, (wl + wr * r * id) * id, -wl * uid2, -wr * u * uid2, -wr * uid2};
  }
}

// Which of df/dp, df/dq, df/dr a function has (the others are 0 for every u): the sums of the
// rest are 0 without a pass over them (a FRN plane's sums spent three accumulators and their
// horizontal sums on zeros).
template <int Op>
constexpr bool has_derivative(int j) {
  if (Op == int(Pointwise::evo_b0)) return true;
  return j == 0 && (Op == int(Pointwise::tlu) || Op == int(Pointwise::swish_gate));
}

template <class T>
struct Coef {  // one plane's coefficients as vectors
  vec<T> shift, a, b, p, q, r, scale, offset, center;
  explicit Coef(const PointwisePlane<T>& c)
      : shift(splat(c.shift)), a(splat(c.a)), b(splat(c.b)), p(splat(c.p)), q(splat(c.q)), r(splat(c.r)),
        scale(splat(c.scale)), offset(splat(c.offset)), center(splat(c.center)) {}
};

template <class S, int Op, class T = compute_t<S>>
void forward_impl(const S* x, S* y, int64_t n, const PointwisePlane<T>& c, bool stream) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: y = f((x - shift)*a + b)*scale + offset
  const Coef<T> v(c);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vec<T> u = (load_as(x + i) - v.shift) * v.a + v.b;
    put(y + i, value<Op, T>(u, v.p, v.q, v.r).f * v.scale + v.offset, stream);
  }
  if constexpr (masked_tail<S>) {  // the last n % L elements as one masked vector (vec.h)
    if (i < n) {
      const vec<T> u = (load_tail(x + i, n - i) - v.shift) * v.a + v.b;
      store_tail(y + i, value<Op, T>(u, v.p, v.q, v.r).f * v.scale + v.offset, n - i);
    }
    return;
  }
  for (; i < n; ++i) {
    const T u = (to_compute(x[i]) - c.shift) * c.a + c.b;
    y[i] = from_compute<S>(value<Op, T>(u, c.p, c.q, c.r).f * c.scale + c.offset);
  }
}

template <class S, int Op, class T = compute_t<S>>
void sums_impl(const S* x, const S* dy, int64_t n, const PointwisePlane<T>& c, double* sums, T* g_out) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: with g = dy*f'(u): sums += dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr
  // Lane l of accumulator j sums the same elements whatever the thread count; every
  // kFlushVectors vectors each accumulator's fixed tree (hsum) goes into a double total, so no
  // float lane sums more than that many terms (a 2115-element plane summed whole in AVX2's
  // float lanes lost 1e-5 of ProxyNorm's weight gradient); then the scalar tail, in double.
  // Sums 4..6 only where the function has that derivative (has_derivative), else 0.
  constexpr int64_t kFlushVectors = 32;
  constexpr int J = 4 + int(has_derivative<Op>(0)) + int(has_derivative<Op>(1)) + int(has_derivative<Op>(2));
  static_assert(J == 7 || !has_derivative<Op>(1), "the sums kept are 0..J-1");
  const Coef<T> v(c);
  vec<T> acc[7] = {};
  double s[7] = {};
  int64_t i = 0;
  while (i + L <= n) {
    const int64_t block_end = std::min(n - L, i + (kFlushVectors - 1) * L);
    for (; i <= block_end; i += L) {
      const vec<T> xi = load_as(x + i), d = load_as(dy + i);
      const Value<vec<T>> f = value<Op, T>((xi - v.shift) * v.a + v.b, v.p, v.q, v.r);
      const vec<T> g = d * f.df;
      if (g_out) store(g_out + i, g);
      acc[0] += d, acc[1] += d * f.f, acc[2] += g, acc[3] += g * (xi - v.center);
      if constexpr (J > 4) acc[4] += d * f.dp;
      if constexpr (J > 5) acc[5] += d * f.dq, acc[6] += d * f.dr;
    }
    if (i + L <= n)
      for (int j = 0; j < J; ++j) s[j] += hsum<T>(acc[j]), acc[j] = vec<T>{};
  }
  if constexpr (masked_tail<S>) {  // lanes past the tail add nothing (zero_past), NaN or not
    if (i < n) {
      const int64_t m = n - i;
      const vec<T> xi = load_tail(x + i, m), d = load_tail(dy + i, m);
      const Value<vec<T>> f = value<Op, T>((xi - v.shift) * v.a + v.b, v.p, v.q, v.r);
      const vec<T> g = d * f.df;
      if (g_out) store_tail(g_out + i, g, m);
      acc[0] += d, acc[1] += zero_past(d * f.f, m), acc[2] += zero_past(g, m);
      acc[3] += zero_past(g * (xi - v.center), m);
      if constexpr (J > 4) acc[4] += zero_past(d * f.dp, m);
      if constexpr (J > 5) acc[5] += zero_past(d * f.dq, m), acc[6] += zero_past(d * f.dr, m);
      i = n;
    }
  }
  for (int j = 0; j < J; ++j) s[j] += hsum<T>(acc[j]);
  for (; i < n; ++i) {
    const T xi = to_compute(x[i]), d = to_compute(dy[i]);
    const Value<T> f = value<Op, T>((xi - c.shift) * c.a + c.b, c.p, c.q, c.r);
    const T g = d * f.df;
    if (g_out) g_out[i] = g;
    s[0] += double(d), s[1] += double(d * f.f), s[2] += double(g), s[3] += double(g * (xi - c.center));
    if constexpr (J > 4) s[4] += double(d * f.dp);
    if constexpr (J > 5) s[5] += double(d * f.dq), s[6] += double(d * f.dr);
  }
  for (int j = 0; j < 7; ++j) sums[j] = s[j];
}

template <class S, int Op, class T = compute_t<S>>
void backward_impl(const S* x, const S* dy, S* dx, int64_t n, const PointwisePlane<T>& c, T c1, T c2, T c3,
                   bool stream) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: dx = c1*dy*f'(u) + c2*(x - center) + c3
  const Coef<T> v(c);
  const vec<T> v1 = splat(c1), v2 = splat(c2), v3 = splat(c3);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vec<T> xi = load_as(x + i);
    const vec<T> g = load_as(dy + i) * value<Op, T>((xi - v.shift) * v.a + v.b, v.p, v.q, v.r).df;
    put(dx + i, v1 * g + (v2 * (xi - v.center) + v3), stream);
  }
  if constexpr (masked_tail<S>) {
    if (i < n) {
      const vec<T> xi = load_tail(x + i, n - i);
      const vec<T> g = load_tail(dy + i, n - i) * value<Op, T>((xi - v.shift) * v.a + v.b, v.p, v.q, v.r).df;
      store_tail(dx + i, v1 * g + (v2 * (xi - v.center) + v3), n - i);
    }
    return;
  }
  for (; i < n; ++i) {
    const T xi = to_compute(x[i]);
    const T g = to_compute(dy[i]) * value<Op, T>((xi - c.shift) * c.a + c.b, c.p, c.q, c.r).df;
    dx[i] = from_compute<S>(c1 * g + (c2 * (xi - c.center) + c3));
  }
}

// f(std::integral_constant<int, op>) for a run-time op.
template <class F>
void with_op(int op, const F& f) {
  switch (op) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 6>{});
  }
}

}  // namespace

template <class S, class T>
void pointwise(int op, const S* x, S* y, int64_t n, const PointwisePlane<T>& c, bool stream) {
  stream = stream && streams<S>();
  with_op(op, [&](auto o) { forward_impl<S, decltype(o)::value>(x, y, n, c, stream); });
}

template <class S, class T>
void pointwise_sums(int op, const S* x, const S* dy, int64_t n, const PointwisePlane<T>& c, double* sums, T* g) {
  with_op(op, [&](auto o) { sums_impl<S, decltype(o)::value>(x, dy, n, c, sums, g); });
}

template <class S, class T>
void pointwise_backward(int op, const S* x, const S* dy, S* dx, int64_t n, const PointwisePlane<T>& c,
                        T c1, T c2, T c3, bool stream) {
  stream = stream && streams<S>();
  with_op(op, [&](auto o) { backward_impl<S, decltype(o)::value>(x, dy, dx, n, c, c1, c2, c3, stream); });
}

#define NK_INSTANTIATE(S, T)                                                                       \
  template void pointwise<S, T>(int, const S*, S*, int64_t, const PointwisePlane<T>&, bool);       \
  template void pointwise_sums<S, T>(int, const S*, const S*, int64_t, const PointwisePlane<T>&,   \
                                     double*, T*);                                                  \
  template void pointwise_backward<S, T>(int, const S*, const S*, S*, int64_t,                     \
                                         const PointwisePlane<T>&, T, T, T, bool);
NK_INSTANTIATE(float, float)
NK_INSTANTIATE(double, double)
NK_INSTANTIATE(f16, float)
NK_INSTANTIATE(bf16, float)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
