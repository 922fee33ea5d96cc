// conv2d_stat_jacobians (normkit/conv.h): a convolution's forward and its weight gradient for
// dy = y in one pass over the input, by im2col and two Eigen GEMMs per block of positions.
//
// Derivation (checked by tests/test_conv_jacobians.py against a float64 reference, torch's
// autograd and central finite differences): y[n, c, p] = w[c] . patch(n, p), so with M = N*P
//   mean_c   = (1/M) sum_{n,p} w[c] . patch(n, p)        -> d/dw[c] = (1/M) sum patch(n, p)
//   sqmean_c = (1/M) sum_{n,p} (w[c] . patch(n, p))^2    -> d/dw[c] = (2/M) sum y[n, c, p] patch(n, p)
// Per block of Pb positions of one sample and group, A (Pb x K) holds the patches (im2col):
//   Y = A W^T (Pb x Cb, the block's outputs),  D = A^T Y (K x Cb),  s = column sums of A.
//
// This file is compiled twice over. Once per ISA level (NK_ISA_NS defined, like kernels/*.cpp),
// for the GEMMs: Eigen's namespace is renamed per level there, so that no AVX-512 instantiation
// of an Eigen template can stand in for the baseline one at link time. And once plainly, into
// the library, for the entry point, which checks the geometry and calls the level dispatch.cpp
// chose.
//
// Numerics and threads: work items are (range of position blocks, block of output channels),
// fixed by the shape alone. float input runs float GEMMs over one block of positions (K-long
// dots for Y, Pb-long ones for D); every block's D and s are added in double to its range's
// partial sums, and the ranges' partials are summed in range order at the end. Every sum's
// order is therefore fixed by the shape: bitwise identical results for any thread count.
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "normkit/conv.h"

#ifdef NK_ISA_NS

#define NK_CONV_PASTE2(a, b) a##b
#define NK_CONV_PASTE(a, b) NK_CONV_PASTE2(a, b)
#define Eigen NK_CONV_PASTE(Eigen_, NK_ISA_NS)  // Eigen_baseline::, Eigen_avx2::, Eigen_avx512::
#include <Eigen/Core>

#include "parallel.h"

namespace nk {
namespace NK_ISA_NS {

namespace {

// Positions per block: A's Pb x K values at most about half of a 1 MiB L2 (but at least
// kMinBlock positions: Eigen's float GEMM runs at a third of its speed for 96 or 112 rows on
// AVX-512) and at most kMaxBlock (float sums of D stay that short), a sample's positions cut
// into equal blocks, Pb a multiple of 16.
constexpr int64_t kBlockBytes = 512 << 10;
constexpr int64_t kMinBlock = 128, kMaxBlock = 4096;
constexpr int64_t kBlockAlign = 16;
// Lanes of the patch sums: independent double accumulators, combined at the end of a range.
constexpr int64_t kLanes = 16;
// Output channels per item at most: a wider group is split (its blocks share no sums).
constexpr int64_t kMaxItemChannels = 128;
// Ranges of position blocks, each with its own double partial sums (C_out*K of them): at most
// kMaxRanges, and their partials within kPartialBytes.
constexpr int64_t kMaxRanges = 32;
constexpr int64_t kPartialBytes = int64_t(64) << 20;

// How the work is cut, from the shape alone.
struct Layout {
  int64_t G, Ci, Co, K, Ho, Wo, P, M;  // groups; per-group in/out channels; fan-in; output size
  int64_t Pb, Q, T;                     // positions per block; blocks per sample; blocks in all
  int64_t R;                            // ranges of blocks (block t belongs to range t*R/T)
  int64_t B, Cb;                        // channel blocks per group, channels per block (last: fewer)
  int64_t rows;                         // padded input rows a block reads at most
  int64_t items() const { return R * G * B; }
  int64_t range_begin(int64_t r) const { return r * T / R; }
};

template <class S>
Layout layout_of(const Conv2d& c) {
  Layout l;
  l.G = c.groups;
  l.Ci = c.C_in / l.G;
  l.Co = c.C_out / l.G;
  l.K = c.fan_in();
  l.Ho = c.out_h();
  l.Wo = c.out_w();
  l.P = l.Ho * l.Wo;
  l.M = c.N * l.P;
  const int64_t most = std::clamp(kBlockBytes / (l.K * int64_t(sizeof(S))), kMinBlock, kMaxBlock);
  l.Q = (l.P + most - 1) / most;
  l.Pb = std::min(l.P, ((l.P + l.Q - 1) / l.Q + kBlockAlign - 1) / kBlockAlign * kBlockAlign);
  l.Q = (l.P + l.Pb - 1) / l.Pb;
  l.T = c.N * l.Q;
  l.rows = (std::min(l.Ho, (l.Pb + l.Wo - 2) / l.Wo + 1) - 1) * c.stride_h + (c.kh - 1) * c.dilation_h + 1;
  const int64_t partial = std::max<int64_t>(1, c.C_out * l.K * int64_t(sizeof(double)));
  l.R = std::max<int64_t>(1, std::min({l.T, kMaxRanges, kPartialBytes / partial}));
  l.B = (l.Co + kMaxItemChannels - 1) / kMaxItemChannels;
  l.Cb = (l.Co + l.B - 1) / l.B;
  return l;
}

// The rows of one sample's group that output rows [oh0, oh1] read, zero-padded: Xc[ci][r][u] =
// x[ci, oh0*stride_h - pad_h + r, u - pad_w] (0 outside the plane), rows_of(oh1 - oh0) rows of
// W + 2*pad_w columns per channel. Then every patch value is one plain read of Xc.
inline int64_t rows_of(const Conv2d& c, int64_t output_rows) {
  return (output_rows - 1) * c.stride_h + (c.kh - 1) * c.dilation_h + 1;
}

template <class S>
void pad_rows(const Conv2d& c, const Layout& l, const S* x, int64_t oh0, int64_t oh1, S* Xc) {
  using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  const int64_t rows = rows_of(c, oh1 - oh0 + 1), Wp = c.W + 2 * c.pad_w, ih0 = oh0 * c.stride_h - c.pad_h;
  for (int64_t ci = 0; ci < l.Ci; ++ci) {
    for (int64_t r = 0; r < rows; ++r) {
      S* out = Xc + (ci * rows + r) * Wp;
      const int64_t ih = ih0 + r;
      if (ih < 0 || ih >= c.H) {
        Vec::Map(out, Wp).setZero();
      } else {
        Vec::Map(out, c.pad_w).setZero();
        Vec::Map(out + c.pad_w, c.W) = Vec::Map(x + (ci * c.H + ih) * c.W, c.W);
        Vec::Map(out + c.pad_w + c.W, c.pad_w).setZero();
      }
    }
  }
}

// Elements a vector copy may read and write past a segment's end (the buffers' slack).
constexpr int64_t kOverrun = 16;

// A[k*n + i] = Xc[ci][(oh - oh0)*stride_h + ky*dilation_h][ow*stride_w + kx*dilation_w] for the n
// positions p0 + i of the block, output position (oh, ow) = divmod(p, W_out), oh0 = p0 / W_out,
// k = (ci*kh + ky)*kw + kx: the patches, x at input row oh*stride_h - pad_h + ky*dilation_h and
// column ow*stride_w - pad_w + kx*dilation_w (0 in the padding). A row of A is a few output
// rows' segments; with stride_w 1 each is copied kOverrun elements at a time, the last copy
// spilling into what the next segment (or row, or the slack) writes next: short segments cost a
// few vector moves, not a call and a scalar tail (the segment loop was a sixth of the call).
template <class S>
void im2col(const Conv2d& c, const Layout& l, const S* Xc, int64_t p0, int64_t n, S* A) {
  using Packet = Eigen::Matrix<S, kOverrun, 1>;
  const int64_t oh0 = p0 / l.Wo, rows = rows_of(c, (p0 + n - 1) / l.Wo - oh0 + 1), Wp = c.W + 2 * c.pad_w;
  const int64_t sw = c.stride_w;
  for (int64_t ci = 0; ci < l.Ci; ++ci) {
    for (int64_t ky = 0; ky < c.kh; ++ky) {
      for (int64_t kx = 0; kx < c.kw; ++kx) {
        S* row = A + ((ci * c.kh + ky) * c.kw + kx) * n;
        const S* src = Xc + (ci * rows + ky * c.dilation_h) * Wp + kx * c.dilation_w;  // output row oh0, column 0
        for (int64_t i = 0, ow0 = p0 % l.Wo; i < n; ow0 = 0, src += c.stride_h * Wp) {
          const int64_t len = std::min(l.Wo - ow0, n - i);  // this output row's positions [ow0, ow0 + len)
          S* out = row + i;
          if (sw == 1) {
            for (int64_t j = 0; j < len; j += kOverrun) Packet::Map(out + j) = Packet::Map(src + ow0 + j);
          } else {
            for (int64_t j = 0; j < len; ++j) out[j] = src[(ow0 + j) * sw];
          }
          i += len;
        }
      }
    }
  }
}

// lane[j] += a[i] for i = j mod kLanes, in double: a fixed order for each n.
template <class S>
void add_lanes(const S* a, int64_t n, double* lane) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += double(a[i + j]);
  for (int64_t j = 0; i < n; ++i, ++j) lane[j] += double(a[i]);
}

}  // namespace

template <class S>
void conv2d_stat_jacobians(const Conv2d& c, const S* x, const S* weight, S* dmean, S* dsqmean) {
  using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
  using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  const Layout l = layout_of<S>(c);
  const int64_t K = l.K, C = c.C_out;
  // Partial sums per range r: sq[r] (K x C_out, filter c's column at c*K, the weight's layout)
  // of sum y*patch, and mean[r] (K x G) of sum patch.
  MatD sq(K, C * l.R), mean(K, l.G * l.R);
  const int64_t work = std::min<int64_t>(kParallelMinWork, (l.T / l.R + 1) * l.Pb * K * l.Cb);
  parallel_for(l.items(), work, [&](int64_t item) {
    const int64_t r = item / (l.G * l.B), g = item / l.B % l.G, b = item % l.B;
    const int64_t c0 = g * l.Co + b * l.Cb, nc = std::min(l.Cb, l.Co - b * l.Cb);
    Eigen::Map<MatD> acc(sq.data() + (r * C + c0) * K, K, nc);
    auto macc = mean.col(r * l.G + g);  // written by the group's first channel block only
    acc.setZero();
    if (b == 0) macc.setZero();
    // Storage: a block maps its n rows of A and Y; Xc: the block's padded input rows.
    Mat Y(l.Pb, nc), D(K, nc);
    Vec A = Vec::Zero(l.Pb * K + kOverrun), Xc = Vec::Zero(l.Ci * l.rows * (c.W + 2 * c.pad_w) + kOverrun);
    MatD lanes = MatD::Zero(b == 0 ? kLanes : 0, K);  // patch sums of filter element k: lanes.col(k)
    const Eigen::Map<const Mat> Wt(weight + c0 * K, K, nc);  // filter j of the block: column j
    for (int64_t t = l.range_begin(r); t < l.range_begin(r + 1); ++t) {
      const int64_t s = t / l.Q, p0 = t % l.Q * l.Pb, n = std::min(l.Pb, l.P - p0);
      const int64_t oh0 = p0 / l.Wo, oh1 = (p0 + n - 1) / l.Wo;
      pad_rows(c, l, x + (s * c.C_in + g * l.Ci) * c.H * c.W, oh0, oh1, Xc.data());
      im2col(c, l, Xc.data(), p0, n, A.data());
      const Eigen::Map<const Mat> An(A.data(), n, K);
      Eigen::Map<Mat> Yn(Y.data(), n, nc);
      Yn.noalias() = An * Wt;                  // y[s, c0 + j, p0 + i] = Yn(i, j)
      D.noalias() = An.transpose() * Yn;       // D(k, j) = sum_i patch_k(i) y_j(i)
      acc += D.template cast<double>();
      if (b == 0)
        for (int64_t k = 0; k < K; ++k) add_lanes(A.data() + k * n, n, lanes.col(k).data());
    }
    if (b == 0)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kLanes; ++j) macc(k) += lanes(j, k);
  });
  // Ranges summed in order: dsqmean[c, k] = 2/M sum_r sq[r](k, c), dmean[c, k] = 1/M sum_r mean[r](k, g(c)).
  const double M = double(l.M);
  parallel_for(C, l.R * K * 2, [&](int64_t co) {
    const int64_t g = co / l.Co;
    for (int64_t k = 0; k < K; ++k) {
      double q = 0, m = 0;
      for (int64_t r = 0; r < l.R; ++r) {
        q += sq(k, r * C + co);
        m += mean(k, r * l.G + g);
      }
      dsqmean[co * K + k] = S(2 * q / M);
      dmean[co * K + k] = S(m / M);
    }
  });
}

template void conv2d_stat_jacobians<float>(const Conv2d&, const float*, const float*, float*, float*);
template void conv2d_stat_jacobians<double>(const Conv2d&, const double*, const double*, double*, double*);

}  // namespace NK_ISA_NS
}  // namespace nk

#else  // the entry point

#include <string>

#include "normkit/normkit.h"

namespace nk {

#define NK_CONV_DECLARE(ns)                                                                             \
  namespace ns {                                                                                        \
  template <class S>                                                                                    \
  void conv2d_stat_jacobians(const Conv2d& c, const S* x, const S* weight, S* dmean, S* dsqmean);       \
  }
NK_CONV_DECLARE(baseline)
#ifdef NK_X86_LEVELS
NK_CONV_DECLARE(avx2)
NK_CONV_DECLARE(avx512)
#endif
#undef NK_CONV_DECLARE

void check_conv2d(const Conv2d& c) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("invalid conv2d: " + why); };
  constexpr int64_t kMax = int64_t(1) << 31;  // every size and parameter: sums and products below stay in int64
  const int64_t sizes[] = {c.N, c.C_in, c.H, c.W, c.C_out, c.kh, c.kw, c.stride_h, c.stride_w,
                           c.pad_h, c.pad_w, c.dilation_h, c.dilation_w, c.groups};
  for (int64_t v : sizes)
    if (v < 0 || v >= kMax) fail("negative or too large dimension or parameter");
  if (c.N < 1) fail("no samples (N = 0): the means are over N*H_out*W_out positions");
  if (c.kh < 1 || c.kw < 1) fail("empty kernel");
  if (c.stride_h < 1 || c.stride_w < 1) fail("stride must be positive");
  if (c.dilation_h < 1 || c.dilation_w < 1) fail("dilation must be positive");
  if (c.groups < 1 || c.C_in % c.groups != 0 || c.C_out % c.groups != 0)
    fail("groups must divide both channel counts");
  if (c.H + 2 * c.pad_h < c.dilation_h * (c.kh - 1) + 1 || c.W + 2 * c.pad_w < c.dilation_w * (c.kw - 1) + 1)
    fail("the dilated kernel is larger than the padded input");
  int64_t planes = 0, elements = 0, filters = 0, rows = 0, positions = 0;
  if (__builtin_mul_overflow(c.N, c.C_in, &planes) || __builtin_mul_overflow(planes, c.H * c.W, &elements) ||
      __builtin_mul_overflow(c.C_out, c.fan_in(), &filters) || __builtin_mul_overflow(c.out_h(), c.out_w(), &rows) ||
      __builtin_mul_overflow(rows, c.N, &positions) || __builtin_mul_overflow(filters, int64_t(8), &filters))
    fail("dimensions overflow");
}

template <class S>
void conv2d_stat_jacobians(const Conv2d& c, const S* x, const S* weight, S* dmean, S* dsqmean) {
  check_conv2d(c);
  if (c.C_out == 0 || c.fan_in() == 0) return;  // empty outputs
#ifdef NK_X86_LEVELS
  const std::string isa = isa_name();
  if (isa.rfind("avx512", 0) == 0) return avx512::conv2d_stat_jacobians<S>(c, x, weight, dmean, dsqmean);
  if (isa == "avx2") return avx2::conv2d_stat_jacobians<S>(c, x, weight, dmean, dsqmean);
#endif
  baseline::conv2d_stat_jacobians<S>(c, x, weight, dmean, dsqmean);
}

template void conv2d_stat_jacobians<float>(const Conv2d&, const float*, const float*, float*, float*);
template void conv2d_stat_jacobians<double>(const Conv2d&, const double*, const double*, double*, double*);

}  // namespace nk

#endif
