// Test kernels for the CUDA emulator (built only into emulator builds, never into PTX): each
// `bnb_emu_test_<fault>` commits one fault the emulator must report, each `bnb_emu_test_ok_*` is
// a correct kernel that must run cleanly. Written in the style of kernels/ (extern "C"
// __global__, 64-bit sizes) so they compile unchanged by nvcc as well.
//
// Kernels, arguments, launch shape and what the emulator reports (messages start with
// "kernel <name>, block <b>, thread <t>: "):
//
//  Correct twins
//   bnb_emu_test_ok_reduce(const float* x, u64 n, float* out)
//       block: a multiple of 32 up to 1024; any grid. out[b] = sum of x[b * blockDim.x + t] over
//       the block's threads t with index < n (a warp butterfly, a barrier, then warp 0). Use
//       small integers in x so the sum is exact whatever the order.
//   bnb_emu_test_ok_shuffles(int* out, double* wide)
//       block 64, grid 1. Lane l of warp w (t = 32 w + l) writes, with r = 32 w:
//         out[0 * 64 + t] = __shfl_sync(full, 100 t, 37)          (= 100 (r + 5))
//         out[1 * 64 + t] = __shfl_up_sync(full, t, 2, 8)          (segments of 8)
//         out[2 * 64 + t] = __shfl_down_sync(full, t, 3, 16)       (segments of 16)
//         out[3 * 64 + t] = __shfl_xor_sync(full, t, 5)            (= t ^ 5)
//         out[4 * 64 + t] = __shfl_xor_sync(full, t, 16, 8)        (earlier segment only)
//         out[5 * 64 + t] = __ballot_sync(full, l % 3 == 0)        (= 0x49249249)
//         out[6 * 64 + t] = __any_sync(full, t == 40)              (warp 1 only)
//         out[7 * 64 + t] = __all_sync(full, t < 40)               (warp 0 only)
//         out[8 * 64 + t] = half-warp __shfl_sync: lanes < 16 with mask 0x0000ffff and source
//                           lane 3, lanes >= 16 with mask 0xffff0000 and source lane 19, at the
//                           same call site (legal: two disjoint groups) -> 1000 (r + 3) or
//                           1000 (r + 19)
//         wide[t] = __shfl_sync(full, t + 0.25 + 2^40, 31 - l)     (64-bit operand)
//   bnb_emu_test_ok_shared(unsigned* out)
//       any block, any grid. Counts the block's threads with atomicAdd on a shared counter,
//       out[b] = blockDim.x; then every thread checks a value in its own stack.
//
//  Faults
//   bnb_emu_test_divergent_barrier(int* out)
//       block 64, grid 1. Threads < 32 wait at one __syncthreads(), the others at another:
//       "thread 0: __syncthreads() at faults.cu:<a> while thread 32 waits at __syncthreads() at
//       faults.cu:<b>"
//   bnb_emu_test_exit_before_barrier(int* out)
//       block 64, grid 1. Thread 5 returns, the others wait at __syncthreads():
//       "thread 5: exited while thread 0 waits at __syncthreads() at faults.cu:<a>"
//   bnb_emu_test_shuffle_mask(float* out)
//       block 32, grid 1. All 32 lanes shuffle with mask 0x0000ffff:
//       "thread 0: __shfl_xor_sync at faults.cu:<a> with mask 0x0000ffff leaves out lane 16,
//       which takes part in the same shuffle"
//   bnb_emu_test_shuffle_divergent(float* out)
//       block 32, grid 1. Lanes < 16 shuffle at one site, lanes >= 16 at another, full mask:
//       "thread 0: __shfl_xor_sync at faults.cu:<a> with mask 0xffffffff: lane 16, in the mask,
//       is at __shfl_xor_sync at faults.cu:<b> instead"
//   bnb_emu_test_shuffle_exited(float* out)
//       block 32, grid 1. Lane 3 returns, the others shuffle with the full mask:
//       "thread 0: __shfl_xor_sync at faults.cu:<a> with mask 0xffffffff: lane 3, in the mask,
//       has exited"
//   bnb_emu_test_shuffle_at_barrier(float* out)
//       block 32, grid 1. Lanes < 16 shuffle with the full mask, the others wait at
//       __syncthreads(): "... lane 16, in the mask, waits at __syncthreads() at faults.cu:<b>
//       instead"
//   bnb_emu_test_shuffle_not_in_mask(float* out)
//       block 32, grid 1. All lanes shuffle with mask 0xfffffffe: "thread 0: __shfl_xor_sync at
//       faults.cu:<a> with mask 0xfffffffe does not contain the calling lane 0"
//   bnb_emu_test_shuffle_source(float* out)
//       block 32, grid 1. Lanes < 16 read lane 20 with mask 0x0000ffff (lanes >= 16 do nothing):
//       "thread 0: __shfl_sync at faults.cu:<a> with mask 0x0000ffff reads lane 20, which is not
//       in the mask"
//   bnb_emu_test_out_of_bounds_load(const float* x, u64 n, float* out)
//       block 32, grid 1. Thread 7 reads x[n]: "thread 7: out-of-bounds load of 4 bytes at 0x..:
//       4 bytes past the end of <x's range name> (0x.., <4 n> bytes)..."
//   bnb_emu_test_out_of_bounds_store(float* x, u64 n)
//       block 32, grid 1. Thread 9 writes x[n]: "thread 9: out-of-bounds store of 4 bytes ..."
//   bnb_emu_test_foreign_stack(int* out)
//       block 32, grid 1. Thread 0 publishes the address of one of its locals through shared
//       memory, thread 1 reads it after a barrier (local memory is private on a GPU):
//       "thread 1: out-of-bounds load of 4 bytes at 0x..: in the stack (local memory) of
//       thread 0..."
//   bnb_emu_test_misaligned_vector(const unsigned char* bytes, uint4* out)
//       block 1, grid 1. A 16-byte __ldcs at bytes + 4 (bytes 16-byte aligned, 32 bytes long):
//       "thread 0: misaligned __ldcs of 16 bytes at 0x..: needs 16-byte alignment"
//   bnb_emu_test_trap(int* out)
//       block 32, grid 2. Thread 7 of every block traps (block 1 runs first):
//       "kernel bnb_emu_test_trap, block 1, thread 7: __trap() at faults.cu:<a>"

namespace bnb_emu_test {

constexpr unsigned kFull = 0xffffffffu;

// The sum of v over the block (valid in thread 0); blockDim.x a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int offset = 16; offset >= 1; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x / 32) ? partial[lane] : 0.0f;
    for (int offset = 16; offset >= 1; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
  }
  __syncthreads();  // partial is written again by the next call
  return v;
}

}  // namespace bnb_emu_test

extern "C" __global__ void bnb_emu_test_ok_reduce(const float* x, unsigned long long n,
                                                  float* out) {
  const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  const float s = bnb_emu_test::block_sum(i < n ? x[i] : 0.0f);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

extern "C" __global__ void bnb_emu_test_ok_shuffles(int* out, double* wide) {
  const unsigned full = bnb_emu_test::kFull;
  const int t = threadIdx.x, l = t % 32;
  out[0 * 64 + t] = __shfl_sync(full, 100 * t, 37);
  out[1 * 64 + t] = __shfl_up_sync(full, t, 2, 8);
  out[2 * 64 + t] = __shfl_down_sync(full, t, 3, 16);
  out[3 * 64 + t] = __shfl_xor_sync(full, t, 5);
  out[4 * 64 + t] = __shfl_xor_sync(full, t, 16, 8);
  out[5 * 64 + t] = (int)__ballot_sync(full, l % 3 == 0);
  out[6 * 64 + t] = __any_sync(full, t == 40);
  out[7 * 64 + t] = __all_sync(full, t < 40);
  const unsigned half = l < 16 ? 0x0000ffffu : 0xffff0000u;
  out[8 * 64 + t] = __shfl_sync(half, 1000 * t, l < 16 ? 3 : 19);
  wide[t] = __shfl_sync(full, t + 0.25 + 1099511627776.0, 31 - l);
}

extern "C" __global__ void bnb_emu_test_ok_shared(unsigned* out) {
  __shared__ unsigned count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1u);
  __syncthreads();
  volatile int mine = (int)threadIdx.x;  // a local in this thread's own stack
  if (mine != (int)threadIdx.x) __trap();
  if (threadIdx.x == 0) out[blockIdx.x] = count;
}

extern "C" __global__ void bnb_emu_test_divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

extern "C" __global__ void bnb_emu_test_exit_before_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

extern "C" __global__ void bnb_emu_test_shuffle_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f * threadIdx.x, 1);
}

extern "C" __global__ void bnb_emu_test_shuffle_divergent(float* out) {
  float v = 1.0f * threadIdx.x;
  if (threadIdx.x < 16)
    v = __shfl_xor_sync(bnb_emu_test::kFull, v, 1);
  else
    v = __shfl_xor_sync(bnb_emu_test::kFull, v, 2);
  out[threadIdx.x] = v;
}

extern "C" __global__ void bnb_emu_test_shuffle_exited(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(bnb_emu_test::kFull, 1.0f * threadIdx.x, 1);
}

extern "C" __global__ void bnb_emu_test_shuffle_at_barrier(float* out) {
  if (threadIdx.x < 16)
    out[threadIdx.x] = __shfl_xor_sync(bnb_emu_test::kFull, 1.0f * threadIdx.x, 1);
  else
    __syncthreads();
}

extern "C" __global__ void bnb_emu_test_shuffle_not_in_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xfffffffeu, 1.0f * threadIdx.x, 1);
}

extern "C" __global__ void bnb_emu_test_shuffle_source(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f * threadIdx.x, 20);
}

extern "C" __global__ void bnb_emu_test_out_of_bounds_load(const float* x, unsigned long long n,
                                                           float* out) {
  const unsigned long long i = threadIdx.x == 7 ? n : threadIdx.x;
  out[threadIdx.x] = x[i];
}

extern "C" __global__ void bnb_emu_test_out_of_bounds_store(float* x, unsigned long long n) {
  const unsigned long long i = threadIdx.x == 9 ? n : threadIdx.x;
  x[i] = 1.0f;
}

extern "C" __global__ void bnb_emu_test_foreign_stack(int* out) {
  __shared__ volatile int* published;
  volatile int local = 42;
  if (threadIdx.x == 0) published = &local;
  __syncthreads();
  if (threadIdx.x == 1) out[0] = *published;
  __syncthreads();  // thread 0's local lives until here
}

extern "C" __global__ void bnb_emu_test_misaligned_vector(const unsigned char* bytes, uint4* out) {
  out[0] = __ldcs(reinterpret_cast<const uint4*>(bytes + 4));
}

extern "C" __global__ void bnb_emu_test_trap(int* out) {
  if (threadIdx.x == 7) __trap();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}
