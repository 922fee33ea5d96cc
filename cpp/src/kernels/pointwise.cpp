// Pointwise epilogues: an elementwise function with per-plane parameters around the
// normalization's affine, for the layers whose output is not an affine of x (FRN's TLU, EvoNorm,
// Proxy Norm's activation). One chunk at a time, like apply.cpp's passes, so a layer that uses
// one reads the tensor as often as a standard layer. With u = (x - shift)*a + b:
//   pointwise           y = f(u)*scale + offset
//   pointwise_sums      sums[0..6] += dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr
//                       with g = dy*f'(u), in double
//   pointwise_backward  dx = c1*g + c2*(x - center) + c3
// Scalar code: the functions need exp and erf per element; the compiler vectorizes the simple ones.
#include <cmath>

#include "convert.h"
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

namespace {

// f(u), f'(u) and df/dp, df/dq, df/dr of each function (normkit.h: Pointwise).
template <class T>
struct Value {
  T f, df, dp, dq, dr;
};

template <class T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

template <int Op, class T>
inline Value<T> value(T u, T p, T q, T r) {
  constexpr int kIdentity = int(Pointwise::identity), kRelu = int(Pointwise::relu),
                kSilu = int(Pointwise::silu), kGelu = int(Pointwise::gelu), kTlu = int(Pointwise::tlu),
                kSwishGate = int(Pointwise::swish_gate), kEvoB0 = int(Pointwise::evo_b0);
  (void)q, (void)r;
  if constexpr (Op == kIdentity) {
    return {u, T(1), T(0), T(0), T(0)};
  } else if constexpr (Op == kRelu) {  // torch: derivative 0 at 0; NaN stays NaN
    return {u > T(0) || u != u ? u : T(0), u > T(0) ? T(1) : T(0), T(0), T(0), T(0)};
  } else if constexpr (Op == kSilu) {  // u*s(u); f' = s (1 + u (1 - s))
    const T s = sigmoid(u);
    return {u * s, s * (T(1) + u * (T(1) - s)), T(0), T(0), T(0)};
  } else if constexpr (Op == kGelu) {  // u Phi(u) (erf form); f' = Phi(u) + u phi(u)
    const T Phi = T(0.5) * (T(1) + std::erf(u * T(0.70710678118654752440)));
    const T phi = T(0.39894228040143267794) * std::exp(T(-0.5) * u * u);
    return {u * Phi, Phi + u * phi, T(0), T(0), T(0)};
  } else if constexpr (Op == kTlu) {  // max(u, p); at u == p the gradient goes to p (FRN's tau)
    const bool above = !(u <= p);      // NaN: above, and stays NaN
    return {above ? u : p, above ? T(1) : T(0), above ? T(0) : T(1), T(0), T(0)};
  } else if constexpr (Op == kSwishGate) {  // u s(p u) (EvoNorm-S0); f' = s + p u s (1 - s)
    const T s = sigmoid(p * u), ds = s * (T(1) - s);
    return {u * s, s + p * u * ds, u * u * ds, T(0), T(0)};
  } else {  // kEvoB0: u / max(p, q u + r); an exact tie splits the gradient evenly (torch.maximum)
    const T d2 = q * u + r;
    const Value<T> left{u / p, T(1) / p, -u / (p * p), T(0), T(0)};
    const Value<T> right{u / d2, r / (d2 * d2), T(0), -u * u / (d2 * d2), -u / (d2 * d2)};
    if (p > d2) return left;
    if (d2 > p) return right;
    if (p != p || d2 != d2) return {u / (p + d2), T(0), T(0), T(0), T(0)};  // NaN
    const T h = T(0.5);
    return {left.f, h * (left.df + right.df), h * left.dp, h * right.dq, h * right.dr};
  }
}

template <class T>
inline T u_of(T x, const PointwisePlane<T>& c) {
  return (x - c.shift) * c.a + c.b;
}

template <class S, int Op, class T = compute_t<S>>
void forward_impl(const S* x, S* y, int64_t n, const PointwisePlane<T>& c) {
  // Scalar math: y = f((x - shift)*a + b)*scale + offset
  for (int64_t i = 0; i < n; ++i) {
    const T u = u_of(to_compute(x[i]), c);
    y[i] = from_compute<S>(value<Op>(u, c.p, c.q, c.r).f * c.scale + c.offset);
  }
}

template <class S, int Op, class T = compute_t<S>>
void sums_impl(const S* x, const S* dy, int64_t n, const PointwisePlane<T>& c, double* sums) {
  // Scalar math: per element, with v = f at u and g = dy*f'(u): the seven sums of the header
  double s[7] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T xi = to_compute(x[i]), d = to_compute(dy[i]);
    const Value<T> v = value<Op>(u_of(xi, c), c.p, c.q, c.r);
    const T g = d * v.df;
    s[0] += double(d), s[1] += double(d * v.f), s[2] += double(g), s[3] += double(g * (xi - c.center));
    s[4] += double(d * v.dp), s[5] += double(d * v.dq), s[6] += double(d * v.dr);
  }
  for (int j = 0; j < 7; ++j) sums[j] = s[j];
}

template <class S, int Op, class T = compute_t<S>>
void backward_impl(const S* x, const S* dy, S* dx, int64_t n, const PointwisePlane<T>& c, T c1, T c2, T c3) {
  // Scalar math: dx = c1*dy*f'(u) + c2*(x - center) + c3
  for (int64_t i = 0; i < n; ++i) {
    const T xi = to_compute(x[i]);
    const T g = to_compute(dy[i]) * value<Op>(u_of(xi, c), c.p, c.q, c.r).df;
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
void pointwise(int op, const S* x, S* y, int64_t n, const PointwisePlane<T>& c) {
  with_op(op, [&](auto o) { forward_impl<S, decltype(o)::value>(x, y, n, c); });
}

template <class S, class T>
void pointwise_sums(int op, const S* x, const S* dy, int64_t n, const PointwisePlane<T>& c, double* sums) {
  with_op(op, [&](auto o) { sums_impl<S, decltype(o)::value>(x, dy, n, c, sums); });
}

template <class S, class T>
void pointwise_backward(int op, const S* x, const S* dy, S* dx, int64_t n, const PointwisePlane<T>& c,
                        T c1, T c2, T c3) {
  with_op(op, [&](auto o) { backward_impl<S, decltype(o)::value>(x, dy, dx, n, c, c1, c2, c3); });
}

#define NK_INSTANTIATE(S, T)                                                                       \
  template void pointwise<S, T>(int, const S*, S*, int64_t, const PointwisePlane<T>&);             \
  template void pointwise_sums<S, T>(int, const S*, const S*, int64_t, const PointwisePlane<T>&,   \
                                     double*);                                                      \
  template void pointwise_backward<S, T>(int, const S*, const S*, S*, int64_t,                     \
                                         const PointwisePlane<T>&, T, T, T);
NK_INSTANTIATE(float, float)
NK_INSTANTIATE(double, double)
NK_INSTANTIATE(f16, float)
NK_INSTANTIATE(bf16, float)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
