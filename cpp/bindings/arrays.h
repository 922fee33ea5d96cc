// NumPy arrays at the binding boundary: dtype identification by type number, checked views of
// argument arrays, and output arrays from a cache of freed blocks. Shared by module.cpp (the
// plan-level calls) and forward_fast.cpp (the one-call layer forward).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "normkit/dtypes.h"

namespace nkpy {

namespace py = pybind11;

template <class S> const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<double>() { return "float64"; }
template <> inline const char* dtype_name<nk::f16>() { return "float16"; }
template <> inline const char* dtype_name<nk::bf16>() { return "bfloat16"; }

// NumPy type numbers identify the dtypes without a Python call per array (a dtype's name is a
// Python property, and costs microseconds). ml_dtypes' bfloat16 gets its number at registration:
// the first array whose dtype is named "bfloat16" teaches it. A non-native byte order is `other`
// (its type number is the native type's).
enum class Dt { f32, f64, f16, bf16, other };
Dt dt_of(const py::array& a);

template <class S> constexpr Dt dt_code();
template <> constexpr Dt dt_code<float>() { return Dt::f32; }
template <> constexpr Dt dt_code<double>() { return Dt::f64; }
template <> constexpr Dt dt_code<nk::f16>() { return Dt::f16; }
template <> constexpr Dt dt_code<nk::bf16>() { return Dt::bf16; }

// A plain ndarray (not a subclass such as a masked array), C-contiguous and aligned: what the
// one-call fast paths accept.
bool plain(py::handle h);

inline std::string dtype_of(const py::array& a) { return py::str(a.dtype().attr("name")); }

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

// A new uninitialized C-contiguous array of a's shape and dtype, from the output cache.
py::array empty_like(const py::array& a);

// A new uninitialized float64 array of `rows` values (cols < 0) or rows x cols: the statistics
// and sums the steps return. From the output cache when it is at least kCachedDoublesBytes:
// LayerNorm2d's per-(n, h, w) statistics are three 800 KB arrays per call, and fresh ones cost a
// page fault per 4 KB, a third of its forward.
constexpr size_t kCachedDoublesBytes = size_t(64) << 10;
py::array_t<double> doubles(int64_t rows, int64_t cols = -1);

}  // namespace nkpy
