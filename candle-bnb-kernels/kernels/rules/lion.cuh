// Lion. Mirrors src/rules/lion.rs.
#pragma once
#include "common.cuh"

namespace bnb {

struct LionRule {
  static constexpr bool kLayerwise = false;
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor;

  __device__ __forceinline__ float direction(float, float grad, float*) const { return grad; }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    const float m = state[0];
    const float c = m * beta1 + grad * one_minus_beta1;
    state[0] = m * beta2 + grad * one_minus_beta2;
    return param * decay_factor - lr * sign(c);
  }
};
static_assert(sizeof(LionRule) == 24, "LionRule layout is shared with src/rules/lion.rs");

}  // namespace bnb
