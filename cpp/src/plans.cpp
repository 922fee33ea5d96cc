// The plans of the standard layers; a research variant is one more function of this shape.
#include <string>

#include "normkit/plan.h"

namespace nk {

static Plan base_plan(int64_t N, int64_t C, int64_t S) {
  int64_t planes = 0, elements = 0;  // checked before any per-sample table is allocated
  if (N < 0 || C < 0 || S < 0) throw std::invalid_argument("invalid plan: negative dimension");
  if (__builtin_mul_overflow(N, C, &planes) || __builtin_mul_overflow(planes, S, &elements))
    throw std::invalid_argument("invalid plan: N*C*S overflows int64");
  Plan p;
  p.N = N; p.C = C; p.S = S;
  return p;
}

// Every constructor returns a checked plan: a core caller can never build one that indexes out
// of bounds.
static Plan checked(Plan p) {
  check_plan(p);
  return p;
}

Plan plan_per_channel(int64_t N, int64_t C, int64_t S) {
  Plan p = base_plan(N, C, S);
  p.sample_group.assign(N > 0 ? N : 0, 0);
  return checked(std::move(p));
}

Plan plan_per_channel_in_sets(int64_t N, int64_t C, int64_t S, std::vector<int64_t> set_of_sample,
                              int64_t channels_per_group) {
  Plan p = base_plan(N, C, S);
  p.channels_per_group = channels_per_group;
  int64_t sets = 0;
  for (int64_t s : set_of_sample) sets = s + 1 > sets ? s + 1 : sets;
  p.sample_group = std::move(set_of_sample);
  p.num_sample_sets = sets > 0 ? sets : 1;
  return checked(std::move(p));
}

Plan plan_per_sample_group(int64_t N, int64_t C, int64_t S, int64_t num_groups) {
  Plan p = base_plan(N, C, S);
  if (N < 0) return checked(std::move(p));
  if (C > 0 && (num_groups <= 0 || C % num_groups != 0))
    throw std::invalid_argument("invalid plan: num_groups must divide C");
  p.sample_group.resize(N);
  for (int64_t n = 0; n < N; ++n) p.sample_group[n] = n;
  p.num_sample_sets = N > 0 ? N : 1;
  p.channels_per_group = C > 0 ? C / num_groups : 1;  // no channels: any grouping is empty
  return checked(std::move(p));
}

Plan plan_per_row(int64_t rows, int64_t M, bool skip_mean) {
  Plan p = plan_per_sample_group(rows, 1, M, 1);
  p.skip_mean = skip_mean;
  p.column_affine = true;
  return checked(std::move(p));
}

void check_plan(const Plan& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("invalid plan: " + what); };
  if (p.N < 0 || p.C < 0 || p.S < 0) fail("negative dimension");
  int64_t planes = 0, elements = 0, groups = 0;
  if (__builtin_mul_overflow(p.N, p.C, &planes) || __builtin_mul_overflow(planes, p.S, &elements) ||
      p.num_sample_sets < 1 || __builtin_mul_overflow(p.num_sample_sets, p.C, &groups))
    fail("N*C*S overflows int64");
  if (p.channels_per_group < 1 || p.C % p.channels_per_group != 0)
    fail("channels_per_group must divide C");
  if (int64_t(p.sample_group.size()) != p.N) fail("sample_group must have N entries");
  if (p.channels_last && p.column_affine) fail("a per-column affine needs channels-first order");
  for (int64_t s : p.sample_group)
    if (s < 0 || s >= p.num_sample_sets) fail("sample_group entry out of range");
}

void check_step_plan(const Plan& p) {
  check_plan(p);
  if (p.column_affine) throw std::invalid_argument("invalid plan: the steps take per-(set, channel) coefficients, not a per-column affine");
}

bool pooled_rows(const Plan& p, Plan* rows) {
  if (p.N < 2 || p.num_sample_sets != 1 || p.column_affine || !(p.channels_last || p.S == 1)) return false;
  *rows = p;
  rows->S = p.N * p.S;
  rows->N = 1;
  rows->sample_group.assign(1, 0);
  rows->channels_last = true;
  return true;
}

std::vector<int64_t> group_counts(const Plan& p) {
  std::vector<int64_t> per_set(p.num_sample_sets, 0);
  for (int64_t s : p.sample_group) per_set[s] += p.channels_per_group * p.S;
  std::vector<int64_t> counts(p.num_groups());
  for (int64_t g = 0; g < p.num_groups(); ++g) counts[g] = per_set[g / p.groups_per_set()];
  return counts;
}

}  // namespace nk
