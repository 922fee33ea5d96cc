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

constexpr int64_t kPositionBlock = 256;  // positions per work item: C rows of a block stay in L1/L2

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
  const int64_t blocks = (Sp + kPositionBlock - 1) / kPositionBlock;
  parallel_for(N * blocks, C * kPositionBlock, [&](int64_t it) {
    const int64_t n = it / blocks, i0 = (it % blocks) * kPositionBlock;
    const int64_t off = n * C * Sp + i0;
    ker.lrn_forward(x + off, y + off, C, Sp, std::min(kPositionBlock, Sp - i0), size, T(alpha), T(beta), T(k));
  });
}

template <class S>
void local_response_norm_backward(int64_t N, int64_t C, int64_t Sp, const S* x, const S* dy, S* dx, int64_t size,
                                  double alpha, double beta, double k) {
  using T = compute_t<S>;
  check_lrn(N, C, Sp, size);
  const Kernels<S>& ker = kernels().get<S>();
  const int64_t blocks = (Sp + kPositionBlock - 1) / kPositionBlock;
  parallel_for(N * blocks, 2 * C * kPositionBlock, [&](int64_t it) {
    const int64_t n = it / blocks, i0 = (it % blocks) * kPositionBlock;
    const int64_t off = n * C * Sp + i0;
    ker.lrn_backward(x + off, dy + off, dx + off, C, Sp, std::min(kPositionBlock, Sp - i0), size, T(alpha),
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
