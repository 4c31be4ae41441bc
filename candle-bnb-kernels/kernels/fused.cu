// Fused multi-tensor optimizer steps. Mirrors src/cpu/fused.rs: per quantization block,
// dequantize each state, apply the rule in f32 to (param, grad * grad_scale), take each new
// state's absmax, re-quantize; the 32-bit path keeps f32 states. One launch covers every
// parameter of a group (same rule type, parameter dtype, state precision and state count)
// through a device table of `Slot`s.
//
// Every thread owns a contiguous run of kPerThread = 16 elements of one quantization block, so a
// block of `block_size` elements is owned by `block_size / 16` threads (4 for 64, 16 for the
// default 256, 256 for 4096): each thread has 16 loads per buffer in flight whatever the block
// size (one element per thread at block 256 left it a single one). Contiguous runs are
// addressed as base + constant offset (strided elements each needed a 64-bit address register,
// about twice the registers), and move as 16-byte vectors when the slot's buffers are 16-byte
// aligned (allocations are; a run covers whole vectors because blocks start at multiples of 64
// elements); otherwise, and for the partial run at a slot's end, element by element. Groups of up
// to 32 threads reduce with warp shuffles alone, without barriers.
//
// Launch (every kernel here): blockDim.x = 256 (kThreads; the tiling assumes it), any grid
// (grid-stride over tiles of 256 / (block_size / 16) quantization blocks), no dynamic shared
// memory. block_size must be one of 64, 128, ..., 4096 (the host checks SUPPORTED_BLOCK_SIZES; a
// kernel given another traps, so the mistake surfaces as a launch error instead of a silent
// no-op). Nothing is read from the host during a step: rules, pointers and block offsets are in
// the slot table, the gradient scales and the skip flag in device memory written by the
// pre-pass (norms.cu), so a step can be captured in a CUDA graph.
//
// Compile with --fmad=false -prec-div=true -prec-sqrt=true -ftz=false (build.rs does): the rules
// are written with plain operators and must round exactly as the Rust code, which never
// contracts a * b + c.

#include "element.cuh"
#include "lookup.cuh"
#include "reduce.cuh"
#include "rules/adam.cuh"
#include "rules/ademamix.cuh"
#include "rules/lion.cuh"
#include "rules/rmsprop.cuh"
#include "rules/sgd.cuh"

namespace bnb {

// Elements of one quantization block each thread owns, whatever the block size: a thread has the
// loads of 16 elements per buffer in flight at once, and 4096 / 16 = 256 threads (the CUDA block)
// is the largest group.
constexpr int kPerThread = 16;
// Resident CUDA blocks per SM the step kernels are compiled for (__launch_bounds__): caps them at
// 65536 / (256 * 2) = 128 registers. Left to itself ptxas also stops at 128 for 8-bit Adam/LAMB
// but then spills 16-20 bytes; given the target it schedules for it and spills nothing (sm_90).
// Only 8-bit centered RMSprop with momentum (3 states) still spills 8 bytes, which is cheaper
// than halving the occupancy of every kernel.
constexpr int kMinBlocksPerSm = 2;

// One parameter of a launch; the host writes an array of these into device memory (#[repr(C)]
// on the Rust side, 8-byte aligned). Offsets in bytes:
//    0  param         T*           the parameter, updated in place
//    8  grad          const T*     its gradient
//   16  state[3]      void*        u8 codes (8-bit) or f32 values (32-bit); unused ones null
//   40  absmax[3]     float*       per-block scales (8-bit only, else null)
//   64  n             u64          elements
//   72  first_block   u64          quantization blocks of the slots before this one
//                                  (sum of ceil(n / block_size)); slot 0 has 0
//   80  scale_index   u64          index of this parameter's gradient scale in grad_scales
//                                  (the optimizer's parameter index: norms.cu GradSlot::index)
//   88  rule          Rule         the Rust rule struct as it is (rules/*.cuh)
// sizeof = 88 + sizeof(Rule) rounded up to 8.
template <class Rule>
struct Slot {
  void* param;
  const void* grad;
  void* state[kMaxStates];
  float* absmax[kMaxStates];
  unsigned long long n;
  unsigned long long first_block;
  unsigned long long scale_index;
  Rule rule;
};
static_assert(sizeof(Slot<AdamRule>) == 128, "Slot layout is shared with the Rust host");
static_assert(alignof(Slot<LionRule>) == 8, "Slot layout is shared with the Rust host");

__device__ __forceinline__ bool supported_block_size(int block_size) {
  return block_size >= 64 && block_size <= 4096 && (block_size & (block_size - 1)) == 0;
}

__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Where this thread's 16 elements are: elements lane * 16 .. lane * 16 + 15 of one quantization
// block of `group` threads.
struct Share {
  int group;                 // threads per quantization block: block_size / kPerThread
  int lane;                  // this thread's index in its group
  unsigned long long block;  // global quantization block index
  bool valid;                // block < total_blocks (threads past the end still join barriers)
};

__device__ __forceinline__ Share share_of(unsigned long long tile, int block_size,
                                          unsigned long long total_blocks) {
  Share s;
  s.group = block_size / kPerThread;
  s.lane = threadIdx.x % s.group;
  s.block = tile * (kThreads / s.group) + threadIdx.x / s.group;
  s.valid = s.block < total_blocks;
  return s;
}

__device__ __forceinline__ unsigned long long tile_count(int block_size,
                                                         unsigned long long total_blocks) {
  const unsigned long long per_tile = kThreads / (block_size / kPerThread);
  return (total_blocks + per_tile - 1) / per_tile;
}

// How many of a thread's 16 elements exist: its run starts at element `first` of the slot, and
// the slot ends at n (only the last block of a slot is partial).
__device__ __forceinline__ int live_count(bool valid, unsigned long long first,
                                          unsigned long long n) {
  if (!valid || first >= n) return 0;
  return n - first < kPerThread ? int(n - first) : kPerThread;
}

// The slot owning global block `block`: the last one with first_block <= block (empty slots share
// their successor's first_block and so are never picked). A fixed number of steps for a given
// n_slots, so the threads of a warp stay converged even when their groups look up different slots.
template <class Rule>
__device__ __forceinline__ int find_slot(const Slot<Rule>* slots, int n_slots,
                                         unsigned long long block) {
  int lo = 0;
  for (int step = 1 << (31 - __clz(n_slots)); step > 0; step >>= 1)
    if (lo + step < n_slots && slots[lo + step].first_block <= block) lo += step;
  return lo;
}

// NaN -> 0, ±inf -> ±FLT_MAX, as cpu/fused.rs `saturate`. The CPU applies it only to a block
// whose absmax is not finite; on finite values it is the identity (-0.0 included), so applying it
// to every value gives the CPU's result without a second reduction.
__device__ __forceinline__ float saturate(float v) {
  return isnan(v) ? 0.0f : fminf(fmaxf(v, -3.402823466e38f), 3.402823466e38f);
}

// The raw bits of an element type, to unpack 16-byte vectors; the conversions are element.cuh's
// (exact widening; stores rounded to nearest-even).
template <class T> struct Bits;
template <> struct Bits<float> {
  using U = unsigned;
  __device__ static float to_f32(U u) { return __uint_as_float(u); }
  __device__ static U from_f32(float x) { return __float_as_uint(x); }
};
template <> struct Bits<__half> {
  using U = unsigned short;
  __device__ static float to_f32(U u) { return bnb::to_f32(__ushort_as_half(u)); }
  __device__ static U from_f32(float x) { return __half_as_ushort(bnb::from_f32<__half>(x)); }
};
template <> struct Bits<__nv_bfloat16> {
  using U = unsigned short;
  __device__ static float to_f32(U u) { return bnb::to_f32(__ushort_as_bfloat16(u)); }
  __device__ static U from_f32(float x) {
    return __bfloat16_as_ushort(bnb::from_f32<__nv_bfloat16>(x));
  }
};

// A run of 16 elements at p as f32: `vec` (all 16 exist and p is 16-byte aligned) reads 16-byte
// vectors, else element by element, elements past `live` reading as 0. The vectors go through
// __ldcs/__stcs: global-space accesses (the slot table's pointers are generic, which would give
// generic loads) with the evict-first hint, as a step touches each byte once.
template <class T>
__device__ __forceinline__ void load_run(const T* p, int live, bool vec,
                                         float (&out)[kPerThread]) {
  using U = typename Bits<T>::U;
  constexpr int kLanes = 16 / sizeof(U);  // elements per 16-byte vector
  if (vec) {
#pragma unroll
    for (int q = 0; q < kPerThread / kLanes; ++q) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + q);
      U u[kLanes];
      memcpy(u, &v, sizeof v);
#pragma unroll
      for (int e = 0; e < kLanes; ++e) out[q * kLanes + e] = Bits<T>::to_f32(u[e]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = j < live ? to_f32(p[j]) : 0.0f;
  }
}

// Stores the first `live` values of a run rounded to T (all 16 as vectors when `vec`).
template <class T>
__device__ __forceinline__ void store_run(T* p, int live, bool vec,
                                          const float (&in)[kPerThread]) {
  using U = typename Bits<T>::U;
  constexpr int kLanes = 16 / sizeof(U);
  if (vec) {
#pragma unroll
    for (int q = 0; q < kPerThread / kLanes; ++q) {
      U u[kLanes];
#pragma unroll
      for (int e = 0; e < kLanes; ++e) u[e] = Bits<T>::from_f32(in[q * kLanes + e]);
      uint4 v;
      memcpy(&v, u, sizeof v);
      __stcs(reinterpret_cast<uint4*>(p) + q, v);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (j < live) p[j] = from_f32<T>(in[j]);
  }
}

// 16 codes at p (one 16-byte vector when `vec`); codes past `live` read as 0 (never used).
__device__ __forceinline__ void load_codes(const unsigned char* p, int live, bool vec,
                                           unsigned char (&out)[kPerThread]) {
  if (vec) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    memcpy(out, &v, sizeof v);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = j < live ? p[j] : 0;
  }
}

__device__ __forceinline__ void store_codes(unsigned char* p, int live, bool vec,
                                            const unsigned char (&in)[kPerThread]) {
  if (vec) {
    uint4 v;
    memcpy(&v, in, sizeof v);
    __stcs(reinterpret_cast<uint4*>(p), v);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (j < live) p[j] = in[j];
  }
}

// A slot's buffers as this thread's quantization block sees them.
template <class T, class Rule, int NS, bool Q>
struct BlockView {
  T* param;
  const T* grad;
  void* state[NS > 0 ? NS : 1];
  float* absmax[NS > 0 ? NS : 1];
  unsigned long long n, b, first;  // slot elements, block index in the slot, this run's start
  float scale;                     // the slot's gradient scale (ScaledGrad)
  bool aligned;                    // every buffer of the slot starts on 16 bytes
  Rule rule;

  __device__ __forceinline__ BlockView(const Slot<Rule>& slot, const Share& s, int block_size,
                                       float grad_scale)
      : param(static_cast<T*>(slot.param)),
        grad(static_cast<const T*>(slot.grad)),
        n(slot.n),
        b(s.block - slot.first_block),
        first((s.block - slot.first_block) * (unsigned long long)block_size +
              (unsigned long long)s.lane * kPerThread),
        scale(grad_scale),
        rule(slot.rule) {
    unsigned long long bits = (unsigned long long)slot.param | (unsigned long long)slot.grad;
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      state[k] = slot.state[k];
      absmax[k] = slot.absmax[k];
      bits |= (unsigned long long)slot.state[k];
    }
    aligned = (bits & 15) == 0;
  }

  // Loads this thread's run: p (param as f32), g (grad as f32 times the scale, which is what
  // ScaledGrad hands the rule) and st (each state dequantized, values[code] * absmax, or read as
  // f32). Elements past `live` read as 0, so they take no part in any absmax. All loads of a
  // tile come before any of its stores.
  __device__ __forceinline__ void load(int live, const QuantTable* table, float (&p)[kPerThread],
                                       float (&g)[kPerThread],
                                       float (&st)[NS > 0 ? NS : 1][kPerThread]) const {
    const bool vec = aligned && live == kPerThread;
    load_run(param + first, live, vec, p);
    load_run(grad + first, live, vec, g);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) g[j] = g[j] * scale;
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      if constexpr (Q) {
        const float a = live > 0 ? absmax[k][b] : 0.0f;
        unsigned char c[kPerThread];
        load_codes(static_cast<const unsigned char*>(state[k]) + first, live, vec, c);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
          st[k][j] = j < live ? table[k].values[c[j]] * a : 0.0f;
      } else {
        load_run(static_cast<const float*>(state[k]) + first, live, vec, st[k]);
      }
    }
  }
};

// One step over every slot. NS: states per element; Q: 8-bit blockwise (else f32) states.
template <class T, class Rule, int NS, bool Q>
__device__ void fused_step(const Slot<Rule>* __restrict__ slots, int n_slots,
                           unsigned long long total_blocks, int block_size,
                           const QuantTable* __restrict__ tables,
                           const float* __restrict__ grad_scales, const int* __restrict__ skip) {
  constexpr int kS = NS > 0 ? NS : 1;
  __shared__ QuantTable table[(Q && NS > 0) ? NS : 1];
  __shared__ unsigned scratch[kS][kWarps];
  if (*skip != 0) return;  // the same for every thread of the grid: no barrier is left waiting
  if (!supported_block_size(block_size)) __trap();
  unsigned char zero_code[kS] = {};
  if constexpr (Q) {
    for (int k = 0; k < NS; ++k) load_table(table[k], tables + k);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < NS; ++k) zero_code[k] = code_of(table[k], 0.0f);
  }

  const unsigned long long tiles = tile_count(block_size, total_blocks);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Share s = share_of(tile, block_size, total_blocks);
    const int slot_index = s.valid ? find_slot(slots, n_slots, s.block) : 0;
    const BlockView<T, Rule, NS, Q> v(slots[slot_index], s, block_size,
                                      s.valid ? grad_scales[slots[slot_index].scale_index] : 1.0f);
    const int live = live_count(s.valid, v.first, v.n);

    const bool vec = v.aligned && live == kPerThread;
    float p[kPerThread], g[kPerThread], st[kS][kPerThread];
    v.load(live, table, p, g, st);

    // The rule, element by element, exactly as apply_rule_body: the state array starts as the
    // element's states with zeros past NS.
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (j < live) {
        float state[kMaxStates] = {0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < NS; ++k) state[k] = st[k][j];
        p[j] = v.rule.apply(p[j], g[j], state);
#pragma unroll
        for (int k = 0; k < NS; ++k) st[k][j] = state[k];
      }
    }
    store_run(v.param + v.first, live, vec, p);

    if constexpr (!Q) {
#pragma unroll
      for (int k = 0; k < NS; ++k)
        store_run(static_cast<float*>(v.state[k]) + v.first, live, vec, st[k]);
    } else if constexpr (NS > 0) {
      // 8-bit: each state's new absmax over the block (bit patterns of |s|, as absmax_bits),
      // after saturation; then the codes of s / absmax.
      unsigned bits[kS];
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        bits[k] = 0;
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          st[k][j] = saturate(st[k][j]);
          bits[k] = max(bits[k], abs_bits(st[k][j]));
        }
      }
      group_max(bits, s.group, scratch);  // every thread of the CUDA block takes part
      if (live > 0) {
#pragma unroll
        for (int k = 0; k < NS; ++k) {
          const float absmax = __uint_as_float(bits[k]);
          // The group's threads read absmax[k][b] in load(); each fed the value into the
          // reduction above, so those reads are complete before this write.
          if (s.lane == 0) v.absmax[k][v.b] = absmax;
          unsigned char c[kPerThread];
#pragma unroll
          for (int j = 0; j < kPerThread; ++j)
            c[j] = bits[k] == 0 ? zero_code[k] : code_of(table[k], __fdiv_rn(st[k][j], absmax));
          store_codes(static_cast<unsigned char*>(v.state[k]) + v.first, live, vec, c);
        }
      }
    }
  }
}

// Layer-wise rules, first pass: per global block, the sums of param² and direction² (the state
// advanced on a copy, nothing written) into partials[2 * block] and partials[2 * block + 1], in
// f64 as cpu/fused.rs `measure` does (f32 values widened, squared and summed in f64). The CPU sums
// a chunk's elements in index order; here each thread sums its 16 in order and the group combines
// them in a fixed tree (group_sum), so the sums are deterministic but may differ from the CPU's
// in the last bits of the f64 (see README).
template <class T, class Rule, int NS, bool Q>
__device__ void measure(const Slot<Rule>* __restrict__ slots, int n_slots,
                        unsigned long long total_blocks, int block_size,
                        const QuantTable* __restrict__ tables,
                        const float* __restrict__ grad_scales, const int* __restrict__ skip,
                        double* __restrict__ partials) {
  constexpr int kS = NS > 0 ? NS : 1;
  __shared__ QuantTable table[(Q && NS > 0) ? NS : 1];
  __shared__ double scratch[2][kWarps];
  if (*skip != 0) return;
  if (!supported_block_size(block_size)) __trap();
  if constexpr (Q) {
    for (int k = 0; k < NS; ++k) load_table(table[k], tables + k);
    __syncthreads();
  }
  const unsigned long long tiles = tile_count(block_size, total_blocks);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Share s = share_of(tile, block_size, total_blocks);
    const int slot_index = s.valid ? find_slot(slots, n_slots, s.block) : 0;
    const BlockView<T, Rule, NS, Q> v(slots[slot_index], s, block_size,
                                      s.valid ? grad_scales[slots[slot_index].scale_index] : 1.0f);
    const int live = live_count(s.valid, v.first, v.n);
    float p[kPerThread], g[kPerThread], st[kS][kPerThread];
    v.load(live, table, p, g, st);
    double param_sq = 0.0, direction_sq = 0.0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (j < live) {
        float state[kMaxStates] = {0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < NS; ++k) state[k] = st[k][j];
        const double d = v.rule.direction(p[j], g[j], state);
        param_sq += (double)p[j] * (double)p[j];
        direction_sq += d * d;
      }
    }
    group_sum(param_sq, direction_sq, s.group, scratch);
    if (s.valid && s.lane == 0) {
      partials[2 * s.block] = param_sq;
      partials[2 * s.block + 1] = direction_sq;
    }
  }
}

// Layer-wise rules, second pass: one CUDA block per slot (grid-stride over slots) sums the slot's
// block partials, thread t taking blocks t, t + 256, ... in order and the 256 sums combined in a
// fixed tree, so the result depends on neither the grid nor the timing; then it fixes the slot's
// trust ratio from the f32 norms, as cpu/fused.rs does with
// `rule.with_norms(param_sq.sqrt() as f32, direction_sq.sqrt() as f32)`.
template <class Rule>
__device__ void set_trust(Slot<Rule>* slots, int n_slots, int block_size,
                          const double* __restrict__ partials, const int* __restrict__ skip) {
  __shared__ double scratch[2][kWarps];
  if (*skip != 0) return;
  for (int s = blockIdx.x; s < n_slots; s += gridDim.x) {
    const unsigned long long first = slots[s].first_block;
    const unsigned long long blocks = (slots[s].n + block_size - 1) / block_size;
    double param_sq = 0.0, direction_sq = 0.0;
    for (unsigned long long b = threadIdx.x; b < blocks; b += kThreads) {
      param_sq += partials[2 * (first + b)];
      direction_sq += partials[2 * (first + b) + 1];
    }
    group_sum(param_sq, direction_sq, kThreads, scratch);
    if (threadIdx.x == 0)
      slots[s].rule.set_norms((float)sqrt(param_sq), (float)sqrt(direction_sq));
  }
}

}  // namespace bnb

#define BNB_STEP_ARGS(Rule)                                                                   \
  const bnb::Slot<Rule>*slots, int n_slots, unsigned long long total_blocks, int block_size, \
      const bnb::QuantTable *tables, const float *grad_scales, const int *skip

// bnb_fused_<rule>_<dtype>_<q8|f32>_s<states>: one step of every slot of a group.
#define BNB_FUSED(NAME, Rule, DNAME, T, NS)                                                  \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads, bnb::kMinBlocksPerSm)         \
      bnb_fused_##NAME##_##DNAME##_q8_s##NS(BNB_STEP_ARGS(Rule)) {                           \
    bnb::fused_step<T, Rule, NS, true>(slots, n_slots, total_blocks, block_size, tables,     \
                                       grad_scales, skip);                                   \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads, bnb::kMinBlocksPerSm)         \
      bnb_fused_##NAME##_##DNAME##_f32_s##NS(BNB_STEP_ARGS(Rule)) {                          \
    bnb::fused_step<T, Rule, NS, false>(slots, n_slots, total_blocks, block_size, tables,    \
                                        grad_scales, skip);                                  \
  }

// bnb_measure_<rule>_<dtype>_<q8|f32>_s<states>: the layer-wise first pass.
#define BNB_MEASURE(NAME, Rule, DNAME, T, NS)                                                \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads, bnb::kMinBlocksPerSm)         \
      bnb_measure_##NAME##_##DNAME##_q8_s##NS(BNB_STEP_ARGS(Rule), double* partials) {       \
    bnb::measure<T, Rule, NS, true>(slots, n_slots, total_blocks, block_size, tables,        \
                                    grad_scales, skip, partials);                            \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads, bnb::kMinBlocksPerSm)         \
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

// bnb_set_trust_<rule>: the layer-wise second pass; blockDim.x = 256, any grid (one CUDA block
// per slot is the natural choice), no dynamic shared memory.
extern "C" __global__ void __launch_bounds__(bnb::kThreads)
    bnb_set_trust_lamb(bnb::Slot<bnb::LambRule>* slots, int n_slots, int block_size,
                       const double* partials, const int* skip) {
  bnb::set_trust(slots, n_slots, block_size, partials, skip);
}
extern "C" __global__ void __launch_bounds__(bnb::kThreads)
    bnb_set_trust_lars(bnb::Slot<bnb::LarsRule>* slots, int n_slots, int block_size,
                       const double* partials, const int* skip) {
  bnb::set_trust(slots, n_slots, block_size, partials, skip);
}
