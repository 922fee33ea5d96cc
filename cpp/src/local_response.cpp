// Local response normalization over an (N, C, positions) view of any rank: work items are blocks
// of positions of one sample, every item all C channels of its positions, so each output is
// written by one item and the bits never depend on the thread count.
#include <algorithm>
#include <vector>

#include "kernels/table.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

namespace {

// Positions per work item: up to 4096, and to 32768 / min(size, C) so that the window's rows and
// the backward's ring of them stay in L2 (16 KB rows for torch's sizes); fewer where the samples'
// blocks would not give every thread four items; at least 256. Each channel's row of a block is
// one contiguous run: rows of 256 positions (1 KB, 12.5 KB apart at 56x56) took LocalResponseNorm
// at 32x64x56x56 12-25% longer than whole 3136-position rows, the run too short for the hardware
// prefetcher. A block only chooses which item computes an output, never how, so it may depend on
// the thread count.
constexpr int64_t kMaxPositionBlock = 4096, kMinPositionBlock = 256;

int64_t position_block(int64_t N, int64_t C, int64_t Sp, int64_t size) {
  const int64_t widest = std::min(kMaxPositionBlock, 32768 / std::max<int64_t>(1, std::min(size, C)));
  const int64_t want = (4 * int64_t(get_num_threads()) + std::max<int64_t>(N, 1) - 1) / std::max<int64_t>(N, 1);
  const int64_t per_sample = std::max((Sp + widest - 1) / widest, want);
  const int64_t len = ((Sp + per_sample - 1) / per_sample + 15) / 16 * 16;
  return std::max(kMinPositionBlock, std::min(widest, len));
}

void check_lrn(int64_t N, int64_t C, int64_t S, int64_t size) {
  int64_t planes = 0, elements = 0;
  if (N < 0 || C < 0 || S < 0 || __builtin_mul_overflow(N, C, &planes) || __builtin_mul_overflow(planes, S, &elements))
    throw std::invalid_argument("invalid local response norm: negative or overflowing dimensions");
  if (size < 1) throw std::invalid_argument("invalid local response norm: size must be positive");
}

}  // namespace

template <class S>
void local_response_norm(int64_t N, int64_t C, int64_t Sp, const S* x, S* y, int64_t size, double alpha,
                         double beta, double k) {
  using T = compute_t<S>;
  check_lrn(N, C, Sp, size);
  const Kernels<S>& ker = kernels().get<S>();
  const int64_t len = position_block(N, C, Sp, size), blocks = (Sp + len - 1) / len;
  parallel_for(N * blocks, C * len, [&](int64_t it) {
    const int64_t n = it / blocks, i0 = (it % blocks) * len;
    const int64_t off = n * C * Sp + i0;
    ker.lrn_forward(x + off, y + off, C, Sp, std::min(len, Sp - i0), size, T(alpha), T(beta), T(k));
  });
}

template <class S>
void local_response_norm_backward(int64_t N, int64_t C, int64_t Sp, const S* x, const S* dy, S* dx, int64_t size,
                                  double alpha, double beta, double k) {
  using T = compute_t<S>;
  check_lrn(N, C, Sp, size);
  const Kernels<S>& ker = kernels().get<S>();
  const int64_t len = position_block(N, C, Sp, size), blocks = (Sp + len - 1) / len;
  parallel_for(N * blocks, 2 * C * len, [&](int64_t it) {
    const int64_t n = it / blocks, i0 = (it % blocks) * len;
    const int64_t off = n * C * Sp + i0;
    ker.lrn_backward(x + off, dy + off, dx + off, C, Sp, std::min(len, Sp - i0), size, T(alpha),
                     T(beta), T(k));
  });
}

#define NK_INSTANTIATE(S)                                                                                 \
  template void local_response_norm<S>(int64_t, int64_t, int64_t, const S*, S*, int64_t, double, double, double); \
  template void local_response_norm_backward<S>(int64_t, int64_t, int64_t, const S*, const S*, S*, int64_t, \
                                                double, double, double);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
