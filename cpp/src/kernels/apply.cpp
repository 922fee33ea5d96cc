// Elementwise passes over one chunk: the forward affine and the backward apply.
// Both subtract the group's shift first, so a large mean cancels exactly before any rounding.
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

template <class T, bool HasG, bool HasH, bool HasRes, bool Relu>
static void affine_impl(const T* x, T* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                        const T* res) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: y = ((x - shift)*a + b) * g + h + res; y = max(y, 0)
  const vec<T> vs = splat(shift), va = splat(a), vb = splat(b), zero{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vec<T> v = (load(x + i) - vs) * va + vb;
    if (HasG) v *= load(g + i);
    if (HasH) v += load(h + i);
    if (HasRes) v += load(res + i);
    if (Relu) v = v < zero ? zero : v;  // NaN compares false and stays NaN, as torch.relu
    store(y + i, v);
  }
  for (; i < n; ++i) {
    T v = (x[i] - shift) * a + b;
    if (HasG) v *= g[i];
    if (HasH) v += h[i];
    if (HasRes) v += res[i];
    if (Relu) v = v < T(0) ? T(0) : v;
    y[i] = v;
  }
}

template <class T, bool HasG, bool HasH>
static void affine_epilogue(const T* x, T* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                            const T* res, bool relu) {
  if (res && relu) affine_impl<T, HasG, HasH, true, true>(x, y, n, shift, a, b, g, h, res);
  else if (res) affine_impl<T, HasG, HasH, true, false>(x, y, n, shift, a, b, g, h, res);
  else if (relu) affine_impl<T, HasG, HasH, false, true>(x, y, n, shift, a, b, g, h, res);
  else affine_impl<T, HasG, HasH, false, false>(x, y, n, shift, a, b, g, h, res);
}

template <class T>
void affine(const T* x, T* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
            const T* res, bool relu) {
  if (g && h) affine_epilogue<T, true, true>(x, y, n, shift, a, b, g, h, res, relu);
  else if (g) affine_epilogue<T, true, false>(x, y, n, shift, a, b, g, h, res, relu);
  else if (h) affine_epilogue<T, false, true>(x, y, n, shift, a, b, g, h, res, relu);
  else affine_epilogue<T, false, false>(x, y, n, shift, a, b, g, h, res, relu);
}

template <class T, bool Weighted>
static void backward_apply_impl(const T* x, const T* dy, T* dx, int64_t n, T c1, T c2, T shift,
                                T c3, const T* w) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: dx = c1*dy*w + c2*(x - shift) + c3
  const vec<T> v1 = splat(c1), v2 = splat(c2), v3 = splat(c3), vs = splat(shift);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vec<T> g = load(dy + i);
    if (Weighted) g *= load(w + i);
    store(dx + i, v1 * g + (v2 * (load(x + i) - vs) + v3));
  }
  for (; i < n; ++i) {
    T g = Weighted ? dy[i] * w[i] : dy[i];
    dx[i] = c1 * g + (c2 * (x[i] - shift) + c3);
  }
}

template <class T>
void backward_apply(const T* x, const T* dy, T* dx, int64_t n, T c1, T c2, T shift, T c3,
                    const T* w) {
  if (w) backward_apply_impl<T, true>(x, dy, dx, n, c1, c2, shift, c3, w);
  else backward_apply_impl<T, false>(x, dy, dx, n, c1, c2, shift, c3, w);
}

#define NK_INSTANTIATE(T)                                                                   \
  template void affine<T>(const T*, T*, int64_t, T, T, T, const T*, const T*, const T*, bool); \
  template void backward_apply<T>(const T*, const T*, T*, int64_t, T, T, T, T, const T*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
