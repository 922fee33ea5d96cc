// Threading: one parallel-for over independent work items, each writing its own output slot.
// No buffer is indexed by thread id and no reduction crosses threads, so results are bitwise
// identical for any thread count. Small jobs run on the calling thread.
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace nk {

int get_num_threads();

// The last-level cache this CPU uses, in bytes (sysfs, else sysconf, else 32 MiB).
int64_t last_level_cache_bytes();

// Whether an output of `bytes` is written with streaming stores: when it is larger than half
// the last-level cache, it cannot stay there for its reader anyway, and skipping the read for
// ownership saves a third of the memory traffic of the pass that writes it.
bool stream_output(int64_t bytes);

// Below this many elements of work a job stays on one thread: waking a team costs more.
constexpr int64_t kParallelMinWork = 1 << 15;

// Orders this thread's streaming (non-temporal) stores before its later stores, so that whoever
// synchronizes with it afterwards sees them. The kernels stream without fencing: parallel_for
// fences once per thread at the end of its share (a fence per 8 KB chunk waited for the
// write-combining buffers to drain every time: a third of a one-thread streamed apply).
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <class F>
void parallel_for(int64_t n, int64_t work_per_item, const F& f) {
#ifdef _OPENMP
  const int threads = get_num_threads();
  if (threads <= 1 || n <= 1 || n * work_per_item < kParallelMinWork) {
    for (int64_t i = 0; i < n; ++i) f(i);  // not even an OpenMP call: a 1-thread region costs ~1 us
    store_fence();
    return;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) f(i);
    store_fence();
  }
#else
  (void)work_per_item;
  for (int64_t i = 0; i < n; ++i) f(i);
  store_fence();
#endif
}

}  // namespace nk
