// The statistics Jacobians of a 2-D convolution (normkit.conv2d_stat_jacobians): how each output
// channel's mean and mean square over (N, H_out, W_out) change with that channel's filter, for
// CrossIterationBatchNorm2d's compensation of earlier iterations' statistics.
#pragma once
#include <cstdint>

namespace nk {

// A convolution's geometry, torch's conv2d semantics: input (N, C_in, H, W), weight
// (C_out, C_in/groups, kh, kw), zero padding, no bias; output (N, C_out, out_h(), out_w()).
struct Conv2d {
  int64_t N = 0, C_in = 0, H = 0, W = 0, C_out = 0, kh = 0, kw = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1, groups = 1;
  // Valid once check_conv2d has passed.
  int64_t out_h() const { return (H + 2 * pad_h - dilation_h * (kh - 1) - 1) / stride_h + 1; }
  int64_t out_w() const { return (W + 2 * pad_w - dilation_w * (kw - 1) - 1) / stride_w + 1; }
  int64_t fan_in() const { return C_in / groups * kh * kw; }  // K: elements of one filter
};

// Throws std::invalid_argument unless the geometry is one torch accepts with at least one output
// position (N >= 1, out_h(), out_w() >= 1) and every size is free of int64 overflow.
void check_conv2d(const Conv2d& c);

// y = conv2d(x, weight); M = N*H_out*W_out. For each output channel c (filter c, K = fan_in()
// elements, row c of each output):
//   dmean[c]   = d mean_c   / d weight[c] = (1/M) sum_{n,i,j} patch(n, i, j)
//   dsqmean[c] = d sqmean_c / d weight[c] = (2/M) sum_{n,i,j} y[n, c, i, j] * patch(n, i, j)
// where patch(n, i, j) is the K input values filter c meets at output position (i, j) (zeros in
// the padding); every filter of a group sees the same patches. x, weight, dmean, dsqmean are
// C-contiguous; S is float or double (float: float GEMMs over blocks of at most 4096 positions,
// the blocks' results summed in double). Bitwise identical for any thread count.
template <class S>
void conv2d_stat_jacobians(const Conv2d& c, const S* x, const S* weight, S* dmean, S* dsqmean);

}  // namespace nk
