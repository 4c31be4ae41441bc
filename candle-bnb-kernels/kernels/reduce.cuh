// Block shape and the group reductions every kernel uses. A "group" is `group` consecutive
// threads of a CUDA block (a power of two, aligned within the block, at most kThreads) that
// together own one quantization block or chunk.
#pragma once

namespace bnb {

// Threads per CUDA block of every kernel (src/cuda/mod.rs THREADS).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The largest of each v[k] over the `group` threads of a quantization block, in every one of
// them. Groups are aligned runs of threads, so xor offsets below the group size stay inside one.
// Every thread of the CUDA block calls it (for groups above a warp it synchronises; `group` is
// the same for the whole launch, so either every thread takes the barrier or none).
template <int N>
__device__ __forceinline__ void group_max(unsigned (&v)[N], int group,
                                          unsigned (*scratch)[kWarps]) {
  const int width = group < 32 ? group : 32;
  for (int offset = width / 2; offset >= 1; offset >>= 1)
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = max(v[k], __shfl_xor_sync(kFullMask, v[k], offset));
  if (group <= 32) return;
  const int warp = threadIdx.x / 32, per_group = group / 32, first = warp / per_group * per_group;
  if (threadIdx.x % 32 == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[k][warp] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    unsigned m = 0;
    for (int w = first; w < first + per_group; ++w) m = max(m, scratch[k][w]);
    v[k] = m;
  }
  __syncthreads();  // scratch is written again by the next tile
}

// The sums of a and b over a group, in a fixed order (a butterfly within the warp, then the
// group's warps in index order), so the result is the same from run to run. Same calling rules
// as group_max.
__device__ __forceinline__ void group_sum(double& a, double& b, int group,
                                          double (*scratch)[kWarps]) {
  const int width = group < 32 ? group : 32;
  for (int offset = width / 2; offset >= 1; offset >>= 1) {
    a += __shfl_xor_sync(kFullMask, a, offset);
    b += __shfl_xor_sync(kFullMask, b, offset);
  }
  if (group <= 32) return;
  const int warp = threadIdx.x / 32, per_group = group / 32, first = warp / per_group * per_group;
  if (threadIdx.x % 32 == 0) {
    scratch[0][warp] = a;
    scratch[1][warp] = b;
  }
  __syncthreads();
  a = 0.0;
  b = 0.0;
  for (int w = first; w < first + per_group; ++w) {
    a += scratch[0][w];
    b += scratch[1][w];
  }
  __syncthreads();
}

}  // namespace bnb
