// Backward: one pass of per-chunk sums, an O(planes) fold, one apply pass.
//
// Derivation (checked by tests/test_reference.py through finite differences). Per group: mean mu,
// rstd r, M elements, xhat = (x - mu)*r, y = w*xhat + b, g = dy*w.
//   dx = r*g - r*B/M - r*xhat*mean(g*xhat),      B = sum g
//   mean(g*xhat) = P = r*(A + (sh - mu)*B)/M,     A = sum g*(x - sh), sh = mu rounded to T
//   so dx = c1*dy*w + c2*(x - sh) + c3 with
//   c1 = r, c2 = -r^2*P, c3 = -r^2*P*(sh - mu) - r*B/M
// RMSNorm (skip_mean) has mu = sh = 0 and no mean term: c3 = 0. With running statistics (eval)
// mean and rstd are constants: c2 = c3 = 0.
//   dweight = sum dy*xhat, dbias = sum dy (per channel, or per column for a column affine)
#include <algorithm>

#include "fold.h"
#include "kernels/table.h"
#include "moments.h"
#include "normkit/normkit.h"
#include "parallel.h"

namespace nk {

// Rows per block of a column-affine gradient: each block sums its rows into its own partial.
constexpr int64_t kRowBlock = 16;

template <class S>
void normalize_backward(const Plan& plan, const S* x, const S* dy, const double* mean,
                        const double* rstd, const compute_t<S>* weight, bool batch_stats, S* dx,
                        compute_t<S>* dweight, compute_t<S>* dbias) {
  using T = compute_t<S>;  // shifts, coefficients, weights and their gradients
  check_plan(plan);
  const Kernels<S>& k = kernels().get<S>();
  const Chunks ch(plan);
  const int64_t P = plan.planes(), Sp = plan.S, C = plan.C;
  const bool col = plan.column_affine;
  const T* wcol = col ? weight : nullptr;
  const PlaneAffine<T> xhat(plan, mean, rstd, nullptr, nullptr);  // xhat = (x - shift)*a + b

  // Pass 1: A = sum dy*w*(x - shift), B = sum dy*w per chunk; column sums for a column affine.
  std::vector<double> A(ch.count), B(ch.count);
  if (col && (dweight || dbias)) {
    const int64_t blocks = (P + kRowBlock - 1) / kRowBlock;
    std::vector<T> gpart(blocks * Sp, T(0)), bpart(blocks * Sp, T(0));
    parallel_for(blocks * ch.per_plane, kRowBlock * ch.work(), [&](int64_t item) {
      const int64_t blk = item / ch.per_plane, off = (item % ch.per_plane) * kChunk;
      const int64_t len = std::min(kChunk, Sp - off);
      for (int64_t p = blk * kRowBlock; p < std::min(P, (blk + 1) * kRowBlock); ++p) {
        const int64_t it = p * ch.per_plane + item % ch.per_plane, s = p * Sp + off;
        k.dot(x + s, dy + s, wcol ? wcol + off : nullptr, len, xhat.shift[p], &A[it], &B[it]);
        k.col_accumulate(x + s, dy + s, len, xhat.shift[p], xhat.a[p], xhat.b[p],
                         gpart.data() + blk * Sp + off, bpart.data() + blk * Sp + off);
      }
    });
    parallel_for(Sp, blocks, [&](int64_t s) {
      double gs = 0, bs = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        gs += double(gpart[blk * Sp + s]);
        bs += double(bpart[blk * Sp + s]);
      }
      if (dweight) dweight[s] = T(gs);
      if (dbias) dbias[s] = T(bs);
    });
  } else if (plan.channels_last) {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      const int64_t j = ch.chunk(it), p0 = ch.sample(it) * C, slot = ch.slot(p0, j);
      k.rows_dot(x + ch.start(it), dy + ch.start(it), ch.length(j), C, &xhat.shift[p0], &A[slot],
                 &B[slot], ch.per_plane);
    });
  } else {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      const int64_t p = ch.plane(it), off = ch.chunk(it) * ch.step, s = ch.start(it);
      k.dot(x + s, dy + s, wcol ? wcol + off : nullptr, ch.length(ch.chunk(it)), xhat.shift[p],
            &A[it], &B[it]);
    });
  }

  // Fold: chunk sums -> plane sums -> group sums, each in a fixed order.
  std::vector<double> Ap(P, 0.0), Bp(P, 0.0);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < ch.per_plane; ++j) {
      Ap[p] += A[p * ch.per_plane + j];
      Bp[p] += B[p * ch.per_plane + j];
    }
  auto plane_weight = [&](int64_t p) { return !col && weight ? double(weight[p % C]) : 1.0; };

  if (!col && (dweight || dbias)) {
    for (int64_t c = 0; c < C; ++c) {
      double gs = 0, bs = 0;
      for (int64_t n = 0; n < plan.N; ++n) {
        const int64_t p = n * C + c;
        gs += double(xhat.a[p]) * Ap[p] + double(xhat.b[p]) * Bp[p];
        bs += Bp[p];
      }
      if (dweight) dweight[c] = T(gs);
      if (dbias) dbias[c] = T(bs);
    }
  }
  if (!dx) return;

  const int64_t G = plan.num_groups();
  std::vector<double> Ag(G, 0.0), Bg(G, 0.0);
  if (batch_stats) {
    const GroupIndex index(plan);
    for (int64_t g = 0; g < G; ++g)
      index.for_each_plane(g, [&](int64_t p) {
        Ag[g] += plane_weight(p) * Ap[p];
        Bg[g] += plane_weight(p) * Bp[p];
      });
  }
  const std::vector<int64_t> count = group_counts(plan);
  std::vector<T> c1(P), c2(P), c3(P);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t g = plan.group_of(p / C, p % C);
    const double r = rstd[g], w = plane_weight(p);
    c1[p] = T(r * w);
    if (!batch_stats) continue;
    const double M = double(count[g]);
    const double mu = plan.skip_mean ? 0.0 : mean[g], d = double(xhat.shift[p]) - mu;
    const double Pg = r * (Ag[g] + d * Bg[g]) / M;
    c2[p] = T(-r * r * Pg);
    c3[p] = T(-r * r * Pg * d - (plan.skip_mean ? 0.0 : r * Bg[g] / M));
  }

  // Pass 2: dx = c1*dy*w + c2*(x - shift) + c3. With constant statistics dx does not depend on
  // x (c2 = c3 = 0): skip reading it, which also keeps a NaN in x out of dx, as in torch.
  const S* xs = batch_stats ? x : nullptr;
  if (plan.channels_last) {
    parallel_for(ch.items(), ch.work(), [&](int64_t it) {
      const int64_t s = ch.start(it), p0 = ch.sample(it) * C;
      k.rows_backward_apply(xs ? xs + s : nullptr, dy + s, dx + s, ch.length(ch.chunk(it)), C, &c1[p0], &c2[p0],
                            &xhat.shift[p0], &c3[p0]);
    });
    return;
  }
  parallel_for(ch.items(), ch.work(), [&](int64_t it) {
    const int64_t p = ch.plane(it), off = ch.chunk(it) * ch.step, s = ch.start(it);
    k.backward_apply(xs ? xs + s : nullptr, dy + s, dx + s, ch.length(ch.chunk(it)), c1[p], c2[p], xhat.shift[p],
                     c3[p], wcol ? wcol + off : nullptr);
  });
}

#define NK_INSTANTIATE(S)                                                                    \
  template void normalize_backward<S>(const Plan&, const S*, const S*, const double*,        \
                                      const double*, const compute_t<S>*, bool, S*,          \
                                      compute_t<S>*, compute_t<S>*);
NK_INSTANTIATE(float)
NK_INSTANTIATE(double)
NK_INSTANTIATE(f16)
NK_INSTANTIATE(bf16)
#undef NK_INSTANTIATE

}  // namespace nk
