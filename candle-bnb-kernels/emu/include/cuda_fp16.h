// Stand-in for CUDA's cuda_fp16.h in the emulator (see bnb_emu.h): the IEEE binary16 storage type
// and the conversions the kernels use, with the GPU's results bit for bit:
//  - f32 -> f16 (__float2half_rn, cvt.rn.f16.f32): round to nearest, ties to even; overflow to
//    ±inf; subnormal results rounded correctly; every NaN gives the canonical 0x7FFF;
//  - f16 -> f32 (__half2float): exact (a NaN keeps its sign and payload, quiet bit set).
#pragma once

struct __half {
  unsigned short __x;  // the bits
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "CUDA layout");

inline __attribute__((always_inline)) __half __ushort_as_half(unsigned short bits) {
  __half h;
  h.__x = bits;
  return h;
}
inline __attribute__((always_inline)) unsigned short __half_as_ushort(__half h) { return h.__x; }

inline __attribute__((always_inline)) __half __float2half_rn(float f) {
  unsigned x;
  __builtin_memcpy(&x, &f, 4);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return __ushort_as_half(0x7fff);                   // NaN
  if (a >= 0x477ff000u) return __ushort_as_half((unsigned short)(sign | 0x7c00u));  // >= 65520: inf
  if (a >= 0x38800000u) {                                                  // normal (>= 2^-14)
    const unsigned rebased = a - 0x38000000u;  // exponent bias 127 -> 15
    unsigned r = rebased >> 13;
    const unsigned rest = rebased & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;
    return __ushort_as_half((unsigned short)(sign | r));
  }
  // Subnormal or zero: the value in units of 2^-24, rounded to nearest even.
  const unsigned exp = a >> 23;
  if (exp < 102) return __ushort_as_half((unsigned short)sign);  // < 2^-25 (or f32 subnormal): 0
  const unsigned mant = (a & 0x7fffffu) | 0x800000u;             // value = mant * 2^(exp - 150)
  const unsigned shift = 126 - exp;                              // 14..24
  unsigned r = mant >> shift;
  const unsigned rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (r & 1u))) ++r;
  return __ushort_as_half((unsigned short)(sign | r));
}
inline __attribute__((always_inline)) __half __float2half(float f) { return __float2half_rn(f); }

inline __attribute__((always_inline)) float __half2float(__half h) {
  const unsigned sign = (unsigned)(h.__x & 0x8000u) << 16;
  const unsigned exp = (h.__x >> 10) & 0x1fu;
  unsigned mant = h.__x & 0x3ffu;
  unsigned x;
  if (exp == 0x1fu) {
    x = sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);  // inf, NaN
  } else if (exp != 0) {
    x = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    x = sign;
  } else {  // subnormal: mant * 2^-24, normalised
    int e = 113;  // exponent field of 2^-14
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    x = sign | ((unsigned)e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &x, 4);
  return f;
}
