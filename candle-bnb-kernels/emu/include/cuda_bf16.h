// Stand-in for CUDA's cuda_bf16.h in the emulator (see bnb_emu.h): the bfloat16 storage type and
// the conversions the kernels use, with the GPU's results bit for bit:
//  - f32 -> bf16 (__float2bfloat16_rn, cvt.rn.bf16.f32): round to nearest, ties to even
//    (overflow to ±inf, subnormals correct); every NaN gives the canonical 0x7FFF;
//  - bf16 -> f32 (__bfloat162float): exact (the bits shifted up).
#pragma once

struct __nv_bfloat16 {
  unsigned short __x;  // the bits
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "CUDA layout");

inline __attribute__((always_inline)) __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  __nv_bfloat16 h;
  h.__x = bits;
  return h;
}
inline __attribute__((always_inline)) unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) {
  return h.__x;
}

inline __attribute__((always_inline)) __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned x;
  __builtin_memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16(0x7fff);  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);  // ties to even; carries into the exponent as it must
  return __ushort_as_bfloat16((unsigned short)(x >> 16));
}
inline __attribute__((always_inline)) __nv_bfloat16 __float2bfloat16(float f) {
  return __float2bfloat16_rn(f);
}

inline __attribute__((always_inline)) float __bfloat162float(__nv_bfloat16 h) {
  const unsigned x = (unsigned)h.__x << 16;
  float f;
  __builtin_memcpy(&f, &x, 4);
  return f;
}
