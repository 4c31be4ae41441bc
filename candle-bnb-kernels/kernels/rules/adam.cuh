// Adam / AdamW and LAMB. Mirrors src/rules/adam.rs field for field (the Rust structs are
// #[repr(C)]; the host copies them into the slot tables as they are) and operation for operation.
#pragma once
#include "common.cuh"

namespace bnb {

struct Moments {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, bias_correction2;

  __device__ __forceinline__ float direction(float g, float* state) const {
    const float m = state[0] * beta1 + g * one_minus_beta1;
    const float v = state[1] * beta2 + (g * g) * one_minus_beta2;
    state[0] = m;
    state[1] = v;
    const float m_hat = m * bias_correction1;
    const float v_hat = v * bias_correction2;
    return m_hat / (sqrtf(v_hat) + eps);
  }
};
static_assert(sizeof(Moments) == 28, "Moments layout is shared with src/rules/adam.rs");

struct AdamRule {
  static constexpr bool kLayerwise = false;
  Moments moments;
  float lr, decay_factor, l2;

  __device__ __forceinline__ float direction(float param, float grad, float* state) const {
    return moments.direction(grad + l2 * param, state);
  }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    const float d = direction(param, grad, state);
    return param * decay_factor - d * lr;
  }
};
static_assert(sizeof(AdamRule) == 40, "AdamRule layout is shared with src/rules/adam.rs");

struct LambRule {
  static constexpr bool kLayerwise = true;
  Moments moments;
  float lr, decoupled_decay, l2, max_unorm, trust;

  __device__ __forceinline__ float direction(float param, float grad, float* state) const {
    return moments.direction(grad + l2 * param, state) + decoupled_decay * param;
  }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    return param - lr * trust * direction(param, grad, state);
  }
  __device__ __forceinline__ void set_norms(float param_norm, float direction_norm) {
    trust = trust_ratio(max_unorm, param_norm, direction_norm);
  }
};
static_assert(sizeof(LambRule) == 48, "LambRule layout is shared with src/rules/adam.rs");

}  // namespace bnb
