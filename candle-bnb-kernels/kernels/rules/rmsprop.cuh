// RMSprop and Adagrad. Mirrors src/rules/rmsprop.rs.
#pragma once
#include "common.cuh"

namespace bnb {

struct RmspropRule {
  static constexpr bool kLayerwise = false;
  float lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  bool centered;

  __device__ __forceinline__ float direction(float, float grad, float*) const { return grad; }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    const float g = grad + weight_decay * param;
    const float v = alpha * state[0] + one_minus_alpha * (g * g);
    state[0] = v;
    const bool has_momentum = momentum != 0.0f;
    float variance = v;
    if (centered) {
      // The mean is state 2 with momentum, else state 1 (rmsprop.rs indexes state[k]). Two
      // selects instead of a runtime index, which would put the state array in local memory.
      const float previous = has_momentum ? state[2] : state[1];
      const float mean = alpha * previous + one_minus_alpha * g;
      if (has_momentum)
        state[2] = mean;
      else
        state[1] = mean;
      variance = rust_max(v - mean * mean, 0.0f);
    }
    const float step = g / (sqrtf(variance) + eps);
    if (has_momentum) {
      const float buf = momentum * state[1] + step;
      state[1] = buf;
      return param - lr * buf;
    }
    return param - lr * step;
  }
};
static_assert(sizeof(RmspropRule) == 28, "RmspropRule layout is shared with src/rules/rmsprop.rs");

struct AdagradRule {
  static constexpr bool kLayerwise = false;
  float clr, eps, weight_decay, initial_accumulator_value;

  __device__ __forceinline__ float direction(float, float grad, float*) const { return grad; }
  __device__ __forceinline__ float apply(float param, float grad, float* state) const {
    const float g = grad + weight_decay * param;
    const float s = state[0] + g * g;
    state[0] = s;
    return param - clr * g / (sqrtf(s) + eps);
  }
};
static_assert(sizeof(AdagradRule) == 16, "AdagradRule layout is shared with src/rules/rmsprop.rs");

}  // namespace bnb
