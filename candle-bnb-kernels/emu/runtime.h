/* The CUDA emulator's C API (see README.md). Plain C types: Rust calls it through FFI.
 *
 * Kernels are the `extern "C" __global__` functions of the .cu files in kernels/, compiled by
 * g++ into emulator units (unit.cpp) and found by name (registry.cpp). A launch runs a kernel to
 * completion on the calling OS thread, every CUDA thread a fiber, and reports what a GPU would
 * punish (barrier divergence, bad warp-operation masks, out-of-bounds accesses, __trap) as an
 * error message naming the kernel, the block and the thread.
 *
 * Thread safety: every function may be called from any thread. Launches are serialized by one
 * process-wide mutex (shared memory is static storage), so concurrent launches wait for each
 * other. */
#ifndef BNB_EMU_RUNTIME_H
#define BNB_EMU_RUNTIME_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Memory a launch may touch, besides each thread's own stack and static storage (shared
 * memory). Ranges may overlap; a zero-byte range allows nothing. */
typedef struct BnbEmuRange {
  const void* start; /* first byte */
  size_t bytes;      /* length in bytes */
  const char* name;  /* used in error messages (NULL: "range <index>"); must stay valid during
                        the launch */
} BnbEmuRange;

/* One kernel. Static data owned by the library: valid for the life of the process. */
typedef struct BnbEmuKernel {
  const char* name;                 /* the kernel's name, e.g. "bnb_quantize_blockwise_f32" */
  void (*call)(void* const* args);  /* calls the kernel with *args[i] as argument i (internal:
                                       use bnb_emu_launch, which runs it on fibers) */
  size_t n_args;                    /* number of parameters */
  const size_t* arg_sizes;          /* sizeof of each parameter (n_args entries) */
} BnbEmuKernel;

/* The kernel of that name, or NULL. */
const BnbEmuKernel* bnb_emu_find_kernel(const char* name);

/* The i-th kernel of all units in name order (byte-wise strcmp), or NULL when i is at least
 * the number of kernels. */
const BnbEmuKernel* bnb_emu_kernel_at(size_t i);

/* Runs kernel k over gridDim (grid, 1, 1) and blockDim (block, 1, 1) to completion on the
 * calling thread. args[i] points to the i-th argument value (as cuLaunchKernel's
 * kernelParams); arg_sizes[i] is its size in bytes, checked against the kernel's signature
 * (count and sizes) before anything runs. ranges[0..n_ranges) is the memory the kernel may
 * touch (every buffer it reaches, also those reached through pointers stored in device tables).
 * block must be 1..=1024, grid >= 1. Blocks run one after another, in descending block index.
 * Returns 0 on success. Otherwise writes a NUL-terminated message (at most message_len bytes
 * including the NUL, truncated if longer; nothing when message is NULL or message_len is 0)
 * into message and returns 1 for an invalid launch (nothing ran) or 2 for a fault detected
 * while the kernel ran (the first one; memory the kernel wrote before it stays written). */
int bnb_emu_launch(const BnbEmuKernel* k, unsigned grid, unsigned block, void* const* args,
                   const size_t* arg_sizes, size_t n_args, const BnbEmuRange* ranges,
                   size_t n_ranges, char* message, size_t message_len);

/* Totals since the process started. */
typedef struct BnbEmuStats {
  unsigned long long launches; /* bnb_emu_launch calls that ran (valid launches) */
  unsigned long long blocks;   /* CUDA blocks run (also those a fault cut short) */
  unsigned long long threads;  /* CUDA threads started */
  unsigned long long switches; /* fiber context switches (into a fiber and back count 2) */
} BnbEmuStats;

/* Fills *out with the totals since the process started (never reset). */
void bnb_emu_stats(BnbEmuStats* out);

#ifdef __cplusplus
} /* extern "C" */

/* For the kernel units (unit.cpp): the trampoline that calls a kernel `void f(A...)` from an
 * array of pointers to its arguments, and the sizes of its parameters. */
#include <cstddef>
#include <type_traits>
#include <utility>

namespace bnb_emu {

template <class F>
struct Signature;

template <class... A>
struct Signature<void (*)(A...)> {
  static_assert((!std::is_reference<A>::value && ...), "kernel parameters are values");
  static constexpr size_t arity = sizeof...(A);
  // sizeof of each parameter (one spare entry so that a kernel without parameters has an array).
  static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};

  template <void (*F)(A...), size_t... I>
  static void call(void* const* args, std::index_sequence<I...>) {
    (void)args;
    F(*static_cast<A*>(args[I])...);
  }
};

template <class... A>
struct Signature<void (*)(A...) noexcept> : Signature<void (*)(A...)> {};

// `call<&kernel>` has the type of BnbEmuKernel::call.
template <auto F>
void call(void* const* args) {
  using S = Signature<decltype(F)>;
  S::template call<F>(args, std::make_index_sequence<S::arity>{});
}

}  // namespace bnb_emu

#endif /* __cplusplus */

#endif /* BNB_EMU_RUNTIME_H */
