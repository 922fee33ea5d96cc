// Array helpers of the binding: dtype identification and the output cache (arrays.h).
#include "arrays.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <cstdlib>
#include <vector>

namespace nkpy {

namespace {
std::atomic<int> g_bf16_num{-1};
// The byte-order character of a dtype that is not in this machine's order.
constexpr char kForeignOrder = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<';
}  // namespace

bool plain(py::handle h) {
  using py::detail::npy_api;
  if (Py_TYPE(h.ptr()) != npy_api::get().PyArray_Type_) return false;
  constexpr int need = npy_api::NPY_ARRAY_C_CONTIGUOUS_ | npy_api::NPY_ARRAY_ALIGNED_;
  return (py::detail::array_proxy(h.ptr())->flags & need) == need;
}

Dt dt_of(const py::array& a) {
  const py::dtype d = a.dtype();
  if (d.byteorder() == kForeignOrder) return Dt::other;
  const int num = d.num();
  switch (num) {
    case 11: return Dt::f32;  // NPY_FLOAT
    case 12: return Dt::f64;  // NPY_DOUBLE
    case 23: return Dt::f16;  // NPY_HALF
    default: break;
  }
  if (num == g_bf16_num.load()) return Dt::bf16;
  if (d.itemsize() == 2 && std::string(py::str(d.attr("name"))) == "bfloat16") {
    g_bf16_num.store(num);
    return Dt::bf16;
  }
  return Dt::other;
}

namespace {

// Output buffers. A fresh output per call from NumPy's allocator pays page faults on every call
// (and compaction stalls when it asks for huge pages and memory is fragmented): more than the
// kernel's own time on a large tensor. Freed output blocks therefore wait in a small cache, up to
// kOutputCacheBytes, and a later output of exactly that size reuses one, already mapped.
constexpr size_t kOutputCacheBytes = size_t(256) << 20;
constexpr size_t kOutputAlignment = 64;

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
    // Aligned to a cache line (malloc's large blocks start 16 bytes past a page): the rows
    // kernels stream an output only where a vector is line-aligned, and with malloc's offset
    // no row of LayerNorm2d's or BatchLayerNorm2d's outputs was, which cost them a read for
    // ownership of every line written.
    void* p = std::aligned_alloc(kOutputAlignment, (std::max<size_t>(bytes, 1) + kOutputAlignment - 1) /
                                                       kOutputAlignment * kOutputAlignment);
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

}  // namespace

namespace {

py::array cached(const py::dtype& dtype, std::vector<py::ssize_t> shape, size_t bytes) {
  Block* block = new Block{output_cache().take(bytes), bytes};
  py::capsule owner(block, [](void* b) {
    Block* blk = static_cast<Block*>(b);
    output_cache().give(blk->data, blk->bytes);
    delete blk;
  });
  return py::array(dtype, shape, block->data, owner);
}

}  // namespace

py::array empty_like(const py::array& a) {
  return cached(a.dtype(), std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()), size_t(a.nbytes()));
}

py::array_t<double> doubles(int64_t rows, int64_t cols) {
  const size_t bytes = size_t(rows) * size_t(cols < 0 ? 1 : cols) * sizeof(double);
  std::vector<py::ssize_t> shape{py::ssize_t(rows)};
  if (cols >= 0) shape.push_back(py::ssize_t(cols));
  if (bytes < kCachedDoublesBytes) return py::array_t<double>(shape);
  return py::array_t<double>(cached(py::dtype::of<double>(), shape, bytes));
}

}  // namespace nkpy
