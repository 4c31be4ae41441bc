// The CUDA execution model for g++: force-included (`-include bnb_emu.h`) before every kernel
// source, which then compiles unchanged as C++17 and runs on the CPU under the emulator's runtime
// (../runtime.cpp). See ../README.md for what is detected and what is not.
//
// Two parts:
//  1. types and the runtime's entry points (also read by runtime.cpp, which defines
//     BNB_EMU_RUNTIME and so gets only this part);
//  2. the CUDA surface the kernels see: qualifiers, built-in variables, barriers, warp shuffles
//     and votes, atomics, intrinsics, vector types, max/min.
//
// Everything that synchronises threads (__syncthreads, shuffles, votes, __syncwarp) or ends one
// (__trap) is a call into the runtime, which switches to another thread's fiber. Everything else
// is inline C++: memory accesses in it are checked by the bounds checker like the kernel's own.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Part 1: types and runtime entry points.
// ---------------------------------------------------------------------------------------------

// CUDA's vector types, with CUDA's sizes and alignments.
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "CUDA layout");
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "CUDA layout");
static_assert(sizeof(int4) == 16 && alignof(int4) == 16, "CUDA layout");
static_assert(sizeof(uint2) == 8 && alignof(uint2) == 8, "CUDA layout");

// Warp operations the runtime resolves (bnb_emu_warp_op's `kind`).
enum BnbEmuWarpKind {
  BNB_EMU_SHFL_IDX = 0,   // __shfl_sync
  BNB_EMU_SHFL_UP = 1,    // __shfl_up_sync
  BNB_EMU_SHFL_DOWN = 2,  // __shfl_down_sync
  BNB_EMU_SHFL_XOR = 3,   // __shfl_xor_sync
  BNB_EMU_VOTE_ANY = 4,   // __any_sync
  BNB_EMU_VOTE_ALL = 5,   // __all_sync
  BNB_EMU_VOTE_BALLOT = 6,  // __ballot_sync
  BNB_EMU_SYNCWARP = 7,   // __syncwarp
};

extern "C" {
// The built-in variables of the running thread (runtime calls, so that reading them is not a
// memory access the bounds checker sees). Zeros outside a launch.
uint3 bnb_emu_thread_idx(void);
uint3 bnb_emu_block_idx(void);
uint3 bnb_emu_block_dim(void);
uint3 bnb_emu_grid_dim(void);
// __syncthreads() at file:line: blocks the thread until every thread of the block waits at a
// barrier; the runtime then checks that they all wait at this same call site.
void bnb_emu_syncthreads(const char* file, int line);
// A shuffle, vote or __syncwarp at file:line (kind: BnbEmuWarpKind). value: the lane's operand
// bits (shuffles) or predicate (votes); arg: srcLane, delta or laneMask; width: the shuffle's
// segment width. Returns the result's bits (shuffles), the vote, or 0.
unsigned long long bnb_emu_warp_op(int kind, const char* file, int line, unsigned mask,
                                   unsigned long long value, int arg, int width);
// __trap() at file:line: ends the launch with an error naming the thread.
[[noreturn]] void bnb_emu_trap(const char* file, int line);
// A vector access (`what`, e.g. "__ldcs") of `bytes` at p that is not aligned to `align`: ends
// the launch with an error (a GPU raises "misaligned address").
[[noreturn]] void bnb_emu_misaligned(const void* p, size_t bytes, size_t align, int store,
                                     const char* what);
// The bounds checks g++ emits before every access of instrumented code
// (-fsanitize=kernel-address, outlined calls); defined by runtime.cpp.
void __asan_loadN_noabort(uintptr_t addr, size_t size);
void __asan_storeN_noabort(uintptr_t addr, size_t size);
}

#ifndef BNB_EMU_RUNTIME

// ---------------------------------------------------------------------------------------------
// Part 2: the CUDA surface.
// ---------------------------------------------------------------------------------------------

// Qualifiers. A kernel is an ordinary extern "C" function; under BNB_EMU_SCAN (preprocessing
// only, `g++ -x c++ -E -P -DBNB_EMU_SCAN`) __global__ leaves a marker in front of every kernel
// so a build script can list them: `bnb_emu_kernel_marker void <name>(` once whitespace runs,
// line breaks included, are collapsed to one space.
#ifdef BNB_EMU_SCAN
#define __global__ bnb_emu_kernel_marker
#else
#define __global__
#endif
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Shared memory is static storage: one block runs at a time and launches are serialized, so a
// function's static locals are its block's shared memory. Not cleared between blocks (zero at
// process start). Dynamic shared memory (`extern __shared__`) is not supported.
#define __shared__ static

static constexpr int warpSize = 32;

#define threadIdx (bnb_emu_thread_idx())
#define blockIdx (bnb_emu_block_idx())
#define blockDim (dim3(bnb_emu_block_dim()))
#define gridDim (dim3(bnb_emu_grid_dim()))

#define __syncthreads() bnb_emu_syncthreads(__FILE__, __LINE__)
#define __trap() bnb_emu_trap(__FILE__, __LINE__)

inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

namespace bnb_emu {

template <class To, class From>
__forceinline__ To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To r;
  __builtin_memcpy(&r, &v, sizeof r);
  return r;
}

template <class T>
__forceinline__ unsigned long long to_bits(T v) {
  unsigned long long b = 0;
  __builtin_memcpy(&b, &v, sizeof v);
  return b;
}
template <class T>
__forceinline__ T from_bits(unsigned long long b) {
  T v;
  __builtin_memcpy(&v, &b, sizeof v);
  return v;
}

// Shuffles, one overload per CUDA operand type (so arguments convert as with nvcc).
#define BNB_EMU_SHFL_TYPE(T)                                                                    \
  __forceinline__ T shfl(int kind, const char* file, int line, unsigned mask, T v, int arg,     \
                         int width = 32) {                                                      \
    return from_bits<T>(bnb_emu_warp_op(kind, file, line, mask, to_bits(v), arg, width));     \
  }
BNB_EMU_SHFL_TYPE(int)
BNB_EMU_SHFL_TYPE(unsigned)
BNB_EMU_SHFL_TYPE(long)
BNB_EMU_SHFL_TYPE(unsigned long)
BNB_EMU_SHFL_TYPE(long long)
BNB_EMU_SHFL_TYPE(unsigned long long)
BNB_EMU_SHFL_TYPE(float)
BNB_EMU_SHFL_TYPE(double)
#undef BNB_EMU_SHFL_TYPE

__forceinline__ int vote(int kind, const char* file, int line, unsigned mask, int pred) {
  return (int)bnb_emu_warp_op(kind, file, line, mask, pred != 0, 0, 32);
}
__forceinline__ unsigned ballot(const char* file, int line, unsigned mask, int pred) {
  return (unsigned)bnb_emu_warp_op(BNB_EMU_VOTE_BALLOT, file, line, mask, pred != 0, 0, 32);
}
// __syncwarp(mask = full) at file:line (a callable, so that the macro works without arguments).
struct SyncWarp {
  const char* file;
  int line;
  __forceinline__ void operator()(unsigned mask = 0xffffffffu) const {
    bnb_emu_warp_op(BNB_EMU_SYNCWARP, file, line, mask, 0, 0, 32);
  }
};

// memcpy / memset / memmove with a runtime size are library calls g++ does not instrument, so
// they are checked here. Copies of 1, 2, 4, 8 or 16 bytes are folded into one load and store,
// which the compiler instruments itself.
__forceinline__ bool folded_size(size_t n) {
  return __builtin_constant_p(n) && (n == 1 || n == 2 || n == 4 || n == 8 || n == 16);
}
__forceinline__ void* memcpy_checked(void* d, const void* s, size_t n) {
  if (!folded_size(n)) {
    __asan_loadN_noabort(reinterpret_cast<uintptr_t>(s), n);
    __asan_storeN_noabort(reinterpret_cast<uintptr_t>(d), n);
  }
  return __builtin_memcpy(d, s, n);
}
__forceinline__ void* memmove_checked(void* d, const void* s, size_t n) {
  if (!folded_size(n)) {
    __asan_loadN_noabort(reinterpret_cast<uintptr_t>(s), n);
    __asan_storeN_noabort(reinterpret_cast<uintptr_t>(d), n);
  }
  return __builtin_memmove(d, s, n);
}
__forceinline__ void* memset_checked(void* d, int c, size_t n) {
  if (!folded_size(n)) __asan_storeN_noabort(reinterpret_cast<uintptr_t>(d), n);
  return __builtin_memset(d, c, n);
}

template <class T>
__forceinline__ void check_align(const T* p, int store, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) & (alignof(T) - 1))
    bnb_emu_misaligned(p, sizeof(T), alignof(T), store, what);
}

template <class T>
struct identity {
  using type = T;
};

}  // namespace bnb_emu

// The `width` argument defaults to warpSize, as in CUDA.
#define __shfl_sync(...) ::bnb_emu::shfl(BNB_EMU_SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::bnb_emu::shfl(BNB_EMU_SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::bnb_emu::shfl(BNB_EMU_SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::bnb_emu::shfl(BNB_EMU_SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
#define __any_sync(mask, pred) ::bnb_emu::vote(BNB_EMU_VOTE_ANY, __FILE__, __LINE__, mask, pred)
#define __all_sync(mask, pred) ::bnb_emu::vote(BNB_EMU_VOTE_ALL, __FILE__, __LINE__, mask, pred)
#define __ballot_sync(mask, pred) ::bnb_emu::ballot(__FILE__, __LINE__, mask, pred)
#define __syncwarp(...) ::bnb_emu::SyncWarp{__FILE__, __LINE__}(__VA_ARGS__)

// (Macros: a standard header included after this one must not call them as std::memcpy etc.;
// the headers the kernels need are all included above.)
#define memcpy(d, s, n) ::bnb_emu::memcpy_checked((d), (s), (n))
#define memmove(d, s, n) ::bnb_emu::memmove_checked((d), (s), (n))
#define memset(d, c, n) ::bnb_emu::memset_checked((d), (c), (n))

// Cache-hinted loads and stores: plain accesses (bounds-checked as any other); a misaligned
// pointer is an error, as on the GPU.
#define BNB_EMU_LOAD_HINT(NAME)                            \
  template <class T>                                       \
  __forceinline__ T NAME(const T* p) {                     \
    ::bnb_emu::check_align(p, 0, #NAME);                   \
    return *p;                                             \
  }
#define BNB_EMU_STORE_HINT(NAME)                                              \
  template <class T>                                                          \
  __forceinline__ void NAME(T* p, typename ::bnb_emu::identity<T>::type v) {  \
    ::bnb_emu::check_align(p, 1, #NAME);                                      \
    *p = v;                                                                   \
  }
BNB_EMU_LOAD_HINT(__ldg)
BNB_EMU_LOAD_HINT(__ldcg)
BNB_EMU_LOAD_HINT(__ldca)
BNB_EMU_LOAD_HINT(__ldcs)
BNB_EMU_LOAD_HINT(__ldlu)
BNB_EMU_LOAD_HINT(__ldcv)
BNB_EMU_STORE_HINT(__stwb)
BNB_EMU_STORE_HINT(__stcg)
BNB_EMU_STORE_HINT(__stcs)
BNB_EMU_STORE_HINT(__stwt)
#undef BNB_EMU_LOAD_HINT
#undef BNB_EMU_STORE_HINT

// Atomics. Threads are fibers that switch only at barriers and warp operations, so a plain
// read-modify-write is atomic here.
#define BNB_EMU_ATOMIC(NAME, T, EXPR)   \
  __forceinline__ T NAME(T* p, T v) {   \
    const T old = *p;                   \
    *p = (EXPR);                        \
    return old;                         \
  }
BNB_EMU_ATOMIC(atomicAdd, int, (int)((unsigned)old + (unsigned)v))
BNB_EMU_ATOMIC(atomicAdd, unsigned, old + v)
BNB_EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
BNB_EMU_ATOMIC(atomicAdd, float, old + v)
BNB_EMU_ATOMIC(atomicAdd, double, old + v)
BNB_EMU_ATOMIC(atomicSub, int, (int)((unsigned)old - (unsigned)v))
BNB_EMU_ATOMIC(atomicSub, unsigned, old - v)
BNB_EMU_ATOMIC(atomicMin, int, v < old ? v : old)
BNB_EMU_ATOMIC(atomicMin, unsigned, v < old ? v : old)
BNB_EMU_ATOMIC(atomicMin, long long, v < old ? v : old)
BNB_EMU_ATOMIC(atomicMin, unsigned long long, v < old ? v : old)
BNB_EMU_ATOMIC(atomicMax, int, v > old ? v : old)
BNB_EMU_ATOMIC(atomicMax, unsigned, v > old ? v : old)
BNB_EMU_ATOMIC(atomicMax, long long, v > old ? v : old)
BNB_EMU_ATOMIC(atomicMax, unsigned long long, v > old ? v : old)
BNB_EMU_ATOMIC(atomicExch, int, v)
BNB_EMU_ATOMIC(atomicExch, unsigned, v)
BNB_EMU_ATOMIC(atomicExch, unsigned long long, v)
BNB_EMU_ATOMIC(atomicExch, float, v)
BNB_EMU_ATOMIC(atomicAnd, int, old & v)
BNB_EMU_ATOMIC(atomicAnd, unsigned, old & v)
BNB_EMU_ATOMIC(atomicAnd, unsigned long long, old & v)
BNB_EMU_ATOMIC(atomicOr, int, old | v)
BNB_EMU_ATOMIC(atomicOr, unsigned, old | v)
BNB_EMU_ATOMIC(atomicOr, unsigned long long, old | v)
BNB_EMU_ATOMIC(atomicXor, int, old ^ v)
BNB_EMU_ATOMIC(atomicXor, unsigned, old ^ v)
BNB_EMU_ATOMIC(atomicXor, unsigned long long, old ^ v)
#undef BNB_EMU_ATOMIC
#define BNB_EMU_ATOMIC_CAS(T)                         \
  __forceinline__ T atomicCAS(T* p, T compare, T v) { \
    const T old = *p;                                 \
    if (old == compare) *p = v;                       \
    return old;                                       \
  }
BNB_EMU_ATOMIC_CAS(int)
BNB_EMU_ATOMIC_CAS(unsigned)
BNB_EMU_ATOMIC_CAS(unsigned long long)
#undef BNB_EMU_ATOMIC_CAS

// Arithmetic with explicit IEEE round-to-nearest: on x86-64 (SSE, -ffp-contract=off, default
// MXCSR in every fiber) the plain operators round exactly so.
__forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__forceinline__ float __fdiv_rn(float a, float b) { return a / b; }
__forceinline__ float __frcp_rn(float a) { return 1.0f / a; }
__forceinline__ float __fsqrt_rn(float a) { return sqrtf(a); }
__forceinline__ float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
__forceinline__ double __dadd_rn(double a, double b) { return a + b; }
__forceinline__ double __dsub_rn(double a, double b) { return a - b; }
__forceinline__ double __dmul_rn(double a, double b) { return a * b; }
__forceinline__ double __ddiv_rn(double a, double b) { return a / b; }
__forceinline__ double __dsqrt_rn(double a) { return sqrt(a); }
__forceinline__ double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
__forceinline__ float __saturatef(float a) {
  return a >= 1.0f ? 1.0f : (a > 0.0f ? a : 0.0f);  // NaN -> 0
}

// Reinterpretations.
__forceinline__ unsigned __float_as_uint(float x) { return bnb_emu::bit_cast<unsigned>(x); }
__forceinline__ float __uint_as_float(unsigned x) { return bnb_emu::bit_cast<float>(x); }
__forceinline__ int __float_as_int(float x) { return bnb_emu::bit_cast<int>(x); }
__forceinline__ float __int_as_float(int x) { return bnb_emu::bit_cast<float>(x); }
__forceinline__ double __longlong_as_double(long long x) { return bnb_emu::bit_cast<double>(x); }
__forceinline__ long long __double_as_longlong(double x) { return bnb_emu::bit_cast<long long>(x); }

// Bit operations, CUDA semantics (__clz(0) = 32, __ffs(0) = 0).
__forceinline__ int __ffs(int x) { return __builtin_ffs(x); }
__forceinline__ int __ffsll(long long x) { return __builtin_ffsll(x); }
__forceinline__ int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
__forceinline__ int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll((unsigned long long)x);
}
__forceinline__ int __popc(unsigned x) { return __builtin_popcount(x); }
__forceinline__ int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__forceinline__ unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
__forceinline__ unsigned __umulhi(unsigned a, unsigned b) {
  return (unsigned)(((unsigned long long)a * b) >> 32);
}
namespace bnb_emu {
__extension__ typedef unsigned __int128 u128;
}
__forceinline__ unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((bnb_emu::u128)a * b) >> 64);
}

// max / min in the global namespace, CUDA's overload set (mixed signedness -> unsigned).
#define BNB_EMU_MINMAX(A, B, R)                                                    \
  __forceinline__ R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }           \
  __forceinline__ R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; }
BNB_EMU_MINMAX(int, int, int)
BNB_EMU_MINMAX(unsigned, unsigned, unsigned)
BNB_EMU_MINMAX(int, unsigned, unsigned)
BNB_EMU_MINMAX(unsigned, int, unsigned)
BNB_EMU_MINMAX(long, long, long)
BNB_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
BNB_EMU_MINMAX(long, unsigned long, unsigned long)
BNB_EMU_MINMAX(unsigned long, long, unsigned long)
BNB_EMU_MINMAX(long long, long long, long long)
BNB_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
BNB_EMU_MINMAX(long long, unsigned long long, unsigned long long)
BNB_EMU_MINMAX(unsigned long long, long long, unsigned long long)
#undef BNB_EMU_MINMAX
__forceinline__ float max(float a, float b) { return fmaxf(a, b); }
__forceinline__ float min(float a, float b) { return fminf(a, b); }
__forceinline__ double max(double a, double b) { return fmax(a, b); }
__forceinline__ double min(double a, double b) { return fmin(a, b); }
__forceinline__ double max(float a, double b) { return fmax(a, b); }
__forceinline__ double min(float a, double b) { return fmin(a, b); }
__forceinline__ double max(double a, float b) { return fmax(a, b); }
__forceinline__ double min(double a, float b) { return fmin(a, b); }

__forceinline__ uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
__forceinline__ int2 make_int2(int x, int y) { return int2{x, y}; }
__forceinline__ float2 make_float2(float x, float y) { return float2{x, y}; }
__forceinline__ uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
__forceinline__ uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}
__forceinline__ int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
__forceinline__ float4 make_float4(float x, float y, float z, float w) {
  return float4{x, y, z, w};
}

#endif  // BNB_EMU_RUNTIME
