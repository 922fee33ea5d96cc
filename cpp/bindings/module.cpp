// The Python binding: arrays in, kernel call with the GIL released, nothing else. Argument
// checking with friendly messages happens in python/normkit/_checks.py; the checks here only
// guarantee that a wrong call can never read or write out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "normkit/normkit.h"

namespace py = pybind11;

namespace {

template <class T>
T* data_of(const py::object& obj, int64_t size, const char* name, bool writable) {
  if (obj.is_none()) return nullptr;
  auto arr = py::cast<py::array>(obj);
  if (!py::isinstance<py::array_t<T>>(arr) || !(arr.flags() & py::array::c_style))
    throw py::type_error(std::string(name) + ": expected a C-contiguous array of the input's dtype");
  if (arr.size() != size)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(size) + " elements, got " +
                          std::to_string(arr.size()));
  if (writable && !arr.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

double* stats_of(const py::object& obj, int64_t size, const char* name) {
  return data_of<double>(obj, size, name, false);
}

bool is_f64(const py::array& x) {
  if (py::isinstance<py::array_t<double>>(x)) return true;
  if (py::isinstance<py::array_t<float>>(x)) return false;
  throw py::type_error("x: expected float32 or float64");
}

template <class T>
py::tuple moments_impl(const nk::Plan& plan, const py::array& x) {
  const T* px = data_of<T>(x, plan.planes() * plan.S, "x", false);
  py::array_t<double> mean(plan.num_groups()), var(plan.num_groups());
  double *pm = mean.mutable_data(), *pv = var.mutable_data();
  {
    py::gil_scoped_release nogil;
    nk::group_moments<T>(plan, px, pm, pv);
  }
  return py::make_tuple(mean, var);
}

template <class T>
void normalize_impl(const nk::Plan& plan, const py::array& x, const py::object& mean,
                    const py::object& rstd, const py::object& weight, const py::object& bias,
                    const py::object& y, const py::object& residual, bool relu) {
  const int64_t n = plan.planes() * plan.S, G = plan.num_groups(), A = plan.affine_size();
  const T* px = data_of<T>(x, n, "x", false);
  const double *pm = stats_of(mean, G, "mean"), *pr = stats_of(rstd, G, "rstd");
  const T *pw = data_of<T>(weight, A, "weight", false), *pb = data_of<T>(bias, A, "bias", false);
  T* py_ = data_of<T>(y, n, "out", true);
  const T* pres = data_of<T>(residual, n, "residual", false);
  if (!pm || !pr || !py_) throw py::value_error("mean, rstd and out are required");
  py::gil_scoped_release nogil;
  nk::normalize<T>(plan, px, pm, pr, pw, pb, py_, pres, relu);
}

template <class T>
void backward_impl(const nk::Plan& plan, const py::array& x, const py::object& dy,
                   const py::object& mean, const py::object& rstd, const py::object& weight,
                   bool batch_stats, const py::object& dx, const py::object& dweight,
                   const py::object& dbias) {
  const int64_t n = plan.planes() * plan.S, G = plan.num_groups(), A = plan.affine_size();
  const T *px = data_of<T>(x, n, "x", false), *pdy = data_of<T>(dy, n, "dy", false);
  const double *pm = stats_of(mean, G, "mean"), *pr = stats_of(rstd, G, "rstd");
  const T* pw = data_of<T>(weight, A, "weight", false);
  T* pdx = data_of<T>(dx, n, "dx", true);
  T *pdw = data_of<T>(dweight, A, "dweight", true), *pdb = data_of<T>(dbias, A, "dbias", true);
  if (!px || !pdy || !pm || !pr) throw py::value_error("x, dy, mean and rstd are required");
  py::gil_scoped_release nogil;
  nk::normalize_backward<T>(plan, px, pdy, pm, pr, pw, batch_stats, pdx, pdw, pdb);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "normkit's C++ core: plans, statistics, normalize and its backward";
  py::register_exception<std::invalid_argument>(m, "PlanError", PyExc_ValueError);

  py::class_<nk::Plan>(m, "Plan")
      .def_readonly("N", &nk::Plan::N)
      .def_readonly("C", &nk::Plan::C)
      .def_readonly("S", &nk::Plan::S)
      .def_readonly("channels_per_group", &nk::Plan::channels_per_group)
      .def_readonly("skip_mean", &nk::Plan::skip_mean)
      .def_readonly("column_affine", &nk::Plan::column_affine)
      .def_property_readonly("num_groups", &nk::Plan::num_groups)
      .def_property_readonly("group_counts", &nk::group_counts);

  m.def("plan_per_channel", &nk::plan_per_channel, py::arg("N"), py::arg("C"), py::arg("S"));
  m.def("plan_per_channel_in_sets", &nk::plan_per_channel_in_sets, py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("set_of_sample"));
  m.def("plan_per_sample_group", &nk::plan_per_sample_group, py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("num_groups"));
  m.def("plan_per_row", &nk::plan_per_row, py::arg("rows"), py::arg("M"), py::arg("skip_mean"));

  m.def("group_moments", [](const nk::Plan& plan, const py::array& x) {
    return is_f64(x) ? moments_impl<double>(plan, x) : moments_impl<float>(plan, x);
  }, py::arg("plan"), py::arg("x"), "Per-group mean and biased variance (float64 arrays).");

  m.def("normalize", [](const nk::Plan& plan, const py::array& x, const py::object& mean,
                        const py::object& rstd, const py::object& weight, const py::object& bias,
                        const py::object& out, const py::object& residual, bool relu) {
    if (is_f64(x)) normalize_impl<double>(plan, x, mean, rstd, weight, bias, out, residual, relu);
    else normalize_impl<float>(plan, x, mean, rstd, weight, bias, out, residual, relu);
  }, py::arg("plan"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
     py::arg("bias"), py::arg("out"), py::arg("residual") = py::none(), py::arg("relu") = false);

  m.def("normalize_backward", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                                 const py::object& mean, const py::object& rstd,
                                 const py::object& weight, bool batch_stats, const py::object& dx,
                                 const py::object& dweight, const py::object& dbias) {
    if (is_f64(x)) backward_impl<double>(plan, x, dy, mean, rstd, weight, batch_stats, dx, dweight, dbias);
    else backward_impl<float>(plan, x, dy, mean, rstd, weight, batch_stats, dx, dweight, dbias);
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("rstd"),
     py::arg("weight"), py::arg("batch_stats"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"));

  m.def("set_num_threads", &nk::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &nk::get_num_threads);
  m.def("isa_name", &nk::isa_name);
  m.def("supported_isas", &nk::supported_isas);
  m.def("set_isa", &nk::set_isa, py::arg("name"));
}
