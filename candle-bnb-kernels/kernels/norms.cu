// The optimizers' gradient pre-pass on the GPU. Mirrors src/cpu/norms.rs `sum_squares` (the same
// f32 lanes, the same order, so each gradient's squared norm is bit-identical to the CPU's) and
// the pre-pass of candle-bnb-optim's engine.rs `TrackedParams::step` (skip on a non-finite
// gradient, global norm clipping, percentile clipping), so a whole step runs without the host
// reading anything back: the fused kernels (fused.cu) read `skip` and `grad_scales`.
//
// The sums are the CPU's f32 lane sums, not f64 ones from the first element on (more accurate,
// but a clipped gradient, and with it every parameter, would then differ from the CPU's by an ulp
// or so). One launch covers gradients of every dtype (GradSlot carries it); prepass_finish also
// records the first offending slot for NonFinitePolicy::Error.
//
// A step is two launches, in this order on one stream:
//   bnb_sum_squares(slots, n_slots, total_chunks, partials)       any grid, 256 threads
//   bnb_prepass_finish(...)                                       1 block of 256 threads
// No dynamic shared memory. Every buffer is allocated once by the host and reused every step.
//
// Compile with --fmad=false -ftz=false (build.rs does); the sums use __fadd_rn/__fmul_rn and
// __dadd_rn/__dmul_rn anyway, which are never contracted or flushed.

#include "element.cuh"
#include "reduce.cuh"

namespace bnb {

// Elements per partial sum: the CPU's chunk (cpu::MAX_BLOCK), cut from each tensor's start.
constexpr int kChunk = 4096;
// Independent f32 accumulators per chunk on the CPU (norms.rs LANES): one per lane of a warp.
constexpr int kLanes = 32;
static_assert(kLanes == 32, "a chunk's accumulators are the 32 lanes of one warp");
// Squared norms kept per parameter for percentile clipping (engine.rs GRAD_NORM_HISTORY).
constexpr int kHistory = 100;

// Element types of GradSlot::dtype.
enum GradDtype : unsigned { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One gradient of the pre-pass, in the optimizer's slot order (only slots with a gradient this
// step; the host writes the table). Offsets in bytes, 32 in all, 8-byte aligned:
//    0  grad          const void*   contiguous elements of `dtype`
//    8  n             u64           elements
//   16  first_chunk   u64           chunks (ceil(n / 4096)) of the gradients before this one
//   24  dtype         u32           GradDtype
//   28  index         u32           the optimizer's index of this parameter: it indexes the
//                                   per-parameter arrays of bnb_prepass_finish (percentile,
//                                   history, history_count, steps, grad_scales), which cover
//                                   every parameter, also those without a gradient this step
struct GradSlot {
  const void* grad;
  unsigned long long n;
  unsigned long long first_chunk;
  unsigned dtype;
  unsigned index;
};
static_assert(sizeof(GradSlot) == 32, "GradSlot layout is shared with the Rust host");

// The last slot whose first_chunk <= chunk (as fused.cu's find_slot: empty slots are skipped).
__device__ __forceinline__ int find_grad_slot(const GradSlot* slots, int n_slots,
                                              unsigned long long chunk) {
  int lo = 0;
  for (int step = 1 << (31 - __clz(n_slots)); step > 0; step >>= 1)
    if (lo + step < n_slots && slots[lo + step].first_chunk <= chunk) lo += step;
  return lo;
}

// An element of a gradient, read once: __ldcs (global space, evict-first) on its bits, which
// element.cuh then widens exactly.
__device__ __forceinline__ float load_once(const float* p) { return __ldcs(p); }
__device__ __forceinline__ float load_once(const __half* p) {
  return to_f32(__ushort_as_half(__ldcs(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float load_once(const __nv_bfloat16* p) {
  return to_f32(__ushort_as_bfloat16(__ldcs(reinterpret_cast<const unsigned short*>(p))));
}

// Σ x² over one chunk of `len` (1..4096) elements, exactly as norms.rs `sum_squares`'s chunk
// closure, by the 32 lanes of a warp (the result is valid in lane 0):
//  - `sum_squares_f32_body`: accumulator r (= lane r) adds x_i * x_i for i ≡ r (mod 32), in index
//    order, in f32; then the 32 accumulators are added in order, in f32 (`acc.iter().sum()`,
//    whose -0.0 start changes nothing: every accumulator is >= +0.0);
//  - finite: that f32, widened;
//  - not finite because an element is NaN or ±inf (absmax_bits >= 0x7F800000): NaN;
//  - not finite from f32 overflow alone: redone in f64, element by element in index order.
template <class T>
__device__ double chunk_sum_squares(const T* x, int len) {
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
  bool bad = false;
#pragma unroll 8
  for (int i = lane; i < len; i += kLanes) {
    const float v = load_once(x + i);
    bad |= (__float_as_uint(v) & 0x7fffffffu) >= 0x7f800000u;
    acc = __fadd_rn(acc, __fmul_rn(v, v));
  }
  float total = 0.0f;
#pragma unroll
  for (int r = 0; r < kLanes; ++r) total = __fadd_rn(total, __shfl_sync(kFullMask, acc, r));
  if (isfinite(total)) return (double)total;  // the same in every lane, so the branch is uniform
  if (__any_sync(kFullMask, bad)) return __longlong_as_double(0x7ff8000000000000ll);  // NaN
  double sum = 0.0;  // rare: finite elements whose f32 squares overflow; one lane, in order
  if (lane == 0)
    for (int i = 0; i < len; ++i) {
      const double v = to_f32(x[i]);
      sum = __dadd_rn(sum, __dmul_rn(v, v));
    }
  return sum;
}

}  // namespace bnb

// Per chunk of kChunk elements of every gradient, its Σ x² (see chunk_sum_squares) into
// partials[first_chunk + c], c counted from the tensor's start.
// Launch: blockDim.x = 256 (8 warps, one chunk per warp at a time), any grid (grid-stride over
// chunks; total_chunks / 8 blocks, capped, is plenty), no dynamic shared memory. total_chunks =
// 0 does nothing. partials: total_chunks f64.
extern "C" __global__ void __launch_bounds__(bnb::kThreads)
    bnb_sum_squares(const bnb::GradSlot* __restrict__ slots, int n_slots,
                    unsigned long long total_chunks, double* __restrict__ partials) {
  const unsigned long long warps = (unsigned long long)gridDim.x * bnb::kWarps;
  for (unsigned long long chunk = (unsigned long long)blockIdx.x * bnb::kWarps + threadIdx.x / 32;
       chunk < total_chunks; chunk += warps) {
    const bnb::GradSlot& slot = slots[bnb::find_grad_slot(slots, n_slots, chunk)];
    const unsigned long long start = (chunk - slot.first_chunk) * bnb::kChunk;
    const unsigned long long rest = slot.n - start;
    const int len = rest < bnb::kChunk ? int(rest) : bnb::kChunk;
    double sum;
    switch (slot.dtype) {
      case bnb::kF16:
        sum = bnb::chunk_sum_squares(static_cast<const __half*>(slot.grad) + start, len);
        break;
      case bnb::kBF16:
        sum = bnb::chunk_sum_squares(static_cast<const __nv_bfloat16*>(slot.grad) + start, len);
        break;
      default:
        sum = bnb::chunk_sum_squares(static_cast<const float*>(slot.grad) + start, len);
        break;
    }
    if (threadIdx.x % 32 == 0) partials[chunk] = sum;
  }
}

namespace bnb {

// a before b in f64::total_cmp order, for the non-NaN values the history holds (-0.0 < +0.0).
__device__ __forceinline__ bool total_less(double a, double b) {
  return a < b || (a == b && signbit(a) && !signbit(b));
}

// engine.rs `percentile_scale`: records `sq` in the slot's history (the last kHistory squared
// norms: a ring of kHistory values and the count ever recorded), then clips to the
// `percentile`-th percentile of the k recorded (this one included), index floor(p * k / 100)
// capped at k - 1. Nothing is recorded when percentile >= 100 (off), as on the CPU.
// The CPU sorts a copy; here the value at that index of the sorted order is found by counting
// (the value with fewer than `index + 1` values before it and more than `index` at or before
// it), O(k²) compares, no local array.
__device__ double percentile_scale(double* ring, unsigned long long* count, double sq,
                                   int percentile) {
  if (percentile >= 100) return 1.0;
  ring[*count % kHistory] = sq;
  *count += 1;
  const int k = *count < kHistory ? int(*count) : kHistory;
  const int index = min(percentile * k / 100, k - 1);
  double at_index = ring[0];
  for (int a = 0; a < k; ++a) {
    int before = 0, at_or_before = 0;
    for (int b = 0; b < k; ++b) {
      before += total_less(ring[b], ring[a]);
      at_or_before += !total_less(ring[a], ring[b]);
    }
    if (before <= index && index < at_or_before) at_index = ring[a];
  }
  const double clip = sqrt(at_index), current = sqrt(sq);
  return current > clip ? clip / current : 1.0;
}

}  // namespace bnb

// From the chunk sums of every gradient of the step (bnb_sum_squares), as engine.rs
// `TrackedParams::step`:
//  - sq[s] = the chunk sums of slot s added in chunk order (f64, the CPU's `sums.iter().sum()`);
//  - any sq[s] not finite: *skip = 1, *first_bad = the smallest such s; nothing else changes (no
//    history), as the CPU returns before touching anything. The host reads both back (without
//    waiting, at the start of its next step; NonFinitePolicy::Error at once, to name the
//    parameter) and counts steps and skips itself;
//  - else *skip = 0, *first_bad = -1, and per slot: grad_scales[s] = (f32)(global *
//    percentile_scale(...)) with global = min(max_grad_norm / (sqrt(Σ_s sq[s]) + 1e-6), 1) (the
//    sum in slot order) when max_grad_norm > 0, else 1.
// sq (f64 out) has one entry per slot s of `slots`. Arrays per parameter i = slots[s].index (every
// parameter of the optimizer, so a parameter without a gradient this step keeps its entries):
// percentile (i32, 1..=100; 100 = off), history (kHistory f64 each: the ring), history_count
// (u64), grad_scales (f32 out). Scalars in device memory: skip (i32 out), first_bad (i32 out).
// History layout (for checkpoints): with c = history_count[s], the recorded norms oldest first
// are ring[(c - m + j) % 100] for j in 0..m, m = min(c, 100); a checkpoint's deque of m norms
// loads as ring[0..m] = deque, count = m.
// Launch: exactly one block of 256 threads, no dynamic shared memory. n_slots = 0 gives
// skip = 0, as the CPU takes a step without gradients.
extern "C" __global__ void __launch_bounds__(bnb::kThreads)
    bnb_prepass_finish(const bnb::GradSlot* __restrict__ slots, int n_slots,
                       const double* __restrict__ partials, double* __restrict__ sq,
                       double max_grad_norm, const int* __restrict__ percentile,
                       double* __restrict__ history, unsigned long long* __restrict__ history_count,
                       float* __restrict__ grad_scales, int* __restrict__ skip,
                       int* __restrict__ first_bad) {
  __shared__ int bad_slot;
  __shared__ double global_scale;
  if (threadIdx.x == 0) bad_slot = INT_MAX;
  __syncthreads();
  // One thread per slot: the chunk sums must be added in order to match the CPU, so a slot's
  // sum is one dependent chain (about 1 ns per 4096 elements); slots run in parallel.
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    const unsigned long long chunks = (slots[s].n + bnb::kChunk - 1) / bnb::kChunk;
    const double* p = partials + slots[s].first_chunk;
    double total = 0.0;  // Rust's f64 sum starts at -0.0: the same bits for sums of x² >= +0.0
    for (unsigned long long c = 0; c < chunks; ++c) total = __dadd_rn(total, p[c]);
    sq[s] = total;
    if (!isfinite(total)) atomicMin(&bad_slot, s);
  }
  __syncthreads();
  const bool bad = bad_slot != INT_MAX;
  if (threadIdx.x == 0) {
    *skip = bad;
    *first_bad = bad ? bad_slot : -1;
    if (!bad) {
      double total = 0.0;
      for (int s = 0; s < n_slots; ++s) total = __dadd_rn(total, sq[s]);  // slot order
      global_scale = max_grad_norm > 0.0 ? fmin(max_grad_norm / (sqrt(total) + 1e-6), 1.0) : 1.0;
    }
  }
  __syncthreads();
  if (bad) return;
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    const unsigned i = slots[s].index;
    const double p = bnb::percentile_scale(history + (unsigned long long)i * bnb::kHistory,
                                           history_count + i, sq[s], percentile[i]);
    grad_scales[i] = (float)(global_scale * p);
  }
}
