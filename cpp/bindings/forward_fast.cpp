// forward_fast: a layer's whole forward in one call, for the common case.
//
// On a small tensor the Python path (argument checks, NumPy bookkeeping of the statistics, three
// calls into the core) costs about 20 us, ten times the work itself. This call does the same
// work, checks included, in 1.5-3 us. It accepts only the common case: x a plain,
// C-contiguous, aligned ndarray of a supported dtype in native byte order, parameters and
// statistics of the matching dtype and exact shape, plain float or int scalars, no out=,
// residual= or activation. For anything else, including every invalid call, it returns None
// before writing anything, and the caller runs the Python path, which owns every error message.
// Both paths run the same core calls in the same order: results are bitwise the same
// (tests/test_forward_fast.py checks that, path against path).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <memory>
#include <vector>

#include "arrays.h"
#include "forward_fast.h"
#include "normkit/normkit.h"
#include "saved.h"

namespace nkpy {

namespace {

using py::detail::npy_api;

enum Kind : int { kBatch = 0, kInstance = 1, kGroup = 2, kLayer = 3, kRms = 4 };

// Below this many elements the GIL stays held: releasing it costs more than the work.
constexpr int64_t kReleaseGilElements = int64_t(1) << 15;

// A Python float or int (not bool, not a NumPy scalar: those take the Python path).
bool real_scalar(py::handle h, double* v) {
  if (PyFloat_CheckExact(h.ptr())) {
    *v = PyFloat_AS_DOUBLE(h.ptr());
    return true;
  }
  if (PyLong_CheckExact(h.ptr())) {
    *v = PyLong_AsDouble(h.ptr());
    if (*v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// A Python int (not bool) that fits in int64.
bool exact_int(py::handle h, int64_t* v) {
  if (!PyLong_CheckExact(h.ptr())) return false;
  const long long value = PyLong_AsLongLong(h.ptr());
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  *v = value;
  return true;
}

// An optional parameter or statistics array of dtype T and exactly `dims`; *data stays null for
// None. False: not the common case.
template <class T>
bool param_ok(py::handle h, const std::vector<int64_t>& dims, bool writable, T** data) {
  *data = nullptr;
  if (h.is_none()) return true;
  if (!plain(h)) return false;
  auto a = py::reinterpret_borrow<py::array>(h);
  if (dt_of(a) != dt_code<T>() || a.ndim() != py::ssize_t(dims.size())) return false;
  for (size_t i = 0; i < dims.size(); ++i)
    if (a.shape(i) != dims[i]) return false;
  if (writable && !a.writeable()) return false;
  *data = static_cast<T*>(const_cast<void*>(a.data()));
  return true;
}

// What the call asks for, as accepted (sizes of x as the plan reads them).
struct Call {
  int kind;
  int64_t N = 0, C = 0, S = 0, G = 0;  // G: num_groups for kGroup; rows/M live in N/S
  bool channels_last, batch_stats;
  double momentum = 0, eps = 0;
  std::vector<int64_t> affine_dims;  // the shape weight and bias must have
};

// Sizes of x for the call's kind and the layer's constraints; false: not the common case.
bool accept_shape(const py::array& x, int64_t channels, py::handle groups, py::handle normalized_shape,
                  uint64_t ndims_mask, Call* c) {
  const int nd = int(x.ndim());
  if (nd >= 64 || !((ndims_mask >> nd) & 1) || x.size() == 0) return false;  // empty: Python path
  if (c->kind == kLayer || c->kind == kRms) {
    // normalized_shape: an int or a tuple of ints, equal to x's trailing dimensions.
    const bool one = PyLong_CheckExact(normalized_shape.ptr());
    if (!one && !PyTuple_CheckExact(normalized_shape.ptr())) return false;
    const int k = one ? 1 : int(PyTuple_GET_SIZE(normalized_shape.ptr()));
    if (k == 0 || k > nd) return false;
    int64_t M = 1;
    for (int i = 0; i < k; ++i) {
      int64_t v;
      if (!exact_int(one ? normalized_shape : PyTuple_GET_ITEM(normalized_shape.ptr(), i), &v)) return false;
      if (v != x.shape(nd - k + i)) return false;
      c->affine_dims.push_back(v);
      M *= v;  // <= x.size(): no overflow
    }
    c->N = x.size() / M;  // rows
    c->S = M;
    return true;
  }
  if (nd < 2) return false;
  c->N = x.shape(0);
  c->C = c->channels_last ? x.shape(nd - 1) : x.shape(1);
  c->S = x.size() / (c->N * c->C);
  if (channels >= 0 && c->C != channels) return false;
  c->affine_dims = {c->C};
  if (c->kind == kGroup) {
    if (!exact_int(groups, &c->G) || c->G < 1 || c->C % c->G != 0) return false;
  }
  // torch refuses statistics of one value per channel (plane) in training: the Python path raises.
  if (c->batch_stats && c->kind == kBatch && c->N * c->S == 1) return false;
  if (c->batch_stats && c->kind == kInstance && c->S == 1) return false;
  return true;
}

nk::Plan plan_of(const Call& c) {
  nk::Plan plan;
  switch (c.kind) {
    case kBatch: plan = nk::plan_per_channel(c.N, c.C, c.S); break;
    case kInstance:
      plan = c.batch_stats ? nk::plan_per_sample_group(c.N, c.C, c.S, c.C) : nk::plan_per_channel(c.N, c.C, c.S);
      break;
    case kGroup: plan = nk::plan_per_sample_group(c.N, c.C, c.S, c.G); break;
    default: return nk::plan_per_row(c.N, c.S, c.kind == kRms);
  }
  plan.channels_last = c.channels_last;
  return plan;
}

// running = (1 - f)*running + f*batch in double, rounded to T: _engine.running_update's
// arithmetic, operation for operation (this file is built without FMA contraction).
template <class T>
void running_update(T* running, const double* batch, double scale, int64_t n, double f) {
  for (int64_t i = 0; i < n; ++i) running[i] = T((1.0 - f) * double(running[i]) + f * (batch[i] * scale));
}

template <class S>
py::object run(const Call& c, const py::array& x, py::handle weight, py::handle bias,
               py::handle running_mean, py::handle running_var) {
  using T = nk::compute_t<S>;
  T *w, *b, *rm, *rv;
  const bool update = c.batch_stats && c.kind == kBatch;  // running stats move (BN training)
  if (!param_ok<T>(weight, c.affine_dims, false, &w) || !param_ok<T>(bias, c.affine_dims, false, &b))
    return py::none();
  const bool channel_kind = c.kind == kBatch || c.kind == kInstance;
  if (channel_kind) {
    const std::vector<int64_t> dims{c.C};
    if (!param_ok<T>(running_mean, dims, update, &rm) || !param_ok<T>(running_var, dims, update, &rv))
      return py::none();
    if (!c.batch_stats && (!rm || !rv)) return py::none();  // the Python path says they are required
    if (c.batch_stats && c.kind == kInstance && (rm || rv)) return py::none();  // rare: Python path
    if (update && rm && rv && rm < rv + c.C && rv < rm + c.C) return py::none();  // shared memory
  } else if (!running_mean.is_none() || !running_var.is_none()) {
    return py::none();
  }

  nk::Plan plan = plan_of(c);
  const int64_t G = plan.num_groups();
  std::vector<double> mean_v(G), rstd_v(G), var(G);
  double *mean = mean_v.data(), *rstd = rstd_v.data();
  py::array y = empty_like(x);
  const S* px = static_cast<const S*>(x.data());
  S* py_ = static_cast<S*>(y.mutable_data());
  {
    std::unique_ptr<py::gil_scoped_release> nogil;
    if (x.size() >= kReleaseGilElements) nogil.reset(new py::gil_scoped_release());
    if (c.batch_stats) {
      nk::normalize_batch_stats<S>(plan, px, c.eps, w, b, py_, mean, var.data(), rstd);
    } else {
      for (int64_t g = 0; g < G; ++g) mean[g] = double(rm[g]), var[g] = double(rv[g]);
      // NaN, Inf and negative variances propagate, as in _engine.rstd_of.
      for (int64_t g = 0; g < G; ++g) rstd[g] = 1.0 / std::sqrt(var[g] + c.eps);
      nk::normalize<S>(plan, px, mean, rstd, w, b, py_, nullptr, false);
    }
    if (update) {
      const double count = double(c.N * c.S);
      if (rm) running_update(rm, mean, 1.0, c.C, c.momentum);
      if (rv) running_update(rv, var.data(), count / (count - 1), c.C, c.momentum);
    }
  }
  Saved saved{std::move(plan), x, std::move(mean_v), std::move(rstd_v), true,
              py::reinterpret_borrow<py::object>(weight), c.batch_stats, py::none()};
  return py::make_tuple(std::move(y), py::cast(std::move(saved)));
}

py::object forward_fast(int kind, py::handle x_obj, int64_t channels, py::handle groups,
                        py::handle normalized_shape, uint64_t ndims_mask, bool channels_last,
                        py::handle weight, py::handle bias, py::handle running_mean,
                        py::handle running_var, bool batch_stats, py::handle momentum, py::handle eps,
                        int param_bits) {
  if (kind < kBatch || kind > kRms || !plain(x_obj)) return py::none();
  const auto x = py::reinterpret_borrow<py::array>(x_obj);
  Call c;
  c.kind = kind;
  c.channels_last = channels_last && (kind == kBatch || kind == kInstance || kind == kGroup);
  c.batch_stats = batch_stats || kind == kGroup || kind == kLayer || kind == kRms;
  if (!real_scalar(eps, &c.eps) || !std::isfinite(c.eps) || c.eps < 0) return py::none();
  if ((kind == kBatch || kind == kInstance) &&
      (!real_scalar(momentum, &c.momentum) || !(c.momentum >= 0 && c.momentum <= 1)))
    return py::none();
  if (!accept_shape(x, channels, groups, normalized_shape, ndims_mask, &c)) return py::none();
  const Dt dt = dt_of(x);
  // A layer's dtype (param_bits 32 or 64; 0: any) fixes its parameters' dtype, arrays or not.
  if (param_bits != 0 && param_bits != (dt == Dt::f64 ? 64 : 32)) return py::none();
  switch (dt) {
    case Dt::f32: return run<float>(c, x, weight, bias, running_mean, running_var);
    case Dt::f64: return run<double>(c, x, weight, bias, running_mean, running_var);
    case Dt::f16: return run<nk::f16>(c, x, weight, bias, running_mean, running_var);
    case Dt::bf16: return run<nk::bf16>(c, x, weight, bias, running_mean, running_var);
    default: return py::none();
  }
}

}  // namespace

void def_forward_fast(py::module_& m) {
  m.attr("FAST_BATCH") = int(kBatch);
  m.attr("FAST_INSTANCE") = int(kInstance);
  m.attr("FAST_GROUP") = int(kGroup);
  m.attr("FAST_LAYER") = int(kLayer);
  m.attr("FAST_RMS") = int(kRms);
  m.def("forward_fast", &forward_fast, py::arg("kind"), py::arg("x"), py::arg("channels"),
        py::arg("groups"), py::arg("normalized_shape"), py::arg("ndims_mask"), py::arg("channels_last"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("batch_stats"), py::arg("momentum"), py::arg("eps"), py::arg("param_bits"),
        "A layer's forward in one call, or None when the input is not the common case "
        "(then the Python path runs). Returns (y, Saved).");
}

}  // namespace nkpy
