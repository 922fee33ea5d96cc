// The primitive kernels every normalization is built from, as a function table. Each ISA level
// (baseline, avx2, avx512) compiles kernels/*.cpp into its own namespace and fills one table;
// dispatch.cpp picks a table once, at load. Each primitive works on one contiguous chunk.
#pragma once
#include <cstdint>

namespace nk {

// Chunk length of every pass: fixed, so results never depend on the thread count, and small
// enough that a chunk's second moments pass reads it from L1.
constexpr int64_t kChunk = 2048;

template <class T>
struct Kernels {
  // mean and sum of squared deviations of x[0, n), two passes over the chunk.
  void (*moments)(const T* x, int64_t n, double* mean, double* m2);
  // A = sum dy*w*(x - shift), B = sum dy*w, with w[i] = 1 when w is null.
  void (*dot)(const T* x, const T* dy, const T* w, int64_t n, T shift, double* A, double* B);
  // gsum[i] += dy*((x - shift)*a + b), bsum[i] += dy: column sums for a per-column affine.
  void (*col_accumulate)(const T* x, const T* dy, int64_t n, T shift, T a, T b, T* gsum, T* bsum);
  // y = ((x - shift)*a + b) * g + h [+ residual] [then max(y, 0)], g, h and residual per
  // element (null: 1, 0 and 0). The epilogue fuses an inference block's add and ReLU.
  void (*affine)(const T* x, T* y, int64_t n, T shift, T a, T b, const T* g, const T* h,
                 const T* residual, bool relu);
  // dx = c1*dy*w + c2*(x - shift) + c3, w per element (null: 1).
  void (*backward_apply)(const T* x, const T* dy, T* dx, int64_t n, T c1, T c2, T shift, T c3,
                         const T* w);
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  template <class T> const Kernels<T>& get() const;
};
template <> inline const Kernels<float>& KernelTable::get<float>() const { return f32; }
template <> inline const Kernels<double>& KernelTable::get<double>() const { return f64; }

namespace baseline { KernelTable make_table(); }
namespace avx2 { KernelTable make_table(); }
namespace avx512 { KernelTable make_table(); }

const KernelTable& kernels();  // the table chosen at load (dispatch.cpp)

}  // namespace nk
