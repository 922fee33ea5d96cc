// Bindings of BatchLayerNorm2d's two steps and of running_update: checked views in, the step with
// the GIL released, float64 statistics out (normkit.h: batch_layer_forward).
#include "batch_layer.h"

#include <pybind11/numpy.h>

#include "arrays.h"
#include "normkit/normkit.h"

namespace py = pybind11;

namespace nkpy {

void def_batch_layer(py::module_& m) {
  m.def("batch_layer_forward", [](const nk::Plan& feature, const py::array& x, double eps, double feature_scale,
                                  double batch_scale, const py::object& weight, const py::object& bias,
                                  const py::object& out, const py::object& running) {
    py::tuple stats;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(feature);
      const int64_t n = feature.planes() * feature.S, G = feature.num_groups(), F = feature.C * feature.S;
      const S* px = required<S>(x, n, "x", false);
      S* py_ = required<S>(out, n, "out", true);
      const T *pw = required<T>(weight, feature.S, "weight", false), *pb = required<T>(bias, feature.S, "bias", false);
      const bool batch_stats = running.is_none();
      py::object mean_b = running, var_b = running;
      if (batch_stats) {
        mean_b = doubles(F), var_b = doubles(F);
      } else {
        if (!py::isinstance<py::tuple>(running) || py::len(running) != 2)
          throw py::type_error("running: expected None or a tuple (mean_b, var_b)");
        // The layer's running statistics as they are (float32 for a float32 layer), copied as
        // float64 into arrays from the output cache: the copies the backward keeps, whatever
        // happens to the buffers after. NumPy's astype made fresh ones every call, whose page
        // faults were a fifth of a small BLN's inference.
        const auto as_doubles = [&](const py::object& a) -> py::object {
          if (!py::isinstance<py::array>(a) || py::reinterpret_borrow<py::array>(a).size() != F) return a;  // required() says why
          py::array_t<double> d = doubles(F);
          py::module_::import("numpy").attr("copyto")(d, a.attr("reshape")(-1));
          return std::move(d);
        };
        mean_b = as_doubles(running.cast<py::tuple>()[0]), var_b = as_doubles(running.cast<py::tuple>()[1]);
      }
      double* pmb = required<double>(mean_b, F, "running mean_b", batch_stats);
      double* pvb = required<double>(var_b, F, "running var_b", batch_stats);
      py::array_t<double> mean = doubles(G), var = doubles(G), rstd = doubles(G), rstd_b = doubles(F);
      double *pm = mean.mutable_data(), *pv = var.mutable_data(), *pr = rstd.mutable_data();
      double* prb = rstd_b.mutable_data();
      {
        py::gil_scoped_release nogil;
        nk::batch_layer_forward<S>(feature, px, eps, feature_scale, batch_scale, batch_stats, pmb, pvb, prb, pw, pb,
                                   py_, pm, pv, pr);
      }
      stats = py::make_tuple(mean, rstd, mean_b, var_b, rstd_b);
    });
    return stats;
  }, py::arg("feature"), py::arg("x"), py::arg("eps"), py::arg("feature_scale"), py::arg("batch_scale"),
     py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("running") = py::none(),
     "BatchLayerNorm2d's output into out, with the batch's own moments per (c, hw) (running None) or the "
     "given (mean_b, var_b), C*H*W values each of any float dtype; returns (mean_f, rstd_f, mean_b, var_b, "
     "rstd_b), float64.");

  m.def("batch_layer_backward", [](const nk::Plan& feature, const py::array& x, const py::object& dy,
                                   const py::object& mean_f, const py::object& rstd_f, const py::object& mean_b,
                                   const py::object& rstd_b, double feature_scale, double batch_scale, bool batch_stats,
                                   const py::object& weight, const py::object& dx) {
    py::tuple out;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(feature);
      const int64_t n = feature.planes() * feature.S, G = feature.num_groups(), F = feature.C * feature.S;
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      S* pdx = required<S>(dx, n, "dx", true);
      const T* pw = required<T>(weight, feature.S, "weight", false);
      const double *pm = required<double>(mean_f, G, "mean_f", false), *pr = required<double>(rstd_f, G, "rstd_f", false);
      const double *pmb = required<double>(mean_b, F, "mean_b", false), *prb = required<double>(rstd_b, F, "rstd_b", false);
      py::array_t<double> dw = doubles(feature.S), db = doubles(feature.S);
      double *pdw = dw.mutable_data(), *pdb = db.mutable_data();
      {
        py::gil_scoped_release nogil;
        nk::batch_layer_backward<S>(feature, px, pdy, pm, pr, pmb, prb, feature_scale, batch_scale, batch_stats, pw,
                                    pdx, pdw, pdb);
      }
      out = py::make_tuple(dw, db);
    });
    return out;
  }, py::arg("feature"), py::arg("x"), py::arg("dy"), py::arg("mean_f"), py::arg("rstd_f"), py::arg("mean_b"),
     py::arg("rstd_b"), py::arg("feature_scale"), py::arg("batch_scale"), py::arg("batch_stats"),
     py::arg("weight"), py::arg("dx"), "BatchLayerNorm2d's dx into dx; returns (dweight, dbias) per channel.");

  m.def("running_update", [](const py::array& running, const py::object& value, double factor, double value_scale) {
    const int64_t n = running.size();
    const double* pv = required<double>(value, n, "value", false);
    auto go = [&](auto* p) {
      py::gil_scoped_release nogil;
      nk::running_update(p, pv, n, factor, value_scale);
    };
    switch (dt_of(running)) {
      case Dt::f32: return go(required<float>(running, n, "running", true));
      case Dt::f64: return go(required<double>(running, n, "running", true));
      default: throw py::type_error("running: expected float32 or float64, got " + dtype_of(running));
    }
  }, py::arg("running"), py::arg("value"), py::arg("factor"), py::arg("value_scale") = 1.0,
     "running = (1 - factor)*running + factor*value_scale*value, in place.");
}

}  // namespace nkpy
