// Storage types. float16 and bfloat16 are stored as their bits and computed in float32, as
// PyTorch does on CPU: statistics, weights, biases and gradients of parameters are float32.
#pragma once
#include <cstdint>

namespace nk {

struct f16 { uint16_t bits; };   // IEEE 754 binary16
struct bf16 { uint16_t bits; };  // bfloat16 (ml_dtypes.bfloat16): the top half of a float32

template <class S> struct ComputeOf { using type = S; };
template <> struct ComputeOf<f16> { using type = float; };
template <> struct ComputeOf<bf16> { using type = float; };
// The type arithmetic runs in for storage type S (and the type of weights and biases).
template <class S> using compute_t = typename ComputeOf<S>::type;

}  // namespace nk
