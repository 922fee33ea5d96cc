// Fills this ISA level's function table.
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

template <class S, class T = compute_t<S>>
static Kernels<S> kernels_of() {
  return Kernels<S>{&moments<S>,     &sum_squares<S>, &dot<S>, &dot_columns<S, T>, &affine<S, T>,
                    &backward_apply<S, T>, &rows_moments<S>, &rows_dot<S>, &rows_affine<S, T>,
                    &rows_backward_apply<S, T>, &rows_affine_rows<S, T>,
                    &rows_dot_row_sums<S, T>, &rows_backward_apply_weighted<S, T>, &rows_affine_samples<S, T>,
                    &rows_backward_apply_samples<S, T>, &lrn_forward<S, T>,
                    &lrn_backward<S, T>, &pointwise<S, T>,
                    &pointwise_sums<S, T>, &pointwise_backward<S, T>, &finish_cells<T>};
}

KernelTable make_table() {
  return KernelTable{NK_ISA_NAME,        kernels_of<float>(), kernels_of<double>(), kernels_of<f16>(),
                     kernels_of<bf16>(), &merge_columns};
}

}  // namespace NK_ISA_NS
}  // namespace nk
