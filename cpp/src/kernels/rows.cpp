// Channels-last primitives: a block of `rows` rows of C channels (one sample's spatial
// positions), every channel its own column. The same sums as reduce.cpp and apply.cpp, per
// column: results for channel c go to out[c], a chunk's C results side by side, and
// merge_columns merges such rows of results C columns at a time.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

// Per-column accumulators: n zeroed arrays of C, reused by the calling thread (a chunk is a few
// thousand elements, so an allocation per call would be a measurable share of it).
template <class T>
T* column_scratch(int64_t n, int64_t C) {
  static thread_local std::vector<T> scratch;
  scratch.assign(n * C, T(0));
  return scratch.data();
}

// Calls f(std::integral_constant<int, NV>, c0) for blocks of NV <= kBlockVecs whole vectors of
// columns [c0, c0 + NV*L), covering the columns below C - C % L: a block's per-column sums then
// live in registers across all rows instead of a store and a reload per row. Each column still
// adds its rows in order, so the sums are those of the column-by-column loop. With 32 vector
// registers (AVX-512) a block is up to 8 vectors: three arrays of sums fit, and 128 float
// channels are one block, so the first pass over a chunk reads memory in order instead of
// half-rows at a stride.
constexpr int kBlockVecs = NK_VEC_BYTES == 64 ? 8 : 4;

template <int NV, class F>
void column_tail(int64_t n, int64_t c0, const F& f) {  // a last block of n < kBlockVecs vectors
  if constexpr (NV > 0) {
    if (n == NV) return f(std::integral_constant<int, NV>{}, c0);
    column_tail<NV - 1>(n, c0, f);
  }
}

template <class T, int MaxNV = kBlockVecs, class F>
void column_blocks(int64_t C, const F& f) {
  constexpr int64_t L = lanes<T>;
  int64_t c0 = 0;
  for (; c0 + MaxNV * L <= C; c0 += MaxNV * L) f(std::integral_constant<int, MaxNV>{}, c0);
  column_tail<MaxNV - 1>((C - c0) / L, c0, f);
}

// rows_affine holds its three per-column coefficient arrays in registers too, over groups of
// kRowGroup rows: a load of every coefficient per element made it load-bound in cache (four
// loads per vector of x), and up to 128 float channels are still read a whole row at a time.
constexpr int64_t kRowGroup = 8;
constexpr int64_t kSumRows = 4, kWideSums = 512;  // rows_moments' first pass on wide rows
constexpr int64_t kBackwardRows = 4;

template <class S>
void rows_moments(const S* x, int64_t rows, int64_t C, int64_t ld, double* mean, double* m2) {
  using T = compute_t<S>;
  constexpr int64_t L = lanes<T>;
  const int64_t cv = C - C % L;  // columns in whole vectors; the rest go one by one
  T* const shift = column_scratch<T>(3, C);
  T *const sd = shift + C, *const sdd = sd + C;
  // Pass 1, scalar math: shift[c] = sum_r x[r, c] / rows (a rough mean, the shift of pass 2).
  // This pass reads memory. Rows of kWideSums columns or more (LayerNorm2d's blocks of 512 of
  // NCHW's 3136-column rows, 12.5 KB apart) go in groups of kSumRows rows, each read along its
  // length: a block of columns at a time went down every row at a stride (10-15% slower at
  // 32x64x56x56). Narrower rows (NHWC's) keep the register blocks. Each column still adds its
  // rows in order, so both give the same sums.
  if (C >= kWideSums) {
    for (int64_t r0 = 0; r0 < rows; r0 += kSumRows) {
      const int64_t r1 = std::min(rows, r0 + kSumRows);
      for (int64_t c = 0; c < cv; c += L) {
        vec<T> acc = load(shift + c);
        for (int64_t r = r0; r < r1; ++r) acc += load_as(x + r * ld + c);
        store(shift + c, acc);
      }
    }
  } else {
    column_blocks<T>(C, [&](auto nv, int64_t c0) {
      constexpr int NV = decltype(nv)::value;
      vec<T> acc[NV] = {};
      for (int64_t r = 0; r < rows; ++r)
        for (int v = 0; v < NV; ++v) acc[v] += load_as(x + r * ld + c0 + v * L);
      for (int v = 0; v < NV; ++v) store(shift + c0 + v * L, acc[v]);
    });
  }
  const int64_t m = C - cv;  // the last columns: one masked vector where masked_tail, else one by one
  if constexpr (masked_tail<S>) {
    if (m > 0) {
      vec<T> acc{};
      for (int64_t r = 0; r < rows; ++r) acc += load_tail(x + r * ld + cv, m);
      store_tail(shift + cv, acc, m);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = cv; c < C; ++c) shift[c] += to_compute(x[r * ld + c]);
  }
  const double inv_rows = 1.0 / double(rows);  // one division: a chunk has C columns to finish
  for (int64_t c = 0; c < C; ++c) shift[c] = T(double(shift[c]) * inv_rows);
  // Pass 2, scalar math: d = x - shift[c]; sd[c] += d; sdd[c] += d*d
  column_blocks<T>(C, [&](auto nv, int64_t c0) {
    constexpr int NV = decltype(nv)::value;
    vec<T> vs[NV], d1[NV] = {}, d2[NV] = {};
    for (int v = 0; v < NV; ++v) vs[v] = load(shift + c0 + v * L);
    for (int64_t r = 0; r < rows; ++r)
      for (int v = 0; v < NV; ++v) {
        const vec<T> d = load_as(x + r * ld + c0 + v * L) - vs[v];
        d1[v] += d;
        d2[v] += d * d;
      }
    for (int v = 0; v < NV; ++v) store(sd + c0 + v * L, d1[v]), store(sdd + c0 + v * L, d2[v]);
  });
  if constexpr (masked_tail<S>) {
    if (m > 0) {
      const vec<T> vs = load_tail(shift + cv, m);
      vec<T> d1{}, d2{};
      for (int64_t r = 0; r < rows; ++r) {
        const vec<T> d = load_tail(x + r * ld + cv, m) - vs;  // lanes past m: 0 - 0
        d1 += d;
        d2 += d * d;
      }
      store_tail(sd + cv, d1, m), store_tail(sdd + cv, d2, m);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = cv; c < C; ++c) {
        const T d = to_compute(x[r * ld + c]) - shift[c];
        sd[c] += d;
        sdd[c] += d * d;
      }
  }
  for (int64_t c = 0; c < C; ++c) {
    const double s = double(sd[c]), q = double(sdd[c]) - s * s * inv_rows;
    if (!std::isfinite(shift[c])) {  // an Inf (or NaN) in the column: mean +-Inf or NaN, variance NaN
      mean[c] = double(shift[c]);
      m2[c] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    mean[c] = double(shift[c]) + s * inv_rows;
    m2[c] = q < 0 ? 0 : q;  // NaN stays NaN
  }
}

template <class S>
void rows_dot(const S* x, const S* dy, int64_t rows, int64_t C, int64_t ld, const compute_t<S>* shift,
              double* A, double* B) {
  using T = compute_t<S>;
  constexpr int64_t L = lanes<T>;
  const int64_t cv = C - C % L;
  T* const sa = column_scratch<T>(2, C);
  T* const sb = sa + C;
  // Scalar math: A[c] += dy*(x - shift[c]); B[c] += dy
  // This pass reads memory: wide rows (LayerNorm2d's backward) go kSumRows rows at a time along
  // their length, as rows_moments' first pass; each column still adds its rows in order.
  if (C >= kWideSums) {
    for (int64_t r0 = 0; r0 < rows; r0 += kSumRows) {
      const int64_t r1 = std::min(rows, r0 + kSumRows);
      for (int64_t c = 0; c < cv; c += L) {
        const vec<T> vs = load(shift + c);
        vec<T> a = load(sa + c), b = load(sb + c);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * ld + c;
          const vec<T> g = load_as(dy + o);
          a += g * (load_as(x + o) - vs);
          b += g;
        }
        store(sa + c, a), store(sb + c, b);
      }
    }
  } else
  column_blocks<T>(C, [&](auto nv, int64_t c0) {
    constexpr int NV = decltype(nv)::value;
    vec<T> vs[NV], a[NV] = {}, b[NV] = {};
    for (int v = 0; v < NV; ++v) vs[v] = load(shift + c0 + v * L);
    for (int64_t r = 0; r < rows; ++r)
      for (int v = 0; v < NV; ++v) {
        const int64_t o = r * ld + c0 + v * L;
        const vec<T> g = load_as(dy + o);
        a[v] += g * (load_as(x + o) - vs[v]);
        b[v] += g;
      }
    for (int v = 0; v < NV; ++v) store(sa + c0 + v * L, a[v]), store(sb + c0 + v * L, b[v]);
  });
  if constexpr (masked_tail<S>) {  // the last columns as one masked vector (lanes past m add 0)
    if (const int64_t m = C - cv; m > 0) {
      const vec<T> vs = load_tail(shift + cv, m);
      vec<T> a{}, b{};
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * ld + cv;
        const vec<T> g = load_tail(dy + o, m);
        a += g * (load_tail(x + o, m) - vs);
        b += g;
      }
      store_tail(sa + cv, a, m), store_tail(sb + cv, b, m);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = cv; c < C; ++c) {
        const T g = to_compute(dy[r * ld + c]);
        sa[c] += g * (to_compute(x[r * ld + c]) - shift[c]);
        sb[c] += g;
      }
  }
  for (int64_t c = 0; c < C; ++c) {
    A[c] = double(sa[c]);
    B[c] = double(sb[c]);
  }
}

// The weighted column sums A, B (rows_dot's with g = w[r]*dy) and the row sums gsum, bsum of the
// per-column affine, in one pass over the rows (LayerNorm2d's and BatchLayerNorm2d's backward
// sums; the row sums were a second pass over the block, from L2, in rows_row_sums). Each sum adds
// its terms in the order of the two kernels it replaced, so the bits are theirs: a column's rows
// in row order; a row's columns lane by lane in column order, then its masked tail, then across
// the lanes.
template <class S, class T>
void rows_dot_row_sums(const S* x, const S* dy, int64_t rows, int64_t C, int64_t ld, const T* shift, const T* w,
                       const T* a, const T* b, double* A, double* B, double* gsum, double* bsum) {
  constexpr int64_t L = lanes<T>;
  const int64_t cv = C - C % L, m = C - cv;
  T* const sa = column_scratch<T>(1, 2 * C + 2 * rows * L);  // column sums, then per-row lane sums
  T *const sb = sa + C, *const rg = sb + C, *const rd = rg + rows * L;
  if (C >= kWideSums) {  // rows_dot's wide rows: kSumRows rows at a time along their length
    for (int64_t r0 = 0; r0 < rows; r0 += kSumRows) {
      const int64_t r1 = std::min(rows, r0 + kSumRows);
      vec<T> g[kSumRows] = {}, d[kSumRows] = {};
      for (int64_t c = 0; c < cv; c += L) {
        const vec<T> vs = load(shift + c), va = load(a + c), vb = load(b + c);
        vec<T> ca = load(sa + c), cb = load(sb + c);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * ld + c;
          const vec<T> dv = load_as(dy + o), xs = load_as(x + o) - vs, gw = load_as(dy + o) * w[r];
          ca += gw * xs;
          cb += gw;
          g[r - r0] += dv * (xs * va + vb);
          d[r - r0] += dv;
        }
        store(sa + c, ca), store(sb + c, cb);
      }
      for (int64_t r = r0; r < r1; ++r) store(rg + r * L, g[r - r0]), store(rd + r * L, d[r - r0]);
    }
  } else {
    column_blocks<T, 4>(C, [&](auto nv, int64_t c0) {
      constexpr int NV = decltype(nv)::value;
      vec<T> vs[NV], va[NV], vb[NV], ca[NV] = {}, cb[NV] = {};
      for (int v = 0; v < NV; ++v)
        vs[v] = load(shift + c0 + v * L), va[v] = load(a + c0 + v * L), vb[v] = load(b + c0 + v * L);
      for (int64_t r = 0; r < rows; ++r) {
        vec<T> g = load(rg + r * L), d = load(rd + r * L);
        for (int v = 0; v < NV; ++v) {
          const int64_t o = r * ld + c0 + v * L;
          const vec<T> dv = load_as(dy + o), xs = load_as(x + o) - vs[v], gw = load_as(dy + o) * w[r];
          ca[v] += gw * xs;
          cb[v] += gw;
          g += dv * (xs * va[v] + vb[v]);
          d += dv;
        }
        store(rg + r * L, g), store(rd + r * L, d);
      }
      for (int v = 0; v < NV; ++v) store(sa + c0 + v * L, ca[v]), store(sb + c0 + v * L, cb[v]);
    });
  }
  if constexpr (masked_tail<S>) {  // the last columns, one masked vector (lanes past m add 0)
    if (m > 0) {
      const vec<T> vs = load_tail(shift + cv, m), va = load_tail(a + cv, m), vb = load_tail(b + cv, m);
      vec<T> ca{}, cb{};
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * ld + cv;
        const vec<T> dv = load_tail(dy + o, m), xs = load_tail(x + o, m) - vs, gw = load_tail(dy + o, m) * w[r];
        ca += gw * xs;
        cb += gw;
        store(rg + r * L, load(rg + r * L) + dv * (xs * va + vb));
        store(rd + r * L, load(rd + r * L) + dv);
      }
      store_tail(sa + cv, ca, m), store_tail(sb + cv, cb, m);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = cv; c < C; ++c) {
        const T gw = to_compute(dy[r * ld + c]) * w[r];
        sa[c] += gw * (to_compute(x[r * ld + c]) - shift[c]);
        sb[c] += gw;
      }
  }
  for (int64_t c = 0; c < C; ++c) A[c] = double(sa[c]), B[c] = double(sb[c]);
  for (int64_t r = 0; r < rows; ++r) {
    double gs = hsum<T>(load(rg + r * L)), ds = hsum<T>(load(rd + r * L));
    for (int64_t c = masked_tail<S> ? C : cv; c < C; ++c) {
      const T dv = to_compute(dy[r * ld + c]);
      gs += double(dv * ((to_compute(x[r * ld + c]) - shift[c]) * a[c] + b[c]));
      ds += double(dv);
    }
    gsum[r] = gs, bsum[r] = ds;
  }
}

template <class S, bool HasRes, bool Relu, bool RowAffine = false, class T = compute_t<S>>
static void rows_affine_impl(const S* x, S* y, int64_t rows, int64_t C, int64_t ld, const T* shift, const T* a,
                             const T* b, const S* res, bool stream, const T* g = nullptr,
                             const T* h = nullptr) {
  constexpr int64_t L = lanes<T>;
  const int64_t cv = C - C % L;
  const vec<T> zero{};
  // Scalar math: y = (x - shift[c])*a[c] + b[c] [then *g[r] + h[r]] + res; y = max(y, 0)
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t r1 = std::min(rows, r0 + kRowGroup);
    column_blocks<T, kBlockVecs>(C, [&](auto nv, int64_t c0) {
      constexpr int NV = decltype(nv)::value;
      vec<T> vs[NV], va[NV], vb[NV];
      for (int v = 0; v < NV; ++v)
        vs[v] = load(shift + c0 + v * L), va[v] = load(a + c0 + v * L), vb[v] = load(b + c0 + v * L);
      for (int64_t r = r0; r < r1; ++r) {
        const T gr = RowAffine ? g[r] : T(1), hr = RowAffine ? h[r] : T(0);
        for (int v = 0; v < NV; ++v) {
          const int64_t o = r * ld + c0 + v * L;
          const vec<T> xv = load_as(x + o);
          vec<T> e = (xv - vs[v]) * va[v] + vb[v];
          if (RowAffine) e = e * gr + hr;
          if (HasRes) e += load_as(res + o);
          if (Relu) e = e < zero ? zero : e;
          put(y + o, e, stream);
        }
      }
    });
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = cv; c < C; ++c) {
        const int64_t o = r * ld + c;
        const T xv = to_compute(x[o]);
        T e = (xv - shift[c]) * a[c] + b[c];
        if (RowAffine) e = e * g[r] + h[r];
        if (HasRes) e += to_compute(res[o]);
        if (Relu) e = e < T(0) ? T(0) : e;
        y[o] = from_compute<S>(e);
      }
  }
}

template <class S, class T>
void rows_affine(const S* x, S* y, int64_t rows, int64_t C, int64_t ld, const T* shift, const T* a, const T* b,
                 const S* res, bool relu, bool stream) {
  stream = stream && streams<S>();
  if (res && relu) rows_affine_impl<S, true, true>(x, y, rows, C, ld, shift, a, b, res, stream);
  else if (res) rows_affine_impl<S, true, false>(x, y, rows, C, ld, shift, a, b, res, stream);
  else if (relu) rows_affine_impl<S, false, true>(x, y, rows, C, ld, shift, a, b, res, stream);
  else rows_affine_impl<S, false, false>(x, y, rows, C, ld, shift, a, b, res, stream);
}

template <class S, class T>
void rows_affine_rows(const S* x, S* y, int64_t rows, int64_t C, int64_t ld, const T* shift, const T* a, const T* b,
                      const T* g, const T* h, bool stream) {
  stream = stream && streams<S>();
  rows_affine_impl<S, false, false, true>(x, y, rows, C, ld, shift, a, b, nullptr, stream, g, h);
}

template <class S, bool HasX, bool RowWeighted = false, class T = compute_t<S>>
static void rows_backward_apply_impl(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, int64_t ld,
                                     const T* c1, const T* c2, const T* shift, const T* c3, bool stream,
                                     const T* w = nullptr) {
  constexpr int64_t L = lanes<T>;
  // Scalar math: dx = c1[c]*dy [*w[r]] + c2[c]*(x - shift[c]) + c3[c]   (without x: c1[c]*dy + c3[c])
  // kBackwardRows rows at a time, each column vector's four coefficients loaded once for all of
  // them: loaded per element, they made six loads per vector of dx, and the pass load-bound.
  // (Streamed outputs went row by row while the outputs' rows were never line-aligned, so never
  // streamed; aligned, the row groups took LayerNorm2d's backward from 6.3 to 5.7 ms at 1 thread.)
  const int64_t cv = C - C % L;
  int64_t r0 = 0;
  auto group = [&](auto nrows) {
    constexpr int64_t NR = decltype(nrows)::value;
    for (int64_t c = 0; c < cv; c += L) {
      const vec<T> v1 = load(c1 + c), v3 = load(c3 + c);
      const vec<T> v2 = HasX ? load(c2 + c) : v1, vs = HasX ? load(shift + c) : v1;
      for (int64_t r = r0; r < r0 + NR; ++r) {
        const int64_t o = r * ld + c;
        const vec<T> g = v1 * (RowWeighted ? load_as(dy + o) * w[r] : load_as(dy + o));
        put(dx + o, HasX ? g + (v2 * (load_as(x + o) - vs) + v3) : g + v3, stream);
      }
    }
    for (int64_t r = r0; r < r0 + NR; ++r)
      for (int64_t c = cv; c < C; ++c) {
        const int64_t o = r * ld + c;
        const T g = c1[c] * (RowWeighted ? to_compute(dy[o]) * w[r] : to_compute(dy[o]));
        dx[o] = from_compute<S>(HasX ? g + (c2[c] * (to_compute(x[o]) - shift[c]) + c3[c]) : g + c3[c]);
      }
    r0 += NR;
  };
  while (r0 + kBackwardRows <= rows) group(std::integral_constant<int64_t, kBackwardRows>{});
  while (r0 < rows) group(std::integral_constant<int64_t, 1>{});
}

template <class S, class T>
void rows_backward_apply(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, int64_t ld, const T* c1,
                         const T* c2, const T* shift, const T* c3, bool stream) {
  stream = stream && streams<S>();
  if (x) rows_backward_apply_impl<S, true>(x, dy, dx, rows, C, ld, c1, c2, shift, c3, stream);
  else rows_backward_apply_impl<S, false>(x, dy, dx, rows, C, ld, c1, c2, shift, c3, stream);
}

template <class S, class T>
void rows_backward_apply_weighted(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, int64_t ld,
                                  const T* c1, const T* c2, const T* shift, const T* c3, const T* w,
                                  bool stream) {
  stream = stream && streams<S>();
  rows_backward_apply_impl<S, true, true>(x, dy, dx, rows, C, ld, c1, c2, shift, c3, stream, w);
}

// rows_affine_rows and rows_backward_apply_weighted with an element term, for one sample or for
// several `sample_ld` apart that share the term (BatchLayerNorm2d's batch part, per (c, hw)):
// sample k's per-column coefficients at k*coef_ld. A column vector at a time, each sample's coefficients
// are loaded once for all the rows and each row's term once for all the samples: one sample at
// a time, its apply loaded four vectors (forward; ten in the backward's streamed rows) per
// vector of output, from L2. Each element's arithmetic is the one-sample kernels', so the bits
// are theirs. kTermSamples samples at a time fit the registers (coefficients, term, temporaries).
// AVX2's vectors are half a cache line: a column step of one vector walked every row before the
// next, reading each line of x, the term and the output twice, the rows between evicting it from
// L1. There a step is a line (kLineVecs vectors), one sample at a time: the coefficients of two
// samples and two vectors did not fit its 16 registers (BatchLayerNorm2d's inference at
// 32x64x56x56 on Zen 3: in one run two samples of a line took 9.8-10.4 ms against 7.0-7.4 for
// two of a vector; in another one sample of a line 4.4-5.3 against 5.8-7.3).
constexpr int kTermSamples = NK_VEC_BYTES == 64 ? 4 : NK_VEC_BYTES == 32 ? 1 : 2;
constexpr int kLineVecs = NK_VEC_BYTES == 32 ? 2 : 1;

// f(integral_constant<U>, c) over the columns [0, cv) (whole vectors): steps of kLineVecs
// vectors (a line), then one vector at a time.
template <class T, class F>
[[gnu::always_inline]] inline void line_steps(int64_t cv, const F& f) {
  constexpr int64_t L = lanes<T>, U = kLineVecs;
  int64_t c = 0;
  for (; c + U * L <= cv; c += U * L) f(std::integral_constant<int, int(U)>{}, c);
  if constexpr (U > 1) {
    for (; c < cv; c += L) f(std::integral_constant<int, 1>{}, c);
  }
}

template <int K, class F>
void sample_groups(int64_t samples, const F& f) {  // f(integral_constant<K'>, k0), K' <= K samples from k0
  int64_t k0 = 0;
  for (; k0 + K <= samples; k0 += K) f(std::integral_constant<int, K>{}, k0);
  if constexpr (K > 1) {
    if (k0 < samples) sample_groups<K - 1>(samples - k0, [&](auto nk, int64_t k) { f(nk, k0 + k); });
  }
}

// K samples from x, y and the coefficients given (the parameters are a function's, not a
// lambda's captures: sample_groups is not inlined, and read through its closure they were
// reloaded after every store, which may alias anything; a third of the loop's time on AVX2).
template <int K, class S, class T>
void affine_sample_group(const S* xs, S* ys, int64_t sample_ld, int64_t rows, int64_t C, int64_t ld, const T* shift,
                         const T* a, const T* b, int64_t coef_ld, const T* g, const T* h, const T* ts, const T* ta,
                         const T* tb, bool stream) {
  constexpr int64_t L = lanes<T>;
  const int64_t cv = C - C % L;
  line_steps<T>(cv, [&](auto nu, int64_t c) {
    constexpr int U = decltype(nu)::value;
    vec<T> vs[K][U], va[K][U], vb[K][U];
    for (int k = 0; k < K; ++k)
      for (int u = 0; u < U; ++u) {
        const int64_t i = k * coef_ld + c + u * L;
        vs[k][u] = load(shift + i), va[k][u] = load(a + i), vb[k][u] = load(b + i);
      }
    for (int64_t r = 0; r < rows; ++r) {
      const T gr = g[r], hr = h[r];
      for (int u = 0; u < U; ++u) {
        const int64_t o = r * ld + c + u * L;
        const vec<T> tsv = load(ts + o), tav = load(ta + o), tbv = load(tb + o);
        for (int k = 0; k < K; ++k) {
          const int64_t q = k * sample_ld + o;
          const vec<T> xv = load_as(xs + q);
          vec<T> e = (xv - vs[k][u]) * va[k][u] + vb[k][u];
          e += (xv - tsv) * tav + tbv;
          e = e * gr + hr;
          put(ys + q, e, stream);
        }
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = cv; c < C; ++c) {
      const int64_t o = r * ld + c;
      for (int k = 0; k < K; ++k) {
        const int64_t q = k * sample_ld + o, i = k * coef_ld + c;
        const T xv = to_compute(xs[q]);
        T e = (xv - shift[i]) * a[i] + b[i];
        e += (xv - ts[o]) * ta[o] + tb[o];
        e = e * g[r] + h[r];
        ys[q] = from_compute<S>(e);
      }
    }
}

template <class S, class T>
void rows_affine_samples(const S* x, S* y, int64_t samples, int64_t sample_ld, int64_t rows, int64_t C, int64_t ld,
                         const T* shift, const T* a, const T* b, int64_t coef_ld, const T* g, const T* h,
                         const ElementTerm<T>& term, bool stream) {
  stream = stream && streams<S>();
  sample_groups<kTermSamples>(samples, [&](auto nk, int64_t k0) {
    const int64_t s = k0 * sample_ld, i = k0 * coef_ld;
    affine_sample_group<decltype(nk)::value>(x + s, y + s, sample_ld, rows, C, ld, shift + i, a + i, b + i, coef_ld,
                                             g, h, term.shift, term.a, term.b, stream);
  });
}

// rows_affine_samples' backward, as affine_sample_group's (its parameters not captures).
template <int K, class S, class T>
void backward_sample_group(const S* xs, const S* dys, S* dxs, int64_t sample_ld, int64_t rows, int64_t C, int64_t ld,
                           const T* c1, const T* c2, const T* shift, const T* c3, int64_t coef_ld, const T* w,
                           const T* t1, const T* ts, const T* ta, const T* tb, bool stream) {
  constexpr int64_t L = lanes<T>;
  const int64_t cv = C - C % L;
  line_steps<T>(cv, [&](auto nu, int64_t c) {
    constexpr int U = decltype(nu)::value;
    vec<T> v1[K][U], v2[K][U], vs[K][U], v3[K][U];
    for (int k = 0; k < K; ++k)
      for (int u = 0; u < U; ++u) {
        const int64_t i = k * coef_ld + c + u * L;
        v1[k][u] = load(c1 + i), v2[k][u] = load(c2 + i), vs[k][u] = load(shift + i), v3[k][u] = load(c3 + i);
      }
    for (int64_t r = 0; r < rows; ++r) {
      const T wr = w[r];
      for (int u = 0; u < U; ++u) {
        const int64_t o = r * ld + c + u * L;
        const vec<T> t1v = load(t1 + o), tsv = load(ts + o), tav = load(ta + o), tbv = load(tb + o);
        for (int k = 0; k < K; ++k) {
          const int64_t q = k * sample_ld + o;
          const vec<T> xv = load_as(xs + q), dyw = load_as(dys + q) * wr;
          const vec<T> t = (v1[k][u] + t1v) * dyw + (v2[k][u] * (xv - vs[k][u]) + v3[k][u]);
          put(dxs + q, t + ((xv - tsv) * tav + tbv), stream);
        }
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = cv; c < C; ++c) {
      const int64_t o = r * ld + c;
      for (int k = 0; k < K; ++k) {
        const int64_t q = k * sample_ld + o, i = k * coef_ld + c;
        const T xv = to_compute(xs[q]), dyw = to_compute(dys[q]) * w[r];
        const T t = (c1[i] + t1[o]) * dyw + (c2[i] * (xv - shift[i]) + c3[i]);
        dxs[q] = from_compute<S>(t + ((xv - ts[o]) * ta[o] + tb[o]));
      }
    }
}

template <class S, class T>
void rows_backward_apply_samples(const S* x, const S* dy, S* dx, int64_t samples, int64_t sample_ld, int64_t rows,
                                 int64_t C, int64_t ld, const T* c1, const T* c2, const T* shift, const T* c3,
                                 int64_t coef_ld, const T* w, const ElementTerm<T>& term, bool stream) {
  stream = stream && streams<S>();
  sample_groups<kTermSamples>(samples, [&](auto nk, int64_t k0) {
    const int64_t s = k0 * sample_ld, i = k0 * coef_ld;
    backward_sample_group<decltype(nk)::value>(x + s, dy + s, dx + s, sample_ld, rows, C, ld, c1 + i, c2 + i,
                                               shift + i, c3 + i, coef_ld, w, term.c1, term.shift, term.a, term.b,
                                               stream);
  });
}

// Chan et al.'s merge (moments.h: merge) of the moments of L columns at once; both sides' counts
// are shared by every column.
struct ColumnMoments {
  double n;
  vec<double> mean, m2;
};

inline ColumnMoments merge_moments(const ColumnMoments& a, const ColumnMoments& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const double n = a.n + b.n, wb = b.n / n;
  const vec<double> delta = b.mean - a.mean;
  const vec<double> mean = a.mean + delta * wb, m2 = a.m2 + b.m2 + delta * delta * (a.n * wb);
  // Columns where either mean is an Inf or NaN: their sum, and an unknown (NaN) spread.
  const auto finite = (a.mean - a.mean == 0) & (b.mean - b.mean == 0);
  const vec<double> nan = splat(std::numeric_limits<double>::quiet_NaN());
  return {n, finite ? mean : a.mean + b.mean, finite ? m2 : nan};
}

void merge_columns(const double* mean, const double* m2, int64_t stride, int64_t C, int64_t parts,
                   int64_t part_n, int64_t last_n, double* out_mean, double* out_m2) {
  constexpr int64_t L = lanes<double>;
  // Parts in order, alternately into two chains (each merge waits on its chain's last), then
  // the two: merge_stored's order.
  auto columns = [&](int64_t c, auto load_cols, auto store_cols) {
    ColumnMoments even{0, {}, {}}, odd{0, {}, {}};
    for (int64_t j = 0; j < parts; ++j) {
      const ColumnMoments m{double(j + 1 == parts ? last_n : part_n), load_cols(mean + j * stride + c),
                            load_cols(m2 + j * stride + c)};
      if (j % 2) odd = merge_moments(odd, m);
      else even = merge_moments(even, m);
    }
    const ColumnMoments all = merge_moments(even, odd);
    store_cols(out_mean + c, all.mean), store_cols(out_m2 + c, all.m2);
  };
  int64_t c = 0;
  for (; c + L <= C; c += L)
    columns(c, [](const double* p) { return load(p); }, [](double* p, vec<double> v) { store(p, v); });
  // The last C % L columns through the same vector code, zero-padded: a column's bits do not
  // depend on which columns a call covers.
  if (const size_t bytes = size_t(C - c) * sizeof(double); bytes > 0)
    columns(c, [&](const double* p) { vec<double> v{}; std::memcpy(&v, p, bytes); return v; },
            [&](double* p, vec<double> v) { std::memcpy(p, &v, bytes); });
}

#define NK_INSTANTIATE(S, T)                                                                      \
  template void rows_moments<S>(const S*, int64_t, int64_t, int64_t, double*, double*);           \
  template void rows_dot<S>(const S*, const S*, int64_t, int64_t, int64_t, const T*, double*,     \
                            double*);                                                             \
  template void rows_affine<S, T>(const S*, S*, int64_t, int64_t, int64_t, const T*, const T*,    \
                                  const T*, const S*, bool, bool);                                \
  template void rows_backward_apply<S, T>(const S*, const S*, S*, int64_t, int64_t, int64_t, const T*, \
                                          const T*, const T*, const T*, bool);                    \
  template void rows_dot_row_sums<S, T>(const S*, const S*, int64_t, int64_t, int64_t, const T*,  \
                                        const T*, const T*, const T*, double*, double*, double*,  \
                                        double*);                                                 \
  template void rows_affine_rows<S, T>(const S*, S*, int64_t, int64_t, int64_t, const T*,         \
                                       const T*, const T*, const T*, const T*, bool);              \
  template void rows_backward_apply_weighted<S, T>(const S*, const S*, S*, int64_t, int64_t,      \
                                                   int64_t, const T*, const T*, const T*, const T*, \
                                                   const T*, bool);                               \
  template void rows_affine_samples<S, T>(const S*, S*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                          const T*, const T*, const T*, int64_t, const T*, const T*, \
                                          const ElementTerm<T>&, bool);                           \
  template void rows_backward_apply_samples<S, T>(const S*, const S*, S*, int64_t, int64_t, int64_t,  \
                                                  int64_t, int64_t, const T*, const T*, const T*,  \
                                                  const T*, int64_t, const T*, const ElementTerm<T>&, \
                                                  bool);
NK_INSTANTIATE(float, float)
NK_INSTANTIATE(double, double)
NK_INSTANTIATE(f16, float)
NK_INSTANTIATE(bf16, float)
#undef NK_INSTANTIATE

}  // namespace NK_ISA_NS
}  // namespace nk
