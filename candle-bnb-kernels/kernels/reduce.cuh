// Block shape and the absmax reduction of quantize.cu. A "group" is `group` consecutive threads of
// a CUDA block (a power of two, 32..kThreads) that together handle one quantization block or
// chunk; every thread of the CUDA block must call these (they synchronise).
#pragma once

namespace bnb {

// Threads per CUDA block of every kernel (src/cuda/mod.rs THREADS).
constexpr int kThreads = 256;

// The largest `v` of the group (bit patterns of |x| order like the values).
__device__ __forceinline__ unsigned group_max(unsigned v, int group, unsigned* scratch) {
  for (int offset = 16; offset >= 1; offset >>= 1)
    v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, per_group = group / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const int first = warp / per_group * per_group;
  unsigned m = 0;
  for (int w = first; w < first + per_group; ++w) m = max(m, scratch[w]);
  __syncthreads();  // scratch is reused by the next call
  return m;
}

}  // namespace bnb
