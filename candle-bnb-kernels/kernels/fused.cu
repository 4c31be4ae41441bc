// Fused multi-tensor optimizer steps. Mirrors src/cpu/fused.rs: per quantization block,
// dequantize each state, apply the rule in f32, take each new state's absmax, re-quantize; the
// 32-bit path keeps f32 states. One launch covers every parameter of a group (same rule type,
// parameter dtype, state precision and state count) through a device table of `Slot`s.
//
// Launch (every kernel here): blockDim.x = 256 (kThreads), any grid (grid-stride over tiles), no
// dynamic shared memory. Nothing is read from the host during a step: rules, pointers and block
// offsets are in the slot table, the gradient scales and the skip flag in device memory written
// by the pre-pass (norms.cu), so a step can be captured in a CUDA graph.

#include "element.cuh"
#include "lookup.cuh"
#include "rules/adam.cuh"
#include "rules/ademamix.cuh"
#include "rules/lion.cuh"
#include "rules/rmsprop.cuh"
#include "rules/sgd.cuh"

namespace bnb {

constexpr int kThreads = 256;
// Elements per thread of the largest block (4096 / 256).
constexpr int kMaxPerThread = 16;

// One parameter of a launch; the host (src/cuda/fused.rs) writes this layout:
//   0 param (T*), 8 grad (const T*), 16 state[3] (u8 codes or f32 values), 40 absmax[3] (8-bit
//   only, else null), 64 n (elements), 72 first_block (blocks of the slots before this one),
//   80 rule (the Rust rule struct, #[repr(C)]); size rounded up to 8 bytes.
template <class Rule>
struct Slot {
  void* param;
  const void* grad;
  void* state[kMaxStates];
  float* absmax[kMaxStates];
  unsigned long long n;
  unsigned long long first_block;
  Rule rule;
};

// The largest bits / the sum of a group of `group` threads (a power of two, 32..256, aligned
// within the CUDA block); every thread of the block must call it (it synchronises).
__device__ __forceinline__ unsigned group_max(unsigned v, int group, unsigned* scratch) {
  for (int offset = 16; offset >= 1; offset >>= 1)
    v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, per_group = group / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const int first = warp / per_group * per_group;
  unsigned m = 0;
  for (int w = first; w < first + per_group; ++w) m = max(m, scratch[w]);
  __syncthreads();
  return m;
}

__device__ __forceinline__ double group_sum(double v, int group, double* scratch) {
  for (int offset = 16; offset >= 1; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, per_group = group / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const int first = warp / per_group * per_group;
  double s = 0.0;
  for (int w = first; w < first + per_group; ++w) s += scratch[w];
  __syncthreads();
  return s;
}

// The slot holding global block `block`: the last one whose first_block <= block.
template <class Rule>
__device__ __forceinline__ int find_slot(const Slot<Rule>* slots, int n_slots,
                                         unsigned long long block) {
  int lo = 0, hi = n_slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (slots[mid].first_block <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// NaN -> 0, ±inf -> ±FLT_MAX, so an overflowing state saturates instead of poisoning its block's
// scale. The CPU applies it only to blocks whose absmax is not finite; on finite values it is the
// identity, so applying it always gives the same result without a second reduction.
__device__ __forceinline__ float saturate(float v) {
  return isnan(v) ? 0.0f : fminf(fmaxf(v, -3.402823466e38f), 3.402823466e38f);
}

// Where one thread's elements of one quantization block are.
struct Tile {
  int group, per_thread, lane;
  unsigned long long block;  // global block index
  bool valid;                // block < total_blocks
};

__device__ __forceinline__ Tile tile_of(unsigned long long tile, int block_size,
                                        unsigned long long total_blocks) {
  Tile t;
  t.group = min(block_size, kThreads);
  t.per_thread = block_size / t.group;
  t.lane = threadIdx.x % t.group;
  t.block = tile * (kThreads / t.group) + threadIdx.x / t.group;
  t.valid = t.block < total_blocks;
  return t;
}

__device__ __forceinline__ unsigned long long n_tiles(int block_size,
                                                      unsigned long long total_blocks) {
  const int per_tile = kThreads / min(block_size, kThreads);
  return (total_blocks + per_tile - 1) / per_tile;
}

// One step over every slot. NS: states per element; Q: 8-bit blockwise (else f32) states.
template <class T, class Rule, int NS, bool Q>
__device__ void fused_step(const Slot<Rule>* __restrict__ slots, int n_slots,
                           unsigned long long total_blocks, int block_size,
                           const QuantTable* __restrict__ tables,
                           const float* __restrict__ grad_scales, const int* __restrict__ skip) {
  __shared__ QuantTable table[(Q && NS > 0) ? NS : 1];
  __shared__ unsigned scratch[kThreads / 32];
  if (*skip != 0) return;  // the same for every thread of the grid: no barrier is left waiting
  if (Q)
    for (int k = 0; k < NS; ++k) load_table(table[k], tables + k);
  __syncthreads();
  const unsigned long long tiles = n_tiles(block_size, total_blocks);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Tile t = tile_of(tile, block_size, total_blocks);
    const int s = t.valid ? find_slot(slots, n_slots, t.block) : 0;
    const Slot<Rule>& slot = slots[s];
    const Rule rule = slot.rule;
    const float scale = grad_scales[s];
    const unsigned long long b = t.block - slot.first_block;
    const unsigned long long start = b * block_size;
    T* param = static_cast<T*>(slot.param);
    const T* grad = static_cast<const T*>(slot.grad);
    float st[NS > 0 ? NS : 1][kMaxPerThread];
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      if (j >= t.per_thread) break;
      const unsigned long long i = start + t.lane + (unsigned long long)j * t.group;
      const bool in = t.valid && i < slot.n;
      float state[kMaxStates] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        if (in) {
          state[k] = Q ? table[k].values[static_cast<const unsigned char*>(slot.state[k])[i]] *
                             slot.absmax[k][b]
                       : static_cast<const float*>(slot.state[k])[i];
        }
      }
      if (in) {
        const float p = rule.apply(to_f32(param[i]), to_f32(grad[i]) * scale, state);
        param[i] = from_f32<T>(p);
      }
#pragma unroll
      for (int k = 0; k < NS; ++k) st[k][j] = in ? state[k] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      if (!Q) {
#pragma unroll
        for (int j = 0; j < kMaxPerThread; ++j) {
          if (j >= t.per_thread) break;
          const unsigned long long i = start + t.lane + (unsigned long long)j * t.group;
          if (t.valid && i < slot.n) static_cast<float*>(slot.state[k])[i] = st[k][j];
        }
        continue;
      }
      unsigned bits = 0;
#pragma unroll
      for (int j = 0; j < kMaxPerThread; ++j) {
        if (j >= t.per_thread) break;
        st[k][j] = saturate(st[k][j]);
        bits = max(bits, __float_as_uint(st[k][j]) & 0x7fffffffu);
      }
      bits = group_max(bits, t.group, scratch);  // every thread of the block takes part
      if (!t.valid) continue;
      const float absmax = __uint_as_float(bits);
      if (t.lane == 0) slot.absmax[k][b] = absmax;
      const unsigned char zero_code = code_of(table[k], 0.0f);
      unsigned char* codes = static_cast<unsigned char*>(slot.state[k]);
#pragma unroll
      for (int j = 0; j < kMaxPerThread; ++j) {
        if (j >= t.per_thread) break;
        const unsigned long long i = start + t.lane + (unsigned long long)j * t.group;
        if (i < slot.n)
          codes[i] = bits == 0 ? zero_code : code_of(table[k], __fdiv_rn(st[k][j], absmax));
      }
    }
  }
}

// Layer-wise rules, first pass: per global block, the sums of param² and direction² (state
// advanced on a copy, nothing written) into partials[2 * block] and [2 * block + 1].
template <class T, class Rule, int NS, bool Q>
__device__ void measure(const Slot<Rule>* __restrict__ slots, int n_slots,
                        unsigned long long total_blocks, int block_size,
                        const QuantTable* __restrict__ tables,
                        const float* __restrict__ grad_scales, const int* __restrict__ skip,
                        double* __restrict__ partials) {
  __shared__ QuantTable table[(Q && NS > 0) ? NS : 1];
  __shared__ double scratch[kThreads / 32];
  if (*skip != 0) return;
  if (Q)
    for (int k = 0; k < NS; ++k) load_table(table[k], tables + k);
  __syncthreads();
  const unsigned long long tiles = n_tiles(block_size, total_blocks);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Tile t = tile_of(tile, block_size, total_blocks);
    const int s = t.valid ? find_slot(slots, n_slots, t.block) : 0;
    const Slot<Rule>& slot = slots[s];
    const Rule rule = slot.rule;
    const float scale = grad_scales[s];
    const unsigned long long b = t.block - slot.first_block;
    const unsigned long long start = b * block_size;
    const T* param = static_cast<const T*>(slot.param);
    const T* grad = static_cast<const T*>(slot.grad);
    double param_sq = 0.0, direction_sq = 0.0;
    for (int j = 0; j < t.per_thread; ++j) {
      const unsigned long long i = start + t.lane + (unsigned long long)j * t.group;
      if (!t.valid || i >= slot.n) continue;
      float state[kMaxStates] = {0.0f, 0.0f, 0.0f};
      for (int k = 0; k < NS; ++k)
        state[k] = Q ? table[k].values[static_cast<const unsigned char*>(slot.state[k])[i]] *
                           slot.absmax[k][b]
                     : static_cast<const float*>(slot.state[k])[i];
      const float p = to_f32(param[i]);
      const double d = rule.direction(p, to_f32(grad[i]) * scale, state);
      param_sq += (double)p * (double)p;
      direction_sq += d * d;
    }
    param_sq = group_sum(param_sq, t.group, scratch);
    direction_sq = group_sum(direction_sq, t.group, scratch);
    if (t.valid && t.lane == 0) {
      partials[2 * t.block] = param_sq;
      partials[2 * t.block + 1] = direction_sq;
    }
  }
}

// Layer-wise rules, second pass: one thread per slot sums its blocks' partials in block order
// (deterministic) and fixes the slot's trust ratio, as `UpdateRule::with_norms` does.
template <class Rule>
__device__ void set_trust(Slot<Rule>* slots, int n_slots, int block_size,
                          const double* __restrict__ partials, const int* __restrict__ skip) {
  if (*skip != 0) return;
  for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < n_slots; s += gridDim.x * blockDim.x) {
    const unsigned long long first = slots[s].first_block;
    const unsigned long long blocks = (slots[s].n + block_size - 1) / block_size;
    double param_sq = 0.0, direction_sq = 0.0;
    for (unsigned long long b = first; b < first + blocks; ++b) {
      param_sq += partials[2 * b];
      direction_sq += partials[2 * b + 1];
    }
    slots[s].rule.set_norms((float)sqrt(param_sq), (float)sqrt(direction_sq));
  }
}

}  // namespace bnb

#define BNB_STEP_ARGS(Rule)                                                                \
  const bnb::Slot<Rule>*slots, int n_slots, unsigned long long total_blocks, int block_size, \
      const bnb::QuantTable *tables, const float *grad_scales, const int *skip

// bnb_fused_<rule>_<dtype>_<q8|f32>_s<states>: one step of every slot of a group.
#define BNB_FUSED(NAME, Rule, DNAME, T, NS)                                                  \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                \
      bnb_fused_##NAME##_##DNAME##_q8_s##NS(BNB_STEP_ARGS(Rule)) {                           \
    bnb::fused_step<T, Rule, NS, true>(slots, n_slots, total_blocks, block_size, tables,     \
                                       grad_scales, skip);                                   \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                \
      bnb_fused_##NAME##_##DNAME##_f32_s##NS(BNB_STEP_ARGS(Rule)) {                          \
    bnb::fused_step<T, Rule, NS, false>(slots, n_slots, total_blocks, block_size, tables,    \
                                        grad_scales, skip);                                  \
  }

// bnb_measure_<rule>_<dtype>_<q8|f32>_s<states> and bnb_set_trust_<rule>: the layer-wise passes.
#define BNB_MEASURE(NAME, Rule, DNAME, T, NS)                                                \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                \
      bnb_measure_##NAME##_##DNAME##_q8_s##NS(BNB_STEP_ARGS(Rule), double* partials) {       \
    bnb::measure<T, Rule, NS, true>(slots, n_slots, total_blocks, block_size, tables,        \
                                    grad_scales, skip, partials);                            \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                \
      bnb_measure_##NAME##_##DNAME##_f32_s##NS(BNB_STEP_ARGS(Rule), double* partials) {      \
    bnb::measure<T, Rule, NS, false>(slots, n_slots, total_blocks, block_size, tables,       \
                                     grad_scales, skip, partials);                           \
  }

#define BNB_ALL_DTYPES(MACRO, NAME, Rule, NS) \
  MACRO(NAME, Rule, f32, float, NS)           \
  MACRO(NAME, Rule, f16, __half, NS)          \
  MACRO(NAME, Rule, bf16, __nv_bfloat16, NS)

BNB_ALL_DTYPES(BNB_FUSED, adam, bnb::AdamRule, 2)
BNB_ALL_DTYPES(BNB_FUSED, lamb, bnb::LambRule, 2)
BNB_ALL_DTYPES(BNB_MEASURE, lamb, bnb::LambRule, 2)
BNB_ALL_DTYPES(BNB_FUSED, lion, bnb::LionRule, 1)
BNB_ALL_DTYPES(BNB_FUSED, sgd, bnb::SgdRule, 0)
BNB_ALL_DTYPES(BNB_FUSED, sgd, bnb::SgdRule, 1)
BNB_ALL_DTYPES(BNB_FUSED, lars, bnb::LarsRule, 0)
BNB_ALL_DTYPES(BNB_FUSED, lars, bnb::LarsRule, 1)
BNB_ALL_DTYPES(BNB_MEASURE, lars, bnb::LarsRule, 0)
BNB_ALL_DTYPES(BNB_MEASURE, lars, bnb::LarsRule, 1)
BNB_ALL_DTYPES(BNB_FUSED, rmsprop, bnb::RmspropRule, 1)
BNB_ALL_DTYPES(BNB_FUSED, rmsprop, bnb::RmspropRule, 2)
BNB_ALL_DTYPES(BNB_FUSED, rmsprop, bnb::RmspropRule, 3)
BNB_ALL_DTYPES(BNB_FUSED, adagrad, bnb::AdagradRule, 1)
BNB_ALL_DTYPES(BNB_FUSED, ademamix, bnb::AdEMAMixRule, 3)

extern "C" __global__ void bnb_set_trust_lamb(bnb::Slot<bnb::LambRule>* slots, int n_slots,
                                              int block_size, const double* partials,
                                              const int* skip) {
  bnb::set_trust(slots, n_slots, block_size, partials, skip);
}
extern "C" __global__ void bnb_set_trust_lars(bnb::Slot<bnb::LarsRule>* slots, int n_slots,
                                              int block_size, const double* partials,
                                              const int* skip) {
  bnb::set_trust(slots, n_slots, block_size, partials, skip);
}
