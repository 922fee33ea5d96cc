// The primitive kernels every normalization is built from, as a function table. Each ISA level
// (baseline, avx2, avx512, avx512bf16) compiles kernels/*.cpp into its own namespace and fills one table;
// dispatch.cpp picks a table once, at load. Each primitive works on one contiguous chunk.
#pragma once
#include <cstdint>

#include "normkit/dtypes.h"
#include "normkit/pointwise.h"

namespace nk {

// Chunk length of every pass: fixed, so results never depend on the thread count, and small
// enough that a chunk's second moments pass reads it from L1.
constexpr int64_t kChunk = 2048;

// One plane's pointwise epilogue (pointwise.cpp): u = (x - shift)*a + b, y = f(u)*scale + offset,
// f's parameters p, q, r; the backward's x term is about center.
template <class T>
struct PointwisePlane {
  T shift, a, b, p, q, r, scale, offset, center;
};

// An optional term per element of a rows block (pointers at the block's first element), the same
// for every sample: BatchLayerNorm2d's batch part, per (c, h, w) over the batch. The forward's
// normalized value gains (x - shift)*a + b; the backward's dx gains c1*w[r]*dy + a*(x - shift) + b.
template <class T>
struct ElementTerm {
  const T *shift, *a, *b, *c1;
};

// S: storage type of x, dy, y, dx; T: compute type of scalars, weights and column sums.
template <class S, class T = compute_t<S>>
struct Kernels {
  // mean[k] and m2[k], the mean and sum of squared deviations of chunk k = x[k*n, (k+1)*n), for
  // `count` consecutive chunks: two passes over each chunk, the same bits whatever the count.
  void (*moments)(const S* x, int64_t n, int64_t count, double* mean, double* m2);
  // q = sum x*x: the statistic of a skip_mean (RMS) plan, one pass.
  void (*sum_squares)(const S* x, int64_t n, double* q);
  // A = sum dy*w*(x - shift), B = sum dy*w, with w[i] = 1 when w is null.
  void (*dot)(const S* x, const S* dy, const T* w, int64_t n, T shift, double* A, double* B);
  // dot, and in the same pass the column sums of a per-column affine's gradients:
  // gsum[i] += dy*((x - shift)*a + b), bsum[i] += dy. A and B are dot's, bit for bit.
  void (*dot_columns)(const S* x, const S* dy, const T* w, int64_t n, T shift, T a, T b, double* A,
                      double* B, T* gsum, T* bsum);
  // y = ((x - shift)*a + b) * g + h [+ residual] [then max(y, 0)], g, h and residual per
  // element (null: 1, 0 and 0). The epilogue fuses an inference block's add and ReLU.
  // stream: write y with streaming stores (a large output; same values either way), unfenced:
  // the caller fences before another thread reads y (parallel.h: parallel_for does).
  void (*affine)(const S* x, S* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                 const S* residual, bool relu, bool stream);
  // dx = c1*dy*w + c2*(x - shift) + c3, w per element (null: 1); x null: no x term (eval).
  void (*backward_apply)(const S* x, const S* dy, S* dx, int64_t n, T c1, T c2, T shift, T c3,
                         const T* w, bool stream);

  // Channels-last: the same four operations on `rows` rows of C channels, `ld` elements apart
  // (ld > C: a block of the columns of wider rows), with per-channel shifts and coefficients;
  // per-channel sums go to out[c].
  void (*rows_moments)(const S* x, int64_t rows, int64_t C, int64_t ld, double* mean, double* m2);
  void (*rows_dot)(const S* x, const S* dy, int64_t rows, int64_t C, int64_t ld, const T* shift,
                   double* A, double* B);
  void (*rows_affine)(const S* x, S* y, int64_t rows, int64_t C, int64_t ld, const T* shift,
                      const T* a, const T* b, const S* residual, bool relu, bool stream);
  void (*rows_backward_apply)(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, int64_t ld,
                              const T* c1, const T* c2, const T* shift, const T* c3, bool stream);

  // Channels-last with a per-row affine (a row is one position of the plan's S: LayerNorm2d reads
  // NCHW memory as rows of HW columns, a row per channel, and its weight is per row):
  //   rows_affine_rows             y = ((x - shift[c])*a[c] + b[c])*g[r] + h[r]
  //   rows_dot_row_sums            A[c] = sum_r w[r]*dy*(x - shift[c]), B[c] = sum_r w[r]*dy, and in
  //                                the same pass gsum[r] = sum_c dy*((x - shift[c])*a[c] + b[c]),
  //                                bsum[r] = sum_c dy
  //   rows_backward_apply_weighted dx = c1[c]*w[r]*dy + c2[c]*(x - shift[c]) + c3[c]
  // (ld as above)
  void (*rows_affine_rows)(const S* x, S* y, int64_t rows, int64_t C, int64_t ld, const T* shift, const T* a,
                           const T* b, const T* g, const T* h, bool stream);
  void (*rows_dot_row_sums)(const S* x, const S* dy, int64_t rows, int64_t C, int64_t ld, const T* shift,
                            const T* w, const T* a, const T* b, double* A, double* B, double* gsum, double* bsum);
  void (*rows_backward_apply_weighted)(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, int64_t ld,
                                       const T* c1, const T* c2, const T* shift, const T* c3,
                                       const T* w, bool stream);

  // Both with an element term (ElementTerm: + (x - ts[o])*ta[o] + tb[o] inside the row affine
  // forward; + t1[o]*w[r]*dy + ta[o]*(x - ts[o]) + tb[o] backward), for `samples` samples
  // sample_ld elements apart that share the term (one, or BatchLayerNorm2d's groups of its
  // batch part), sample k's per-column coefficients at k*coef_ld: the term is read once for all
  // of them. Bits: those of one call per sample.
  void (*rows_affine_samples)(const S* x, S* y, int64_t samples, int64_t sample_ld, int64_t rows, int64_t C,
                              int64_t ld, const T* shift, const T* a, const T* b, int64_t coef_ld, const T* g,
                              const T* h, const ElementTerm<T>& term, bool stream);
  void (*rows_backward_apply_samples)(const S* x, const S* dy, S* dx, int64_t samples, int64_t sample_ld,
                                      int64_t rows, int64_t C, int64_t ld, const T* c1, const T* c2,
                                      const T* shift, const T* c3, int64_t coef_ld, const T* w,
                                      const ElementTerm<T>& term, bool stream);

  // Local response normalization (window.cpp): positions [0, len) of one sample's C channels,
  // `stride` apart; d = k + alpha/size * sum of x^2 over a window of `size` channels, y = x d^-beta.
  void (*lrn_forward)(const S* x, S* y, int64_t C, int64_t stride, int64_t len, int64_t size, T alpha,
                      T beta, T k);
  void (*lrn_backward)(const S* x, const S* dy, S* dx, int64_t C, int64_t stride, int64_t len,
                       int64_t size, T alpha, T beta, T k);

  // Pointwise epilogues (op: a Pointwise), channels-first chunks: y = f(u)*scale + offset; the
  // seven sums of pointwise.h into sums[0..6]; dx = c1*dy*f'(u) + c2*(x - center) + c3.
  // (stream: as affine's)
  void (*pointwise)(int op, const S* x, S* y, int64_t n, const PointwisePlane<T>& c, bool stream);
  void (*pointwise_sums)(int op, const S* x, const S* dy, int64_t n, const PointwisePlane<T>& c,
                         double* sums, T* g);  // g: dy*f'(u) per element, or null
  void (*pointwise_backward)(int op, const S* x, const S* dy, S* dx, int64_t n,
                             const PointwisePlane<T>& c, T c1, T c2, T c3, bool stream);

  // The fold of n cells that are each one column (cells.cpp), from their moments (pmean, pm2
  // over `count` elements; not aliasing the outputs): var = pm2/count, rstd = 1/sqrt(var + eps),
  // and the cell's affine shift = T(mean), a = T(rstd*scale [*weight]), b = T([bias +]
  // (shift - mean)*a) in double. weight, bias per cell, or null; mean and var (both or neither)
  // null: only rstd and the coefficients are written.
  void (*finish_cells)(int64_t n, double count, double eps, double scale, const double* pmean, const double* pm2,
                       const T* weight, const T* bias, double* mean, double* var, double* rstd, T* shift, T* a,
                       T* b);
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<f16> f16s;
  Kernels<bf16> bf16s;
  // Per column c < C: the moments of `parts` parts, part j's (mean, m2) at mean[j*stride + c]
  // with part_n elements (the last one last_n), merged (moments.h: merge) in part order,
  // alternately into two chains and then the two, to out_mean[c], out_m2[c]. Columns go a
  // vector at a time: a channels-last chunk's C moments are side by side.
  void (*merge_columns)(const double* mean, const double* m2, int64_t stride, int64_t C,
                        int64_t parts, int64_t part_n, int64_t last_n, double* out_mean, double* out_m2);
  template <class S> const Kernels<S>& get() const;
};
template <> inline const Kernels<float>& KernelTable::get<float>() const { return f32; }
template <> inline const Kernels<double>& KernelTable::get<double>() const { return f64; }
template <> inline const Kernels<f16>& KernelTable::get<f16>() const { return f16s; }
template <> inline const Kernels<bf16>& KernelTable::get<bf16>() const { return bf16s; }

namespace baseline { KernelTable make_table(); }
namespace avx2 { KernelTable make_table(); }
namespace avx512 { KernelTable make_table(); }
namespace avx512bf16 { KernelTable make_table(); }  // avx512 plus hardware float -> bfloat16

const KernelTable& kernels();  // the table chosen at load (dispatch.cpp)

}  // namespace nk
