// The per-cell fold of cells that are each one column (LayerNorm2d's (n, h, w) cells,
// BatchLayerNorm2d's feature cells and batch columns): from a cell's moments its variance,
// rstd and the three coefficients of its affine pass. A cell's count of them is a tensor's
// worth (one per position), so the fold runs at the ISA level's vector width: compiled outside
// the kernels, as SSE2, its square root and division per cell took as long as BLN's apply.
#include <cmath>

#include "primitives.h"

namespace nk {
namespace NK_ISA_NS {

// Unaliased pointers and the weight's and bias's presence outside the loop: the compiler
// vectorizes it. Square root and division are correctly rounded at every width, so the results
// are those of the scalar loop.
template <class T, bool Weight, bool Bias, bool Moments>
static void finish_cells_impl(int64_t n, double count, double eps, double scale, const double* __restrict__ pmean,
                              const double* __restrict__ pm2, const T* __restrict__ weight,
                              const T* __restrict__ bias, double* __restrict__ mean, double* __restrict__ var,
                              double* __restrict__ rstd, T* __restrict__ shift, T* __restrict__ a,
                              T* __restrict__ b) {
  for (int64_t i = 0; i < n; ++i) {
    const double mu = pmean[i], v = pm2[i] / count, r = 1.0 / std::sqrt(v + eps);
    if (Moments) mean[i] = mu, var[i] = v;
    rstd[i] = r;
    const double sc = Weight ? r * scale * double(weight[i]) : r * scale, offset = Bias ? double(bias[i]) : 0.0;
    const T sh = T(mu);
    shift[i] = sh, a[i] = T(sc), b[i] = T(offset + (double(sh) - mu) * sc);
  }
}

template <class T, bool Moments>
static void finish_cells_of(int64_t n, double count, double eps, double scale, const double* pmean, const double* pm2,
                            const T* weight, const T* bias, double* mean, double* var, double* rstd, T* shift, T* a,
                            T* b) {
  if (weight && bias)
    finish_cells_impl<T, true, true, Moments>(n, count, eps, scale, pmean, pm2, weight, bias, mean, var, rstd, shift, a, b);
  else if (weight)
    finish_cells_impl<T, true, false, Moments>(n, count, eps, scale, pmean, pm2, weight, bias, mean, var, rstd, shift, a, b);
  else if (bias)
    finish_cells_impl<T, false, true, Moments>(n, count, eps, scale, pmean, pm2, weight, bias, mean, var, rstd, shift, a, b);
  else
    finish_cells_impl<T, false, false, Moments>(n, count, eps, scale, pmean, pm2, weight, bias, mean, var, rstd, shift, a, b);
}

template <class T>
void finish_cells(int64_t n, double count, double eps, double scale, const double* pmean, const double* pm2,
                  const T* weight, const T* bias, double* mean, double* var, double* rstd, T* shift, T* a, T* b) {
  if (mean) finish_cells_of<T, true>(n, count, eps, scale, pmean, pm2, weight, bias, mean, var, rstd, shift, a, b);
  else finish_cells_of<T, false>(n, count, eps, scale, pmean, pm2, weight, bias, mean, var, rstd, shift, a, b);
}

template void finish_cells<float>(int64_t, double, double, double, const double*, const double*, const float*,
                                  const float*, double*, double*, double*, float*, float*, float*);
template void finish_cells<double>(int64_t, double, double, double, const double*, const double*, const double*,
                                   const double*, double*, double*, double*, double*, double*, double*);

}  // namespace NK_ISA_NS
}  // namespace nk
