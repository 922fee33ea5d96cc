// Fills this ISA level's function table.
#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

template <class T>
static Kernels<T> kernels_of() {
  return Kernels<T>{&moments<T>, &dot<T>, &col_accumulate<T>, &affine<T>, &backward_apply<T>};
}

KernelTable make_table() {
  return KernelTable{NK_ISA_NAME, kernels_of<float>(), kernels_of<double>()};
}

}  // namespace NK_ISA_NS
}  // namespace nk
