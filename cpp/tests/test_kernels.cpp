// C++ unit tests of the shared kernels and entry points, at every ISA level this CPU runs.
// References are plain double-precision Eigen expressions. Prints "N passed, N failed".
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

bool close(double got, double want, double tol) {
  return std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
}

template <class T>
std::vector<T> random_vector(int64_t n, double offset, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& e : v) e = T(offset + dist(rng));
  return v;
}

template <class T> double tol() { return sizeof(T) == 4 ? 2e-5 : 1e-12; }
template <class T> const char* type_name() { return sizeof(T) == 4 ? "f32" : "f64"; }

using Arr = Eigen::ArrayXd;
template <class T> Arr as_double(const std::vector<T>& v, int64_t off = 0, int64_t n = -1) {
  if (n < 0) n = int64_t(v.size()) - off;
  Arr a(n);
  for (int64_t i = 0; i < n; ++i) a[i] = double(v[off + i]);
  return a;
}

// Each primitive on one chunk against its double-precision formula, lengths that hit every
// vector and unroll tail.
template <class T>
void test_primitives(const std::string& isa) {
  const nk::Kernels<T>& k = nk::kernels().get<T>();
  for (int64_t n : {1, 3, 7, 15, 16, 17, 63, 64, 65, 257, 2047, 2048}) {
    const std::string tag = isa + "/" + type_name<T>() + "/n=" + std::to_string(n);
    auto x = random_vector<T>(n, 1e3, 1), dy = random_vector<T>(n, 0.5, 2), w = random_vector<T>(n, 1.0, 3);
    const Arr xd = as_double(x), dyd = as_double(dy), wd = as_double(w);

    double mean, m2;
    k.moments(x.data(), n, 1, &mean, &m2);
    const double ref_mean = xd.mean(), ref_m2 = (xd - ref_mean).square().sum();
    check(close(mean, ref_mean, tol<T>()), "moments mean " + tag);
    check(close(m2, ref_m2, sizeof(T) == 4 ? 1e-5 : 1e-12), "moments m2 " + tag);

    // A batch of consecutive chunks (more than one kernel batch) gives each chunk's own bits;
    // a chunk holding an Inf gives mean Inf and m2 NaN without touching its neighbours.
    {
      const int64_t count = 19;
      auto xs = random_vector<T>(count * n, 5, 11);
      xs[7 * n + n / 2] = std::numeric_limits<T>::infinity();
      std::vector<double> bm(count), bm2(count);
      k.moments(xs.data(), n, count, bm.data(), bm2.data());
      bool same = std::isinf(bm[7]) && std::isnan(bm2[7]);
      for (int64_t i = 0; i < count; ++i) {
        double m1, q1;
        k.moments(xs.data() + i * n, n, 1, &m1, &q1);
        same &= (bm[i] == m1 || (std::isnan(bm[i]) && std::isnan(m1))) && (bm2[i] == q1 || (std::isnan(bm2[i]) && std::isnan(q1)));
      }
      check(same, "moments of a batch = each chunk's " + tag);
    }

    double q;
    k.sum_squares(x.data(), n, &q);
    check(close(q, xd.square().sum(), tol<T>()), "sum_squares " + tag);

    const T shift = T(ref_mean);
    double A, B;
    k.dot(x.data(), dy.data(), w.data(), n, shift, &A, &B);
    check(close(A, (dyd * wd * (xd - double(shift))).sum(), 10 * tol<T>() * std::sqrt(double(n))), "dot A " + tag);
    check(close(B, (dyd * wd).sum(), tol<T>() * std::sqrt(double(n))), "dot B " + tag);

    std::vector<T> y(n), g(n, T(0)), b(n, T(0));
    const T a = T(0.5), c = T(-0.25);
    k.affine(x.data(), y.data(), n, shift, a, c, w.data(), dy.data(), nullptr, false, false);
    const Arr yref = ((xd - double(shift)) * double(a) + double(c)) * wd + dyd;
    check(((as_double(y) - yref).abs() <= tol<T>() * (1 + yref.abs())).all(), "affine " + tag);

    // Inference epilogue: + residual, then ReLU (residual = -w makes about half the outputs negative).
    std::vector<T> neg_w(n);
    for (int64_t i = 0; i < n; ++i) neg_w[i] = -w[i];
    k.affine(x.data(), y.data(), n, shift, a, c, nullptr, nullptr, neg_w.data(), true, false);
    const Arr rref = ((xd - double(shift)) * double(a) + double(c) - wd).max(0.0);
    check(((as_double(y) - rref).abs() <= tol<T>() * (1 + rref.abs())).all(), "affine+residual+relu " + tag);

    // Streaming stores write the same values, at every alignment of the output.
    for (int64_t shift_out : {0, 1, 3}) {
      std::vector<T> ys(n + 3), yp(n + 3);
      k.affine(x.data(), ys.data() + shift_out, n, shift, a, c, w.data(), dy.data(), neg_w.data(), true, true);
      k.affine(x.data(), yp.data() + shift_out, n, shift, a, c, w.data(), dy.data(), neg_w.data(), true, false);
      check(ys == yp, "affine streamed = plain " + tag + " offset " + std::to_string(shift_out));
      k.backward_apply(x.data(), dy.data(), ys.data() + shift_out, n, T(2), T(-0.5), shift, T(0.125), w.data(), true);
      k.backward_apply(x.data(), dy.data(), yp.data() + shift_out, n, T(2), T(-0.5), shift, T(0.125), w.data(), false);
      check(ys == yp, "backward_apply streamed = plain " + tag + " offset " + std::to_string(shift_out));
    }

    // dot_columns: dot's A and B bit for bit, and the column sums added to what is there.
    for (int64_t i = 0; i < n; ++i) g[i] = T(i % 3), b[i] = T(-(i % 5));
    const Arr g0 = as_double(g), b0 = as_double(b);
    double Ac, Bc;
    k.dot_columns(x.data(), dy.data(), w.data(), n, shift, a, c, &Ac, &Bc, g.data(), b.data());
    check(Ac == A && Bc == B, "dot_columns A, B = dot's " + tag);
    const Arr gref = g0 + dyd * ((xd - double(shift)) * double(a) + double(c));
    check(((as_double(g) - gref).abs() <= tol<T>() * (1 + gref.abs())).all(), "dot_columns g " + tag);
    check(((as_double(b) - (b0 + dyd)).abs() <= tol<T>() * (1 + b0.abs())).all(), "dot_columns b " + tag);
    k.dot(x.data(), dy.data(), nullptr, n, shift, &A, &B);
    k.dot_columns(x.data(), dy.data(), nullptr, n, shift, a, c, &Ac, &Bc, g.data(), b.data());
    check(Ac == A && Bc == B, "dot_columns A, B = dot's, unweighted " + tag);

    std::vector<T> dx(n);
    k.backward_apply(x.data(), dy.data(), dx.data(), n, T(2), T(-0.5), shift, T(0.125), w.data(), false);
    const Arr dxref = 2.0 * dyd * wd - 0.5 * (xd - double(shift)) + 0.125;
    check(((as_double(dx) - dxref).abs() <= tol<T>() * (1 + dxref.abs())).all(), "backward_apply " + tag);
  }
}

// The entry points on a GroupNorm-shaped plan (which covers BatchNorm's and InstanceNorm's
// groupings too) against a direct double computation, and bitwise equality across threads.
template <class T>
void test_entry_points(const std::string& isa) {
  const int64_t N = 3, C = 6, S = 2049, G = 2, cpg = C / G;
  const nk::Plan plan = nk::plan_per_sample_group(N, C, S, G);
  auto x = random_vector<T>(N * C * S, 1e4, 4), dy = random_vector<T>(N * C * S, 0, 5);
  std::vector<T> w(C), b(C);
  for (int64_t c = 0; c < C; ++c) { w[c] = T(0.5 + 0.25 * c); b[c] = T(0.1 * c); }
  const std::string tag = isa + "/" + type_name<T>();

  std::vector<double> mean(N * G), var(N * G), rstd(N * G);
  nk::group_moments<T>(plan, x.data(), mean.data(), var.data());
  for (int64_t g = 0; g < N * G; ++g) {
    const Arr xs = as_double(x, g * cpg * S, cpg * S);
    check(close(mean[g], xs.mean(), 1e-12), "group mean " + tag);
    { const double rv = (xs - xs.mean()).square().mean(); check(close(var[g], rv, sizeof(T) == 4 ? 1e-5 : 1e-12), "group var " + tag + " got " + std::to_string(var[g]) + " want " + std::to_string(rv)); }
    rstd[g] = 1.0 / std::sqrt(var[g] + 1e-5);
  }

  std::vector<T> y(x.size()), dx(x.size()), dw(C), db(C);
  nk::normalize<T>(plan, x.data(), mean.data(), rstd.data(), w.data(), b.data(), y.data());
  nk::normalize_backward<T>(plan, x.data(), dy.data(), mean.data(), rstd.data(), w.data(), true,
                            dx.data(), dw.data(), db.data());
  Arr dw_ref = Arr::Zero(C), db_ref = Arr::Zero(C);
  double worst_y = 0, worst_dx = 0;
  for (int64_t g = 0; g < N * G; ++g) {
    const int64_t off = g * cpg * S, M = cpg * S;
    const Arr xhat = (as_double(x, off, M) - mean[g]) * rstd[g];
    const Arr dyd = as_double(dy, off, M);
    Arr wcol(M), bcol(M);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t c = (g % G) * cpg + i / S;
      wcol[i] = w[c]; bcol[i] = b[c];
      dw_ref[c] += dyd[i] * xhat[i];
      db_ref[c] += dyd[i];
    }
    const Arr gy = dyd * wcol;
    const Arr dx_ref = rstd[g] * (gy - gy.mean() - xhat * (gy * xhat).mean());
    worst_y = std::max(worst_y, (as_double(y, off, M) - (xhat * wcol + bcol)).abs().maxCoeff());
    worst_dx = std::max(worst_dx, (as_double(dx, off, M) - dx_ref).abs().maxCoeff() / (1 + dx_ref.abs().maxCoeff()));
  }
  // float32 at a mean of 1e4: the bound is 1e-4 on normalized outputs.
  check(worst_y < (sizeof(T) == 4 ? 1e-4 : 1e-10), "normalize vs reference " + tag + " err=" + std::to_string(worst_y));
  check(worst_dx < (sizeof(T) == 4 ? 1e-4 : 1e-10), "backward dx vs reference " + tag + " err=" + std::to_string(worst_dx));
  for (int64_t c = 0; c < C; ++c) {
    check(close(dw[c], dw_ref[c], sizeof(T) == 4 ? 1e-4 : 1e-9), "dweight " + tag);
    check(close(db[c], db_ref[c], sizeof(T) == 4 ? 1e-4 : 1e-9), "dbias " + tag);
  }

  // Same bits with one thread.
  const int threads = nk::get_num_threads();
  nk::set_num_threads(1);
  std::vector<T> y1(x.size()), dx1(x.size());
  nk::normalize<T>(plan, x.data(), mean.data(), rstd.data(), w.data(), b.data(), y1.data());
  nk::normalize_backward<T>(plan, x.data(), dy.data(), mean.data(), rstd.data(), w.data(), true,
                            dx1.data(), nullptr, nullptr);
  std::vector<double> mean1(N * G), var1(N * G);
  nk::group_moments<T>(plan, x.data(), mean1.data(), var1.data());
  nk::set_num_threads(threads < 2 ? 2 : threads);
  check(y1 == y && dx1 == dx && mean1 == mean && var1 == var, "bitwise equal across thread counts " + tag);
  nk::set_num_threads(threads);
}

// Channels-last gives the channels-first results (to rounding) for the same logical tensor:
// BatchNorm's and GroupNorm's groupings, channel counts that hit vector tails, rows that hit
// chunk tails, with the inference epilogue.
template <class T>
void test_channels_last(const std::string& isa) {
  for (int64_t C : {1, 3, 33, 300}) {  // 300: several whole column blocks and a tail at every ISA
    for (int64_t S : {1, 17, 2049}) {
      const int64_t N = 2, G = C == 33 ? 3 : 1;
      const std::string tag = isa + "/" + type_name<T>() + "/C=" + std::to_string(C) + "/S=" + std::to_string(S);
      auto x = random_vector<T>(N * C * S, 10, 8), dy = random_vector<T>(N * C * S, 0, 9), res = random_vector<T>(N * C * S, 0, 10);
      std::vector<T> xt(x.size()), dyt(x.size()), rest(x.size());
      auto nhwc = [&](int64_t n, int64_t c, int64_t s) { return (n * S + s) * C + c; };
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t s = 0; s < S; ++s) {
            const int64_t i = (n * C + c) * S + s;
            xt[nhwc(n, c, s)] = x[i]; dyt[nhwc(n, c, s)] = dy[i]; rest[nhwc(n, c, s)] = res[i];
          }
      std::vector<T> w(C), b(C);
      for (int64_t c = 0; c < C; ++c) { w[c] = T(0.5 + 0.1 * c); b[c] = T(-0.2 * c); }
      for (int kind : {0, 1, 2}) {  // per channel (BatchNorm), per sample group, per channel in sets
        const bool per_channel = kind != 1;
        nk::Plan plan = kind == 0 ? nk::plan_per_channel(N, C, S)
                        : kind == 1 ? nk::plan_per_sample_group(N, C, S, G)
                                    : nk::plan_per_channel_in_sets(N, C, S, {1, 0});
        if (per_channel && N * S == 1) continue;
        nk::Plan plan_t = plan;
        plan_t.channels_last = true;
        const int64_t ng = plan.num_groups();
        std::vector<double> m(ng), v(ng), mt(ng), vt(ng), r(ng);
        nk::group_moments<T>(plan, x.data(), m.data(), v.data());
        nk::group_moments<T>(plan_t, xt.data(), mt.data(), vt.data());
        bool stats_ok = true;
        for (int64_t g = 0; g < ng; ++g) {
          stats_ok &= close(mt[g], m[g], tol<T>()) && close(vt[g], v[g], 10 * tol<T>());
          r[g] = 1 / std::sqrt(v[g] + 1e-5);
        }
        check(stats_ok, "channels-last statistics " + tag);
        std::vector<T> y(x.size()), yt(x.size()), dx(x.size()), dxt(x.size()), dw(C), db(C), dwt(C), dbt(C);
        nk::normalize<T>(plan, x.data(), m.data(), r.data(), w.data(), b.data(), y.data(), res.data(), true);
        nk::normalize<T>(plan_t, xt.data(), m.data(), r.data(), w.data(), b.data(), yt.data(), rest.data(), true);
        nk::normalize_backward<T>(plan, x.data(), dy.data(), m.data(), r.data(), w.data(), true, dx.data(), dw.data(), db.data());
        nk::normalize_backward<T>(plan_t, xt.data(), dyt.data(), m.data(), r.data(), w.data(), true, dxt.data(), dwt.data(), dbt.data());
        double ey = 0, edx = 0, ep = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t s = 0; s < S; ++s) {
              const int64_t i = (n * C + c) * S + s;
              ey = std::max(ey, std::fabs(double(yt[nhwc(n, c, s)]) - double(y[i])));
              edx = std::max(edx, std::fabs(double(dxt[nhwc(n, c, s)]) - double(dx[i])));
            }
        for (int64_t c = 0; c < C; ++c)
          ep = std::max(ep, std::fabs(double(dwt[c]) - dw[c]) + std::fabs(double(dbt[c]) - db[c]));
        const double t = sizeof(T) == 4 ? 1e-4 : 1e-10;
        check(ey < t, "channels-last normalize+residual+relu " + tag + " err=" + std::to_string(ey));
        check(edx < t, "channels-last backward dx " + tag + " err=" + std::to_string(edx));
        check(ep < t * std::sqrt(double(N * S)), "channels-last dweight/dbias " + tag + " err=" + std::to_string(ep));
      }
    }
  }
}

}  // namespace

// Channels-last outputs written with streaming stores equal the plain ones, for channel counts
// that put rows on and off vector boundaries.
template <class T>
void test_rows_streaming(const std::string& isa) {
  const nk::Kernels<T>& k = nk::kernels().get<T>();
  for (int64_t C : {1, 7, 16, 33, 64, 300}) {
    const int64_t rows = 37, n = rows * C;
    auto x = random_vector<T>(n, 2.0, 21), dy = random_vector<T>(n, 0.0, 22), res = random_vector<T>(n, 0.0, 23);
    auto shift = random_vector<T>(C, 2.0, 24), a = random_vector<T>(C, 1.0, 25), b = random_vector<T>(C, 0.0, 26);
    for (int64_t offset : {0, 1}) {
      std::vector<T> ys(n + 1), yp(n + 1);
      k.rows_affine(x.data(), ys.data() + offset, rows, C, C, shift.data(), a.data(), b.data(), res.data(), true, true);
      k.rows_affine(x.data(), yp.data() + offset, rows, C, C, shift.data(), a.data(), b.data(), res.data(), true, false);
      const std::string tag = isa + "/" + type_name<T>() + " C=" + std::to_string(C) + " offset " + std::to_string(offset);
      check(ys == yp, "rows_affine streamed = plain " + tag);
      k.rows_backward_apply(x.data(), dy.data(), ys.data() + offset, rows, C, C, a.data(), b.data(), shift.data(), b.data(), true);
      k.rows_backward_apply(x.data(), dy.data(), yp.data() + offset, rows, C, C, a.data(), b.data(), shift.data(), b.data(), false);
      check(ys == yp, "rows_backward_apply streamed = plain " + tag);
    }
  }
}

// merge_columns against moments.h's scalar merges in the same order (two alternating chains),
// per column; a column's bits the same whatever columns a call covers; an Inf mean in one of
// several parts of one column gives that column mean Inf and m2 NaN and leaves its neighbours
// alone.
void test_merge_columns(const std::string& isa) {
  const nk::KernelTable& kt = nk::kernels();
  for (int64_t C : {1, 5, 8, 13, 64, 67, 130}) {
    for (int64_t parts : {0, 1, 2, 7}) {
      const int64_t stride = C + 3, part_n = 11, last_n = 3;
      const std::string tag = isa + " C=" + std::to_string(C) + " parts=" + std::to_string(parts);
      auto mean = random_vector<double>(parts * stride + 1, 4.0, 31), m2 = random_vector<double>(parts * stride + 1, 20.0, 32);
      std::vector<double> om(C), om2(C), pm(C), pm2(C);
      kt.merge_columns(mean.data(), m2.data(), stride, C, parts, part_n, last_n, om.data(), om2.data());
      bool ok = true;
      for (int64_t c = 0; c < C; ++c) {
        nk::Moments even, odd;
        for (int64_t j = 0; j < parts; ++j) {
          const nk::Moments m{double(j + 1 == parts ? last_n : part_n), mean[j * stride + c], m2[j * stride + c]};
          (j % 2 ? odd : even) = nk::merge(j % 2 ? odd : even, m);
        }
        const nk::Moments want = nk::merge(even, odd);
        ok &= parts == 0 ? om[c] == 0 && om2[c] == 0 : close(om[c], want.mean, 1e-14) && close(om2[c], want.m2, 1e-14);
      }
      check(ok, "merge_columns = scalar merges " + tag);
      // Columns [64, C) alone, and [0, min(C, 64)) alone: the same bits as in the whole call.
      for (int64_t c0 : {int64_t(0), int64_t(64)}) {
        if (c0 >= C) continue;
        const int64_t c1 = c0 == 0 ? std::min<int64_t>(C, 64) : C;
        kt.merge_columns(mean.data() + c0, m2.data() + c0, stride, c1 - c0, parts, part_n, last_n, pm.data(), pm2.data());
        bool same = true;
        for (int64_t c = c0; c < c1; ++c) same &= pm[c - c0] == om[c] && pm2[c - c0] == om2[c];
        check(same, "merge_columns of columns from " + std::to_string(c0) + " = whole call's " + tag);
      }
      if (parts > 1 && C > 2) {  // (one part passes through as it is: its own kernel set its m2)
        mean[(parts - 1) * stride + 2] = std::numeric_limits<double>::infinity();
        kt.merge_columns(mean.data(), m2.data(), stride, C, parts, part_n, last_n, pm.data(), pm2.data());
        bool inf_ok = std::isinf(pm[2]) && std::isnan(pm2[2]);
        for (int64_t c = 0; c < C; ++c)
          if (c != 2) inf_ok &= pm[c] == om[c] && pm2[c] == om2[c];
        check(inf_ok, "merge_columns Inf in one column " + tag);
      }
    }
  }
}

nk::Plan channels_last(nk::Plan p) {
  p.channels_last = true;
  return p;
}

// Plans with no channels (N > 0, S > 0, C = 0) in either layout run every entry point, at 1
// and 64 threads, and write nothing: a channels-last chunk slot once divided by C.
void test_no_channels(const std::string& isa) {
  const int threads_before = nk::get_num_threads();
  for (bool last : {false, true})
    for (int kind : {0, 1})
      for (int threads : {1, 64}) {
        nk::Plan plan = kind == 0 ? nk::plan_per_channel(2, 0, 16) : nk::plan_per_sample_group(3, 0, 5000, 1);
        plan.channels_last = last;
        nk::set_num_threads(threads);
        std::vector<float> x(1, 1.f), y(1, 7.f), w(1, 2.f), b(1, 3.f), dw(1, 5.f), db(1, 6.f);
        std::vector<double> m(4, -1), v(4, -1), r(4, -1);
        nk::group_moments<float>(plan, x.data(), m.data(), v.data());
        nk::normalize_batch_stats<float>(plan, x.data(), 1e-5, w.data(), b.data(), y.data(), m.data(), v.data(), r.data());
        nk::normalize_backward<float>(plan, x.data(), x.data(), m.data(), r.data(), w.data(), true, y.data(), dw.data(), db.data());
        const bool untouched = y[0] == 7.f && dw[0] == 5.f && db[0] == 6.f && m[0] == -1 && v[0] == -1 && r[0] == -1;
        check(untouched, isa + " no channels, " + (last ? "channels-last" : "channels-first") + " plan " +
                             std::to_string(kind) + " threads=" + std::to_string(threads));
      }
  nk::set_num_threads(threads_before);
}

// The traversals (moments.h: GroupBlocks, by_sample) run the same chunks and merges: 1 thread
// takes block by block of groups (channels-last: sample by sample), 64 threads with fewer than
// 256 blocks (samples) pass by pass. Their results, and the
// fused normalize_batch_stats against its three steps, must be the same bits.
template <class T>
void test_traversals_agree(const std::string& isa) {
  struct Case { const char* name; nk::Plan plan; };
  std::vector<Case> cases = {
      {"bn", nk::plan_per_channel(5, 7, 300)},
      {"bn-big-planes", nk::plan_per_channel(3, 4, 5000)},
      {"bn-channel-blocks", nk::plan_per_channel(4, 64, 3000)},
      {"gn", nk::plan_per_sample_group(4, 12, 196, 3)},
      {"gn-long", nk::plan_per_sample_group(2, 8, 3000, 2)},
      {"in", nk::plan_per_sample_group(3, 5, 64, 5)},
      {"ln", nk::plan_per_row(40, 300, false)},
      {"ln-long-rows", nk::plan_per_row(20, 4500, false)},
      {"ln-blocks", nk::plan_per_row(1000, 100, false)},
      {"gn-blocks", nk::plan_per_sample_group(8, 16, 1000, 4)},
      {"rms", nk::plan_per_row(33, 96, true)},
      {"sets", nk::plan_per_channel_in_sets(6, 3, 50, {0, 1, 0, 2, 1, 0})},
      {"gn-nhwc", channels_last(nk::plan_per_sample_group(5, 12, 700, 3))},
      {"in-nhwc", channels_last(nk::plan_per_sample_group(4, 7, 300, 7))},
      {"bn-nhwc", channels_last(nk::plan_per_channel(4, 7, 300))},
      {"sets-nhwc", channels_last(nk::plan_per_channel_in_sets(6, 3, 50, {0, 1, 0, 2, 1, 0}))},
  };
  const int threads_before = nk::get_num_threads();
  nk::set_cache_bytes(64 << 10);  // these small plans then take the large-tensor paths: blocks, streaming
  for (auto& cs : cases) {
    const nk::Plan& plan = cs.plan;
    const int64_t n = plan.planes() * plan.S, G = plan.num_groups(), A = plan.affine_size();
    const std::string tag = isa + "/" + type_name<T>() + "/" + cs.name;
    auto x = random_vector<T>(n, 3.0, 11), dy = random_vector<T>(n, 0.1, 12);
    auto w = random_vector<T>(A, 1.0, 13), b = random_vector<T>(A, 0.0, 14);
    struct Out { std::vector<T> y, dx, dw, db; std::vector<double> mean, var, rstd; };
    auto run = [&](const nk::Plan& plan, int threads, bool fused) {
      nk::set_num_threads(threads);
      Out o{std::vector<T>(n), std::vector<T>(n), std::vector<T>(A), std::vector<T>(A),
            std::vector<double>(G), std::vector<double>(G), std::vector<double>(G)};
      if (fused) {
        nk::normalize_batch_stats<T>(plan, x.data(), 1e-5, w.data(), b.data(), o.y.data(),
                                     o.mean.data(), o.var.data(), o.rstd.data());
      } else {
        nk::group_moments<T>(plan, x.data(), o.mean.data(), o.var.data());
        for (int64_t g = 0; g < G; ++g) o.rstd[g] = 1.0 / std::sqrt(o.var[g] + 1e-5);
        nk::normalize<T>(plan, x.data(), o.mean.data(), o.rstd.data(), w.data(), b.data(), o.y.data());
      }
      nk::normalize_backward<T>(plan, x.data(), dy.data(), o.mean.data(), o.rstd.data(), w.data(),
                                true, o.dx.data(), o.dw.data(), o.db.data());
      return o;
    };
    const Out ref = run(plan, 1, true);
    for (auto [threads, fused] : {std::pair{64, true}, std::pair{1, false}, std::pair{64, false}}) {
      const Out o = run(plan, threads, fused);
      const std::string t = tag + " threads=" + std::to_string(threads) + (fused ? " fused" : " steps");
      check(o.mean == ref.mean && o.var == ref.var && o.rstd == ref.rstd, "statistics bitwise " + t);
      check(o.y == ref.y, "y bitwise " + t);
      check(o.dx == ref.dx && o.dw == ref.dw && o.db == ref.db, "gradients bitwise " + t);
    }
    // One set per sample, numbered in reverse: the same statistics, but no longer sample n in
    // set n, so not the one-chunk-per-group paths (moments.h: single_chunk_run, by_sample).
    if (plan.num_sample_sets == plan.N && plan.N > 1) {
      nk::Plan reversed = plan;
      for (int64_t i = 0; i < plan.N; ++i) reversed.sample_group[i] = plan.N - 1 - i;
      const int64_t gps = plan.groups_per_set();
      for (int threads : {1, 64}) {
        const Out o = run(reversed, threads, true);
        const std::string t = tag + " reversed sets, threads=" + std::to_string(threads);
        bool same_stats = true;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (plan.N - 1 - g / gps) * gps + g % gps;  // group g's number when reversed
          same_stats = same_stats && o.mean[r] == ref.mean[g] && o.var[r] == ref.var[g];
        }
        check(same_stats, "statistics bitwise " + t);
        check(o.y == ref.y, "y bitwise " + t);
        check(o.dx == ref.dx && o.dw == ref.dw && o.db == ref.db, "gradients bitwise " + t);
      }
    }
  }
  nk::set_num_threads(threads_before);
  nk::set_cache_bytes(0);
}

// The steps a variant calls one by one (normkit.h: apply_coefficients, backward_sums,
// backward_apply_coefficients) against a plain double loop over their per-(set, channel)
// coefficients k = sample_group[n]*C + c: one set, interleaved sets, and sets whose channels
// are grouped in pairs (the coefficients stay per channel), in both layouts, with plane
// lengths that hit chunk tails (channels-first kChunk; channels-last kRowsChunk / C rows);
// the same bits at 1 and 2 threads.
template <class T>
void test_steps(const std::string& isa) {
  const int threads_before = nk::get_num_threads();
  const int64_t max_n = 5 * 5 * 2049;  // the largest case's elements; smaller ones take a prefix
  const auto xs = random_vector<T>(max_n, 10.0, 41), dys = random_vector<T>(max_n, 0.2, 42), ress = random_vector<T>(max_n, 0.0, 43);
  for (int kind : {0, 1, 2})  // per channel (1 set), interleaved sets, sets with 2 channels per group
    for (bool last : {false, true})
      for (int64_t S : {1, 7, 2047, 2049}) {
        const int64_t N = 5, C = kind == 2 ? 4 : 5;  // N*C*S above kParallelMinWork at S = 2049
        nk::Plan plan = kind == 0 ? nk::plan_per_channel(N, C, S)
                        : kind == 1 ? nk::plan_per_channel_in_sets(N, C, S, {1, 0, 1, 2, 0})
                                    : nk::plan_per_channel_in_sets(N, C, S, {1, 0, 1, 2, 0}, 2);
        plan.channels_last = last;
        const int64_t K = plan.num_sample_sets * C, n = N * C * S;
        const std::string tag = isa + "/" + type_name<T>() + "/plan " + std::to_string(kind) +
                                (last ? "/channels-last" : "/channels-first") + "/S=" + std::to_string(S);
        const T *x = xs.data(), *dy = dys.data(), *res = ress.data();
        // Means near the data's but not representable in float, so the shift rounding shows.
        auto mean = random_vector<double>(K, 10.0, 44), scale = random_vector<double>(K, 1.0, 45);
        auto offset = random_vector<double>(K, 0.0, 46), c1 = random_vector<double>(K, 0.5, 47);
        auto c2 = random_vector<double>(K, -0.3, 48), c3 = random_vector<double>(K, 0.0, 49);
        const std::vector<double> zeros(K, 0.0);
        auto at = [&](int64_t nn, int64_t c, int64_t s) { return last ? (nn * S + s) * C + c : (nn * C + c) * S + s; };

        struct Out { std::vector<T> y, yr, dx, dx0; std::vector<double> sdy, sxmu; };
        auto run = [&](int threads) {
          nk::set_num_threads(threads);
          Out o{std::vector<T>(n), std::vector<T>(n), std::vector<T>(n), std::vector<T>(n),
                std::vector<double>(K, -1.0), std::vector<double>(K, -1.0)};
          nk::apply_coefficients<T>(plan, x, mean.data(), scale.data(), offset.data(), o.y.data());
          nk::apply_coefficients<T>(plan, x, mean.data(), scale.data(), offset.data(), o.yr.data(), res, true);
          nk::backward_sums<T>(plan, x, dy, mean.data(), o.sdy.data(), o.sxmu.data());
          nk::backward_apply_coefficients<T>(plan, x, dy, mean.data(), c1.data(), c2.data(), c3.data(), o.dx.data());
          nk::backward_apply_coefficients<T>(plan, nullptr, dy, mean.data(), c1.data(), zeros.data(), c3.data(), o.dx0.data());
          return o;
        };
        const Out o = run(1);
        const Out o2 = run(2);
        check(o2.y == o.y && o2.yr == o.yr && o2.sdy == o.sdy && o2.sxmu == o.sxmu && o2.dx == o.dx && o2.dx0 == o.dx0,
              "steps bitwise equal at 1 and 2 threads " + tag);

        // Errors relative to the magnitude of each result's terms.
        std::vector<double> sdy(K, 0.0), sxmu(K, 0.0), mag_dy(K, 0.0), mag_xmu(K, 0.0);
        double ey = 0, eyr = 0, edx = 0, edx0 = 0;
        for (int64_t nn = 0; nn < N; ++nn)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k = plan.sample_group[nn] * C + c;
            for (int64_t s = 0; s < S; ++s) {
              const int64_t i = at(nn, c, s);
              const double xm = double(x[i]) - mean[k], d = double(dy[i]), r = double(res[i]);
              const double yt = xm * scale[k], ymag = std::fabs(yt) + std::fabs(offset[k]);
              ey = std::max(ey, std::fabs(double(o.y[i]) - (yt + offset[k])) / (1 + ymag));
              eyr = std::max(eyr, std::fabs(double(o.yr[i]) - std::max(yt + offset[k] + r, 0.0)) / (1 + ymag + std::fabs(r)));
              const double t1 = c1[k] * d, t2 = c2[k] * xm;
              edx = std::max(edx, std::fabs(double(o.dx[i]) - (t1 + t2 + c3[k])) /
                                      (1 + std::fabs(t1) + std::fabs(t2) + std::fabs(c3[k])));
              edx0 = std::max(edx0, std::fabs(double(o.dx0[i]) - (t1 + c3[k])) / (1 + std::fabs(t1) + std::fabs(c3[k])));
              sdy[k] += d, mag_dy[k] += std::fabs(d);
              sxmu[k] += d * xm, mag_xmu[k] += std::fabs(d * xm);
            }
          }
        const double t = tol<T>();
        check(ey <= t, "apply_coefficients vs reference " + tag + " err=" + std::to_string(ey));
        check(eyr <= t, "apply_coefficients+residual+relu vs reference " + tag + " err=" + std::to_string(eyr));
        check(edx <= t, "backward_apply_coefficients vs reference " + tag + " err=" + std::to_string(edx));
        check(edx0 <= t, "backward_apply_coefficients x=null vs reference " + tag + " err=" + std::to_string(edx0));
        bool sums_ok = true;
        for (int64_t k = 0; k < K; ++k)
          sums_ok &= std::fabs(o.sdy[k] - sdy[k]) <= t * (1 + mag_dy[k]) &&
                     std::fabs(o.sxmu[k] - sxmu[k]) <= 10 * t * (1 + mag_xmu[k]);
        check(sums_ok, "backward_sums vs reference " + tag);
      }
  nk::set_num_threads(threads_before);

  // A per-column affine (LayerNorm's plan) is no plan of the steps: each call throws.
  const nk::Plan rows = nk::plan_per_row(4, 8, false);
  std::vector<T> x(32, T(1)), y(32);
  std::vector<double> d(32, 0.0), e(32, 0.0);
  auto throws = [](const std::function<void()>& f) {
    try { f(); } catch (const std::invalid_argument&) { return true; } catch (...) { return false; }
    return false;
  };
  const std::string tag = isa + "/" + type_name<T>();
  check(throws([&] { nk::apply_coefficients<T>(rows, x.data(), d.data(), d.data(), d.data(), y.data()); }),
        "apply_coefficients rejects a per-column affine plan " + tag);
  check(throws([&] { nk::backward_sums<T>(rows, x.data(), x.data(), d.data(), d.data(), e.data()); }),
        "backward_sums rejects a per-column affine plan " + tag);
  check(throws([&] { nk::backward_apply_coefficients<T>(rows, x.data(), x.data(), d.data(), d.data(), d.data(), d.data(), y.data()); }),
        "backward_apply_coefficients rejects a per-column affine plan " + tag);
}

// The pointwise epilogues' f (normkit/pointwise.h) in double: f(u; p, q, r) and df/du with the
// documented tie rules (relu: 0 at 0; tlu: a tie's gradient goes to p; evo_b0: an exact tie
// splits it evenly between the sides).
double pw_f(nk::Pointwise op, double u, double p, double q, double r) {
  switch (op) {
    case nk::Pointwise::identity: return u;
    case nk::Pointwise::relu: return std::max(u, 0.0);
    case nk::Pointwise::silu: return u / (1.0 + std::exp(-u));
    case nk::Pointwise::gelu: return u * 0.5 * (1.0 + std::erf(u / std::sqrt(2.0)));
    case nk::Pointwise::tlu: return std::max(u, p);
    case nk::Pointwise::swish_gate: return u / (1.0 + std::exp(-p * u));
    case nk::Pointwise::evo_b0: return u / std::max(p, q * u + r);
  }
  return std::numeric_limits<double>::quiet_NaN();
}

double pw_df(nk::Pointwise op, double u, double p, double q, double r) {
  switch (op) {
    case nk::Pointwise::identity: return 1.0;
    case nk::Pointwise::relu: return u > 0 ? 1.0 : 0.0;
    case nk::Pointwise::silu: {
      const double s = 1.0 / (1.0 + std::exp(-u));
      return s * (1.0 + u * (1.0 - s));
    }
    case nk::Pointwise::gelu:
      return 0.5 * (1.0 + std::erf(u / std::sqrt(2.0))) + u * std::exp(-0.5 * u * u) / 2.50662827463100050242;
    case nk::Pointwise::tlu: return u > p ? 1.0 : 0.0;
    case nk::Pointwise::swish_gate: {
      const double s = 1.0 / (1.0 + std::exp(-p * u));
      return s + p * u * s * (1.0 - s);
    }
    case nk::Pointwise::evo_b0: {
      const double d2 = q * u + r, left = 1.0 / p, right = r / (d2 * d2);
      return p > d2 ? left : d2 > p ? right : 0.5 * (left + right);
    }
  }
  return std::numeric_limits<double>::quiet_NaN();
}

// df/dp, df/dq, df/dr: central differences of pw_f in double, with steps that stay on one side
// of the kink (tlu: u = p; evo_b0: p = q*u + r) where u is near it. At an exact evo_b0 tie the
// central difference is the average of the one-sided slopes (the even split) but only first-order
// accurate, so it is extrapolated (Richardson); at an exact tlu tie (u == p) the gradient goes to
// p, which a central difference would halve, so that one is the rule's 1.
void pw_dparams(nk::Pointwise op, double u, double p, double q, double r, double out[3]) {
  const double th[3] = {p, q, r}, inf = std::numeric_limits<double>::infinity();
  auto central = [&](int i, double h) {
    double lo[3] = {p, q, r}, hi[3] = {p, q, r};
    lo[i] = th[i] - h, hi[i] = th[i] + h;
    return (pw_f(op, u, hi[0], hi[1], hi[2]) - pw_f(op, u, lo[0], lo[1], lo[2])) / (hi[i] - lo[i]);
  };
  for (int i = 0; i < 3; ++i) {
    double gap = inf;  // how far theta_i is from the kink
    if (op == nk::Pointwise::tlu && i == 0) gap = std::fabs(u - p);
    if (op == nk::Pointwise::evo_b0) {
      const double sens = i == 1 ? std::fabs(u) : 1.0;
      if (sens > 0) gap = std::fabs(p - (q * u + r)) / sens;
    }
    const double h = 1e-5 * (1.0 + std::fabs(th[i]));
    out[i] = gap == 0 ? 2 * central(i, h / 2) - central(i, h) : central(i, std::min(h, gap / 4));
  }
  if (op == nk::Pointwise::tlu && u == p) out[0] = 1.0;
}

bool pw_has_params(nk::Pointwise op) {
  return op == nk::Pointwise::tlu || op == nk::Pointwise::swish_gate || op == nk::Pointwise::evo_b0;
}

const char* pw_name(nk::Pointwise op) {
  static const char* names[] = {"identity", "relu", "silu", "gelu", "tlu", "swish_gate", "evo_b0"};
  return names[int(op)];
}

// One case of the pointwise tests: x and dy in (N, C, S) order, and per-cell coefficients of one
// op, k = sample_group[n]*C + c. Cell 0 has exact coefficients (shift 0, a 1, b 0) and x = 0.5,
// 0 at every third element, so u hits relu's 0, tlu's threshold p = 0.5 and evo_b0's tie
// p = q*u + r = 0.75 exactly.
template <class T>
struct PointwiseData {
  std::vector<T> x, dy;
  std::vector<double> shift, a, b, p, q, r, scale, offset, center, c1, c2, c3;
  PointwiseData(const nk::Plan& plan, nk::Pointwise op, unsigned salt) {
    using nk::Pointwise;
    const int64_t N = plan.N, C = plan.C, S = plan.S, K = plan.num_sample_sets * C;
    x = random_vector<T>(N * C * S, 3.0, 51 + salt), dy = random_vector<T>(N * C * S, 0.2, 52 + salt);
    for (int64_t n = 0; n < N; ++n)
      if (plan.sample_group[n] == 0)
        for (int64_t s = 0; s < S; s += 3) {
          x[n * C * S + s] = T(0.5);
          if (s + 1 < S) x[n * C * S + s + 1] = T(0);
        }
    auto z = [&](unsigned seed) { return random_vector<double>(K, 0.0, seed + salt); };
    shift = random_vector<double>(K, 3.0, 53 + salt), a = z(54), b = z(55), p = z(56), q = z(57), r = z(58);
    scale = z(59), offset = z(60), center = z(61), c1 = z(62), c2 = z(63), c3 = z(64);
    for (int64_t k = 0; k < K; ++k) {
      a[k] = 1.0 + 0.3 * a[k], b[k] *= 0.5, scale[k] = 1.0 + 0.5 * scale[k], offset[k] *= 0.5;
      center[k] = 3.0 + 0.1 * center[k], c1[k] += 0.5, c2[k] *= 0.3;
      if (op == Pointwise::tlu) p[k] *= 0.5;
      if (op == Pointwise::swish_gate) p[k] = 1.0 + 0.5 * p[k];
      if (op == Pointwise::evo_b0) p[k] = 0.8 + 0.3 * std::fabs(p[k]), q[k] = 0.5 + 0.3 * q[k], r[k] = 1.0 + 0.3 * r[k];
    }
    shift[0] = 0.0, a[0] = 1.0, b[0] = 0.0;
    if (op == Pointwise::tlu) p[0] = 0.5;
    if (op == Pointwise::evo_b0) p[0] = 0.75, q[0] = 1.0, r[0] = 0.25;
  }
  nk::PointwiseCoefficients coef() const {
    return {shift.data(), a.data(), b.data(), p.data(), q.data(), r.data(), scale.data(), offset.data(), center.data()};
  }
};

// The pointwise epilogues (normkit.h: apply_pointwise, pointwise_sums, pointwise_backward) of
// every op against a plain double loop over their cells: one set with a chunk tail (S = 2049),
// interleaved sets, one set per sample (PointwiseData: with exact ties). The sums'
// parameter-derivative entries against central differences of the reference f (exactly 0 for
// the ops without parameters). The references are computed once per type, not per ISA level.
// The same bits at 1 and 2 threads on a plan of 24 chunks.
template <class T>
void test_pointwise(const std::string& isa) {
  using nk::Pointwise;
  constexpr int J = nk::kPointwiseSums, P = nk::kPointwiseOps;
  struct Case { const char* name; nk::Plan plan; };
  static const std::vector<Case> cases = {
      {"bn", nk::plan_per_channel(1, 2, 2049)},
      {"sets", nk::plan_per_channel_in_sets(3, 2, 7, {1, 0, 1})},
      {"gn", nk::plan_per_sample_group(2, 4, 1, 2)},
  };
  struct Ref {  // per element: y, dx and their terms' magnitudes; per sum: its value and magnitude
    std::vector<double> y, ymag, dx, dxmag, sums, smag;
    int64_t ties = 0;
  };
  static std::vector<PointwiseData<T>> data;
  static std::vector<Ref> refs;  // [case*P + op]
  if (refs.empty()) {
    for (size_t ci = 0; ci < cases.size(); ++ci)
      for (int opi = 0; opi < P; ++opi) {
        const nk::Plan& plan = cases[ci].plan;
        const Pointwise op = Pointwise(opi);
        const int64_t N = plan.N, C = plan.C, S = plan.S, n = N * C * S, K = plan.num_sample_sets * C;
        data.emplace_back(plan, op, 100 * unsigned(ci));
        const PointwiseData<T>& dt = data.back();
        Ref rf{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n), std::vector<double>(n),
               std::vector<double>(J * K, 0.0), std::vector<double>(J * K, 0.0)};
        for (int64_t nn = 0; nn < N; ++nn)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k = plan.sample_group[nn] * C + c;
            const double p = dt.p[k], q = dt.q[k], r = dt.r[k];
            for (int64_t s = 0; s < S; ++s) {
              const int64_t i = (nn * C + c) * S + s;
              const double xi = double(dt.x[i]), d = double(dt.dy[i]);
              const double u = (xi - dt.shift[k]) * dt.a[k] + dt.b[k];
              const double mu = std::fabs(xi - dt.shift[k]) * std::fabs(dt.a[k]) + std::fabs(dt.b[k]);  // u's terms
              const double f = pw_f(op, u, p, q, r), df = pw_df(op, u, p, q, r);
              rf.ties += (op == Pointwise::relu && u == 0) || (op == Pointwise::tlu && u == p) ||
                         (op == Pointwise::evo_b0 && q * u + r == p);
              rf.y[i] = f * dt.scale[k] + dt.offset[k];
              rf.ymag[i] = 1 + std::fabs(dt.scale[k]) * (std::fabs(f) + (1 + std::fabs(df)) * mu) + std::fabs(dt.offset[k]);
              const double g = d * df, xc = xi - dt.center[k], t2 = dt.c2[k] * xc;
              rf.dx[i] = dt.c1[k] * g + t2 + dt.c3[k];
              rf.dxmag[i] = 1 + std::fabs(dt.c1[k] * d) * (std::fabs(df) + mu) + std::fabs(t2) + std::fabs(dt.c3[k]);
              double dth[3] = {0, 0, 0};
              if (pw_has_params(op)) pw_dparams(op, u, p, q, r, dth);
              const double term[J] = {d, d * f, g, g * xc, d * dth[0], d * dth[1], d * dth[2]};
              const double slack = std::fabs(d) * mu * (1 + std::fabs(u));  // u's rounding through f, f', df/dp
              for (int j = 0; j < J; ++j) {
                rf.sums[j * K + k] += term[j];
                rf.smag[j * K + k] += std::fabs(term[j]) + (j == 0 ? 0.0 : j == 3 ? slack * (1 + std::fabs(xc)) : slack);
              }
            }
          }
        refs.push_back(std::move(rf));
      }
  }
  // Float: u and f in float, exp/erfc approximations (about 1e-6 relative), sums accumulated in
  // float lanes over a chunk; double: libm's; the central differences good to about 1e-9.
  const double t = tol<T>(), tsum = sizeof(T) == 4 ? 10 * tol<T>() : 1e-11, tfd = sizeof(T) == 4 ? 10 * tol<T>() : 1e-8;
  for (size_t ci = 0; ci < cases.size(); ++ci)
    for (int opi = 0; opi < P; ++opi) {
      const nk::Plan& plan = cases[ci].plan;
      const Pointwise op = Pointwise(opi);
      const PointwiseData<T>& dt = data[ci * P + opi];
      const Ref& rf = refs[ci * P + opi];
      const int64_t n = plan.N * plan.C * plan.S, K = plan.num_sample_sets * plan.C;
      const std::string tag = isa + "/" + type_name<T>() + "/" + cases[ci].name + "/" + pw_name(op);
      std::vector<T> y(n), dx(n);
      std::vector<double> sums(J * K, -1.0);
      nk::apply_pointwise<T>(plan, op, dt.x.data(), dt.coef(), y.data());
      nk::pointwise_sums<T>(plan, op, dt.x.data(), dt.dy.data(), dt.coef(), sums.data());
      nk::pointwise_backward<T>(plan, op, dt.x.data(), dt.dy.data(), dt.coef(), dt.c1.data(), dt.c2.data(), dt.c3.data(), dx.data());
      double ey = 0, edx = 0;
      for (int64_t i = 0; i < n; ++i) {
        ey = std::max(ey, std::fabs(double(y[i]) - rf.y[i]) / rf.ymag[i]);
        edx = std::max(edx, std::fabs(double(dx[i]) - rf.dx[i]) / rf.dxmag[i]);
      }
      check(ey <= t, "apply_pointwise vs reference " + tag + " err=" + std::to_string(ey));
      check(edx <= t, "pointwise_backward vs reference " + tag + " err=" + std::to_string(edx));
      if (plan.S > 1 && (op == Pointwise::relu || op == Pointwise::tlu || op == Pointwise::evo_b0))
        check(rf.ties > 0, "pointwise test data holds exact ties " + tag);
      bool sums_ok = true, dparams_ok = true;
      double esum = 0, efd = 0;
      for (int j = 0; j < J; ++j)
        for (int64_t k = 0; k < K; ++k) {
          const double got = sums[j * K + k];
          if (j >= 4 && !pw_has_params(op)) {
            dparams_ok &= got == 0.0;
            continue;
          }
          const double err = std::fabs(got - rf.sums[j * K + k]) / (1 + rf.smag[j * K + k]);
          (j >= 4 ? efd : esum) = std::max(j >= 4 ? efd : esum, err);
        }
      sums_ok &= esum <= tsum, dparams_ok &= efd <= tfd;
      check(sums_ok, "pointwise_sums dy, dy*f, g, g*(x - center) vs reference " + tag + " err=" + std::to_string(esum));
      check(dparams_ok, "pointwise_sums dy*df/dp, dq, dr vs central differences " + tag + " err=" + std::to_string(efd));
    }

  // 4*3 planes of 2049: 24 chunks, parallel at 2 threads; every op the same bits.
  const int threads_before = nk::get_num_threads();
  const nk::Plan big = nk::plan_per_channel(4, 3, 2049);
  const int64_t n = 4 * 3 * 2049, K = 3;
  for (int opi = 0; opi < P; ++opi) {
    const Pointwise op = Pointwise(opi);
    const PointwiseData<T> dt(big, op, 7);
    struct Out { std::vector<T> y, dx; std::vector<double> sums; };
    auto run = [&](int threads) {
      nk::set_num_threads(threads);
      Out o{std::vector<T>(n), std::vector<T>(n), std::vector<double>(J * K, -1.0)};
      nk::apply_pointwise<T>(big, op, dt.x.data(), dt.coef(), o.y.data());
      nk::pointwise_sums<T>(big, op, dt.x.data(), dt.dy.data(), dt.coef(), o.sums.data());
      nk::pointwise_backward<T>(big, op, dt.x.data(), dt.dy.data(), dt.coef(), dt.c1.data(), dt.c2.data(), dt.c3.data(), o.dx.data());
      return o;
    };
    const Out o1 = run(1), o2 = run(2);
    check(o2.y == o1.y && o2.sums == o1.sums && o2.dx == o1.dx,
          "pointwise bitwise equal at 1 and 2 threads " + isa + "/" + type_name<T>() + "/" + pw_name(op));
  }
  nk::set_num_threads(threads_before);

  // Channels-last plans and ops out of range are rejected.
  auto throws = [](const std::function<void()>& f) {
    try { f(); } catch (const std::invalid_argument&) { return true; } catch (...) { return false; }
    return false;
  };
  const nk::Plan last = channels_last(nk::plan_per_channel(2, 3, 4)), first = nk::plan_per_channel(2, 3, 4);
  std::vector<T> x(24, T(1)), y(24);
  std::vector<double> v(6, 1.0);
  const nk::PointwiseCoefficients coef{v.data(), v.data(), v.data(), v.data(), v.data(), v.data(), v.data(), v.data(), v.data()};
  const std::string tag = isa + "/" + type_name<T>();
  check(throws([&] { nk::apply_pointwise<T>(last, Pointwise::silu, x.data(), coef, y.data()); }),
        "apply_pointwise rejects a channels-last plan " + tag);
  check(throws([&] { nk::pointwise_sums<T>(last, Pointwise::silu, x.data(), x.data(), coef, v.data()); }),
        "pointwise_sums rejects a channels-last plan " + tag);
  check(throws([&] { nk::apply_pointwise<T>(first, Pointwise(nk::kPointwiseOps), x.data(), coef, y.data()); }),
        "apply_pointwise rejects an op out of range " + tag);
}

// The per-position steps (normkit.h: normalize_batch_stats_positions, apply_coefficients_positions,
// backward_sums_positions, backward_apply_positions) on LayerNorm2d's plan: NCHW memory (N, C, HW)
// as plan_per_sample_group(N, HW, C, HW), channels-last, so cell k = n*HW + hw is one LayerNorm
// over the C channels at (n, hw) and the per-channel weight/bias is per row (position). Shapes
// with narrow rows (kRowsChunk / HW rows to a chunk: a tail at C = 1640) and wide ones (HW > 512:
// 64 rows to a chunk, a tail at C = 65). Each step against a double loop of its own formula,
// then the steps composed into LayerNorm2d's backward against LayerNorm's gradient (references
// computed once per type); the same bits at 1 and 2 threads on the wide shape.
template <class T>
void test_positions(const std::string& isa) {
  struct Shape { int64_t N, C, HW; };
  static const std::vector<Shape> shapes = {{2, 3, 5}, {2, 5, 17}, {2, 65, 513}, {1, 1640, 5}};
  const double eps = 1e-5;
  struct Data {  // inputs; the steps' own coefficients per cell
    std::vector<T> x, dy, w, b;
    std::vector<double> mean, scale, offset, c1, c2, c3;
  };
  struct Ref {
    std::vector<double> m, v, rs;                                    // per cell: LayerNorm's statistics
    std::vector<double> y, ymag, ya, yamag, dx, dxmag, dxl, dxlmag;  // per element, and their terms' magnitudes
    std::vector<double> sdy, mdy, sxmu, mxmu;                        // per cell
    std::vector<double> dw, mdw, db, mdb, ldw, mldw;                 // per channel
  };
  static std::vector<Data> data;
  static std::vector<Ref> refs;
  if (refs.empty())
    for (const Shape& sh : shapes) {
      const int64_t N = sh.N, C = sh.C, HW = sh.HW, n = N * C * HW, K = N * HW;
      data.push_back({random_vector<T>(n, 5.0, 71), random_vector<T>(n, 0.1, 72), random_vector<T>(C, 1.0, 73),
                      random_vector<T>(C, 0.0, 74), random_vector<double>(K, 5.0, 75), random_vector<double>(K, 1.0, 76),
                      random_vector<double>(K, 0.0, 77), random_vector<double>(K, 0.5, 78),
                      random_vector<double>(K, -0.3, 79), random_vector<double>(K, 0.0, 80)});
      const Data& dt = data.back();
      const std::vector<double> zk(K, 0.0), ze(n, 0.0), zc(C, 0.0);
      Ref rf{zk, zk, zk, ze, ze, ze, ze, ze, ze, ze, ze, zk, zk, zk, zk, zc, zc, zc, zc, zc, zc};
      for (int64_t nn = 0; nn < N; ++nn)
        for (int64_t hw = 0; hw < HW; ++hw) {
          const int64_t k = nn * HW + hw;
          auto at = [&](int64_t c) { return (nn * C + c) * HW + hw; };
          double m = 0, v = 0;
          for (int64_t c = 0; c < C; ++c) m += double(dt.x[at(c)]);
          m /= double(C);
          for (int64_t c = 0; c < C; ++c) v += (double(dt.x[at(c)]) - m) * (double(dt.x[at(c)]) - m);
          v /= double(C);
          const double rs = 1.0 / std::sqrt(v + eps);
          rf.m[k] = m, rf.v[k] = v, rf.rs[k] = rs;
          double gsum = 0, gxsum = 0;  // sums of g = w dy and of g*xhat
          for (int64_t c = 0; c < C; ++c) {
            const double g = double(dt.w[c]) * double(dt.dy[at(c)]);
            gsum += g, gxsum += g * (double(dt.x[at(c)]) - m) * rs;
          }
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = at(c);
            const double xi = double(dt.x[i]), d = double(dt.dy[i]), wc = double(dt.w[c]), bc = double(dt.b[c]);
            const double xh = (xi - m) * rs, g = wc * d;
            rf.y[i] = xh * wc + bc, rf.ymag[i] = 1 + std::fabs(xh * wc) + std::fabs(bc);
            const double xm = xi - dt.mean[k], xs = xm * dt.scale[k] + dt.offset[k];
            const double xsmag = std::fabs(xm * dt.scale[k]) + std::fabs(dt.offset[k]);
            rf.ya[i] = xs * wc + bc, rf.yamag[i] = 1 + xsmag * std::fabs(wc) + std::fabs(bc);
            const double t1 = dt.c1[k] * g, t2 = dt.c2[k] * xm;
            rf.dx[i] = t1 + t2 + dt.c3[k], rf.dxmag[i] = 1 + std::fabs(t1) + std::fabs(t2) + std::fabs(dt.c3[k]);
            rf.dxl[i] = rs * (g - gsum / double(C) - xh * gxsum / double(C));  // LayerNorm's gradient
            rf.dxlmag[i] = 1 + rs * (std::fabs(g) + std::fabs(gsum) / double(C) + std::fabs(xh * gxsum) / double(C));
            rf.sdy[k] += g, rf.mdy[k] += std::fabs(g);
            rf.sxmu[k] += g * xm, rf.mxmu[k] += std::fabs(g * xm);
            rf.dw[c] += d * xs, rf.mdw[c] += std::fabs(d) * xsmag;
            rf.db[c] += d, rf.mdb[c] += std::fabs(d);
            rf.ldw[c] += d * xh, rf.mldw[c] += std::fabs(d * xh);
          }
        }
      refs.push_back(std::move(rf));
    }

  const int threads_before = nk::get_num_threads();
  const double t = tol<T>(), tstat = sizeof(T) == 4 ? 1e-5 : 1e-12;
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape sh = shapes[si];
    const Data& dt = data[si];
    const Ref& rf = refs[si];
    const int64_t N = sh.N, C = sh.C, HW = sh.HW, n = N * C * HW, K = N * HW;
    nk::Plan plan = nk::plan_per_sample_group(N, HW, C, HW);
    plan.channels_last = true;
    const std::string tag = isa + "/" + type_name<T>() + "/N=" + std::to_string(N) + ",C=" + std::to_string(C) +
                            ",HW=" + std::to_string(HW);
    struct Out {
      std::vector<T> y, ya, dx, dxl;
      std::vector<double> m, v, rs, sdy, sxmu, dw, db, lsdy, lsxmu, ldw, ldb;
    };
    auto run = [&](int threads) {
      nk::set_num_threads(threads);
      const std::vector<T> ve(n);
      const std::vector<double> vk(K, -1.0), vc(C, -1.0);
      Out o{ve, ve, ve, ve, vk, vk, vk, vk, vk, vc, vc, vk, vk, vc, vc};
      nk::normalize_batch_stats_positions<T>(plan, dt.x.data(), eps, dt.w.data(), dt.b.data(), o.y.data(), o.m.data(),
                                             o.v.data(), o.rs.data());
      nk::apply_coefficients_positions<T>(plan, dt.x.data(), dt.mean.data(), dt.scale.data(), dt.offset.data(),
                                          dt.w.data(), dt.b.data(), o.ya.data());
      nk::backward_sums_positions<T>(plan, dt.x.data(), dt.dy.data(), dt.mean.data(), dt.scale.data(), dt.offset.data(),
                                     dt.w.data(), o.sdy.data(), o.sxmu.data(), o.dw.data(), o.db.data());
      nk::backward_apply_positions<T>(plan, dt.x.data(), dt.dy.data(), dt.mean.data(), dt.c1.data(), dt.c2.data(),
                                      dt.c3.data(), dt.w.data(), o.dx.data());
      // LayerNorm2d's backward from the steps: sums with scale rstd and offset 0 (the sums of g*xhat/rstd),
      // dx = rstd*w*dy - rstd/C*sum(w dy) - rstd^3/C*sum(w dy (x - mean))*(x - mean).
      const std::vector<double> zeros(K, 0.0);
      nk::backward_sums_positions<T>(plan, dt.x.data(), dt.dy.data(), o.m.data(), o.rs.data(), zeros.data(), dt.w.data(),
                                     o.lsdy.data(), o.lsxmu.data(), o.ldw.data(), o.ldb.data());
      std::vector<double> l1(K), l2(K), l3(K);
      for (int64_t k = 0; k < K; ++k) {
        const double rs = o.rs[k];
        l1[k] = rs, l2[k] = -rs * rs * rs * o.lsxmu[k] / double(C), l3[k] = -rs * o.lsdy[k] / double(C);
      }
      nk::backward_apply_positions<T>(plan, dt.x.data(), dt.dy.data(), o.m.data(), l1.data(), l2.data(), l3.data(),
                                      dt.w.data(), o.dxl.data());
      return o;
    };
    const Out o = run(1);
    if (C == 65) {  // 2 samples of 2 chunks of up to 64 x 513: parallel at 2 threads
      const Out o2 = run(2);
      check(o2.y == o.y && o2.m == o.m && o2.v == o.v && o2.rs == o.rs && o2.ya == o.ya && o2.sdy == o.sdy &&
                o2.sxmu == o.sxmu && o2.dw == o.dw && o2.db == o.db && o2.dx == o.dx && o2.dxl == o.dxl &&
                o2.ldw == o.ldw && o2.ldb == o.ldb,
            "positions steps bitwise equal at 1 and 2 threads " + tag);
    }
    bool stats_ok = true, sums_ok = true, params_ok = true, lparams_ok = true;
    for (int64_t k = 0; k < K; ++k) {
      stats_ok &= close(o.m[k], rf.m[k], t) && close(o.v[k], rf.v[k], tstat) && close(o.rs[k], rf.rs[k], tstat);
      sums_ok &= std::fabs(o.sdy[k] - rf.sdy[k]) <= t * (1 + rf.mdy[k]) &&
                 std::fabs(o.sxmu[k] - rf.sxmu[k]) <= 10 * t * (1 + rf.mxmu[k]);
    }
    for (int64_t c = 0; c < C; ++c) {
      params_ok &= std::fabs(o.dw[c] - rf.dw[c]) <= 10 * t * (1 + rf.mdw[c]) && std::fabs(o.db[c] - rf.db[c]) <= t * (1 + rf.mdb[c]);
      lparams_ok &= std::fabs(o.ldw[c] - rf.ldw[c]) <= 10 * t * (1 + rf.mldw[c]) && std::fabs(o.ldb[c] - rf.db[c]) <= t * (1 + rf.mdb[c]);
    }
    double ey = 0, eya = 0, edx = 0, edxl = 0;
    for (int64_t i = 0; i < n; ++i) {
      ey = std::max(ey, std::fabs(double(o.y[i]) - rf.y[i]) / rf.ymag[i]);
      eya = std::max(eya, std::fabs(double(o.ya[i]) - rf.ya[i]) / rf.yamag[i]);
      edx = std::max(edx, std::fabs(double(o.dx[i]) - rf.dx[i]) / rf.dxmag[i]);
      edxl = std::max(edxl, std::fabs(double(o.dxl[i]) - rf.dxl[i]) / rf.dxlmag[i]);
    }
    check(stats_ok, "normalize_batch_stats_positions mean, var, rstd vs LayerNorm over C " + tag);
    check(ey <= t, "normalize_batch_stats_positions y vs LayerNorm over C " + tag + " err=" + std::to_string(ey));
    check(eya <= t, "apply_coefficients_positions vs reference " + tag + " err=" + std::to_string(eya));
    check(edx <= t, "backward_apply_positions vs reference " + tag + " err=" + std::to_string(edx));
    check(sums_ok, "backward_sums_positions sum_dy, sum_dy_xmu vs reference " + tag);
    check(params_ok, "backward_sums_positions dweight, dbias vs reference " + tag);
    check(lparams_ok, "LayerNorm2d dweight, dbias from the steps vs LayerNorm's " + tag);
    check(edxl <= 10 * t, "LayerNorm2d dx from the steps vs LayerNorm's gradient " + tag + " err=" + std::to_string(edxl));
  }
  nk::set_num_threads(threads_before);

  // A channels-first plan is no plan of these steps; the fused forward wants one group per column.
  auto throws = [](const std::function<void()>& f) {
    try { f(); } catch (const std::invalid_argument&) { return true; } catch (...) { return false; }
    return false;
  };
  const nk::Plan first = nk::plan_per_sample_group(2, 4, 3, 4);
  const nk::Plan paired = channels_last(nk::plan_per_sample_group(2, 4, 3, 2));
  std::vector<T> x(24, T(1)), y(24), w(3, T(1));
  std::vector<double> d(8, 0.0), e(8, 0.0), f(8, 0.0);
  const std::string tag = isa + "/" + type_name<T>();
  check(throws([&] { nk::apply_coefficients_positions<T>(first, x.data(), d.data(), d.data(), d.data(), w.data(), w.data(), y.data()); }),
        "apply_coefficients_positions rejects a channels-first plan " + tag);
  check(throws([&] { nk::backward_apply_positions<T>(first, x.data(), x.data(), d.data(), d.data(), d.data(), d.data(), w.data(), y.data()); }),
        "backward_apply_positions rejects a channels-first plan " + tag);
  check(throws([&] { nk::normalize_batch_stats_positions<T>(paired, x.data(), 1e-5, w.data(), w.data(), y.data(), d.data(), e.data(), f.data()); }),
        "normalize_batch_stats_positions rejects groups of two columns " + tag);
}

// The optional SampleTerm of normalize_batch_stats_positions and backward_apply_positions
// (normkit.h: BatchLayerNorm2d's batch part joins the cells' normalization as a term per element
// e = c*HW + hw of a sample, the same for every sample) on LayerNorm2d's plan, against a double
// loop of the header's formulas:
//   y  = ((x - mean)*rstd*cell_scale + (x - tm[e])*ts[e] + to[e])*w[c] + b[c]   (mean, rstd over C)
//   dx = c1[k]*w[c]*dy + c2[k]*(x - mean[k]) + c3[k] + tc1[e]*w[c]*dy + ts[e]*(x - tm[e]) + to[e]
// Columns (HW) no multiple of any vector width (17, 1, 513, 5); rows narrower than kWideRow
// (kRowsChunk / HW rows to a chunk: a tail at C = 1640, so the term is read from a sample's second
// chunk) and wider (HW = 513 > 512: chunks of 64 rows, a second chunk of 1 row at C = 65). Every
// shape in cache and streamed (a 64 KiB cache; results never depend on it), and the wide one at 1
// and 2 threads: the same bits. A backward term without c1 is rejected. References once per type.
template <class T>
void test_positions_term(const std::string& isa) {
  struct Shape { int64_t N, C, HW; };
  static const std::vector<Shape> shapes = {{3, 7, 17}, {2, 5, 1}, {2, 65, 513}, {1, 1640, 5}};
  const double eps = 1e-5, cell_scale = 0.37;
  struct Data {
    std::vector<T> x, dy, w, b;
    std::vector<double> tm, ts, to, tc1;    // the term, per element of one sample
    std::vector<double> bm, c1, c2, c3;     // the backward's cell mean and coefficients, per cell
  };
  struct Ref { std::vector<double> m, v, rs, y, ymag, dx, dxmag; };
  static std::vector<Data> data;
  static std::vector<Ref> refs;
  if (refs.empty())
    for (const Shape& sh : shapes) {
      const int64_t N = sh.N, C = sh.C, HW = sh.HW, n = N * C * HW, F = C * HW, K = N * HW;
      data.push_back({random_vector<T>(n, 2.0, 91), random_vector<T>(n, 0.1, 92), random_vector<T>(C, 1.0, 93),
                      random_vector<T>(C, 0.0, 94), random_vector<double>(F, 2.0, 95),
                      random_vector<double>(F, 0.5, 96), random_vector<double>(F, 0.0, 97),
                      random_vector<double>(F, 0.3, 98), random_vector<double>(K, 2.0, 99),
                      random_vector<double>(K, 0.5, 100), random_vector<double>(K, -0.3, 101),
                      random_vector<double>(K, 0.0, 102)});
      const Data& dt = data.back();
      const std::vector<double> zk(K, 0.0), ze(n, 0.0);
      Ref rf{zk, zk, zk, ze, ze, ze, ze};
      for (int64_t nn = 0; nn < N; ++nn)
        for (int64_t hw = 0; hw < HW; ++hw) {
          const int64_t k = nn * HW + hw;
          auto at = [&](int64_t c) { return (nn * C + c) * HW + hw; };
          double m = 0, v = 0;
          for (int64_t c = 0; c < C; ++c) m += double(dt.x[at(c)]);
          m /= double(C);
          for (int64_t c = 0; c < C; ++c) v += (double(dt.x[at(c)]) - m) * (double(dt.x[at(c)]) - m);
          v /= double(C);
          const double rs = 1.0 / std::sqrt(v + eps);
          rf.m[k] = m, rf.v[k] = v, rf.rs[k] = rs;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = at(c), e = c * HW + hw;
            const double xi = double(dt.x[i]), d = double(dt.dy[i]), wc = double(dt.w[c]), bc = double(dt.b[c]);
            const double f = (xi - m) * rs * cell_scale, g = (xi - dt.tm[e]) * dt.ts[e];
            rf.y[i] = (f + g + dt.to[e]) * wc + bc;
            rf.ymag[i] = 1 + (std::fabs(f) + std::fabs(g) + std::fabs(dt.to[e])) * std::fabs(wc) + std::fabs(bc);
            const double terms[6] = {dt.c1[k] * wc * d, dt.c2[k] * (xi - dt.bm[k]), dt.c3[k],
                                     dt.tc1[e] * wc * d, g, dt.to[e]};
            double sum = 0, mag = 1;
            for (double t : terms) sum += t, mag += std::fabs(t);
            rf.dx[i] = sum, rf.dxmag[i] = mag;
          }
        }
      refs.push_back(std::move(rf));
    }

  const int threads_before = nk::get_num_threads();
  const double t = tol<T>(), tstat = sizeof(T) == 4 ? 1e-5 : 1e-12;
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape sh = shapes[si];
    const Data& dt = data[si];
    const Ref& rf = refs[si];
    const int64_t N = sh.N, C = sh.C, HW = sh.HW, n = N * C * HW, K = N * HW;
    nk::Plan plan = nk::plan_per_sample_group(N, HW, C, HW);
    plan.channels_last = true;
    nk::SampleTerm fwd;  // the forward's: no c1
    fwd.mean = dt.tm.data(), fwd.scale = dt.ts.data(), fwd.offset = dt.to.data(), fwd.cell_scale = cell_scale;
    nk::SampleTerm bwd;  // the backward's: cell_scale unused
    bwd.mean = dt.tm.data(), bwd.scale = dt.ts.data(), bwd.offset = dt.to.data(), bwd.c1 = dt.tc1.data();
    struct Out { std::vector<T> y, dx; std::vector<double> m, v, rs; };
    auto run = [&](int threads, int64_t cache) {
      nk::set_num_threads(threads);
      nk::set_cache_bytes(cache);
      Out o{std::vector<T>(n), std::vector<T>(n), std::vector<double>(K, -1.0), std::vector<double>(K, -1.0),
            std::vector<double>(K, -1.0)};
      nk::normalize_batch_stats_positions<T>(plan, dt.x.data(), eps, dt.w.data(), dt.b.data(), o.y.data(), o.m.data(),
                                             o.v.data(), o.rs.data(), &fwd);
      nk::backward_apply_positions<T>(plan, dt.x.data(), dt.dy.data(), dt.bm.data(), dt.c1.data(), dt.c2.data(),
                                      dt.c3.data(), dt.w.data(), o.dx.data(), &bwd);
      return o;
    };
    for (int64_t cache : {int64_t(0), int64_t(64 << 10)}) {
      const std::string tag = isa + "/" + type_name<T>() + "/N=" + std::to_string(N) + ",C=" + std::to_string(C) +
                              ",HW=" + std::to_string(HW) + (cache ? " streamed" : "");
      const Out o = run(1, cache);
      if (C == 65) {  // 2 samples of 2 chunks of up to 64 x 513: parallel at 2 threads
        const Out o2 = run(2, cache);
        check(o2.y == o.y && o2.m == o.m && o2.v == o.v && o2.rs == o.rs && o2.dx == o.dx,
              "positions steps with a sample term bitwise equal at 1 and 2 threads " + tag);
      }
      if (cache) {
        const Out o0 = run(1, 0);
        check(o0.y == o.y && o0.dx == o.dx, "positions steps with a sample term: streamed = in cache, bitwise " + tag);
      }
      bool stats_ok = true;
      for (int64_t k = 0; k < K; ++k)
        stats_ok &= close(o.m[k], rf.m[k], t) && close(o.v[k], rf.v[k], tstat) && close(o.rs[k], rf.rs[k], tstat);
      double ey = 0, edx = 0;
      for (int64_t i = 0; i < n; ++i) {
        ey = std::max(ey, std::fabs(double(o.y[i]) - rf.y[i]) / rf.ymag[i]);
        edx = std::max(edx, std::fabs(double(o.dx[i]) - rf.dx[i]) / rf.dxmag[i]);
      }
      check(stats_ok, "normalize_batch_stats_positions with a sample term: mean, var, rstd over C " + tag);
      check(ey <= t, "normalize_batch_stats_positions with a sample term vs reference " + tag + " err=" + std::to_string(ey));
      check(edx <= t, "backward_apply_positions with a sample term vs reference " + tag + " err=" + std::to_string(edx));
    }
  }
  nk::set_num_threads(threads_before);
  nk::set_cache_bytes(0);

  // The backward's term needs its c1 (the forward's has none and needs none).
  const nk::Plan plan = channels_last(nk::plan_per_sample_group(2, 4, 3, 4));
  std::vector<T> x(24, T(1)), dx(24), w(3, T(1));
  std::vector<double> d(8, 0.0), e(12, 0.0);
  nk::SampleTerm no_c1;
  no_c1.mean = e.data(), no_c1.scale = e.data(), no_c1.offset = e.data();
  bool threw = false;
  try {
    nk::backward_apply_positions<T>(plan, x.data(), x.data(), d.data(), d.data(), d.data(), d.data(), w.data(),
                                    dx.data(), &no_c1);
  } catch (const std::invalid_argument&) {
    threw = true;
  } catch (...) {
  }
  check(threw, "backward_apply_positions rejects a sample term without c1 " + isa + "/" + type_name<T>());
}

// Local response normalization (normkit.h: local_response_norm and its backward) on (N, C, S)
// views against a double loop of torch's formula: windows of size 1, 2, 3, 5 and larger than C
// (9 and 16 at C = 7), beta 0.75 (the vector square-root path) and 0.5 (pow), positions with a
// vector tail (S = 37), one channel, and S > 256 positions (two blocks per sample: parallel at 2
// threads, the same bits). The reference gradient is itself checked once against central
// differences of the reference forward at a few positions. References computed once per type.
template <class T>
void test_local_response(const std::string& isa) {
  struct Case { int64_t N, C, Sp, size; double beta; };
  static std::vector<Case> cases;
  if (cases.empty()) {
    for (int64_t size : {1, 2, 3, 5, 9, 16})
      for (double beta : {0.75, 0.5}) cases.push_back({2, 7, 37, size, beta});
    cases.push_back({3, 1, 5, 3, 0.75});
    cases.push_back({2, 32, 300, 5, 0.75});
  }
  const double alpha = 0.6, kk = 1.25, t = tol<T>();
  struct Ref { std::vector<T> x, dy; std::vector<double> y, dx, dxmag; double efd; };
  static std::vector<Ref> refs;
  const bool first_time = refs.empty();
  if (first_time)
    for (const Case& cs : cases) {
      const int64_t N = cs.N, C = cs.C, Sp = cs.Sp, size = cs.size, n = N * C * Sp;
      const double beta = cs.beta;
      Ref rf{random_vector<T>(n, 0.5, 81), random_vector<T>(n, 0.1, 82), std::vector<double>(n), std::vector<double>(n),
             std::vector<double>(n), 0.0};
      // One position's column of channels: d_c, and y_c = x_c d_c^-beta.
      auto forward_ref = [&](const std::vector<double>& xc, std::vector<double>& d, std::vector<double>& yc) {
        for (int64_t c = 0; c < C; ++c) {
          double sq = 0;
          for (int64_t j = std::max<int64_t>(0, c - size / 2); j <= std::min<int64_t>(C - 1, c + (size - 1) / 2); ++j)
            sq += xc[j] * xc[j];
          d[c] = kk + alpha / double(size) * sq;
          yc[c] = xc[c] * std::pow(d[c], -beta);
        }
      };
      std::vector<double> xc(C), dyc(C), d(C), yc(C), u(C), dref(C);
      const double coef = 2 * alpha * beta / double(size);
      for (int64_t nn = 0; nn < N; ++nn)
        for (int64_t s = 0; s < Sp; ++s) {
          auto at = [&](int64_t c) { return (nn * C + c) * Sp + s; };
          for (int64_t c = 0; c < C; ++c) xc[c] = double(rf.x[at(c)]), dyc[c] = double(rf.dy[at(c)]);
          forward_ref(xc, d, yc);
          for (int64_t c = 0; c < C; ++c) rf.y[at(c)] = yc[c], u[c] = dyc[c] * xc[c] * std::pow(d[c], -beta - 1);
          for (int64_t j = 0; j < C; ++j) {
            double su = 0, mu = 0;
            for (int64_t c = std::max<int64_t>(0, j - (size - 1) / 2); c <= std::min<int64_t>(C - 1, j + size / 2); ++c)
              su += u[c], mu += std::fabs(u[c]);
            const double t1 = dyc[j] * std::pow(d[j], -beta);
            dref[j] = rf.dx[at(j)] = t1 - coef * xc[j] * su;
            rf.dxmag[at(j)] = 1 + std::fabs(t1) + coef * std::fabs(xc[j]) * mu;
          }
          if (nn == 0 && s < 2) {  // the reference gradient of sum dy*y, by central differences
            std::vector<double> xp = xc, yp(C), dp(C);
            for (int64_t j = 0; j < C; ++j) {
              const double h = 1e-6 * (1 + std::fabs(xc[j]));
              double l[2];
              for (int side = 0; side < 2; ++side) {
                xp[j] = xc[j] + (side ? h : -h);
                forward_ref(xp, dp, yp);
                l[side] = 0;
                for (int64_t c = 0; c < C; ++c) l[side] += dyc[c] * yp[c];
              }
              xp[j] = xc[j];
              rf.efd = std::max(rf.efd, std::fabs((l[1] - l[0]) / (2 * h) - dref[j]) / (1 + std::fabs(dref[j])));
            }
          }
        }
      refs.push_back(std::move(rf));
    }

  const int threads_before = nk::get_num_threads();
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& cs = cases[ci];
    const Ref& rf = refs[ci];
    const int64_t N = cs.N, C = cs.C, Sp = cs.Sp, size = cs.size, n = N * C * Sp;
    const double beta = cs.beta;
    const std::string tag = isa + "/" + type_name<T>() + "/N=" + std::to_string(N) + ",C=" + std::to_string(C) +
                            ",S=" + std::to_string(Sp) + ",size=" + std::to_string(size) + ",beta=" + std::to_string(beta);
    auto run = [&](int threads, std::vector<T>& y, std::vector<T>& dx) {
      nk::set_num_threads(threads);
      nk::local_response_norm<T>(N, C, Sp, rf.x.data(), y.data(), size, alpha, beta, kk);
      nk::local_response_norm_backward<T>(N, C, Sp, rf.x.data(), rf.dy.data(), dx.data(), size, alpha, beta, kk);
    };
    std::vector<T> y(n), dx(n);
    run(1, y, dx);
    if (Sp > 256) {
      std::vector<T> y2(n), dx2(n);
      run(2, y2, dx2);
      check(y2 == y && dx2 == dx, "local_response_norm bitwise equal at 1 and 2 threads " + tag);
    }
    double ey = 0, edx = 0;
    for (int64_t i = 0; i < n; ++i) {
      ey = std::max(ey, std::fabs(double(y[i]) - rf.y[i]) / (1 + std::fabs(rf.y[i])));
      edx = std::max(edx, std::fabs(double(dx[i]) - rf.dx[i]) / rf.dxmag[i]);
    }
    check(ey <= t, "local_response_norm vs reference " + tag + " err=" + std::to_string(ey));
    check(edx <= t, "local_response_norm_backward vs reference " + tag + " err=" + std::to_string(edx));
    if (first_time)
      check(rf.efd <= 1e-7, "local_response_norm reference dx = central differences of its y " + tag +
                                " err=" + std::to_string(rf.efd));
  }
  nk::set_num_threads(threads_before);
}

int main() {
  for (const std::string& isa : nk::supported_isas()) {
    nk::set_isa(isa);
    test_primitives<float>(isa);
    test_primitives<double>(isa);
    test_entry_points<float>(isa);
    test_entry_points<double>(isa);
    test_channels_last<float>(isa);
    test_channels_last<double>(isa);
    test_rows_streaming<float>(isa);
    test_rows_streaming<double>(isa);
    test_merge_columns(isa);
    test_no_channels(isa);
    test_traversals_agree<float>(isa);
    test_traversals_agree<double>(isa);
    test_steps<float>(isa);
    test_steps<double>(isa);
    test_pointwise<float>(isa);
    test_pointwise<double>(isa);
    test_positions<float>(isa);
    test_positions<double>(isa);
    test_positions_term<float>(isa);
    test_positions_term<double>(isa);
    test_local_response<float>(isa);
    test_local_response<double>(isa);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
