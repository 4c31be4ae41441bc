// Adafactor, as Hugging Face transformers implements it. Mirrors src/rules/adafactor.rs.
#pragma once
#include "common.cuh"

namespace bnb {

struct AdafactorRule {
  float eps1, beta2, one_minus_beta2, clip_threshold;
  float rho, eps2, beta1, one_minus_beta1, weight_decay;
  float alpha, neg_decay;
  unsigned scale_parameter, momentum;

  __device__ __forceinline__ bool has_confidence() const { return false; }
  __device__ __forceinline__ bool uses_param_rms() const { return scale_parameter != 0; }

  // The decay of statistic pair `which` (0: the second moment's; Adafactor has no other).
  __device__ __forceinline__ void stat_decay(int, float& beta, float& one_minus) const {
    beta = beta2;
    one_minus = one_minus_beta2;
  }

  // `with_param_rms`: alpha = max(eps2, rms) * rho (Python's max: a NaN rms gives eps2).
  __device__ __forceinline__ void set_param_rms(float rms) {
    if (scale_parameter == 0) return;
    const float scale = rms > eps2 ? rms : eps2;
    alpha = scale * rho;
    neg_decay = -(weight_decay * alpha);
  }

  __device__ __forceinline__ float apply(float param, float update, float& m) const {
    float step = alpha * update;
    if (momentum != 0) {
      m = beta1 * m + one_minus_beta1 * step;
      step = m;
    }
    const float decayed = param + neg_decay * param;
    return decayed - step;
  }

  // Only rules with a confidence step call these.
  __device__ __forceinline__ float residual(float, float&) const { return 0.0f; }
  __device__ __forceinline__ float apply_confident(float param, float) const { return param; }
};
static_assert(sizeof(AdafactorRule) == 52, "AdafactorRule layout is shared with src/rules/adafactor.rs");

}  // namespace bnb
