#include "saved.h"

#include <pybind11/numpy.h>

#include "arrays.h"

namespace nkpy {

namespace {

// A statistics argument of the Python constructor: None, or G float64 values (copied).
std::vector<double> stats_of(const py::object& a, int64_t G, const char* name) {
  if (a.is_none()) return {};
  const auto arr = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!arr || arr.ndim() != 1 || arr.size() != G)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(G) + " float64 values");
  return std::vector<double>(arr.data(), arr.data() + G);
}

// A read-only float64 view of v that keeps its Saved alive.
py::object stats_view(const py::object& self, const std::vector<double>& v, bool has) {
  if (!has) return py::none();
  py::array_t<double> a({py::ssize_t(v.size())}, {py::ssize_t(sizeof(double))}, v.data(), self);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return std::move(a);
}

}  // namespace

void def_saved(py::module_& m) {
  py::class_<Saved>(m, "Saved", "What a backward needs from its forward.")
      .def(py::init([](const nk::Plan& plan, py::object x, py::object mean, py::object rstd,
                       py::object weight, bool batch_stats, py::object shape) {
             nk::check_plan(plan);
             const int64_t G = plan.num_groups();
             const bool has = !mean.is_none() && !rstd.is_none();
             return Saved{plan, std::move(x), stats_of(has ? mean : py::none(), G, "mean"),
                          stats_of(has ? rstd : py::none(), G, "rstd"), has, std::move(weight),
                          batch_stats, std::move(shape)};
           }),
           py::arg("plan"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
           py::arg("batch_stats"), py::arg("shape"))
      .def_property_readonly("plan", [](Saved& s) -> nk::Plan& { return s.plan; },
                             py::return_value_policy::reference_internal)
      .def_readonly("x", &Saved::x)
      .def_property_readonly("mean", [](py::object self) {
        const Saved& s = self.cast<const Saved&>();
        return stats_view(self, s.mean, s.has_stats);
      })
      .def_property_readonly("rstd", [](py::object self) {
        const Saved& s = self.cast<const Saved&>();
        return stats_view(self, s.rstd, s.has_stats);
      })
      .def_readonly("weight", &Saved::weight)
      .def_readonly("batch_stats", &Saved::batch_stats)
      .def_property("shape", [](const Saved& s) { return s.shape.is_none() ? s.x.attr("shape") : s.shape; },
                    [](Saved& s, py::object shape) { s.shape = std::move(shape); });
}

}  // namespace nkpy
