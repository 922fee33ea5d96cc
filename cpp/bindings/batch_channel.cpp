// Bindings of BatchChannelNorm2d's folds: float64 cell arrays in, float64 coefficients out
// (normkit.h: batch_channel_fold).
#include "batch_channel.h"

#include <pybind11/numpy.h>

#include "arrays.h"
#include "normkit/normkit.h"

namespace py = pybind11;

namespace nkpy {

namespace {

// The four parameters as float64 arrays of C, C, G and G values.
nk::BatchChannelParams params_of(const py::object& bn_weight, const py::object& bn_bias, const py::object& gn_weight,
                                 const py::object& gn_bias, int64_t C, int64_t G) {
  return {required<double>(bn_weight, C, "bn_weight", false), required<double>(bn_bias, C, "bn_bias", false),
          required<double>(gn_weight, G, "gn_weight", false), required<double>(gn_bias, G, "gn_bias", false)};
}

}  // namespace

void def_batch_channel(py::module_& m) {
  m.def("batch_channel_fold", [](int64_t N, int64_t C, int64_t G, int64_t S, double eps, const py::object& mean,
                                 const py::object& var, const py::object& bn_weight, const py::object& bn_bias,
                                 const py::object& gn_weight, const py::object& gn_bias, const py::object& mu,
                                 const py::object& batch_var) {
    nk::check_batch_channel_cells(N, C, G, S);
    const nk::BatchChannelParams p = params_of(bn_weight, bn_bias, gn_weight, gn_bias, C, G);
    const double *pm = required<double>(mean, N * C, "mean", false), *pv = required<double>(var, N * C, "var", false);
    const bool pool = mu.is_none();
    if (pool != batch_var.is_none()) throw py::value_error("batch_channel_fold: give both mu and batch_var, or neither");
    py::array_t<double> mu_out, var_out;
    double *pmu, *pbv;
    if (pool) {
      mu_out = doubles(C), var_out = doubles(C);
      pmu = mu_out.mutable_data(), pbv = var_out.mutable_data();
    } else {  // read only: pool is false
      pmu = required<double>(mu, C, "mu", false), pbv = required<double>(batch_var, C, "batch_var", false);
    }
    py::array_t<double> r = doubles(C), scale = doubles(N * C), offset = doubles(N * C), mu_g = doubles(N * G),
                        r_g = doubles(N * G);
    nk::batch_channel_fold(N, C, G, S, eps, pool, pm, pv, pmu, pbv, p, r.mutable_data(), scale.mutable_data(),
                           offset.mutable_data(), mu_g.mutable_data(), r_g.mutable_data());
    return py::make_tuple(pool ? py::object(mu_out) : mu, pool ? py::object(var_out) : batch_var, r, scale, offset,
                          mu_g, r_g);
  }, py::arg("N"), py::arg("C"), py::arg("G"), py::arg("S"), py::arg("eps"), py::arg("mean"), py::arg("var"),
     py::arg("bn_weight"), py::arg("bn_bias"), py::arg("gn_weight"), py::arg("gn_bias"), py::arg("mu") = py::none(),
     py::arg("batch_var") = py::none(),
     "BatchChannelNorm2d's forward fold from its N*C cells' moments (float64): (mu, batch_var, r, scale, offset, "
     "mu_g, r_g), the batch part's statistics pooled from the cells where mu and batch_var are None.");

  m.def("batch_channel_infer", [](const py::array& x, int64_t G, double eps, const py::object& mu,
                                  const py::object& batch_var, const py::object& bn_weight, const py::object& bn_bias,
                                  const py::object& gn_weight, const py::object& gn_bias, const py::object& out) {
    if (x.ndim() < 2) throw py::value_error("batch_channel_infer: x must be (N, C, *spatial)");
    int64_t S = 1;
    for (py::ssize_t d = 2; d < x.ndim(); ++d) S *= x.shape(d);
    const int64_t N = x.shape(0), C = x.shape(1);
    nk::check_batch_channel_cells(N, C, G, S);
    const nk::BatchChannelParams p = params_of(bn_weight, bn_bias, gn_weight, gn_bias, C, G);
    const double *pmu = required<double>(mu, C, "mu", false), *pbv = required<double>(batch_var, C, "batch_var", false);
    py::array_t<double> mean = doubles(N * C), var = doubles(N * C), r = doubles(C), scale = doubles(N * C),
                        offset = doubles(N * C), mu_g = doubles(N * G), r_g = doubles(N * G);
    dispatch(x, [&](auto s) {
      using S_ = decltype(s);
      const S_* px = required<S_>(x, N * C * S, "x", false);
      S_* py_ = required<S_>(out, N * C * S, "out", true);
      double *pm = mean.mutable_data(), *pv = var.mutable_data(), *pr = r.mutable_data();
      double *psc = scale.mutable_data(), *pof = offset.mutable_data(), *pmg = mu_g.mutable_data(), *prg = r_g.mutable_data();
      py::gil_scoped_release nogil;
      nk::batch_channel_infer<S_>(N, C, G, S, px, eps, pmu, pbv, p, py_, pm, pv, pr, psc, pof, pmg, prg);
    });
    return py::make_tuple(mean, var, r, scale, offset, mu_g, r_g);
  }, py::arg("x"), py::arg("G"), py::arg("eps"), py::arg("mu"), py::arg("batch_var"), py::arg("bn_weight"),
     py::arg("bn_bias"), py::arg("gn_weight"), py::arg("gn_bias"), py::arg("out"),
     "BatchChannelNorm2d's inference in one pass over x (N, C, *spatial) with the batch part's mu and batch_var "
     "(float64): out = the layer's output; returns (mean, var) of the N*C cells and batch_channel_fold's "
     "(r, scale, offset, mu_g, r_g).");

  m.def("batch_channel_fold_backward", [](int64_t N, int64_t C, int64_t G, int64_t S, bool batch,
                                          const py::object& sum_dy, const py::object& sum_dy_xmu,
                                          const py::object& mean, const py::object& var, const py::object& mu,
                                          const py::object& r, const py::object& mu_g, const py::object& r_g,
                                          const py::object& bn_weight, const py::object& bn_bias,
                                          const py::object& gn_weight, const py::object& gn_bias) {
    nk::check_batch_channel_cells(N, C, G, S);
    const nk::BatchChannelParams p = params_of(bn_weight, bn_bias, gn_weight, gn_bias, C, G);
    const int64_t K = N * C;
    const double *pB = required<double>(sum_dy, K, "sum_dy", false), *pA = required<double>(sum_dy_xmu, K, "sum_dy_xmu", false);
    const double *pm = required<double>(mean, K, "mean", false), *pv = required<double>(var, K, "var", false);
    const double *pmu = required<double>(mu, C, "mu", false), *pr = required<double>(r, C, "r", false);
    const double *pmg = required<double>(mu_g, N * G, "mu_g", false), *prg = required<double>(r_g, N * G, "r_g", false);
    py::array_t<double> c1 = doubles(K), c2 = doubles(K), c3 = doubles(K), dbw = doubles(C), dbb = doubles(C),
                        dgw = doubles(G), dgb = doubles(G);
    nk::batch_channel_fold_backward(N, C, G, S, batch, pB, pA, pm, pv, pmu, pr, pmg, prg, p, c1.mutable_data(),
                                    c2.mutable_data(), c3.mutable_data(), dbw.mutable_data(), dbb.mutable_data(),
                                    dgw.mutable_data(), dgb.mutable_data());
    return py::make_tuple(c1, c2, c3, dbw, dbb, dgw, dgb);
  }, py::arg("N"), py::arg("C"), py::arg("G"), py::arg("S"), py::arg("batch"), py::arg("sum_dy"),
     py::arg("sum_dy_xmu"), py::arg("mean"), py::arg("var"), py::arg("mu"), py::arg("r"), py::arg("mu_g"),
     py::arg("r_g"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("gn_weight"), py::arg("gn_bias"),
     "BatchChannelNorm2d's backward fold from its cells' sums (float64): (c1, c2, c3) per cell and the gradients "
     "(d_bn_weight, d_bn_bias, d_gn_weight, d_gn_bias).");
}

}  // namespace nkpy
