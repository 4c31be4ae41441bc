// The optimizers' gradient pre-pass on the GPU. Mirrors src/cpu/norms.rs (sum of squares, NaN
// when an element is not finite) and the pre-pass of candle-bnb-optim's engine.rs (skip on a
// non-finite gradient, global norm clipping, percentile clipping), so a whole step runs without
// the host reading anything back: the fused kernels read `skip` and `grad_scales`.
//
// Launch: bnb_sum_squares_*: blockDim.x = 256, any grid (grid-stride over chunks of kChunk
// elements). bnb_prepass_finish: one block of 256 threads. No dynamic shared memory.

#include "element.cuh"

namespace bnb {

constexpr int kThreads = 256;
// Elements summed per partial (the CPU's MAX_BLOCK).
constexpr int kChunk = 4096;
// Squared norms kept per parameter for percentile clipping (GRAD_NORM_HISTORY).
constexpr int kHistory = 100;

// One gradient of the pre-pass: 0 grad (const T*), 8 n, 16 first_chunk (chunks of the gradients
// before it); 24 bytes.
struct GradSlot {
  const void* grad;
  unsigned long long n;
  unsigned long long first_chunk;
};

template <class T>
__device__ void sum_squares(const GradSlot* __restrict__ slots, int n_slots,
                            unsigned long long total_chunks, double* __restrict__ partials) {
  __shared__ double scratch[kThreads / 32];
  for (unsigned long long chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    int lo = 0, hi = n_slots - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (slots[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
    }
    const GradSlot& slot = slots[lo];
    const T* grad = static_cast<const T*>(slot.grad);
    const unsigned long long start = (chunk - slot.first_chunk) * kChunk;
    // f64 squares of f32 values cannot overflow, so the sum is finite exactly when every
    // element is (the CPU reaches the same answer through f32 partial sums and a re-check).
    double s = 0.0;
    for (int j = 0; j < kChunk / kThreads; ++j) {
      const unsigned long long i = start + threadIdx.x + (unsigned long long)j * kThreads;
      if (i < slot.n) {
        const double x = to_f32(grad[i]);
        s += x * x;
      }
    }
    for (int offset = 16; offset >= 1; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
      partials[chunk] = isfinite(total) ? total : nan("");
    }
    __syncthreads();
  }
}

// The percentile-clipping scale of one parameter (engine.rs `percentile_scale`): records `sq` in
// its ring of the last kHistory squared norms, then clips to the `percentile`-th percentile of
// the norms recorded so far (this one included).
__device__ double percentile_scale(double* ring, unsigned long long* count, double sq,
                                   int percentile) {
  if (percentile >= 100) return 1.0;
  ring[*count % kHistory] = sq;
  *count += 1;
  const int k = (int)min(*count, (unsigned long long)kHistory);
  double sorted[kHistory];
  for (int i = 0; i < k; ++i) {  // insertion sort: k <= 100, once per parameter and step
    const double v = ring[i];
    int j = i;
    while (j > 0 && sorted[j - 1] > v) {
      sorted[j] = sorted[j - 1];
      --j;
    }
    sorted[j] = v;
  }
  const int index = min(percentile * k / 100, k - 1);
  const double clip = sqrt(sorted[index]), current = sqrt(sq);
  return current > clip ? clip / current : 1.0;
}

}  // namespace bnb

#define BNB_SUM_SQUARES(NAME, T)                                                         \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads) bnb_sum_squares_##NAME(    \
      const bnb::GradSlot* slots, int n_slots, unsigned long long total_chunks,          \
      double* partials) {                                                                \
    bnb::sum_squares<T>(slots, n_slots, total_chunks, partials);                         \
  }

BNB_SUM_SQUARES(f32, float)
BNB_SUM_SQUARES(f16, __half)
BNB_SUM_SQUARES(bf16, __nv_bfloat16)

// From the partial sums of every gradient of the step: `sq[s]` (each slot's chunks summed in
// order), `*skip` = 1 (and `*skipped` counted) when one is not finite, else the scale each slot's
// gradient is multiplied by: min(1, max_grad_norm / (sqrt(Σ sq) + 1e-6)) when max_grad_norm > 0,
// times its percentile-clipping scale (`percentile[s]`, 100 = off; `history` holds kHistory
// values per slot, `history_count` how many were ever recorded). Nothing is recorded on a skipped
// step, as on the CPU.
extern "C" __global__ void __launch_bounds__(bnb::kThreads) bnb_prepass_finish(
    const bnb::GradSlot* slots, int n_slots, const double* partials, double* sq,
    double max_grad_norm, const int* percentile, double* history,
    unsigned long long* history_count, float* grad_scales, int* skip,
    unsigned long long* skipped) {
  __shared__ int bad;
  __shared__ double global_scale;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    const unsigned long long chunks = (slots[s].n + bnb::kChunk - 1) / bnb::kChunk;
    double total = 0.0;
    for (unsigned long long c = 0; c < chunks; ++c) total += partials[slots[s].first_chunk + c];
    sq[s] = total;
    if (isnan(total)) atomicExch(&bad, 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *skip = bad;
    if (bad) *skipped += 1;
    double total = 0.0;
    for (int s = 0; s < n_slots; ++s) total += sq[s];  // slot order, as the CPU sums
    global_scale = max_grad_norm > 0.0 ? fmin(max_grad_norm / (sqrt(total) + 1e-6), 1.0) : 1.0;
  }
  __syncthreads();
  if (bad) return;
  for (int s = threadIdx.x; s < n_slots; s += blockDim.x) {
    const double p = bnb::percentile_scale(history + (unsigned long long)s * bnb::kHistory,
                                           history_count + s, sq[s], percentile[s]);
    grad_scales[s] = (float)(global_scale * p);
  }
}
