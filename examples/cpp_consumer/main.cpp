// normkit from C++: a BatchNorm2d inference and a LayerNorm forward + backward on float tensors,
// each checked against a scalar reference written out here. Exits 1 on a mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "normkit/normkit.h"

static double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::fmax(d, std::fabs(a[i] - b[i]));
  return d;
}

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  const double tol = 1e-4;
  bool ok = true;

  // BatchNorm2d inference on an NCHW tensor: y = (x - running_mean[c]) * rstd[c] * weight[c] + bias[c],
  // rstd = 1/sqrt(running_var + eps).
  {
    const int64_t N = 2, C = 3, H = 5, W = 7, S = H * W;
    const double eps = 1e-5;
    std::vector<float> x(N * C * S), y(x.size()), weight(C), bias(C);
    std::vector<double> mean(C), rstd(C);
    for (auto& v : x) v = 3.f + 2.f * normal(rng);
    for (int64_t c = 0; c < C; ++c) {
      weight[c] = 1.f + 0.1f * c;
      bias[c] = -0.5f * c;
      mean[c] = 3.0 + 0.2 * c;  // running statistics
      rstd[c] = 1.0 / std::sqrt(4.0 + c + eps);
    }
    nk::Plan plan = nk::plan_per_channel(N, C, S);
    nk::normalize<float>(plan, x.data(), mean.data(), rstd.data(), weight.data(), bias.data(), y.data());

    std::vector<double> ref(x.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t s = 0; s < S; ++s) {
          int64_t i = (n * C + c) * S + s;
          ref[i] = (x[i] - mean[c]) * rstd[c] * weight[c] + bias[c];
        }
    double err = max_abs_diff(y, ref);
    std::printf("BatchNorm2d inference  (%lldx%lldx%lldx%lld)  max |y - ref| = %.2e\n", (long long)N,
                (long long)C, (long long)H, (long long)W, err);
    ok = ok && err < tol;
  }

  // LayerNorm over the last M elements of each row, affine per column, forward and backward
  // (the statistics come from x, so the gradient flows through them).
  {
    const int64_t rows = 6, M = 40;
    const double eps = 1e-5;
    std::vector<float> x(rows * M), y(x.size()), dy(x.size()), dx(x.size());
    std::vector<float> weight(M), bias(M), dweight(M), dbias(M);
    std::vector<double> mean(rows), var(rows), rstd(rows);
    for (auto& v : x) v = 1.f + normal(rng);
    for (auto& v : dy) v = normal(rng);
    for (int64_t j = 0; j < M; ++j) {
      weight[j] = 1.f + 0.01f * j;
      bias[j] = 0.1f * (j % 3);
    }
    nk::Plan plan = nk::plan_per_row(rows, M, /*skip_mean=*/false);
    nk::normalize_batch_stats<float>(plan, x.data(), eps, weight.data(), bias.data(), y.data(), mean.data(),
                                     var.data(), rstd.data());
    nk::normalize_backward<float>(plan, x.data(), dy.data(), mean.data(), rstd.data(), weight.data(),
                                  /*batch_stats=*/true, dx.data(), dweight.data(), dbias.data());

    // Reference, per row: xhat = (x - mean) * r, y = xhat * w + b;
    // dx = r * (g - mean(g) - xhat * mean(g * xhat)) with g = w * dy; dw = sum dy * xhat, db = sum dy.
    std::vector<double> y_ref(x.size()), dx_ref(x.size()), dw_ref(M, 0.0), db_ref(M, 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      const float* xr = &x[i * M];
      const float* dyr = &dy[i * M];
      double mu = 0, v = 0;
      for (int64_t j = 0; j < M; ++j) mu += xr[j];
      mu /= M;
      for (int64_t j = 0; j < M; ++j) v += (xr[j] - mu) * (xr[j] - mu);
      double r = 1.0 / std::sqrt(v / M + eps);
      double g_mean = 0, gx_mean = 0;
      for (int64_t j = 0; j < M; ++j) {
        double xhat = (xr[j] - mu) * r, g = weight[j] * dyr[j];
        y_ref[i * M + j] = xhat * weight[j] + bias[j];
        g_mean += g / M;
        gx_mean += g * xhat / M;
        dw_ref[j] += dyr[j] * xhat;
        db_ref[j] += dyr[j];
      }
      for (int64_t j = 0; j < M; ++j) {
        double xhat = (xr[j] - mu) * r;
        dx_ref[i * M + j] = r * (weight[j] * dyr[j] - g_mean - xhat * gx_mean);
      }
    }
    double ey = max_abs_diff(y, y_ref), edx = max_abs_diff(dx, dx_ref);
    double edw = std::fmax(max_abs_diff(dweight, dw_ref), max_abs_diff(dbias, db_ref));
    std::printf("LayerNorm fwd+bwd      (%lldx%lld)      max |y - ref| = %.2e, |dx - ref| = %.2e, "
                "|dw, db - ref| = %.2e\n", (long long)rows, (long long)M, ey, edx, edw);
    ok = ok && ey < tol && edx < tol && edw < tol;
  }

  std::printf("normkit %s (SIMD level %s): %s\n", ok ? "ok" : "MISMATCH", nk::isa_name().c_str(),
              ok ? "all results match the references" : "a result differs from its reference");
  return ok ? 0 : 1;
}
