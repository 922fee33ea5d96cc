// The pointwise epilogues a layer may put around its normalization's affine (normkit.h:
// apply_pointwise): u = (x - shift)*a + b, then y = f(u)*scale + offset with f one of these,
// its parameters p, q, r per plane.
#pragma once

namespace nk {

enum class Pointwise : int {
  identity = 0,    // u
  relu = 1,        // max(u, 0)
  silu = 2,        // u * sigmoid(u)
  gelu = 3,        // u * Phi(u), the erf form
  tlu = 4,         // max(u, p): FRN's thresholded linear unit, p = tau; at a tie the gradient goes to p
  swish_gate = 5,  // u * sigmoid(p u): EvoNorm-S0's numerator, p = v
  evo_b0 = 6,      // u / max(p, q u + r): EvoNorm-B0, p = sqrt(var_B + eps), q = v, r = sqrt(var_I + eps)
};
constexpr int kPointwiseOps = 7;
// pointwise_sums' seven sums per cell, in this order (g = dy*f'(u)).
constexpr int kPointwiseSums = 7;  // dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr

}  // namespace nk
