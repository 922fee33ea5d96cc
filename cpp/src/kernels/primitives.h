// Declarations of one ISA level's primitives (see table.h for what each computes). S is the
// storage type of x, dy, y and dx; T = compute_t<S> the type of shifts, scales and weights.
#pragma once
#include <cstdint>

#include "normkit/dtypes.h"
#include "table.h"
#include "vec.h"

namespace nk {
namespace NK_ISA_NS {

template <class S> void moments(const S* x, int64_t n, double* mean, double* m2);
template <class S> void dot(const S* x, const S* dy, const compute_t<S>* w, int64_t n, compute_t<S> shift, double* A, double* B);
template <class S, class T> void col_accumulate(const S* x, const S* dy, int64_t n, T shift, T a, T b, T* gsum, T* bsum);
template <class S, class T> void affine(const S* x, S* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                                        const S* residual, bool relu);
template <class S, class T> void backward_apply(const S* x, const S* dy, S* dx, int64_t n, T c1, T c2, T shift, T c3, const T* w);

}  // namespace NK_ISA_NS
}  // namespace nk
