// C++ microbenchmarks of the entry points (Google Benchmark). Bytes processed are the minimum
// an op must move (forward: read x + write y; backward: read x, dy + write dx), so the
// reported bandwidth compares directly with a copy's.
//   cmake -S . -B build/bench -DNORMKIT_BUILD_BENCH=ON && cmake --build build/bench
//   build/bench/normkit_bench --benchmark_filter=BatchNorm
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "normkit/normkit.h"

namespace {

struct Case {
  nk::Plan plan;
  std::vector<float> x, dy, y, w, b;
  std::vector<double> mean, var, rstd;
  explicit Case(nk::Plan p) : plan(std::move(p)) {
    const int64_t n = plan.planes() * plan.S, G = plan.num_groups(), A = plan.affine_size();
    std::mt19937 rng(0);
    std::normal_distribution<float> d(0, 1);
    x.resize(n); dy.resize(n); y.resize(n);
    for (auto& e : x) e = d(rng);
    for (auto& e : dy) e = d(rng);
    w.assign(A, 1.5f); b.assign(A, 0.5f);
    mean.resize(G); var.resize(G); rstd.resize(G);
    nk::group_moments<float>(plan, x.data(), mean.data(), var.data());
    for (int64_t g = 0; g < G; ++g) rstd[g] = 1 / std::sqrt(var[g] + 1e-5);
  }
  int64_t bytes() const { return int64_t(x.size() * sizeof(float)); }
};

nk::Plan plan_of(int kind, int64_t N, int64_t C, int64_t S) {
  switch (kind) {
    case 0: return nk::plan_per_channel(N, C, S);             // BatchNorm
    case 1: return nk::plan_per_sample_group(N, C, S, std::min<int64_t>(32, C));  // GroupNorm(32)
    case 2: return nk::plan_per_sample_group(N, C, S, C);     // InstanceNorm
    case 3: { nk::Plan p = nk::plan_per_channel(N, C, S); p.channels_last = true; return p; }  // BN NHWC
    default: return nk::plan_per_row(N, C * S, false);        // LayerNorm
  }
}

void Forward(benchmark::State& state) {
  Case c(plan_of(int(state.range(0)), state.range(1), state.range(2), state.range(3)));
  for (auto _ : state) {
    nk::group_moments<float>(c.plan, c.x.data(), c.mean.data(), c.var.data());
    nk::normalize<float>(c.plan, c.x.data(), c.mean.data(), c.rstd.data(), c.w.data(), c.b.data(), c.y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * c.bytes());
}

void Inference(benchmark::State& state) {
  Case c(plan_of(int(state.range(0)), state.range(1), state.range(2), state.range(3)));
  for (auto _ : state) {
    nk::normalize<float>(c.plan, c.x.data(), c.mean.data(), c.rstd.data(), c.w.data(), c.b.data(), c.y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * c.bytes());
}

void Backward(benchmark::State& state) {
  Case c(plan_of(int(state.range(0)), state.range(1), state.range(2), state.range(3)));
  std::vector<float> dw(c.w.size()), db(c.w.size());
  for (auto _ : state) {
    nk::normalize_backward<float>(c.plan, c.x.data(), c.dy.data(), c.mean.data(), c.rstd.data(),
                                  c.w.data(), true, c.y.data(), dw.data(), db.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 3 * c.bytes());
}

void Copy(benchmark::State& state) {
  const int64_t n = state.range(0) * state.range(1) * state.range(2);
  std::vector<float> a(n, 1.0f), b(n);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n * sizeof(float));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * n * int64_t(sizeof(float)));
}

// {kind, N, C, S}: kind 0 BatchNorm, 1 GroupNorm(32), 2 InstanceNorm, 3 BatchNorm NHWC, 4 LayerNorm
void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"kind", "N", "C", "S"});
  for (int kind : {0, 1, 2, 3}) {
    b->Args({kind, 32, 64, 56 * 56});
    b->Args({kind, 8, 256, 14 * 14});
    b->Args({kind, 2, 16, 8 * 8});
  }
  b->Args({4, 8192, 1, 1024});
  b->UseRealTime();
}

BENCHMARK(Forward)->Apply(Shapes);
BENCHMARK(Inference)->Apply(Shapes);
BENCHMARK(Backward)->Apply(Shapes);
BENCHMARK(Copy)->Args({32, 64, 56 * 56})->Args({8, 256, 14 * 14})->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
