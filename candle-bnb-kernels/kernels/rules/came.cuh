// CAME, as its authors' came_pytorch implements it. Mirrors src/rules/came.rs.
#pragma once
#include "common.cuh"

namespace bnb {

struct CameRule {
  float eps1, beta2, one_minus_beta2, clip_threshold;
  float eps2, beta1, one_minus_beta1, beta3, one_minus_beta3, lr, neg_decay;

  __device__ __forceinline__ bool has_confidence() const { return true; }
  __device__ __forceinline__ bool uses_param_rms() const { return false; }

  // The decay of statistic pair `which`: 0 the second moment's (beta2), 1 the residuals' (beta3).
  __device__ __forceinline__ void stat_decay(int which, float& beta, float& one_minus) const {
    beta = which == 0 ? beta2 : beta3;
    one_minus = which == 0 ? one_minus_beta2 : one_minus_beta3;
  }

  __device__ __forceinline__ void set_param_rms(float) {}

  // Advances the momentum by the clipped update; the residual (update - m)^2 + eps2 with the
  // new m.
  __device__ __forceinline__ float residual(float update, float& momentum) const {
    const float m = beta1 * momentum + one_minus_beta1 * update;
    momentum = m;
    const float r = update - m;
    return r * r + eps2;
  }

  __device__ __forceinline__ float apply_confident(float param, float direction) const {
    const float decayed = param + neg_decay * param;
    return decayed - lr * direction;
  }

  __device__ __forceinline__ float apply(float param, float update, float& momentum) const {
    const float m = beta1 * momentum + one_minus_beta1 * update;
    momentum = m;
    return apply_confident(param, m);
  }
};
static_assert(sizeof(CameRule) == 44, "CameRule layout is shared with src/rules/came.rs");

}  // namespace bnb
