// SGD with momentum, and LARS. Mirrors src/rules/sgd.rs.
#pragma once
#include "common.cuh"

namespace bnb {

struct SgdRule {
  static constexpr bool kLayerwise = false;
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, first_step;

  __device__ __forceinline__ float direction(float param, float grad, float* state) const {
    const float g = grad + weight_decay * param;
    if (momentum == 0.0f) return g;
    const float buf = first_step ? g : momentum * state[0] + one_minus_dampening * g;
    state[0] = buf;
    return nesterov ? g + momentum * buf : buf;
  }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    return param - lr * direction(param, grad, state);
  }
};
static_assert(sizeof(SgdRule) == 20, "SgdRule layout is shared with src/rules/sgd.rs");

struct LarsRule {
  static constexpr bool kLayerwise = true;
  SgdRule sgd;
  float max_unorm, trust;

  __device__ __forceinline__ float direction(float param, float grad, float* state) const {
    return sgd.direction(param, grad, state);
  }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    return param - sgd.lr * trust * sgd.direction(param, grad, state);
  }
  __device__ __forceinline__ void set_norms(float param_norm, float direction_norm) {
    trust = trust_ratio(max_unorm, param_norm, direction_norm);
  }
};
static_assert(sizeof(LarsRule) == 28, "LarsRule layout is shared with src/rules/sgd.rs");

}  // namespace bnb
