// Runtime ISA dispatch: every ISA level's kernels are compiled into the library (each in its
// own namespace, so no AVX-512 symbol can stand in for a baseline one); one table is chosen
// at first use from what the CPU and the OS support. NORMKIT_ISA=baseline|avx2|avx512|avx512bf16
// asks for a lower level; set_isa() switches at run time so the tests can check every level.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/table.h"
#include "normkit/normkit.h"

namespace nk {

namespace {

struct Level {
  const char* name;
  KernelTable (*make)();
};

#if defined(NK_X86_LEVELS) && defined(NK_X86_AVX512BF16)
const Level kLevels[] = {{"baseline", &baseline::make_table}, {"avx2", &avx2::make_table},
                         {"avx512", &avx512::make_table}, {"avx512bf16", &avx512bf16::make_table}};
#elif defined(NK_X86_LEVELS)
const Level kLevels[] = {{"baseline", &baseline::make_table}, {"avx2", &avx2::make_table},
                         {"avx512", &avx512::make_table}};
#else
const Level kLevels[] = {{"baseline", &baseline::make_table}};
#endif
constexpr int kNumLevels = sizeof(kLevels) / sizeof(kLevels[0]);

int supported_level() {
#if defined(NK_X86_LEVELS)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int level_of(const std::string& name) {
  for (int i = 0; i < kNumLevels; ++i)
    if (name == kLevels[i].name) return i;
  std::string known;
  for (int i = 0; i < kNumLevels; ++i) known += std::string(i ? ", " : "") + kLevels[i].name;
  throw std::invalid_argument("unknown ISA level '" + name + "' (this build has: " + known + ")");
}

KernelTable g_tables[kNumLevels];
std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* initial_table() {
  // Only the levels this CPU runs: a level's make_table is compiled with its ISA's flags, so
  // even filling its table may use its instructions (AVX-512 stores on an AVX2-only CPU).
  int level = std::min(supported_level(), kNumLevels - 1);
  for (int i = 0; i <= level; ++i) g_tables[i] = kLevels[i].make();
  if (const char* forced = std::getenv("NORMKIT_ISA"); forced && *forced)
    level = std::min(level, level_of(forced));
  return &g_tables[level];
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable* first = initial_table();
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  return t ? *t : *first;
}

std::string isa_name() { return kernels().isa; }

std::vector<std::string> supported_isas() {
  kernels();
  std::vector<std::string> out;
  for (int i = 0; i <= std::min(supported_level(), kNumLevels - 1); ++i) out.push_back(kLevels[i].name);
  return out;
}

void set_isa(const std::string& name) {
  kernels();
  const int level = level_of(name);
  if (level > supported_level())
    throw std::invalid_argument("ISA level '" + name + "' is not supported by this CPU");
  g_active.store(&g_tables[level], std::memory_order_release);
}

}  // namespace nk
