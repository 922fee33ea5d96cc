#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <unistd.h>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "normkit/normkit.h"

namespace nk {

static int initial_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();  // honours OMP_NUM_THREADS
#else
  return 1;
#endif
}

// A process-wide setting: omp_set_num_threads only affects the calling thread, and normkit is
// called from many Python threads.
static std::atomic<int> g_threads{initial_threads()};

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
  g_threads.store(n);
}

int get_num_threads() { return g_threads.load(); }

// The last-level cache this CPU uses: Linux's sysfs size of cpu0's level-3 cache (in a VM,
// glibc's sysconf reports the host package's total, ten times too much on a 2-vCPU slice of an
// EPYC), else sysconf, else 32 MiB.
static int64_t detect_last_level_cache() {
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long n = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &n, &unit);
    std::fclose(f);
    if (got >= 1 && n > 0) return n << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
  }
  long l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return l3 > 0 ? int64_t(l3) : int64_t(32) << 20;
}

static std::atomic<int64_t> g_cache_bytes{0};  // 0: the detected size

void set_cache_bytes(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("cache bytes must be >= 0 (0: detect)");
  g_cache_bytes.store(bytes);
}

int64_t last_level_cache_bytes() {
  static const int64_t detected = detect_last_level_cache();
  const int64_t set = g_cache_bytes.load();
  return set > 0 ? set : detected;
}

bool stream_output(int64_t bytes) { return bytes >= last_level_cache_bytes() / 2; }

void parallel_copy(void* dst, const void* src, int64_t bytes) {
  constexpr int64_t kPiece = 64 << 10;
  parallel_for((bytes + kPiece - 1) / kPiece, kPiece, [&](int64_t i) {
    const int64_t off = i * kPiece;
    std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, std::min(kPiece, bytes - off));
  });
}

}  // namespace nk
