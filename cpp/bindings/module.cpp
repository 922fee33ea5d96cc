// The Python binding: arrays in, kernel call with the GIL released, nothing else. Argument
// checking with friendly messages happens in python/normkit/_checks.py; the checks here only
// guarantee that a wrong call can never read or write out of bounds. float16 and bfloat16 arrays
// (ml_dtypes) come with float32 weights, biases and parameter gradients.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <map>
#include <mutex>
#include <cstdlib>
#include <vector>
#include <string>

#include "normkit/normkit.h"

namespace py = pybind11;

namespace {

template <class S> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<double>() { return "float64"; }
template <> const char* dtype_name<nk::f16>() { return "float16"; }
template <> const char* dtype_name<nk::bf16>() { return "bfloat16"; }

// NumPy type numbers identify the dtypes without a Python call per array (a dtype's name is a
// Python property, and costs microseconds). ml_dtypes' bfloat16 gets its number at registration:
// the first array whose dtype is named "bfloat16" teaches it.
enum class Dt { f32, f64, f16, bf16, other };
std::atomic<int> g_bf16_num{-1};

Dt dt_of(const py::array& a) {
  const int num = a.dtype().num();
  switch (num) {
    case 11: return Dt::f32;  // NPY_FLOAT
    case 12: return Dt::f64;  // NPY_DOUBLE
    case 23: return Dt::f16;  // NPY_HALF
    default: break;
  }
  if (num == g_bf16_num.load()) return Dt::bf16;
  if (a.dtype().itemsize() == 2 && std::string(py::str(a.dtype().attr("name"))) == "bfloat16") {
    g_bf16_num.store(num);
    return Dt::bf16;
  }
  return Dt::other;
}

template <class S> constexpr Dt dt_code();
template <> constexpr Dt dt_code<float>() { return Dt::f32; }
template <> constexpr Dt dt_code<double>() { return Dt::f64; }
template <> constexpr Dt dt_code<nk::f16>() { return Dt::f16; }
template <> constexpr Dt dt_code<nk::bf16>() { return Dt::bf16; }

std::string dtype_of(const py::array& a) { return py::str(a.dtype().attr("name")); }

// Calls f(S{}) for the storage type of x.
template <class F>
void dispatch(const py::array& x, F&& f) {
  switch (dt_of(x)) {
    case Dt::f32: return f(float{});
    case Dt::f64: return f(double{});
    case Dt::f16: return f(nk::f16{});
    case Dt::bf16: return f(nk::bf16{});
    default: throw py::type_error("x: expected float32, float64, float16 or bfloat16, got " + dtype_of(x));
  }
}

// The data of an optional array argument, checked to be C-contiguous, of dtype T and of `size`
// elements (and writable when written), so a wrong call can never read or write out of bounds.
template <class T>
T* data_of(const py::object& obj, int64_t size, const char* name, bool writable) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy.ndarray");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (dt_of(arr) != dt_code<T>() || !(arr.flags() & py::array::c_style))
    throw py::type_error(std::string(name) + ": expected a C-contiguous " + dtype_name<T>() + " array, got " +
                         dtype_of(arr));
  if (reinterpret_cast<uintptr_t>(arr.data()) % alignof(T) != 0)
    throw py::value_error(std::string(name) + ": array data is not aligned to its element size");
  if (arr.size() != size)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(size) + " elements, got " +
                          std::to_string(arr.size()));
  if (writable && !arr.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

template <class T>
T* required(const py::object& obj, int64_t size, const char* name, bool writable) {
  T* p = data_of<T>(obj, size, name, writable);
  if (!p) throw py::value_error(std::string(name) + " is required");
  return p;
}

template <class S>
py::tuple moments_impl(const nk::Plan& plan, const py::array& x) {
  nk::check_plan(plan);  // before any size is computed from it
  const S* px = required<S>(x, plan.planes() * plan.S, "x", false);
  py::array_t<double> mean(plan.num_groups()), var(plan.num_groups());
  double *pm = mean.mutable_data(), *pv = var.mutable_data();
  {
    py::gil_scoped_release nogil;
    nk::group_moments<S>(plan, px, pm, pv);
  }
  return py::make_tuple(mean, var);
}

template <class S>
void normalize_impl(const nk::Plan& plan, const py::array& x, const py::object& mean,
                    const py::object& rstd, const py::object& weight, const py::object& bias,
                    const py::object& y, const py::object& residual, bool relu) {
  nk::check_plan(plan);  // before any size is computed from it
  using T = nk::compute_t<S>;
  const int64_t n = plan.planes() * plan.S, G = plan.num_groups(), A = plan.affine_size();
  const S* px = required<S>(x, n, "x", false);
  const double *pm = required<double>(mean, G, "mean", false), *pr = required<double>(rstd, G, "rstd", false);
  const T *pw = data_of<T>(weight, A, "weight", false), *pb = data_of<T>(bias, A, "bias", false);
  S* py_ = required<S>(y, n, "out", true);
  const S* pres = data_of<S>(residual, n, "residual", false);
  py::gil_scoped_release nogil;
  nk::normalize<S>(plan, px, pm, pr, pw, pb, py_, pres, relu);
}

template <class S>
void backward_impl(const nk::Plan& plan, const py::array& x, const py::object& dy,
                   const py::object& mean, const py::object& rstd, const py::object& weight,
                   bool batch_stats, const py::object& dx, const py::object& dweight,
                   const py::object& dbias) {
  nk::check_plan(plan);  // before any size is computed from it
  using T = nk::compute_t<S>;
  const int64_t n = plan.planes() * plan.S, G = plan.num_groups(), A = plan.affine_size();
  const S *px = required<S>(x, n, "x", false), *pdy = required<S>(dy, n, "dy", false);
  const double *pm = required<double>(mean, G, "mean", false), *pr = required<double>(rstd, G, "rstd", false);
  const T* pw = data_of<T>(weight, A, "weight", false);
  S* pdx = data_of<S>(dx, n, "dx", true);
  T *pdw = data_of<T>(dweight, A, "dweight", true), *pdb = data_of<T>(dbias, A, "dbias", true);
  py::gil_scoped_release nogil;
  nk::normalize_backward<S>(plan, px, pdy, pm, pr, pw, batch_stats, pdx, pdw, pdb);
}

// Output buffers. A fresh output per call from NumPy's allocator pays page faults on every call
// (and compaction stalls when it asks for huge pages and memory is fragmented): more than the
// kernel's own time on a large tensor. Freed output blocks therefore wait in a small cache, up to
// kOutputCacheBytes, and a later output of exactly that size reuses one, already mapped.
constexpr size_t kOutputCacheBytes = size_t(256) << 20;

class OutputCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = blocks_.find(bytes);
      if (it != blocks_.end()) {
        void* p = it->second;
        blocks_.erase(it);
        held_ -= bytes;
        return p;
      }
    }
    void* p = std::malloc(bytes > 0 ? bytes : 1);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= kOutputCacheBytes) {
        blocks_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> blocks_;
  size_t held_ = 0;
};

OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();  // never destroyed: arrays may outlive teardown
  return *cache;
}

struct Block {
  void* data;
  size_t bytes;
};

// A new uninitialized C-contiguous array of a's shape and dtype.
py::array empty_like(const py::array& a) {
  const size_t bytes = size_t(a.nbytes());
  Block* block = new Block{output_cache().take(bytes), bytes};
  py::capsule owner(block, [](void* b) {
    Block* blk = static_cast<Block*>(b);
    output_cache().give(blk->data, blk->bytes);
    delete blk;
  });
  std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  return py::array(a.dtype(), shape, block->data, owner);
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
      .def_readwrite("channels_last", &nk::Plan::channels_last)
      .def_property_readonly("num_groups", &nk::Plan::num_groups)
      .def_property_readonly("group_counts", [](const nk::Plan& p) {
        nk::check_plan(p);  // channels_last is writable from Python; the rest is checked already
        return nk::group_counts(p);
      });

  m.def("plan_per_channel", &nk::plan_per_channel, py::arg("N"), py::arg("C"), py::arg("S"));
  m.def("plan_per_channel_in_sets", &nk::plan_per_channel_in_sets, py::arg("N"), py::arg("C"),
        py::arg("S"), py::arg("set_of_sample"));
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

  m.def("normalize_backward", [](const nk::Plan& plan, const py::array& x, const py::object& dy,
                                 const py::object& mean, const py::object& rstd,
                                 const py::object& weight, bool batch_stats, const py::object& dx,
                                 const py::object& dweight, const py::object& dbias) {
    dispatch(x, [&](auto s) {
      backward_impl<decltype(s)>(plan, x, dy, mean, rstd, weight, batch_stats, dx, dweight, dbias);
    });
  }, py::arg("plan"), py::arg("x"), py::arg("dy"), py::arg("mean"), py::arg("rstd"),
     py::arg("weight"), py::arg("batch_stats"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"));

  m.def("empty_like", &empty_like, py::arg("a"),
        "A new uninitialized C-contiguous array of a's shape and dtype, on the C heap.");
  m.def("set_num_threads", &nk::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &nk::get_num_threads);
  m.def("isa_name", &nk::isa_name);
  m.def("supported_isas", &nk::supported_isas);
  m.def("set_isa", &nk::set_isa, py::arg("name"));
}
