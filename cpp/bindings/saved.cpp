#include "saved.h"

namespace nkpy {

namespace py = pybind11;

void def_saved(py::module_& m) {
  py::class_<Saved>(m, "Saved", "What a backward needs from its forward.")
      .def(py::init([](const nk::Plan& plan, py::object x, py::object mean, py::object rstd,
                       py::object weight, bool batch_stats, py::object shape) {
             return Saved{plan, std::move(x), std::move(mean), std::move(rstd), std::move(weight),
                          batch_stats, std::move(shape)};
           }),
           py::arg("plan"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
           py::arg("batch_stats"), py::arg("shape"))
      .def_property_readonly("plan", [](Saved& s) -> nk::Plan& { return s.plan; },
                             py::return_value_policy::reference_internal)
      .def_readonly("x", &Saved::x)
      .def_readonly("mean", &Saved::mean)
      .def_readonly("rstd", &Saved::rstd)
      .def_readonly("weight", &Saved::weight)
      .def_readonly("batch_stats", &Saved::batch_stats)
      .def_property("shape", [](const Saved& s) { return s.shape.is_none() ? s.x.attr("shape") : s.shape; },
                    [](Saved& s, py::object shape) { s.shape = std::move(shape); });
}

}  // namespace nkpy
