// Elementwise passes over one chunk: the forward affine and the backward apply.
// Both subtract the group's shift first, so a large mean cancels exactly before any rounding.
#include <type_traits>

#include "convert.h"
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

// With `stream` (a large output, see parallel.h), whole vectors of y are written with streaming
// stores from the first vector-aligned element on; elements before it go the scalar way, which
// rounds exactly as the vector body does, so the result does not depend on the choice.
template <class S, bool HasG, bool HasH, bool HasRes, bool Relu, class T = compute_t<S>>
static void affine_impl(const S* x, S* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                        const S* res, bool stream) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: y = ((x - shift)*a + b) * g + h + res; y = max(y, 0)
  auto one = [&](int64_t i) {
    T v = (to_compute(x[i]) - shift) * a + b;
    if (HasG) v *= g[i];
    if (HasH) v += h[i];
    if (HasRes) v += to_compute(res[i]);
    if (Relu) v = v < T(0) ? T(0) : v;
    y[i] = from_compute<S>(v);
  };
  const vec<T> vs = splat(shift), va = splat(a), vb = splat(b), zero{};
  auto body = [&](vec<T> xv, vec<T> gv, vec<T> hv, vec<T> rv) {
    vec<T> v = (xv - vs) * va + vb;
    if (HasG) v *= gv;
    if (HasH) v += hv;
    if (HasRes) v += rv;
    if (Relu) v = v < zero ? zero : v;  // NaN compares false and stays NaN, as torch.relu
    return v;
  };
  stream = stream && streams<S>();
  int64_t i = 0;
  if (stream)
    for (; i < n && !vec_aligned(y + i); ++i) one(i);
  for (; i + L <= n; i += L) {
    const vec<T> v = body(load_as(x + i), HasG ? load(g + i) : zero, HasH ? load(h + i) : zero,
                          HasRes ? load_as(res + i) : zero);
    if (stream) stream_as(y + i, v);
    else store_as(y + i, v);
  }
  if constexpr (kMaskedTails && std::is_same_v<S, T>) {  // float and double: the same math, masked
    if (const int64_t r = n - i; r > 0)
      store_tail(y + i, body(load_tail(x + i, r), HasG ? load_tail(g + i, r) : zero,
                             HasH ? load_tail(h + i, r) : zero, HasRes ? load_tail(res + i, r) : zero), r);
    return;
  }
  for (; i < n; ++i) one(i);
}

template <class S, bool HasG, bool HasH, class T = compute_t<S>>
static void affine_epilogue(const S* x, S* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                            const S* res, bool relu, bool stream) {
  if (res && relu) affine_impl<S, HasG, HasH, true, true>(x, y, n, shift, a, b, g, h, res, stream);
  else if (res) affine_impl<S, HasG, HasH, true, false>(x, y, n, shift, a, b, g, h, res, stream);
  else if (relu) affine_impl<S, HasG, HasH, false, true>(x, y, n, shift, a, b, g, h, res, stream);
  else affine_impl<S, HasG, HasH, false, false>(x, y, n, shift, a, b, g, h, res, stream);
}

template <class S, class T>
void affine(const S* x, S* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
            const S* res, bool relu, bool stream) {
  if (g && h) affine_epilogue<S, true, true>(x, y, n, shift, a, b, g, h, res, relu, stream);
  else if (g) affine_epilogue<S, true, false>(x, y, n, shift, a, b, g, h, res, relu, stream);
  else if (h) affine_epilogue<S, false, true>(x, y, n, shift, a, b, g, h, res, relu, stream);
  else affine_epilogue<S, false, false>(x, y, n, shift, a, b, g, h, res, relu, stream);
}

template <class S, bool Weighted, bool HasX, class T = compute_t<S>>
static void backward_apply_impl(const S* x, const S* dy, S* dx, int64_t n, T c1, T c2, T shift,
                                T c3, const T* w, bool stream) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: dx = c1*dy*w + c2*(x - shift) + c3   (without x: dx = c1*dy*w + c3)
  auto one = [&](int64_t i) {
    T g = Weighted ? to_compute(dy[i]) * w[i] : to_compute(dy[i]);
    dx[i] = from_compute<S>(HasX ? c1 * g + (c2 * (to_compute(x[i]) - shift) + c3) : c1 * g + c3);
  };
  const vec<T> v1 = splat(c1), v2 = splat(c2), v3 = splat(c3), vs = splat(shift);
  auto body = [&](vec<T> dyv, vec<T> wv, vec<T> xv) {
    const vec<T> g = Weighted ? dyv * wv : dyv;
    return HasX ? v1 * g + (v2 * (xv - vs) + v3) : v1 * g + v3;
  };
  stream = stream && streams<S>();
  int64_t i = 0;
  if (stream)
    for (; i < n && !vec_aligned(dx + i); ++i) one(i);
  for (; i + L <= n; i += L) {
    const vec<T> v = body(load_as(dy + i), Weighted ? load(w + i) : v1, HasX ? load_as(x + i) : v1);
    if (stream) stream_as(dx + i, v);
    else store_as(dx + i, v);
  }
  if constexpr (kMaskedTails && std::is_same_v<S, T>) {  // float and double: the same math, masked
    if (const int64_t r = n - i; r > 0)
      store_tail(dx + i, body(load_tail(dy + i, r), Weighted ? load_tail(w + i, r) : v1,
                              HasX ? load_tail(x + i, r) : v1), r);
    return;
  }
  for (; i < n; ++i) one(i);
}

template <class S, class T>
void backward_apply(const S* x, const S* dy, S* dx, int64_t n, T c1, T c2, T shift, T c3,
                    const T* w, bool stream) {
  if (w && x) backward_apply_impl<S, true, true>(x, dy, dx, n, c1, c2, shift, c3, w, stream);
  else if (w) backward_apply_impl<S, true, false>(x, dy, dx, n, c1, c2, shift, c3, w, stream);
  else if (x) backward_apply_impl<S, false, true>(x, dy, dx, n, c1, c2, shift, c3, w, stream);
  else backward_apply_impl<S, false, false>(x, dy, dx, n, c1, c2, shift, c3, w, stream);
}

#define NK_INSTANTIATE(S, T)                                                                           \
  template void affine<S, T>(const S*, S*, int64_t, T, T, T, const T*, const T*, const S*, bool, bool); \
  template void backward_apply<S, T>(const S*, const S*, S*, int64_t, T, T, T, T, const T*, bool);
NK_INSTANTIATE(float, float)
NK_INSTANTIATE(double, double)
NK_INSTANTIATE(f16, float)
NK_INSTANTIATE(bf16, float)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
