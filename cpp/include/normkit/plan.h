// A plan says how a normalization views its input: the tensor is read as (N, C, S) planes,
// planes are pooled into statistics groups, and the affine is indexed by channel or by column.
// Every layer (batch, instance, group, layer, RMS norm and the research variants) is a plan;
// the kernels never know which layer they serve.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace nk {

struct Plan {
  int64_t N = 0;  // samples
  int64_t C = 0;  // channels (planes per sample)
  int64_t S = 0;  // elements per plane (product of the spatial dims)

  // Statistics group of plane (n, c): sample_group[n] * (C / channels_per_group) + c / channels_per_group.
  //   BatchNorm: every sample in set 0, 1 channel per group  -> group c
  //   InstanceNorm: sample n in set n, 1 channel per group   -> group n*C + c
  //   GroupNorm: sample n in set n, C/G channels per group   -> group n*G + c/(C/G)
  //   LayerNorm/RMSNorm: viewed as (N, 1, M)                  -> group n
  std::vector<int64_t> sample_group;
  int64_t num_sample_sets = 1;
  int64_t channels_per_group = 1;

  bool skip_mean = false;      // RMS: statistics are (0, mean of x^2), oneDNN's skip_mean
  bool column_affine = false;  // weight/bias indexed by s (LayerNorm's elementwise affine), not by c
  bool channels_last = false;  // memory order (N, S, C) instead of (N, C, S); planes are strided

  int64_t planes() const { return N * C; }
  int64_t groups_per_set() const { return channels_per_group > 0 ? C / channels_per_group : 0; }
  int64_t num_groups() const { return num_sample_sets * groups_per_set(); }
  int64_t group_of(int64_t n, int64_t c) const {
    return sample_group[n] * groups_per_set() + c / channels_per_group;
  }
  int64_t affine_size() const { return column_affine ? S : C; }
};

// One statistics set per channel, pooled over the batch (BatchNorm).
Plan plan_per_channel(int64_t N, int64_t C, int64_t S);
// Sample n pooled with the samples whose id equals its id (ghost batches, modalities), each
// set's channels in groups of channels_per_group (ghost batches mixed with GroupNorm).
Plan plan_per_channel_in_sets(int64_t N, int64_t C, int64_t S, std::vector<int64_t> set_of_sample,
                              int64_t channels_per_group = 1);
// Each sample's channels in groups of C/G (GroupNorm; G == C is InstanceNorm).
Plan plan_per_sample_group(int64_t N, int64_t C, int64_t S, int64_t num_groups);
// Each row of M elements is one group, affine per column (LayerNorm, RMSNorm with skip_mean).
Plan plan_per_row(int64_t rows, int64_t M, bool skip_mean);

// A plan of one statistics set over channels-last memory, or with one element per plane, reads
// the same memory as one sample of N*S rows of C channels: the passes run that plan (its chunks
// may span samples), so their per-plane bookkeeping is per channel, not per element (BatchNorm1d
// on (N, C) input had one plane per element). True, and *rows set, where it applies.
bool pooled_rows(const Plan& plan, Plan* rows);

// Elements in each statistics group (the same for every group of one set).
std::vector<int64_t> group_counts(const Plan& plan);
void check_plan(const Plan& plan);  // throws std::invalid_argument
// check_plan, and no per-column affine: the plan of the steps (normkit.h: apply_coefficients).
void check_step_plan(const Plan& plan);

}  // namespace nk
