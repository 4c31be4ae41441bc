// AdEMAMix. Mirrors src/rules/ademamix.rs (the schedules are evaluated on the host per step).
#pragma once
#include "common.cuh"

namespace bnb {

struct AdEMAMixRule {
  static constexpr bool kLayerwise = false;
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha, eps,
      weight_decay, bias_correction1, bias_correction2;

  __device__ __forceinline__ float direction(float, float grad, float*) const { return grad; }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    const float m1 = beta1 * state[0] + one_minus_beta1 * grad;
    const float m2 = beta3 * state[1] + one_minus_beta3 * grad;
    const float nu = beta2 * state[2] + one_minus_beta2 * (grad * grad);
    state[0] = m1;
    state[1] = m2;
    state[2] = nu;
    const float numerator = m1 * bias_correction1 + alpha * m2;
    const float denominator = sqrtf(nu * bias_correction2) + eps;
    return param - lr * (numerator / denominator + weight_decay * param);
  }
};
static_assert(sizeof(AdEMAMixRule) == 48, "AdEMAMixRule layout is shared with src/rules/ademamix.rs");

}  // namespace bnb
