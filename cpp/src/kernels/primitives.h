// Declarations of one ISA level's primitives (see table.h for what each computes). S is the
// storage type of x, dy, y and dx; T = compute_t<S> the type of shifts, scales and weights.
#pragma once
#include <cstdint>

#include "normkit/dtypes.h"
#include "table.h"
#include "vec.h"

namespace nk {
namespace NK_ISA_NS {

template <class S> void moments(const S* x, int64_t n, int64_t count, double* mean, double* m2);
template <class S> void sum_squares(const S* x, int64_t n, double* q);
template <class S> void dot(const S* x, const S* dy, const compute_t<S>* w, int64_t n, compute_t<S> shift, double* A, double* B);
template <class S, class T> void dot_columns(const S* x, const S* dy, const T* w, int64_t n, T shift, T a, T b,
                                             double* A, double* B, T* gsum, T* bsum);
template <class S, class T> void affine(const S* x, S* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                                        const S* residual, bool relu, bool stream);
// Channels-last: `rows` rows of C channels; per-channel results go to out[c].
template <class S> void rows_moments(const S* x, int64_t rows, int64_t C, int64_t ld, double* mean, double* m2);
template <class S> void rows_dot(const S* x, const S* dy, int64_t rows, int64_t C, int64_t ld,
                                 const compute_t<S>* shift, double* A, double* B);
template <class S, class T> void rows_affine(const S* x, S* y, int64_t rows, int64_t C, int64_t ld, const T* shift,
                                             const T* a, const T* b, const S* residual, bool relu, bool stream);
template <class S, class T> void rows_backward_apply(const S* x, const S* dy, S* dx, int64_t rows, int64_t C,
                                                     int64_t ld, const T* c1, const T* c2, const T* shift, const T* c3,
                                                     bool stream);
template <class S, class T> void backward_apply(const S* x, const S* dy, S* dx, int64_t n, T c1, T c2, T shift, T c3, const T* w,
                                                bool stream);
template <class S, class T> void pointwise(int op, const S* x, S* y, int64_t n, const PointwisePlane<T>& c,
                                           bool stream);
template <class S, class T> void pointwise_sums(int op, const S* x, const S* dy, int64_t n,
                                                const PointwisePlane<T>& c, double* sums, T* g);
template <class S, class T> void pointwise_backward(int op, const S* x, const S* dy, S* dx, int64_t n,
                                                    const PointwisePlane<T>& c, T c1, T c2, T c3, bool stream);
template <class S, class T> void rows_dot_row_sums(const S* x, const S* dy, int64_t rows, int64_t C, int64_t ld,
                                                   const T* shift, const T* w, const T* a, const T* b, double* A,
                                                   double* B, double* gsum, double* bsum);
template <class S, class T> void rows_affine_rows(const S* x, S* y, int64_t rows, int64_t C, int64_t ld,
                                                  const T* shift, const T* a, const T* b, const T* g, const T* h,
                                                  bool stream);
template <class S, class T> void rows_backward_apply_weighted(const S* x, const S* dy, S* dx, int64_t rows,
                                                              int64_t C, int64_t ld, const T* c1, const T* c2,
                                                              const T* shift, const T* c3, const T* w,
                                                              bool stream);
template <class S, class T> void rows_affine_samples(const S* x, S* y, int64_t samples, int64_t sample_ld,
                                                     int64_t rows, int64_t C, int64_t ld, const T* shift, const T* a,
                                                     const T* b, int64_t coef_ld, const T* g, const T* h,
                                                     const ElementTerm<T>& term, bool stream);
template <class S, class T> void rows_backward_apply_samples(const S* x, const S* dy, S* dx, int64_t samples,
                                                             int64_t sample_ld, int64_t rows, int64_t C, int64_t ld,
                                                             const T* c1, const T* c2, const T* shift, const T* c3,
                                                             int64_t coef_ld, const T* w, const ElementTerm<T>& term,
                                                             bool stream);
template <class S, class T> void lrn_forward(const S* x, S* y, int64_t C, int64_t stride, int64_t len, int64_t size,
                                             T alpha, T beta, T k);
template <class S, class T> void lrn_backward(const S* x, const S* dy, S* dx, int64_t C, int64_t stride, int64_t len,
                                              int64_t size, T alpha, T beta, T k);
template <class T> void finish_cells(int64_t n, double count, double eps, double scale, const double* pmean,
                                     const double* pm2, const T* weight, const T* bias, double* mean, double* var,
                                     double* rstd, T* shift, T* a, T* b);
void merge_columns(const double* mean, const double* m2, int64_t stride, int64_t C, int64_t parts,
                   int64_t part_n, int64_t last_n, double* out_mean, double* out_m2);

}  // namespace NK_ISA_NS
}  // namespace nk
