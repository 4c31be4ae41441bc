// What every rule shares. Mirrors src/rules/mod.rs.
#pragma once

namespace bnb {

// Most state values a rule keeps per element (MAX_STATES).
constexpr int kMaxStates = 3;

// The trust ratio of LAMB and LARS as bitsandbytes applies it (`max_unorm`): the update's norm
// stays at most max_unorm times the parameter's; 1 when max_unorm is 0 or either norm is 0.
__device__ __forceinline__ float trust_ratio(float max_unorm, float param_norm,
                                             float direction_norm) {
  const float limit = max_unorm * param_norm;
  return (max_unorm > 0.0f && param_norm > 0.0f && direction_norm > limit)
             ? limit / direction_norm
             : 1.0f;
}

__device__ __forceinline__ float sign(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}

// Rust's f32::max: the non-NaN operand when one is NaN, as fmaxf.
__device__ __forceinline__ float rust_max(float a, float b) { return fmaxf(a, b); }

}  // namespace bnb
