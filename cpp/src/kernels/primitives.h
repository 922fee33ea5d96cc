// Declarations of one ISA level's primitives (see table.h for what each computes).
#pragma once
#include <cstdint>

#include "table.h"
#include "vec.h"

namespace nk {
namespace NK_ISA_NS {

template <class T> void moments(const T* x, int64_t n, double* mean, double* m2);
template <class T> void dot(const T* x, const T* dy, const T* w, int64_t n, T shift, double* A, double* B);
template <class T> void col_accumulate(const T* x, const T* dy, int64_t n, T shift, T a, T b, T* gsum, T* bsum);
template <class T> void affine(const T* x, T* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                              const T* residual, bool relu);
template <class T> void backward_apply(const T* x, const T* dy, T* dx, int64_t n, T c1, T c2, T shift, T c3, const T* w);

}  // namespace NK_ISA_NS
}  // namespace nk
