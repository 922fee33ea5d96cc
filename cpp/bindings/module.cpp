// The Python binding: arrays in, kernel call with the GIL released, nothing else. Argument
// checking with friendly messages happens in python/normkit/_checks.py; the checks here only
// guarantee that a wrong call can never read or write out of bounds. float16 and bfloat16 arrays
// (ml_dtypes) come with float32 weights, biases and parameter gradients.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "arrays.h"
#include "batch_channel.h"
#include "batch_layer.h"
#include "forward_fast.h"
#include "saved.h"
#include "normkit/conv.h"
#include "normkit/normkit.h"

namespace py = pybind11;
using namespace nkpy;

namespace {

template <class S>
py::tuple moments_impl(const nk::Plan& plan, const py::array& x) {
  nk::check_plan(plan);  // before any size is computed from it
  const S* px = required<S>(x, plan.planes() * plan.S, "x", false);
  py::array_t<double> mean = doubles(plan.num_groups()), var = doubles(plan.num_groups());
  double *pm = mean.mutable_data(), *pv = var.mutable_data();
  {
    py::gil_scoped_release nogil;
    nk::group_moments<S>(plan, px, pm, pv);
  }
  return py::make_tuple(mean, var);
}

// The arrays of an affine pass (normalize, normalize_batch_stats), each checked against the plan.
template <class S>
struct ApplyArrays {
  using T = nk::compute_t<S>;
  const S* x;
  const T *weight, *bias;
  S* y;
  const S* residual;
  ApplyArrays(const nk::Plan& plan, const py::array& x_, const py::object& weight_,
              const py::object& bias_, const py::object& y_, const py::object& residual_) {
    nk::check_plan(plan);  // before any size is computed from it
    const int64_t n = plan.planes() * plan.S, A = plan.affine_size();
    x = required<S>(x_, n, "x", false);
    weight = data_of<T>(weight_, A, "weight", false);
    bias = data_of<T>(bias_, A, "bias", false);
    y = required<S>(y_, n, "out", true);
    residual = data_of<S>(residual_, n, "residual", false);
  }
};

template <class S>
void normalize_impl(const nk::Plan& plan, const py::array& x, const py::object& mean,
                    const py::object& rstd, const py::object& weight, const py::object& bias,
                    const py::object& y, const py::object& residual, bool relu) {
  const ApplyArrays<S> a(plan, x, weight, bias, y, residual);
  const int64_t G = plan.num_groups();
  const double *pm = required<double>(mean, G, "mean", false), *pr = required<double>(rstd, G, "rstd", false);
  py::gil_scoped_release nogil;
  nk::normalize<S>(plan, a.x, pm, pr, a.weight, a.bias, a.y, a.residual, relu);
}

template <class S>
py::tuple normalize_batch_stats_impl(const nk::Plan& plan, const py::array& x, double eps,
                                     const py::object& weight, const py::object& bias,
                                     const py::object& y, const py::object& residual, bool relu) {
  const ApplyArrays<S> a(plan, x, weight, bias, y, residual);
  const int64_t G = plan.num_groups();
  py::array_t<double> mean = doubles(G), var = doubles(G), rstd = doubles(G);
  double *pm = mean.mutable_data(), *pv = var.mutable_data(), *pr = rstd.mutable_data();
  {
    py::gil_scoped_release nogil;
    nk::normalize_batch_stats<S>(plan, a.x, eps, a.weight, a.bias, a.y, pm, pv, pr, a.residual, relu);
  }
  return py::make_tuple(mean, var, rstd);
}

template <class S>
void backward_impl(const nk::Plan& plan, const py::array& x, const py::object& dy, const double* pm,
                   const double* pr, const py::object& weight, bool batch_stats, const py::object& dx,
                   const py::object& dweight, const py::object& dbias) {
  nk::check_plan(plan);  // before any size is computed from it
  using T = nk::compute_t<S>;
  const int64_t n = plan.planes() * plan.S, A = plan.affine_size();
  const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
  const T* pw = data_of<T>(weight, A, "weight", false);
  S* pdx = data_of<S>(dx, n, "dx", true);
  T *pdw = data_of<T>(dweight, A, "dweight", true), *pdb = data_of<T>(dbias, A, "dbias", true);
  py::gil_scoped_release nogil;
  nk::normalize_backward<S>(plan, px, pdy, pm, pr, pw, batch_stats, pdx, pdw, pdb);
}

// A layer's backward in one call for the common case: the Saved of a one-call forward (x's
// shape is the output's) and dy a plain array of x's dtype and shape. Returns (dx, dweight,
// dbias), or None before anything is written, and the Python path, which owns every error
// message, runs instead. Saves the Python path's checks and allocations: about 4 us a call.
py::object backward_fast(const Saved& saved, py::handle dy_obj, bool want_weight, bool want_bias) {
  if (!saved.has_stats || !saved.shape.is_none() || !plain(saved.x) || !plain(dy_obj)) return py::none();
  const auto x = py::reinterpret_borrow<py::array>(saved.x);
  const auto dy = py::reinterpret_borrow<py::array>(dy_obj);
  const Dt dt = dt_of(x);
  if (dt == Dt::other || dt_of(dy) != dt || dy.ndim() != x.ndim() || x.size() == 0) return py::none();
  for (py::ssize_t i = 0; i < x.ndim(); ++i)
    if (dy.shape(i) != x.shape(i)) return py::none();
  const nk::Plan& plan = saved.plan;
  const int64_t G = plan.num_groups(), n_aff = plan.affine_size();
  if (int64_t(saved.mean.size()) != G || int64_t(saved.rstd.size()) != G) return py::none();
  py::object dx = empty_like(x), dw = py::none(), db = py::none();
  dispatch(x, [&](auto s) {
    using S = decltype(s);
    using T = nk::compute_t<S>;
    if (want_weight) dw = py::array_t<T>(n_aff);
    if (want_bias) db = py::array_t<T>(n_aff);
    backward_impl<S>(plan, x, dy, saved.mean.data(), saved.rstd.data(), saved.weight, saved.batch_stats,
                     dx, dw, db);
  });
  return py::make_tuple(std::move(dx), std::move(dw), std::move(db));
}

// A coefficient argument of the steps a variant calls one by one (normkit.h:
// apply_coefficients): K = num_sample_sets*C float64 values, one per (set, channel) cell, or
// C (the same for every set) or 1 (for every cell), or a Python number, broadcast here so that
// a variant's fold hands over its per-channel arrays as they are (a NumPy broadcast and copy
// cost more than a small layer's whole call).
struct Coefficients {
  std::vector<double> own;
  const double* data = nullptr;
  Coefficients(const nk::Plan& plan, const py::object& a, const char* name) {
    const int64_t K = plan.num_sample_sets * plan.C;
    if (PyFloat_Check(a.ptr()) || PyLong_Check(a.ptr())) {
      own.assign(K, a.cast<double>());
    } else {
      const py::array arr = py::isinstance<py::array>(a) ? py::reinterpret_borrow<py::array>(a) : py::array();
      const int64_t n = arr ? int64_t(arr.size()) : -1;
      const int64_t size = n == K || n == plan.C || n == 1 ? n : K;  // anything else: data_of says why
      const double* p = required<double>(a, size, name, false);
      if (size == K) {
        data = p;
        return;
      }
      own.resize(K);
      for (int64_t k = 0; k < K; ++k) own[k] = p[size == 1 ? 0 : k % plan.C];
    }
    data = own.data();
  }
};

// A step's optional sample term (normkit.h: SampleTerm) from a tuple of float64 arrays of one
// sample's plan.S*plan.C elements: (mean, scale, offset, cell_scale) for the forward, cell_scale
// a number; (mean, c1, c2, c3) for the backward apply (dx gains c1*weight*dy + c2*(x - mean)
// + c3); None: no term.
struct SampleTermArg {
  nk::SampleTerm term;
  const nk::SampleTerm* ptr = nullptr;
  SampleTermArg(const nk::Plan& plan, const py::object& arg, bool backward) {
    if (arg.is_none()) return;
    if (!py::isinstance<py::tuple>(arg) || py::len(arg) != 4)
      throw py::type_error(backward ? "sample_term: expected None or a tuple (mean, c1, c2, c3)"
                                    : "sample_term: expected None or a tuple (mean, scale, offset, cell_scale)");
    const py::tuple t = arg.cast<py::tuple>();
    const int64_t n = plan.C * plan.S;
    const char* names[2][4] = {{"sample_term mean", "sample_term scale", "sample_term offset", ""},
                               {"sample_term mean", "sample_term c1", "sample_term c2", "sample_term c3"}};
    const double* p[4] = {};
    for (size_t i = 0; i < (backward ? 4 : 3); ++i) p[i] = required<double>(t[i], n, names[backward][i], false);
    term.mean = p[0];
    if (backward) term.c1 = p[1], term.scale = p[2], term.offset = p[3];
    else if (PyFloat_Check(t[3].ptr()) || PyLong_Check(t[3].ptr())) term.scale = p[1], term.offset = p[2], term.cell_scale = t[3].cast<double>();
    else throw py::type_error("sample_term cell_scale: expected a number");
    ptr = &term;
  }
};

template <class S>
void apply_coefficients_impl(const nk::Plan& plan, const py::array& x, const py::object& mean,
                             const py::object& scale, const py::object& offset, const py::object& y,
                             const py::object& residual, bool relu) {
  nk::check_step_plan(plan);  // before any size is computed from it
  const int64_t n = plan.planes() * plan.S;
  const S* px = required<S>(x, n, "x", false);
  S* py_ = required<S>(y, n, "out", true);
  const S* pr = data_of<S>(residual, n, "residual", false);
  const Coefficients m(plan, mean, "mean"), sc(plan, scale, "scale"), o(plan, offset, "offset");
  py::gil_scoped_release nogil;
  nk::apply_coefficients<S>(plan, px, m.data, sc.data, o.data, py_, pr, relu);
}

template <class S>
py::tuple backward_sums_impl(const nk::Plan& plan, const py::array& x, const py::object& dy,
                             const py::object& mean) {
  nk::check_step_plan(plan);
  const int64_t n = plan.planes() * plan.S;
  const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
  const Coefficients m(plan, mean, "mean");
  const double* pm = m.data;
  py::array_t<double> sum_dy = doubles(plan.num_sample_sets * plan.C), sum_dy_xmu = doubles(plan.num_sample_sets * plan.C);
  double *pb = sum_dy.mutable_data(), *pa = sum_dy_xmu.mutable_data();
  {
    py::gil_scoped_release nogil;
    nk::backward_sums<S>(plan, px, pdy, pm, pb, pa);
  }
  return py::make_tuple(sum_dy, sum_dy_xmu);
}

template <class S>
void backward_apply_coefficients_impl(const nk::Plan& plan, const py::object& x, const py::array& dy,
                                      const py::object& mean, const py::object& c1,
                                      const py::object& c2, const py::object& c3, const py::object& dx) {
  nk::check_step_plan(plan);
  const int64_t n = plan.planes() * plan.S;
  const S *px = data_of<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
  S* pdx = required<S>(dx, n, "dx", true);
  const Coefficients m(plan, mean, "mean"), a(plan, c1, "c1"), b(plan, c2, "c2"), c(plan, c3, "c3");
  py::gil_scoped_release nogil;
  nk::backward_apply_coefficients<S>(plan, px, pdy, m.data, a.data, b.data, c.data, pdx);
}

// The pointwise epilogue steps (normkit.h: apply_pointwise): `coef` is a (9, K) float64 array,
// rows shift, a, b, p, q, r, scale, offset, center of every cell.
nk::PointwiseCoefficients pointwise_coefficients(const nk::Plan& plan, const py::object& coef) {
  const int64_t K = plan.num_sample_sets * plan.C;
  const double* p = required<double>(coef, 9 * K, "coef", false);
  return {p, p + K, p + 2 * K, p + 3 * K, p + 4 * K, p + 5 * K, p + 6 * K, p + 7 * K, p + 8 * K};
}

// N*C*S of a local response norm view, refused when negative or overflowing.
int64_t lrn_elements(int64_t N, int64_t C, int64_t S) {
  int64_t planes = 0, n = 0;
  if (N < 0 || C < 0 || S < 0 || __builtin_mul_overflow(N, C, &planes) || __builtin_mul_overflow(planes, S, &n))
    throw py::value_error("x: expected non-negative dimensions whose product fits in int64");
  return n;
}

nk::Pointwise pointwise_op(int op) {
  if (op < 0 || op >= nk::kPointwiseOps) throw py::value_error("op: expected a pointwise epilogue number in [0, " + std::to_string(nk::kPointwiseOps) + ")");
  return nk::Pointwise(op);
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
      .def_readonly("num_sample_sets", &nk::Plan::num_sample_sets)
      .def_readonly("skip_mean", &nk::Plan::skip_mean)
      .def_readonly("column_affine", &nk::Plan::column_affine)
      .def_readwrite("channels_last", &nk::Plan::channels_last)
      .def_property_readonly("num_groups", &nk::Plan::num_groups)
      .def_property_readonly("group_counts", [](const nk::Plan& p) {
        nk::check_plan(p);  // channels_last is writable from Python; the rest is checked already
        return nk::group_counts(p);
      })
      // Layers keep their plans per shape: copy.deepcopy and pickle of a layer copy them too.
      .def(py::pickle(
          [](const nk::Plan& p) {
            return py::make_tuple(p.N, p.C, p.S, p.sample_group, p.num_sample_sets, p.channels_per_group,
                                  p.skip_mean, p.column_affine, p.channels_last);
          },
          [](const py::tuple& t) {
            if (t.size() != 9) throw py::value_error("Plan: expected a 9-tuple state");
            nk::Plan p;
            p.N = t[0].cast<int64_t>(), p.C = t[1].cast<int64_t>(), p.S = t[2].cast<int64_t>();
            p.sample_group = t[3].cast<std::vector<int64_t>>();
            p.num_sample_sets = t[4].cast<int64_t>(), p.channels_per_group = t[5].cast<int64_t>();
            p.skip_mean = t[6].cast<bool>(), p.column_affine = t[7].cast<bool>(), p.channels_last = t[8].cast<bool>();
            nk::check_plan(p);  // a state from elsewhere is checked as a constructed plan is
            return p;
          }));

  m.def("plan_per_channel", &nk::plan_per_channel, py::arg("N"), py::arg("C"), py::arg("S"));
  m.def("plan_per_channel_in_sets", &nk::plan_per_channel_in_sets, py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("set_of_sample"), py::arg("channels_per_group") = 1);
  m.def("plan_per_sample_group", &nk::plan_per_sample_group, py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("num_groups"));
  m.def("plan_per_row", &nk::plan_per_row, py::arg("rows"), py::arg("M"), py::arg("skip_mean"));

  m.def("group_moments", [](const nk::Plan& plan, const py::array& x) {
    py::tuple out;
    dispatch(x, [&](auto s) { out = moments_impl<decltype(s)>(plan, x); });
    return out;
  }, py::arg("plan"), py::arg("x"), "Per-group mean and biased variance (float64 arrays).");

  m.def("normalize", [](const nk::Plan& plan, const py::array& x, const py::object& mean,
                        const py::object& rstd, const py::object& weight, const py::object& bias,
                        const py::object& out, const py::object& residual, bool relu) {
    dispatch(x, [&](auto s) {
      normalize_impl<decltype(s)>(plan, x, mean, rstd, weight, bias, out, residual, relu);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
     py::arg("bias"), py::arg("out"), py::arg("residual") = py::none(), py::arg("relu") = false);

  m.def("normalize_batch_stats", [](const nk::Plan& plan, const py::array& x, double eps,
                                    const py::object& weight, const py::object& bias,
                                    const py::object& out, const py::object& residual, bool relu) {
    py::tuple stats;
    dispatch(x, [&](auto s) {
      stats = normalize_batch_stats_impl<decltype(s)>(plan, x, eps, weight, bias, out, residual, relu);
    });
    return stats;
  }, py::arg("plan"), py::arg("x"), py::arg("eps"), py::arg("weight"), py::arg("bias"), py::arg("out"),
     py::arg("residual") = py::none(), py::arg("relu") = false,
     "Statistics from x and the normalization in one call; returns (mean, var, rstd).");

  m.def("backward", [](const Saved& saved, const py::object& dy, const py::object& dx,
                       const py::object& dweight, const py::object& dbias) {
    if (!saved.has_stats) throw py::value_error("saved: a forward of an empty input has no statistics");
    if (!py::isinstance<py::array>(saved.x)) throw py::type_error("saved.x: expected a numpy.ndarray");
    const auto x = py::reinterpret_borrow<py::array>(saved.x);
    const int64_t G = saved.plan.num_groups();
    if (int64_t(saved.mean.size()) != G || int64_t(saved.rstd.size()) != G)
      throw py::value_error("saved: statistics do not match its plan");
    dispatch(x, [&](auto s) {
      backward_impl<decltype(s)>(saved.plan, x, dy, saved.mean.data(), saved.rstd.data(), saved.weight,
                                 saved.batch_stats, dx, dweight, dbias);
    });
  }, py::arg("saved"), py::arg("dy"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
     "normalize_backward of the forward that made `saved`.");

  m.def("backward_fast", &backward_fast, py::arg("saved"), py::arg("dy"), py::arg("want_weight"),
        py::arg("want_bias"),
        "(dx, dweight, dbias) of the forward that made `saved`, or None when the call is not the "
        "common case (then the Python path runs).");

  m.def("normalize_backward", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                                 const py::object& mean, const py::object& rstd,
                                 const py::object& weight, bool batch_stats, const py::object& dx,
                                 const py::object& dweight, const py::object& dbias) {
    nk::check_plan(plan);  // before any size is computed from it
    const int64_t G = plan.num_groups();
    const double *pm = required<double>(mean, G, "mean", false), *pr = required<double>(rstd, G, "rstd", false);
    dispatch(x, [&](auto s) {
      backward_impl<decltype(s)>(plan, x, dy, pm, pr, weight, batch_stats, dx, dweight, dbias);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("rstd"),
     py::arg("weight"), py::arg("batch_stats"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"));

  m.def("apply_coefficients", [](const nk::Plan& plan, const py::array& x, const py::object& mean,
                                 const py::object& scale, const py::object& offset,
                                 const py::object& out, const py::object& residual, bool relu) {
    dispatch(x, [&](auto s) {
      apply_coefficients_impl<decltype(s)>(plan, x, mean, scale, offset, out, residual, relu);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("offset"),
     py::arg("out"), py::arg("residual") = py::none(), py::arg("relu") = false,
     "out = (x - mean[k])*scale[k] + offset[k], k = set*C + channel of each plane; each "
     "coefficient is K = sets*C float64 values, or C, or 1, or a number (broadcast).");

  m.def("backward_sums", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                            const py::object& mean) {
    py::tuple out;
    dispatch(x, [&](auto s) { out = backward_sums_impl<decltype(s)>(plan, x, dy, mean); });
    return out;
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"),
     "(sum dy, sum dy*(x - mean[k])) per (set, channel) k, float64 arrays.");

  m.def("backward_apply_coefficients", [](const nk::Plan& plan, const py::object& x,
                                          const py::array& dy, const py::object& mean,
                                          const py::object& c1, const py::object& c2,
                                          const py::object& c3, const py::object& dx) {
    dispatch(dy, [&](auto s) {
      backward_apply_coefficients_impl<decltype(s)>(plan, x, dy, mean, c1, c2, c3, dx);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("c1"), py::arg("c2"),
     py::arg("c3"), py::arg("dx"),
     "dx = c1[k]*dy + c2[k]*(x - mean[k]) + c3[k] per (set, channel) k (coefficients as "
     "apply_coefficients'); x may be None (no x term).");

  py::enum_<nk::Pointwise>(m, "Pointwise")
      .value("identity", nk::Pointwise::identity)
      .value("relu", nk::Pointwise::relu)
      .value("silu", nk::Pointwise::silu)
      .value("gelu", nk::Pointwise::gelu)
      .value("tlu", nk::Pointwise::tlu)
      .value("swish_gate", nk::Pointwise::swish_gate)
      .value("evo_b0", nk::Pointwise::evo_b0);

  m.def("apply_pointwise", [](const nk::Plan& plan, int op, const py::array& x, const py::object& coef,
                              const py::object& out) {
    const nk::Pointwise o = pointwise_op(op);
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S;
      const S* px = required<S>(x, n, "x", false);
      S* py_ = required<S>(out, n, "out", true);
      const nk::PointwiseCoefficients c = pointwise_coefficients(plan, coef);
      py::gil_scoped_release nogil;
      nk::apply_pointwise<S>(plan, o, px, c, py_);
    });
  }, py::arg("plan"), py::arg("op"), py::arg("x"), py::arg("coef"), py::arg("out"),
     "out = f(u)*scale + offset, u = (x - shift)*a + b, per cell; coef: (9, K) float64.");

  m.def("normalize_pointwise", [](const nk::Plan& plan, int op, const py::array& x, double eps, bool skip_mean,
                                  bool center, bool rstd_into_scale, const py::object& channel,
                                  const py::object& out, const py::object& cell, bool std_into_r) {
    const nk::Pointwise o = pointwise_op(op);
    py::array_t<double> mean, var;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S, C = plan.C, P = plan.planes();
      const S* px = required<S>(x, n, "x", false);
      S* py_ = required<S>(out, n, "out", true);
      const double* ch = required<double>(channel, 9 * C, "channel", false);
      double* pc = required<double>(cell, 9 * P, "cell", true);
      const nk::PointwiseCoefficients c{ch, ch + C, ch + 2 * C, ch + 3 * C, ch + 4 * C, ch + 5 * C,
                                        ch + 6 * C, ch + 7 * C, ch + 8 * C};
      mean = doubles(plan.num_groups());
      var = doubles(plan.num_groups());
      double *pm = mean.mutable_data(), *pv = var.mutable_data();
      nk::PointwiseFold fold;
      fold.eps = eps, fold.skip_mean = skip_mean, fold.center = center, fold.rstd_into_scale = rstd_into_scale;
      fold.std_into_r = std_into_r;
      py::gil_scoped_release nogil;
      nk::normalize_pointwise<S>(plan, o, px, fold, c, py_, pm, pv, pc);
    });
    return py::make_tuple(mean, var);
  }, py::arg("plan"), py::arg("op"), py::arg("x"), py::arg("eps"), py::arg("skip_mean"), py::arg("center"),
     py::arg("rstd_into_scale"), py::arg("channel"), py::arg("out"), py::arg("cell"), py::arg("std_into_r") = false,
     "Statistics per group of a per-sample-group plan, then out = apply_pointwise with cell coefficients "
     "folded from them and the (9, C) channel rows (r = 1/sqrt(var + eps) into a, or into scale; with "
     "std_into_r, sqrt(var + eps) as the cells' r); "
     "writes the (9, N*C) cell coefficients to `cell`; returns (mean, var) per group.");

  m.def("pointwise_sums", [](const nk::Plan& plan, int op, const py::array& x, const py::object& dy,
                             const py::object& coef) {
    const nk::Pointwise o = pointwise_op(op);
    py::array_t<double> sums;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S, K = plan.num_sample_sets * plan.C;
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      const nk::PointwiseCoefficients c = pointwise_coefficients(plan, coef);
      sums = doubles(nk::kPointwiseSums, K);
      double* ps = sums.mutable_data();
      py::gil_scoped_release nogil;
      nk::pointwise_sums<S>(plan, o, px, pdy, c, ps);
    });
    return sums;
  }, py::arg("plan"), py::arg("op"), py::arg("x"), py::arg("dy"), py::arg("coef"),
     "(7, K) sums per cell: dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr; g = dy*f'(u); a derivative the function does not have sums to exactly 0.");

  m.def("pointwise_backward", [](const nk::Plan& plan, int op, const py::array& x, const py::object& dy,
                                 const py::object& coef, const py::object& c1, const py::object& c2,
                                 const py::object& c3, const py::object& dx) {
    const nk::Pointwise o = pointwise_op(op);
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S;
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      S* pdx = required<S>(dx, n, "dx", true);
      const nk::PointwiseCoefficients c = pointwise_coefficients(plan, coef);
      const Coefficients a(plan, c1, "c1"), b(plan, c2, "c2"), d(plan, c3, "c3");
      py::gil_scoped_release nogil;
      nk::pointwise_backward<S>(plan, o, px, pdy, c, a.data, b.data, d.data, pdx);
    });
  }, py::arg("plan"), py::arg("op"), py::arg("x"), py::arg("dy"), py::arg("coef"), py::arg("c1"),
     py::arg("c2"), py::arg("c3"), py::arg("dx"),
     "dx = c1[k]*dy*f'(u) + c2[k]*(x - center[k]) + c3[k] per cell (c1..c3 as apply_coefficients').");

  m.def("pointwise_backward_fused", [](const nk::Plan& plan, int op, const py::array& x, const py::object& dy,
                                       const py::object& coef, const py::object& c1, const py::object& c2,
                                       const py::object& c3, const py::object& dx, int64_t cluster,
                                       const py::object& k2, const py::object& k3) {
    const nk::Pointwise o = pointwise_op(op);
    py::array_t<double> sums;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S, K = plan.num_sample_sets * plan.C;
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      S* pdx = required<S>(dx, n, "dx", true);
      const nk::PointwiseCoefficients c = pointwise_coefficients(plan, coef);
      const Coefficients a(plan, c1, "c1"), b(plan, c2, "c2"), d(plan, c3, "c3");
      const double* pk2 = data_of<double>(k2, nk::kPointwiseSums * K, "k2", false);
      const double* pk3 = data_of<double>(k3, nk::kPointwiseSums * K, "k3", false);
      sums = doubles(nk::kPointwiseSums, K);
      double* ps = sums.mutable_data();
      py::gil_scoped_release nogil;
      nk::pointwise_backward_fused<S>(plan, o, px, pdy, c, a.data, b.data, d.data, cluster, pk2, pk3, ps, pdx);
    });
    return sums;
  }, py::arg("plan"), py::arg("op"), py::arg("x"), py::arg("dy"), py::arg("coef"), py::arg("c1"),
     py::arg("c2"), py::arg("c3"), py::arg("dx"), py::arg("cluster") = 1, py::arg("k2") = py::none(),
     py::arg("k3") = py::none(),
     "pointwise_sums and pointwise_backward in one pass: dx = c1[k]*g + (c2[k] + q2)*(x - center[k]) + c3[k] + q3 "
     "with q2, q3 = sum over the cluster's planes of k2 . sums, k3 . sums (k2, k3: (7, K) or None); returns the "
     "(7, K) sums.");

  m.def("apply_coefficients_positions", [](const nk::Plan& plan, const py::array& x, const py::object& mean,
                                           const py::object& scale, const py::object& offset,
                                           const py::object& weight, const py::object& bias, const py::object& out) {
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S;
      const S* px = required<S>(x, n, "x", false);
      S* py_ = required<S>(out, n, "out", true);
      const T *pw = required<T>(weight, plan.S, "weight", false), *pb = required<T>(bias, plan.S, "bias", false);
      const Coefficients m(plan, mean, "mean"), sc(plan, scale, "scale"), o(plan, offset, "offset");
      py::gil_scoped_release nogil;
      nk::apply_coefficients_positions<S>(plan, px, m.data, sc.data, o.data, pw, pb, py_);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("offset"), py::arg("weight"),
     py::arg("bias"), py::arg("out"),
     "out = ((x - mean[k])*scale[k] + offset[k])*weight[s] + bias[s]; channels-last plans.");

  m.def("normalize_batch_stats_positions", [](const nk::Plan& plan, const py::array& x, double eps,
                                              const py::object& weight, const py::object& bias,
                                              const py::object& out, const py::object& sample_term) {
    py::tuple stats;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S, G = plan.num_groups();
      const S* px = required<S>(x, n, "x", false);
      S* py_ = required<S>(out, n, "out", true);
      const T *pw = required<T>(weight, plan.S, "weight", false), *pb = required<T>(bias, plan.S, "bias", false);
      const SampleTermArg term(plan, sample_term, false);
      py::array_t<double> mean = doubles(G), var = doubles(G), rstd = doubles(G);
      double *pm = mean.mutable_data(), *pv = var.mutable_data(), *pr = rstd.mutable_data();
      {
        py::gil_scoped_release nogil;
        nk::normalize_batch_stats_positions<S>(plan, px, eps, pw, pb, py_, pm, pv, pr, term.ptr);
      }
      stats = py::make_tuple(mean, var, rstd);
    });
    return stats;
  }, py::arg("plan"), py::arg("x"), py::arg("eps"), py::arg("weight"), py::arg("bias"), py::arg("out"),
     py::arg("sample_term") = py::none(),
     "Per-column statistics and out = ((x - mean)*rstd [+ the sample term's])*weight[s] + bias[s], sample by "
     "sample; (mean, var, rstd).");

  m.def("local_response_norm", [](int64_t N, int64_t C, int64_t Sp, const py::array& x, const py::object& out,
                                  int64_t size, double alpha, double beta, double k) {
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      const int64_t n = lrn_elements(N, C, Sp);
      const S* px = required<S>(x, n, "x", false);
      S* py_ = required<S>(out, n, "out", true);
      py::gil_scoped_release nogil;
      nk::local_response_norm<S>(N, C, Sp, px, py_, size, alpha, beta, k);
    });
  }, py::arg("N"), py::arg("C"), py::arg("S"), py::arg("x"), py::arg("out"), py::arg("size"), py::arg("alpha"),
     py::arg("beta"), py::arg("k"), "torch's local_response_norm of x viewed as (N, C, S), into out.");

  m.def("local_response_norm_backward", [](int64_t N, int64_t C, int64_t Sp, const py::array& x,
                                           const py::object& dy, const py::object& dx, int64_t size, double alpha,
                                           double beta, double k) {
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      const int64_t n = lrn_elements(N, C, Sp);
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      S* pdx = required<S>(dx, n, "dx", true);
      py::gil_scoped_release nogil;
      nk::local_response_norm_backward<S>(N, C, Sp, px, pdy, pdx, size, alpha, beta, k);
    });
  }, py::arg("N"), py::arg("C"), py::arg("S"), py::arg("x"), py::arg("dy"), py::arg("dx"), py::arg("size"),
     py::arg("alpha"), py::arg("beta"), py::arg("k"), "dx of local_response_norm.");

  m.def("backward_sums_positions", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                                      const py::object& mean, const py::object& scale, const py::object& offset,
                                      const py::object& weight) {
    py::tuple out;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S, K = plan.num_sample_sets * plan.C;
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      const T* pw = required<T>(weight, plan.S, "weight", false);
      const Coefficients m(plan, mean, "mean"), sc(plan, scale, "scale"), o(plan, offset, "offset");
      py::array_t<double> b = doubles(K), a = doubles(K), dw = doubles(plan.S), db = doubles(plan.S);
      double *pb = b.mutable_data(), *pa = a.mutable_data(), *pdw = dw.mutable_data(), *pdb = db.mutable_data();
      {
        py::gil_scoped_release nogil;
        nk::backward_sums_positions<S>(plan, px, pdy, m.data, sc.data, o.data, pw, pb, pa, pdw, pdb);
      }
      out = py::make_tuple(b, a, dw, db);
    });
    return out;
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("scale"), py::arg("offset"),
     py::arg("weight"),
     "(sum weight*dy, sum weight*dy*(x - mean[k])) per cell and (sum dy*xhat, sum dy) per position.");

  m.def("backward_apply_positions", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                                       const py::object& mean, const py::object& c1, const py::object& c2,
                                       const py::object& c3, const py::object& weight, const py::object& dx,
                                       const py::object& sample_term) {
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S;
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      S* pdx = required<S>(dx, n, "dx", true);
      const T* pw = required<T>(weight, plan.S, "weight", false);
      const Coefficients m(plan, mean, "mean"), a(plan, c1, "c1"), b(plan, c2, "c2"), c(plan, c3, "c3");
      const SampleTermArg term(plan, sample_term, true);
      py::gil_scoped_release nogil;
      nk::backward_apply_positions<S>(plan, px, pdy, m.data, a.data, b.data, c.data, pw, pdx, term.ptr);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
     py::arg("weight"), py::arg("dx"), py::arg("sample_term") = py::none(),
     "dx = c1[k]*weight[s]*dy + c2[k]*(x - mean[k]) + c3[k] [+ the sample term's]; channels-last plans.");

  m.def("normalize_backward_positions", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                                           const py::object& mean, const py::object& rstd, const py::object& weight,
                                           const py::object& dx) {
    py::tuple out;
    dispatch(x, [&](auto s) {
      using S = decltype(s);
      using T = nk::compute_t<S>;
      nk::check_step_plan(plan);
      const int64_t n = plan.planes() * plan.S, G = plan.num_groups();
      const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
      S* pdx = required<S>(dx, n, "dx", true);
      const T* pw = required<T>(weight, plan.S, "weight", false);
      const double *pm = required<double>(mean, G, "mean", false), *pr = required<double>(rstd, G, "rstd", false);
      py::array_t<double> dw = doubles(plan.S), db = doubles(plan.S);
      double *pdw = dw.mutable_data(), *pdb = db.mutable_data();
      {
        py::gil_scoped_release nogil;
        nk::normalize_backward_positions<S>(plan, px, pdy, pm, pr, pw, pdx, pdw, pdb);
      }
      out = py::make_tuple(dw, db);
    });
    return out;
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
     py::arg("dx"),
     "LayerNorm's backward over normalize_batch_stats_positions' plan, mean and rstd: dx, and returns "
     "(dweight, dbias) per position.");

  m.def("conv2d_stat_jacobians", [](const py::array& x, const py::array& weight, int64_t stride_h,
                                    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                    int64_t dilation_w, int64_t groups) {
    if (x.ndim() != 4 || weight.ndim() != 4)
      throw py::value_error("conv2d_stat_jacobians: expected a 4-D input and a 4-D weight");
    if (dt_of(weight) != dt_of(x))
      throw py::type_error("weight: expected the input's dtype " + dtype_of(x) + ", got " + dtype_of(weight));
    nk::Conv2d c;
    c.N = x.shape(0), c.C_in = x.shape(1), c.H = x.shape(2), c.W = x.shape(3);
    c.C_out = weight.shape(0), c.kh = weight.shape(2), c.kw = weight.shape(3);
    c.stride_h = stride_h, c.stride_w = stride_w, c.pad_h = pad_h, c.pad_w = pad_w;
    c.dilation_h = dilation_h, c.dilation_w = dilation_w, c.groups = groups;
    nk::check_conv2d(c);
    if (weight.shape(1) != c.C_in / c.groups)
      throw py::value_error("weight: expected C_in/groups = " + std::to_string(c.C_in / c.groups) +
                            " input channels per filter, got " + std::to_string(weight.shape(1)));
    py::tuple out;
    auto run = [&](auto s) {
      using S = decltype(s);
      const int64_t n_w = c.C_out * c.fan_in();
      const S* px = required<S>(x, c.N * c.C_in * c.H * c.W, "x", false);
      const S* pw = required<S>(weight, n_w, "weight", false);
      py::array_t<S> dmean({weight.shape(0), weight.shape(1), weight.shape(2), weight.shape(3)});
      py::array_t<S> dsqmean({weight.shape(0), weight.shape(1), weight.shape(2), weight.shape(3)});
      S *pm = dmean.mutable_data(), *pq = dsqmean.mutable_data();
      {
        py::gil_scoped_release nogil;
        nk::conv2d_stat_jacobians<S>(c, px, pw, pm, pq);
      }
      out = py::make_tuple(dmean, dsqmean);
    };
    switch (dt_of(x)) {
      case Dt::f32: run(float{}); break;
      case Dt::f64: run(double{}); break;
      default: throw py::type_error("x: expected float32 or float64, got " + dtype_of(x));
    }
    return out;
  }, py::arg("x"), py::arg("weight"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"),
     py::arg("pad_w"), py::arg("dilation_h"), py::arg("dilation_w"), py::arg("groups"),
     "(dmean_dweight, dsqmean_dweight) of y = conv2d(x, weight), each of the weight's shape (normkit/conv.h).");

  def_saved(m);
  def_forward_fast(m);
  def_batch_layer(m);
  def_batch_channel(m);
  m.def("empty_like", &empty_like, py::arg("a"),
        "A new uninitialized C-contiguous array of a's shape and dtype, on the C heap.");
  m.def("copy", [](py::array dst, const py::array& src) {
    if (!(dst.flags() & py::array::c_style) || !(src.flags() & py::array::c_style) ||
        dst.nbytes() != src.nbytes() || !dst.writeable())
      throw py::value_error("copy: expected C-contiguous arrays of equal byte size, dst writable");
    void* d = dst.mutable_data();
    const void* s = src.data();
    const int64_t n = dst.nbytes();
    py::gil_scoped_release nogil;
    nk::parallel_copy(d, s, n);
  }, py::arg("dst"), py::arg("src"), "dst[...] = src bytewise on normkit's threads (the bench's yardstick).");
  m.def("set_num_threads", &nk::set_num_threads, py::arg("n"));
  m.def("set_cache_bytes", &nk::set_cache_bytes, py::arg("bytes"),
        "The last-level cache size the traversal assumes (0: detect); speed only, never results.");
  m.def("get_num_threads", &nk::get_num_threads);
  m.def("isa_name", &nk::isa_name);
  m.def("supported_isas", &nk::supported_isas);
  m.def("set_isa", &nk::set_isa, py::arg("name"));
}
