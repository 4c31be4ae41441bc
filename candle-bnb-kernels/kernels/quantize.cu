// Blockwise quantization and dequantization. Mirrors src/cpu/mod.rs (quantize, dequantize) and
// src/cpu/portable.rs (absmax_bits, encode, decode): the same per-block absmax (compared as the
// bit patterns of |x|), the same correctly rounded division x / absmax, the same code search, so
// codes equal the CPU's.
//
// Launch (both kernels): blockDim.x = 256 (kThreads), any grid (grid-stride loops), no dynamic
// shared memory. 64-bit element indices throughout; n = 0 does nothing.

#include "element.cuh"
#include "lookup.cuh"
#include "reduce.cuh"

namespace bnb {

// One tile per loop iteration: `kThreads` threads cover `kThreads / group` quantization blocks
// (group = min(block_size, 256) threads per block, block_size / group elements per thread,
// strided by `group` so loads coalesce).
template <class T>
__device__ void quantize_blockwise(const T* __restrict__ x, unsigned long long n, int block_size,
                                   const QuantTable* __restrict__ table,
                                   unsigned char* __restrict__ codes, float* __restrict__ absmax,
                                   unsigned long long* first_bad) {
  __shared__ QuantTable t;
  __shared__ unsigned scratch[1][kWarps];
  load_table(t, table);
  __syncthreads();
  const unsigned char zero_code = code_of(t, 0.0f);
  const int group = min(block_size, kThreads);
  const int per_thread = block_size / group;
  const int blocks_per_tile = kThreads / group;
  const unsigned long long n_blocks = (n + block_size - 1) / block_size;
  const unsigned long long n_tiles = (n_blocks + blocks_per_tile - 1) / blocks_per_tile;
  const int lane = threadIdx.x % group;
  for (unsigned long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const unsigned long long block = tile * blocks_per_tile + threadIdx.x / group;
    const unsigned long long start = block * block_size;
    unsigned bits = 0;
    for (int j = 0; j < per_thread; ++j) {
      const unsigned long long i = start + lane + (unsigned long long)j * group;
      if (block < n_blocks && i < n) {
        const unsigned b = __float_as_uint(to_f32(x[i])) & 0x7fffffffu;
        if (b >= 0x7f800000u) atomicMin(first_bad, i);
        bits = max(bits, b);
      }
    }
    unsigned group_bits[1] = {bits};
    group_max(group_bits, group, scratch);  // every thread of the block takes part
    bits = group_bits[0];
    if (block >= n_blocks) continue;
    const float scale = __uint_as_float(bits);
    if (lane == 0) absmax[block] = scale;
    if (bits >= 0x7f800000u) continue;  // reported through first_bad; the host discards all
    for (int j = 0; j < per_thread; ++j) {
      const unsigned long long i = start + lane + (unsigned long long)j * group;
      if (i < n) codes[i] = bits == 0 ? zero_code : code_of(t, __fdiv_rn(to_f32(x[i]), scale));
    }
  }
}

template <class T>
__device__ void dequantize_blockwise(const unsigned char* __restrict__ codes,
                                     const float* __restrict__ absmax, unsigned long long n,
                                     int block_size, const float* __restrict__ values,
                                     T* __restrict__ out) {
  __shared__ float v[kMapLen];
  for (int i = threadIdx.x; i < kMapLen; i += blockDim.x) v[i] = values[i];
  __syncthreads();
  const int shift = __ffs(block_size) - 1;  // block sizes are powers of two
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += stride)
    out[i] = from_f32<T>(v[codes[i]] * absmax[i >> shift]);
}

}  // namespace bnb

#define BNB_QUANTIZE(NAME, T)                                                               \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                               \
      bnb_quantize_blockwise_##NAME(const T* x, unsigned long long n, int block_size,       \
                                    const bnb::QuantTable* table, unsigned char* codes,     \
                                    float* absmax, unsigned long long* first_bad) {         \
    bnb::quantize_blockwise<T>(x, n, block_size, table, codes, absmax, first_bad);          \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                               \
      bnb_dequantize_blockwise_##NAME(const unsigned char* codes, const float* absmax,      \
                                      unsigned long long n, int block_size,                 \
                                      const float* values, T* out) {                        \
    bnb::dequantize_blockwise<T>(codes, absmax, n, block_size, values, out);                \
  }

BNB_QUANTIZE(f32, float)
BNB_QUANTIZE(f16, __half)
BNB_QUANTIZE(bf16, __nv_bfloat16)
