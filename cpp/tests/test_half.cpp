// float16 and bfloat16 storage at every ISA level: conversions exact and round-to-nearest-even
// (checked against a brute-force table of every representable value), and the entry points
// computing in float32 against a double reference. Prints "N passed, N failed".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/table.h"
#include "normkit/normkit.h"

namespace {

int g_passed = 0, g_failed = 0;
void check(bool ok, const std::string& what) {
  if (ok) ++g_passed;
  else { ++g_failed; std::printf("FAIL: %s\n", what.c_str()); }
}

// Reference decoders written from the formats' definitions.
double decode(nk::f16 h) {
  const int sign = h.bits >> 15, exp = (h.bits >> 10) & 31, man = h.bits & 1023;
  double v = exp == 0 ? std::ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(1024 + man, exp - 25);
  return sign ? -v : v;
}
double decode(nk::bf16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even reference: the nearest of all finite values of the format (ties to the
// even bit pattern), Inf beyond the largest finite value plus half an ulp.
template <class H>
struct Nearest {
  std::vector<std::pair<double, uint16_t>> finite;  // non-negative finite values, ascending
  double overflow;                                   // smallest magnitude that rounds to Inf
  Nearest() {
    for (uint32_t b = 0; b < 0x8000; ++b) {
      double v = decode(H{uint16_t(b)});
      if (std::isfinite(v)) finite.push_back({v, uint16_t(b)});
    }
    const double top = finite.back().first, below = finite[finite.size() - 2].first;
    overflow = top + (top - below) / 2;
  }
  uint16_t operator()(float f) const {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(double(f));
    uint16_t inf = H{0}.bits;
    inf = std::is_same<H, nk::f16>::value ? 0x7c00 : 0x7f80;
    if (a >= overflow) return sign | inf;
    auto it = std::lower_bound(finite.begin(), finite.end(), std::make_pair(a, uint16_t(0)));
    if (it == finite.end()) return sign | finite.back().second;  // above the top, below overflow
    if (it->first == a || it == finite.begin()) return sign | it->second;
    auto lo = it - 1;
    const double dl = a - lo->first, dh = it->first - a;
    if (dl < dh) return sign | lo->second;
    if (dh < dl) return sign | it->second;
    return sign | ((lo->second & 1) ? it->second : lo->second);
  }
};

template <class H> const char* name() { return std::is_same<H, nk::f16>::value ? "f16" : "bf16"; }

// normalize with mean 0, rstd 1 and no affine is y = x*1: a storage round trip. With a scale it
// is y = round(x*a): the float-to-half rounding of exactly known floats.
// The avx512bf16 level converts float32 to bfloat16 with VCVTNEPS2BF16, which treats denormal
// inputs as zero: there a float32 denormal becomes the zero of its sign; every other value
// rounds exactly as the software conversion.
template <class H>
bool flushes_denormals(const std::string& isa) {
  return std::is_same<H, nk::bf16>::value && isa == "avx512bf16";
}

template <class H>
uint16_t expected(const Nearest<H>& nearest, float f, const std::string& isa) {
  if (flushes_denormals<H>(isa) && std::fpclassify(f) == FP_SUBNORMAL) return std::signbit(f) ? 0x8000 : 0;
  return nearest(f);
}

template <class H>
void test_conversions(const std::string& isa) {
  static const Nearest<H> nearest;
  const int64_t n = 0x10000;
  std::vector<H> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) x[i].bits = uint16_t(i);
  const nk::Plan plan = nk::plan_per_channel(1, 1, n);
  const double zero = 0, one = 1;
  nk::normalize<H>(plan, x.data(), &zero, &one, nullptr, nullptr, y.data());
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = decode(x[i]);
    if (std::isnan(v)) bad += !std::isnan(decode(y[i]));
    else if (v == 0) bad += y[i].bits != 0;  // (x - 0)*1 + 0 turns -0 into +0, as float math does
    else if (flushes_denormals<H>(isa) && std::fpclassify(float(v)) == FP_SUBNORMAL) bad += y[i].bits != (x[i].bits & 0x8000);
    else {
      if (y[i].bits != x[i].bits) std::printf("  roundtrip x=%04x (%g) got %04x\n", unsigned(x[i].bits), v, unsigned(y[i].bits));
      bad += y[i].bits != x[i].bits;
    }
  }
  check(bad == 0, std::string("round trip of every bit pattern ") + name<H>() + " " + isa + " bad=" + std::to_string(bad));

  for (float scale : {0.1f, 1.0f / 3.0f, 1.5f, 3.0f, 7.77f, 1e-3f, 1e3f}) {
    const std::vector<double> mean = {0}, rstd = {scale};
    nk::normalize<H>(plan, x.data(), mean.data(), rstd.data(), nullptr, nullptr, y.data());
    bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double v = decode(x[i]);
      if (std::isnan(v)) { bad += !std::isnan(decode(y[i])); continue; }
      const float f = (float(v) - 0.0f) * scale + 0.0f;  // the kernel's float expression (-0 becomes +0)
      const uint16_t want = expected(nearest, f, isa);
      if (y[i].bits != want && bad < 3)
        std::printf("  x=%04x (%g) *%g = %.9g: got %04x want %04x\n", unsigned(x[i].bits), v, double(scale), double(f), unsigned(y[i].bits), unsigned(want));
      bad += y[i].bits != want;
    }
    check(bad == 0, std::string("rounding x*") + std::to_string(scale) + " " + name<H>() + " " + isa + " bad=" + std::to_string(bad));
  }
}

template <class H>
void test_entry_points(const std::string& isa) {
  const int64_t N = 2, C = 3, S = 2049;
  const nk::Plan plan = nk::plan_per_channel(N, C, S);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0, 1);
  static const Nearest<H> nearest;
  std::vector<H> x(N * C * S), dy(N * C * S), y(N * C * S), dx(N * C * S);
  for (auto& e : x) e.bits = nearest(100 + dist(rng));
  for (auto& e : dy) e.bits = nearest(dist(rng));
  std::vector<double> mean(C), var(C), rstd(C);
  nk::group_moments<H>(plan, x.data(), mean.data(), var.data());
  const std::vector<float> w = {0.5f, 1.0f, 2.0f}, b = {0.f, 1.f, -1.f};
  std::vector<float> dw(C), db(C);
  double worst_mean = 0, worst_y = 0, worst_dx = 0, worst_dw = 0;
  const double ulp = std::is_same<H, nk::f16>::value ? 1.0 / 1024 : 1.0 / 128;
  for (int64_t c = 0; c < C; ++c) rstd[c] = 1 / std::sqrt(var[c] + 1e-5);
  nk::normalize<H>(plan, x.data(), mean.data(), rstd.data(), w.data(), b.data(), y.data());
  nk::normalize_backward<H>(plan, x.data(), dy.data(), mean.data(), rstd.data(), w.data(), true,
                            dx.data(), dw.data(), db.data());
  for (int64_t c = 0; c < C; ++c) {
    double m = 0, v = 0, sdy = 0, sdyx = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) m += decode(x[(n * C + c) * S + s]);
    m /= N * S;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) v += std::pow(decode(x[(n * C + c) * S + s]) - m, 2);
    v /= N * S;
    const double r = 1 / std::sqrt(v + 1e-5);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (n * C + c) * S + s;
        sdy += decode(dy[i]);
        sdyx += decode(dy[i]) * (decode(x[i]) - m) * r;
      }
    worst_mean = std::max(worst_mean, std::fabs(mean[c] - m) + std::fabs(var[c] - v) / v);
    worst_dw = std::max(worst_dw, std::fabs(dw[c] - sdyx) / (1 + std::fabs(sdyx)) + std::fabs(db[c] - sdy) / (1 + std::fabs(sdy)));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (n * C + c) * S + s;
        const double xh = (decode(x[i]) - m) * r;
        const double yr = xh * w[c] + b[c];
        const double dxr = w[c] * r * (decode(dy[i]) - sdy / (N * S) - xh * sdyx / (N * S));
        worst_y = std::max(worst_y, std::fabs(decode(y[i]) - yr) / (1 + std::fabs(yr)));
        worst_dx = std::max(worst_dx, std::fabs(decode(dx[i]) - dxr) / (1 + std::fabs(dxr)));
      }
  }
  const std::string tag = std::string(name<H>()) + " " + isa;
  check(worst_mean < 1e-5, "statistics " + tag + " err=" + std::to_string(worst_mean));
  check(worst_y <= ulp, "normalize within one output ulp " + tag + " err=" + std::to_string(worst_y));
  check(worst_dx <= ulp, "backward dx within one output ulp " + tag + " err=" + std::to_string(worst_dx));
  check(worst_dw < 1e-4, "dweight/dbias in float32 " + tag + " err=" + std::to_string(worst_dw));
}

}  // namespace

int main() {
  for (const std::string& isa : nk::supported_isas()) {
    nk::set_isa(isa);
    test_conversions<nk::f16>(isa);
    test_conversions<nk::bf16>(isa);
    test_entry_points<nk::f16>(isa);
    test_entry_points<nk::bf16>(isa);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
