// Nearest-code search for a quantization map. Mirrors src/lookup.rs: the host derives, for every
// boundary between neighbouring map values, the first f32 on its upper side (ties to the even
// index already decided, see `CodeLookup::new`), so the code of `y` is
// `region_codes[number of thresholds <= y]`, exactly the CPU's `code_by_search`. The CPU's bucket
// table is a faster route to the same answer; on the GPU a binary search over the thresholds in
// shared memory is cheap and needs no table.
#pragma once

namespace bnb {

constexpr int kMapLen = 256;

// One map as the kernels read it; the host (src/cuda/tables.rs) writes this exact layout.
//   offset    0: float values[256]         the map, ascending (dequantization)
//   offset 1024: float thresholds[256]     the boundaries, ascending, padded with +inf
//   offset 2048: unsigned char region_codes[256]  code of each region (padded with the last)
// 2304 bytes, 4-byte aligned.
struct QuantTable {
  float values[kMapLen];
  float thresholds[kMapLen];
  unsigned char region_codes[kMapLen];
};
static_assert(sizeof(QuantTable) == 2304, "QuantTable layout is shared with the Rust host");

// `table` in shared memory, filled cooperatively by every thread of the block.
__device__ __forceinline__ void load_table(QuantTable& shared, const QuantTable* global) {
  const unsigned* src = reinterpret_cast<const unsigned*>(global);
  unsigned* dst = reinterpret_cast<unsigned*>(&shared);
  for (int i = threadIdx.x; i < int(sizeof(QuantTable) / 4); i += blockDim.x) dst[i] = src[i];
}

// The nearest code of `y`: count the thresholds <= y by binary search (at most 255 real ones;
// the +inf padding is never counted for finite y), then read that region's code.
__device__ __forceinline__ unsigned char code_of(const QuantTable& t, float y) {
  int count = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) {
    if (t.thresholds[count + step - 1] <= y) count += step;
  }
  return t.region_codes[count];
}

}  // namespace bnb
