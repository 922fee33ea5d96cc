// normkit's C++ entry points. Every normalization is three steps over a Plan:
//   group_moments          statistics per group (one read of x)
//   normalize              y = (x - mean) * rstd * weight + bias (one read of x, one write of y)
//   normalize_batch_stats  both; x comes from memory once where the groups allow (block by block)
//   normalize_backward     dx, dweight, dbias (x and dy from memory once where the groups allow,
//                          else twice; one write of dx)
// All arrays are contiguous, in (N, C, S) order, or (N, S, C) for a channels_last plan. S is the storage type of x, y, dy, dx: float,
// double, f16 or bf16 (dtypes.h); weights, biases and their gradients are compute_t<S> (float
// for the half types); statistics are double.
// Results are bitwise identical for any thread count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "normkit/dtypes.h"
#include "normkit/plan.h"
#include "normkit/pointwise.h"

namespace nk {

// mean[g] and biased var[g] of every group; with skip_mean, mean is 0 and var is mean(x^2).
template <class S>
void group_moments(const Plan& plan, const S* x, double* mean, double* var);

// y = (x - mean[g]) * rstd[g] * weight + bias, weight/bias per channel or per column
// (plan.column_affine); either may be null (1 and 0). Inference epilogue: y += residual
// (same shape as x, may be null), then y = max(y, 0) when relu. y may alias x or residual.
template <class S>
void normalize(const Plan& plan, const S* x, const double* mean, const double* rstd,
               const compute_t<S>* weight, const compute_t<S>* bias, S* y,
               const S* residual = nullptr, bool relu = false);

// Forward with statistics from x (training, and every layer without running statistics):
// group_moments, rstd = 1/sqrt(var + eps) and normalize in one call, bitwise the same as those
// three steps. It runs group by group where that keeps each group in cache between its
// statistics and its apply, so x is read from memory once.
template <class S>
void normalize_batch_stats(const Plan& plan, const S* x, double eps, const compute_t<S>* weight,
                           const compute_t<S>* bias, S* y, double* mean, double* var, double* rstd,
                           const S* residual = nullptr, bool relu = false);

// Gradients of normalize. batch_stats: mean/rstd were computed from this x (training), so the
// gradient flows through them; otherwise they are constants (eval). dweight/dbias may be null;
// dx may be null when only the parameter gradients are wanted.
template <class S>
void normalize_backward(const Plan& plan, const S* x, const S* dy, const double* mean,
                        const double* rstd, const compute_t<S>* weight, bool batch_stats, S* dx,
                        compute_t<S>* dweight, compute_t<S>* dbias);

// The same steps one by one, for a research variant: statistics (group_moments of a plan whose
// sets are the variant's sub-batches), then O(groups) arithmetic of the variant's own (the fold),
// then one of these passes. Their coefficients are per (set, channel): entry
// k = sample_group[n]*C + c serves plane (n, c), num_sample_sets*C entries, double. The plan
// must not have a per-column affine. Bitwise identical for any thread count.
//   apply_coefficients           y = (x - mean[k])*scale[k] + offset[k] [+ residual] [relu]
//   backward_sums                sum_dy[k] = sum dy, sum_dy_xmu[k] = sum dy*(x - mean[k])
//   backward_apply_coefficients  dx = c1[k]*dy + c2[k]*(x - mean[k]) + c3[k] (x may be null
//                                when every c2 is 0)
template <class S>
void apply_coefficients(const Plan& plan, const S* x, const double* mean, const double* scale,
                        const double* offset, S* y, const S* residual = nullptr, bool relu = false);
template <class S>
void backward_sums(const Plan& plan, const S* x, const S* dy, const double* mean, double* sum_dy,
                   double* sum_dy_xmu);
template <class S>
void backward_apply_coefficients(const Plan& plan, const S* x, const S* dy, const double* mean,
                                 const double* c1, const double* c2, const double* c3, S* dx);

// The same steps with a per-position affine after the cells' normalization, weight[s] and
// bias[s] over the plan's S positions (compute_t<S>, required), for channels-last plans:
// LayerNorm2d reads NCHW memory as N samples of C rows (positions) of HW columns (cells).
//   apply_coefficients_positions  y = ((x - mean[k])*scale[k] + offset[k])*weight[s] + bias[s]
//   backward_sums_positions       sum_dy[k] = sum weight*dy, sum_dy_xmu[k] = sum weight*dy*(x - mean[k]);
//                                 dweight[s] = sum dy*((x - mean)*scale + offset), dbias[s] = sum dy
//   backward_apply_positions      dx = c1[k]*weight[s]*dy + c2[k]*(x - mean[k]) + c3[k]
//
// An optional SampleTerm joins the normalized value per element of a sample, the same for every
// sample (BatchLayerNorm2d's batch part, per (c, h, w) over the batch): arrays of one sample's
// plan.S*plan.C elements in memory order. normalize_batch_stats_positions:
// y = ((x - mean)*rstd*cell_scale + (x - term.mean[e])*term.scale[e] + term.offset[e])*weight[s]
// + bias[s]; backward_apply_positions: dx gains term.c1[e]*weight[s]*dy
// + term.scale[e]*(x - term.mean[e]) + term.offset[e].
struct SampleTerm {
  const double* mean = nullptr;
  const double* scale = nullptr;
  const double* offset = nullptr;
  const double* c1 = nullptr;  // the backward's
  double cell_scale = 1.0;     // the forward's factor of the cells' standardized value
};
template <class S>
void apply_coefficients_positions(const Plan& plan, const S* x, const double* mean, const double* scale,
                                  const double* offset, const compute_t<S>* weight, const compute_t<S>* bias,
                                  S* y);
// The statistics and the apply in one call, sample by sample while the sample is in cache (as
// normalize_batch_stats' channels-last path), for a channels-last plan whose groups are its
// columns: mean, var, rstd per column of each sample; weight and bias per position (required).
template <class S>
void normalize_batch_stats_positions(const Plan& plan, const S* x, double eps, const compute_t<S>* weight,
                                     const compute_t<S>* bias, S* y, double* mean, double* var, double* rstd,
                                     const SampleTerm* term = nullptr);
template <class S>
void backward_sums_positions(const Plan& plan, const S* x, const S* dy, const double* mean, const double* scale,
                             const double* offset, const compute_t<S>* weight, double* sum_dy,
                             double* sum_dy_xmu, double* dweight, double* dbias);
template <class S>
void backward_apply_positions(const Plan& plan, const S* x, const S* dy, const double* mean, const double* c1,
                              const double* c2, const double* c3, const compute_t<S>* weight, S* dx,
                              const SampleTerm* term = nullptr);
// LayerNorm's backward over a positions plan in one call (normalize_batch_stats_positions'
// plan, its mean and rstd): per (sample, block of columns) while it is in cache, the sums, the
// standardization's fold per column (M = plan.S positions: dx = r w dy - r B/M - r^3 (x - mean)
// A/M with B = sum w dy, A = sum w dy (x - mean)) and dx; dweight[s] and dbias[s] as
// backward_sums_positions'. The same sums and coefficients as those two steps and the fold.
template <class S>
void normalize_backward_positions(const Plan& plan, const S* x, const S* dy, const double* mean,
                                  const double* rstd, const compute_t<S>* weight, S* dx, double* dweight,
                                  double* dbias);

// BatchLayerNorm2d over its feature plan (LayerNorm2d's: N samples of HW columns, its cells
// (n, hw), and C positions, its channels), one pass over the tensor each way (batch_layer.cpp).
// Batch moments per (c, hw) of one sample's F = C*HW elements: with batch_stats the batch's own
// (the forward writes mean_b and var_b, biased), else given (running ones, constants).
//   batch_layer_forward   y = (feature_scale*(x - mean_f)*rstd_f + batch_scale*(x - mean_b)*rstd_b)
//                         *weight[c] + bias[c]; writes rstd_b = 1/sqrt(var_b + eps) and the
//                         feature statistics per cell, biased, as normalize_batch_stats_positions'
//   batch_layer_backward  dx of that, from the forward's statistics (the batch statistics'
//                         gradient joins with batch_stats), dweight[c] and dbias[c]
template <class S>
void batch_layer_forward(const Plan& feature, const S* x, double eps, double feature_scale, double batch_scale,
                         bool batch_stats, double* mean_b, double* var_b, double* rstd_b,
                         const compute_t<S>* weight, const compute_t<S>* bias, S* y, double* mean_f, double* var_f,
                         double* rstd_f);
template <class S>
void batch_layer_backward(const Plan& feature, const S* x, const S* dy, const double* mean_f, const double* rstd_f,
                          const double* mean_b, const double* rstd_b, double feature_scale, double batch_scale,
                          bool batch_stats, const compute_t<S>* weight, S* dx, double* dweight, double* dbias);
// BatchChannelNorm2d's folds over its N*C cells (n, c) of S elements (batch_channel.cpp): a
// batch part x1 = a x + b per channel (a = bn_weight r, b = bn_bias - mu a, r = 1/sqrt(var +
// eps)), then a group part over each sample's groups of C/G channels with gn_weight, gn_bias.
//   batch_channel_fold           from the cells' moments m, v (biased), and mu, var per channel
//                                (with pool, first pooled from the cells into them): r, the
//                                cells' output coefficients y = scale (x - m) + offset, and per
//                                (n, g) the group part's mean mu_g and rstd r_g
//   batch_channel_fold_backward  from the cells' sums B = sum dy, A = sum dy (x - m): dx's
//                                coefficients per cell, dx = c1 dy + c2 (x - m) + c3 (batch:
//                                the batch statistics' gradient joins), and the four gradients
//   batch_channel_infer          inference (the running mu, var) in one pass over x: per batch of
//                                (n, g) groups, the cells' moments m, v, the fold of
//                                batch_channel_fold, then y = scale (x - m) + offset, while the
//                                group is in cache; writes what batch_channel_fold writes
struct BatchChannelParams {
  const double *bn_weight, *bn_bias, *gn_weight, *gn_bias;
};
// Throws std::invalid_argument unless N, C, G, S >= 1 and G divides C (both folds check first).
void check_batch_channel_cells(int64_t N, int64_t C, int64_t G, int64_t S);
void batch_channel_fold(int64_t N, int64_t C, int64_t G, int64_t S, double eps, bool pool, const double* m,
                        const double* v, double* mu, double* var, const BatchChannelParams& p, double* r,
                        double* scale, double* offset, double* mu_g, double* r_g);
template <class S>
void batch_channel_infer(int64_t N, int64_t C, int64_t G, int64_t S_, const S* x, double eps, const double* mu,
                         const double* var, const BatchChannelParams& p, S* y, double* m, double* v, double* r,
                         double* scale, double* offset, double* mu_g, double* r_g);
void batch_channel_fold_backward(int64_t N, int64_t C, int64_t G, int64_t S, bool batch, const double* B,
                                 const double* A, const double* m, const double* v, const double* mu,
                                 const double* r, const double* mu_g, const double* r_g,
                                 const BatchChannelParams& p, double* c1, double* c2, double* c3,
                                 double* d_bn_weight, double* d_bn_bias, double* d_gn_weight, double* d_gn_bias);
// running = (1 - factor)*running + factor*value_scale*value over n elements, in place (torch's
// running-statistics rule; value_scale: the unbiasing N/(N - 1) of a variance).
template <class T>
void running_update(T* running, const double* value, int64_t n, double factor, double value_scale);

// Local response normalization (torch's local_response_norm) of x viewed as (N, C, S): per
// position, d_c = k + alpha/size * sum of x_j^2 over channels j in [c - size/2, c + (size-1)/2]
// (those that exist), y = x * d^-beta; and its backward dx (x and dy in, contiguous).
template <class S>
void local_response_norm(int64_t N, int64_t C, int64_t Sp, const S* x, S* y, int64_t size, double alpha,
                         double beta, double k);
template <class S>
void local_response_norm_backward(int64_t N, int64_t C, int64_t Sp, const S* x, const S* dy, S* dx, int64_t size,
                                  double alpha, double beta, double k);

// Pointwise epilogues (pointwise.h), for the layers whose output is not an affine of x. Per cell
// (as above), nine coefficients: u = (x - shift)*a + b; y = f(u; p, q, r)*scale + offset; the
// backward's x term is about center. Channels-first plans only.
//   apply_pointwise     y = f(u)*scale + offset
//   pointwise_sums      sums[i*K + k], i < kPointwiseSums: cell k's dy, dy*f(u), g, g*(x - center),
//                       dy*df/dp, dy*df/dq, dy*df/dr, with g = dy*f'(u); the last three exactly
//                       0 (not summed, so a NaN in dy does not reach them) where f has no such
//                       derivative: all but evo_b0 lack dq and dr, and only tlu and swish_gate have dp
//   pointwise_backward  dx = c1[k]*g + c2[k]*(x - center[k]) + c3[k]
struct PointwiseCoefficients {
  const double *shift, *a, *b, *p, *q, *r, *scale, *offset, *center;
};
template <class S>
void apply_pointwise(const Plan& plan, Pointwise op, const S* x, const PointwiseCoefficients& coef, S* y);
template <class S>
void pointwise_sums(const Plan& plan, Pointwise op, const S* x, const S* dy,
                    const PointwiseCoefficients& coef, double* sums);
template <class S>
void pointwise_backward(const Plan& plan, Pointwise op, const S* x, const S* dy,
                        const PointwiseCoefficients& coef, const double* c1, const double* c2,
                        const double* c3, S* dx);
// Statistics per group, then the pointwise epilogue, in one call (FRN, EvoNorm-S0): for a plan
// of each sample's own groups (plan_per_sample_group), mean[g] and var[g] of x (skip_mean: 0 and
// the mean of x^2, FRN's nu2), r = 1/sqrt(var + eps), then per plane p = (n, c) of group g the
// cell coefficients cell[i*P + p] from channel c's (9, C) `channel` rows: shift = mean (center)
// or the channel's shift, a *= r unless rstd_into_scale, scale *= r if it, center = mean, the
// rest the channel's; with std_into_r instead the group's sqrt(var + eps) is the cells' r and a
// and scale are the channel's (EvoNorm-B0's instance term). Then y = apply_pointwise with them
// (the cells are the planes). Where a group is one chunk the group's output follows its
// statistics while it is in cache (x read once); else a statistics pass, then the apply pass.
// Groups with no elements fold as mean 0, var 0.
struct PointwiseFold {
  double eps = 0;
  bool skip_mean = false, center = false, rstd_into_scale = false, std_into_r = false;
};
template <class S>
void normalize_pointwise(const Plan& plan, Pointwise op, const S* x, const PointwiseFold& fold,
                         const PointwiseCoefficients& channel, S* y, double* mean, double* var, double* cell);
// pointwise_sums and pointwise_backward in one pass, each chunk's sums then its dx while it is in
// cache: dx = c1[k]*g + (c2[k] + q2)*(x - center[k]) + c3[k] + q3, and the sums as
// pointwise_sums' (to rounding: float and double keep g = dy*f'(u) for dx, so it is rounded
// before the sums take it). Without k2 and k3 (null), q2 = q3 = 0: a fold whose coefficients do not
// depend on the sums (Proxy Norm's), on any plan. With them, a fold local to each cluster of
// `cluster` consecutive planes of a sample (FRN: one plane; EvoNorm-S0: a group of channels),
// for plans whose cells are the planes: q2 = sum over the cluster's planes k and the seven sums
// i of k2[i*K + k]*sums[i*K + k], q3 likewise with k3 (either may be null: 0).
template <class S>
void pointwise_backward_fused(const Plan& plan, Pointwise op, const S* x, const S* dy,
                              const PointwiseCoefficients& coef, const double* c1, const double* c2,
                              const double* c3, int64_t cluster, const double* k2, const double* k3,
                              double* sums, S* dx);
void set_num_threads(int n);
int get_num_threads();
// The last-level cache size the traversal and the streaming-store choice assume; 0 (the
// default) detects it. Results never depend on it, only speed (the tests shrink it so that
// small tensors take the paths large ones do).
void set_cache_bytes(int64_t bytes);
// memcpy on the library's threads, in 64 KiB pieces: the copy bandwidth that `python -m normkit
// bench` measures its roofline with, so that both run on the same number of cores.
void parallel_copy(void* dst, const void* src, int64_t bytes);
// The SIMD level chosen at load ("avx512", "avx2", "baseline"); NORMKIT_ISA forces a lower one.
std::string isa_name();
// The levels this CPU can run, lowest first; set_isa switches to one of them (for tests).
std::vector<std::string> supported_isas();
void set_isa(const std::string& name);

}  // namespace nk
