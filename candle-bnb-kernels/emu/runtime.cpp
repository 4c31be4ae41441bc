// The emulator's runtime: fibers, the per-block scheduler, barriers, warp shuffles and votes, the
// bounds checker behind the instrumented kernel code, error messages and statistics. Compiled
// WITHOUT instrumentation (see README.md for the flags). The C API is runtime.h.
//
// Execution model. One process-wide mutex serializes launches (shared memory is static storage).
// A launch runs its blocks one after another on the calling OS thread, in descending block index
// (a GPU may run them in any order, so a kernel must not depend on it). Every thread of a block
// is a fiber with its own stack (64 KiB, a PROT_NONE guard page below; stacks are pooled and
// reused) that starts with the default MXCSR and x87 control word (round to nearest, no
// flush-to-zero: the GPU's -ftz=false arithmetic) whatever the caller's. Between two barriers
// the warps run one after another, each as far as it can (see run_block): its runnable threads
// in index order until each blocks (barrier or warp operation), exits or fails, then its warp
// operations are resolved, and again; when every warp is done the barrier is released. Both
// steps check what a GPU would punish. The first error ends the launch: the block's fibers are
// abandoned (kernels hold no resources) and no further block runs.
//
// Bounds. Instrumented code calls __asan_{load,store}{1,2,4,8,16,N}_noabort(addr[, size]) before
// every access. An access is allowed when it lies wholly inside the running thread's own stack,
// inside static storage (see StaticSeg), or inside one range passed to the launch. The running
// fiber is a thread-local pointer (initial-exec TLS), null whenever no fiber runs on this OS
// thread, so instrumented code run outside a launch (or by another thread) is never checked.
#define BNB_EMU_RUNTIME 1
#include "include/bnb_emu.h"  // relative: builds without -I emu/include
#include "runtime.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__x86_64__) && !defined(BNB_EMU_USE_UCONTEXT)
#define BNB_EMU_ASM_SWITCH 1
#else
#define BNB_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace {

constexpr size_t kStackBytes = 64 * 1024;  // usable stack per fiber
constexpr unsigned kMaxBlock = 1024;       // threads per block
constexpr size_t kArgBytes = 8192;         // all arguments of a launch, each 16-byte aligned
constexpr size_t kMaxArgs = 256;
constexpr size_t kTextBytes = 768;         // a scheduler error's text

enum class State : unsigned char {
  kRunnable,  // may run
  kBarrier,   // waits at __syncthreads()
  kWarp,      // waits at a shuffle, vote or __syncwarp
  kExited,    // returned from the kernel
  kFailed,    // trapped or faulted (the launch ends)
};

struct Fiber {
  // Read by every bounds check.
  uintptr_t stack_lo;    // first usable byte of the stack
  uintptr_t stack_span;  // usable bytes
#if BNB_EMU_ASM_SWITCH
  void* sp;  // saved stack pointer while not running
#else
  ucontext_t uc;
#endif
  unsigned tid;  // threadIdx.x
  State state;
  // Where it waits (barrier or warp operation) and the warp operation's operands.
  int kind;
  const char* file;
  int line;
  unsigned mask;
  int arg;
  int width;
  unsigned long long value;
  unsigned long long result;
};

struct Stack {
  void* map;         // the mapping, guard page included
  size_t map_bytes;  // its length
  uintptr_t lo, hi;  // usable bytes
};

// Static storage: the loadable segments of the module holding this runtime (and the kernel
// units linked with it), found through the program headers (dl_iterate_phdr). Writable ones
// (.data, .bss: shared memory is zero-initialized statics) allow loads and stores; read-only
// ones (.rodata; .data.rel.ro and .got once relocated; code, which older linkers put in one
// segment with .rodata) allow loads. Fallback when the program headers say nothing: the linker
// symbols __data_start.._end (.data and .bss of the executable).
struct StaticSeg {
  uintptr_t lo, span;
  bool writable;
};

// Launch ranges merged where they overlap, sorted by address (the checker's view).
struct Interval {
  uintptr_t lo, span;
};

enum class Fault { kNone, kLoad, kStore, kTrap, kMisaligned, kText };

struct Error {
  Fault kind;
  unsigned tid;
  uintptr_t addr;     // kLoad, kStore, kMisaligned
  size_t bytes;       // kLoad, kStore, kMisaligned
  size_t align;       // kMisaligned
  const void* pc;     // kLoad, kStore: return address into the instrumented code
  const char* file;   // kTrap
  int line;           // kTrap
  const char* what;   // kMisaligned: the intrinsic
  char text[kTextBytes];  // kText: the scheduler's message
};

// The launch in progress (guarded by g_mutex).
struct Launch {
  // Bounds (hot first).
  uintptr_t static_lo, static_span;  // the writable static segment holding this runtime
  uintptr_t hit_lo, hit_span;  // the launch range interval that allowed the last slow check
  const Interval* merged;
  size_t n_merged;
  // Kernel and geometry.
  const BnbEmuKernel* kernel;
  unsigned grid, block, block_index;
  // Scheduler.
  unsigned n_barrier, n_warp, n_exited;
  unsigned long long switches;
#if BNB_EMU_ASM_SWITCH
  void* sched_sp;
#else
  ucontext_t sched_uc;
#endif
  bool failed;
  Error err;
  const BnbEmuRange* ranges;
  size_t n_ranges;
};

Launch g;
std::mutex g_mutex;
size_t g_page;

// What persists between launches, allocated on the first launch and never freed (no static
// destructors: a launch may still run on another thread while the process exits).
struct Pools {
  std::vector<StaticSeg> statics;
  std::vector<Interval> merged;
  std::vector<Fiber> fibers;  // kMaxBlock entries
  std::vector<Stack> stacks;
};
Pools* g_pools;

// The launch's arguments: copied here (static storage, so the instrumented trampoline may read
// them) and handed to the kernel's `call`.
alignas(16) unsigned char g_arg_buf[kArgBytes];
void* g_arg_ptrs[kMaxArgs];

std::atomic<unsigned long long> g_launches{0}, g_blocks{0}, g_threads{0}, g_switches{0};

__thread Fiber* t_fiber __attribute__((tls_model("initial-exec")));

}  // namespace

// ---------------------------------------------------------------------------------------------
// Context switch.
// ---------------------------------------------------------------------------------------------

extern "C" [[noreturn]] __attribute__((visibility("hidden"), used)) void bnb_emu_fiber_main(
    Fiber* f);

#if BNB_EMU_ASM_SWITCH
// bnb_emu_switch(save, next): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save, and resumes the context whose stack
// pointer is `next` (saved by an earlier switch, or prepared by fiber_init).
// bnb_emu_fiber_start: a new fiber's first return address; the Fiber* is in r12, the stack
// pointer 16-byte aligned as before a call.
extern "C" void bnb_emu_switch(void** save, void* next) __attribute__((visibility("hidden")));
extern "C" void bnb_emu_fiber_start() __attribute__((visibility("hidden")));
asm(R"(
  .text
  .p2align 4
  .globl bnb_emu_switch
  .hidden bnb_emu_switch
  .type bnb_emu_switch, @function
bnb_emu_switch:
  .byte 0xf3, 0x0f, 0x1e, 0xfa
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bnb_emu_switch, .-bnb_emu_switch

  .p2align 4
  .globl bnb_emu_fiber_start
  .hidden bnb_emu_fiber_start
  .type bnb_emu_fiber_start, @function
bnb_emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  call bnb_emu_fiber_main
  ud2
  .cfi_endproc
  .size bnb_emu_fiber_start, .-bnb_emu_fiber_start
)");

namespace {

void fiber_init(Fiber* f, const Stack& s) {
  f->stack_lo = s.lo;
  f->stack_span = s.hi - s.lo;
  uint64_t* sp = reinterpret_cast<uint64_t*>(s.hi & ~uintptr_t{15});
  *--sp = reinterpret_cast<uintptr_t>(&bnb_emu_fiber_start);  // return address
  *--sp = 0;                                                   // rbp
  *--sp = 0;                                                   // rbx
  *--sp = reinterpret_cast<uintptr_t>(f);                      // r12
  *--sp = 0;                                                   // r13
  *--sp = 0;                                                   // r14
  *--sp = 0;                                                   // r15
  // Default MXCSR (round to nearest, no flush-to-zero, exceptions masked) and x87 control word,
  // whatever the caller's environment: the GPU's -ftz=false arithmetic.
  *--sp = 0x1f80ull | (0x037full << 32);
  f->sp = sp;
}

// Scheduler -> fiber f, until f switches back.
inline void resume(Fiber* f) {
  t_fiber = f;
  bnb_emu_switch(&g.sched_sp, f->sp);
  t_fiber = nullptr;
  g.switches += 2;
}

// Fiber f -> scheduler (f is resumed, if ever, by resume()).
inline void leave(Fiber* f) { bnb_emu_switch(&f->sp, g.sched_sp); }

}  // namespace

#else  // ucontext fallback

namespace {

void fiber_entry_uc() { bnb_emu_fiber_main(t_fiber); }

void fiber_init(Fiber* f, const Stack& s) {
  f->stack_lo = s.lo;
  f->stack_span = s.hi - s.lo;
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = reinterpret_cast<void*>(s.lo);
  f->uc.uc_stack.ss_size = s.hi - s.lo;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_entry_uc, 0);
}

inline void resume(Fiber* f) {
  t_fiber = f;
  swapcontext(&g.sched_uc, &f->uc);
  t_fiber = nullptr;
  g.switches += 2;
}

inline void leave(Fiber* f) { swapcontext(&f->uc, &g.sched_uc); }

}  // namespace

#endif

// ---------------------------------------------------------------------------------------------
// Fiber side: entry, exit, faults, barriers and warp operations.
// ---------------------------------------------------------------------------------------------

namespace {

// Ends the launch with g.err (already filled in) as its error; f is never resumed.
[[noreturn]] void fail(Fiber* f) {
  t_fiber = nullptr;
  f->state = State::kFailed;
  g.failed = true;
  leave(f);
  __builtin_trap();  // the scheduler never resumes a failed fiber
}

Fiber* current(const char* what) {
  Fiber* f = t_fiber;
  if (f == nullptr) {
    std::fprintf(stderr, "bnb_emu: %s called outside a kernel launch\n", what);
    std::abort();
  }
  return f;
}

}  // namespace

extern "C" void bnb_emu_fiber_main(Fiber* f) {
  g.kernel->call(g_arg_ptrs);
  t_fiber = nullptr;
  f->state = State::kExited;
  ++g.n_exited;
  leave(f);
  __builtin_trap();  // an exited fiber is never resumed
}

extern "C" uint3 bnb_emu_thread_idx(void) {
  const Fiber* f = t_fiber;
  return uint3{f ? f->tid : 0u, 0u, 0u};
}
extern "C" uint3 bnb_emu_block_idx(void) {
  return uint3{t_fiber ? g.block_index : 0u, 0u, 0u};
}
extern "C" uint3 bnb_emu_block_dim(void) {
  return t_fiber ? uint3{g.block, 1u, 1u} : uint3{0u, 0u, 0u};
}
extern "C" uint3 bnb_emu_grid_dim(void) {
  return t_fiber ? uint3{g.grid, 1u, 1u} : uint3{0u, 0u, 0u};
}

extern "C" void bnb_emu_syncthreads(const char* file, int line) {
  Fiber* f = current("__syncthreads()");
  t_fiber = nullptr;
  f->state = State::kBarrier;
  f->file = file;
  f->line = line;
  ++g.n_barrier;
  leave(f);
}

extern "C" unsigned long long bnb_emu_warp_op(int kind, const char* file, int line,
                                              unsigned mask, unsigned long long value, int arg,
                                              int width) {
  Fiber* f = current("a warp shuffle or vote");
  t_fiber = nullptr;
  f->state = State::kWarp;
  f->kind = kind;
  f->file = file;
  f->line = line;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  ++g.n_warp;
  leave(f);
  return f->result;
}

extern "C" void bnb_emu_trap(const char* file, int line) {
  Fiber* f = current("__trap()");
  g.err.kind = Fault::kTrap;
  g.err.tid = f->tid;
  g.err.file = file;
  g.err.line = line;
  fail(f);
}

extern "C" void bnb_emu_misaligned(const void* p, size_t bytes, size_t align, int store,
                                   const char* what) {
  Fiber* f = t_fiber;
  if (f == nullptr) {
    std::fprintf(stderr, "bnb_emu: misaligned %s of %zu bytes at %p outside a launch\n", what,
                 bytes, p);
    std::abort();
  }
  g.err.kind = Fault::kMisaligned;
  g.err.tid = f->tid;
  g.err.addr = reinterpret_cast<uintptr_t>(p);
  g.err.bytes = bytes;
  g.err.align = align;
  g.err.what = what;
  (void)store;
  fail(f);
}

// ---------------------------------------------------------------------------------------------
// Bounds checker.
// ---------------------------------------------------------------------------------------------

namespace {

// [a, a + n) inside [lo, lo + span).
inline bool inside(uintptr_t a, size_t n, uintptr_t lo, uintptr_t span) {
  return n <= span && a - lo <= span - n;
}

[[noreturn]] __attribute__((noinline, cold)) void fault_access(Fiber* f, uintptr_t a, size_t n,
                                                                 bool store, const void* pc) {
  g.err.kind = store ? Fault::kStore : Fault::kLoad;
  g.err.tid = f->tid;
  g.err.addr = a;
  g.err.bytes = n;
  g.err.pc = pc;
  fail(f);
}

__attribute__((noinline)) void check_slow(Fiber* f, uintptr_t a, size_t n, bool store,
                                          const void* pc) {
  if (n == 0) return;
  if (inside(a, n, f->stack_lo, f->stack_span)) return;
  if (inside(a, n, g.static_lo, g.static_span)) return;
  if (inside(a, n, g.hit_lo, g.hit_span)) return;
  const Interval* v = g.merged;
  size_t lo = 0, hi = g.n_merged;  // the first interval starting after a
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (v[mid].lo <= a)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo > 0 && inside(a, n, v[lo - 1].lo, v[lo - 1].span)) {
    g.hit_lo = v[lo - 1].lo;
    g.hit_span = v[lo - 1].span;
    return;
  }
  for (const StaticSeg& s : g_pools->statics)
    if ((s.writable || !store) && inside(a, n, s.lo, s.span)) return;
  fault_access(f, a, n, store, pc);
}

// The fast path: the running fiber's stack, the writable static segment, the range interval of
// the last slow check; else the slow path.
__attribute__((always_inline)) inline void check(uintptr_t a, size_t n, bool store,
                                                 const void* pc) {
  Fiber* f = t_fiber;
  if (__builtin_expect(f == nullptr, 0)) return;
  if (a - f->stack_lo <= f->stack_span - n) return;  // n <= 16 < stack_span
  if (inside(a, n, g.static_lo, g.static_span)) return;
  if (inside(a, n, g.hit_lo, g.hit_span)) return;
  check_slow(f, a, n, store, pc);
}

}  // namespace

#define BNB_EMU_CHECKS(N)                                                                     \
  extern "C" void __asan_load##N##_noabort(uintptr_t a) {                                   \
    check(a, N, false, __builtin_return_address(0));                                         \
  }                                                                                          \
  extern "C" void __asan_store##N##_noabort(uintptr_t a) {                                  \
    check(a, N, true, __builtin_return_address(0));                                          \
  }                                                                                          \
  extern "C" void __asan_load##N(uintptr_t a) { check(a, N, false, __builtin_return_address(0)); } \
  extern "C" void __asan_store##N(uintptr_t a) { check(a, N, true, __builtin_return_address(0)); }
BNB_EMU_CHECKS(1)
BNB_EMU_CHECKS(2)
BNB_EMU_CHECKS(4)
BNB_EMU_CHECKS(8)
BNB_EMU_CHECKS(16)
#undef BNB_EMU_CHECKS

extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) {
  if (t_fiber != nullptr) check_slow(t_fiber, a, n, false, __builtin_return_address(0));
}
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) {
  if (t_fiber != nullptr) check_slow(t_fiber, a, n, true, __builtin_return_address(0));
}
extern "C" void __asan_loadN(uintptr_t a, size_t n) {
  if (t_fiber != nullptr) check_slow(t_fiber, a, n, false, __builtin_return_address(0));
}
extern "C" void __asan_storeN(uintptr_t a, size_t n) {
  if (t_fiber != nullptr) check_slow(t_fiber, a, n, true, __builtin_return_address(0));
}
// Emitted before calls to noreturn functions (ASan unpoisons the stack there); nothing to do.
extern "C" void __asan_handle_no_return(void) {}

// ---------------------------------------------------------------------------------------------
// Static storage, stacks, ranges.
// ---------------------------------------------------------------------------------------------

extern "C" char __data_start[] __attribute__((weak));
extern "C" char _end[] __attribute__((weak));

namespace {

struct PhdrSearch {
  uintptr_t target;
  bool found;
};

void add_static(uintptr_t lo, uintptr_t hi, bool writable) {
  if (hi > lo) g_pools->statics.push_back(StaticSeg{lo, hi - lo, writable});
}

int phdr_callback(dl_phdr_info* info, size_t, void* data) {
  PhdrSearch* s = static_cast<PhdrSearch*>(data);
  bool mine = false;
  uintptr_t relro_lo = 0, relro_hi = 0;
  for (unsigned i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (ph.p_type == PT_LOAD && s->target >= lo && s->target < hi) mine = true;
    if (ph.p_type == PT_GNU_RELRO) {
      relro_lo = lo;
      relro_hi = hi;
    }
  }
  if (!mine) return 0;
  for (unsigned i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (!(ph.p_flags & PF_W)) {
      add_static(lo, hi, false);
    } else if (relro_hi > lo && relro_lo < hi) {  // read-only once relocated
      add_static(lo, std::max(lo, relro_lo), true);
      add_static(std::max(lo, relro_lo), std::min(hi, relro_hi), false);
      add_static(std::min(hi, relro_hi), hi, true);
    } else {
      add_static(lo, hi, true);
    }
  }
  s->found = true;
  return 1;
}

void init_once() {
  if (g_pools != nullptr) return;
  g_pools = new Pools;
  g_pools->fibers.resize(kMaxBlock);
  g_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  PhdrSearch s{reinterpret_cast<uintptr_t>(&g), false};
  dl_iterate_phdr(phdr_callback, &s);
  if (!s.found && __data_start != nullptr && _end != nullptr)
    add_static(reinterpret_cast<uintptr_t>(__data_start), reinterpret_cast<uintptr_t>(_end), true);
  for (const StaticSeg& seg : g_pools->statics)
    if (seg.writable && s.target - seg.lo < seg.span) {
      g.static_lo = seg.lo;
      g.static_span = seg.span;
    }
}

// At least n stacks in the pool; false when memory runs out.
bool ensure_stacks(size_t n) {
  while (g_pools->stacks.size() < n) {
    const size_t bytes = g_page + kStackBytes;
    void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (map == MAP_FAILED) return false;
    if (mprotect(map, g_page, PROT_NONE) != 0) {
      munmap(map, bytes);
      return false;
    }
    const uintptr_t base = reinterpret_cast<uintptr_t>(map);
    g_pools->stacks.push_back(Stack{map, bytes, base + g_page, base + bytes});
  }
  return true;
}

void prepare_ranges(const BnbEmuRange* ranges, size_t n) {
  std::vector<Interval>& merged = g_pools->merged;
  merged.clear();
  for (size_t i = 0; i < n; ++i)
    if (ranges[i].bytes != 0)
      merged.push_back(Interval{reinterpret_cast<uintptr_t>(ranges[i].start), ranges[i].bytes});
  std::sort(merged.begin(), merged.end(),
            [](const Interval& a, const Interval& b) { return a.lo < b.lo; });
  size_t out = 0;
  for (size_t i = 0; i < merged.size(); ++i) {
    const Interval& r = merged[i];
    if (out > 0) {
      Interval& prev = merged[out - 1];
      const uintptr_t prev_hi = prev.lo + prev.span;
      if (r.lo < prev_hi) {  // overlapping (adjacent ranges stay apart: a straddle is an error)
        const uintptr_t hi = std::max(prev_hi, r.lo + r.span);
        prev.span = hi - prev.lo;
        continue;
      }
    }
    merged[out++] = r;
  }
  merged.resize(out);
  g.merged = merged.data();
  g.n_merged = merged.size();
  g.hit_lo = 0;
  g.hit_span = 0;
}

// ---------------------------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------------------------

const char* base_name(const char* path) {
  if (path == nullptr) return "?";
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

const char* op_name(int kind) {
  switch (kind) {
    case BNB_EMU_SHFL_IDX: return "__shfl_sync";
    case BNB_EMU_SHFL_UP: return "__shfl_up_sync";
    case BNB_EMU_SHFL_DOWN: return "__shfl_down_sync";
    case BNB_EMU_SHFL_XOR: return "__shfl_xor_sync";
    case BNB_EMU_VOTE_ANY: return "__any_sync";
    case BNB_EMU_VOTE_ALL: return "__all_sync";
    case BNB_EMU_VOTE_BALLOT: return "__ballot_sync";
    case BNB_EMU_SYNCWARP: return "__syncwarp";
    default: return "warp operation";
  }
}

bool is_shuffle(int kind) { return kind >= BNB_EMU_SHFL_IDX && kind <= BNB_EMU_SHFL_XOR; }

const char* op_group(int kind) {
  if (is_shuffle(kind)) return "shuffle";
  if (kind == BNB_EMU_SYNCWARP) return "__syncwarp";
  return "vote";
}

bool same_line(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && std::strcmp(f1, f2) == 0));
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.kind == b.kind && same_line(a.file, a.line, b.file, b.line);
}

// A scheduler-detected error of thread tid (the first one wins).
__attribute__((format(printf, 2, 3))) void error_text(unsigned tid, const char* fmt, ...) {
  if (g.failed) return;
  g.failed = true;
  g.err.kind = Fault::kText;
  g.err.tid = tid;
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g.err.text, sizeof g.err.text, fmt, ap);
  va_end(ap);
}

struct Buf {
  char* p;
  size_t cap, len;
  __attribute__((format(printf, 2, 3))) void add(const char* fmt, ...) {
    if (len + 1 >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    const int w = std::vsnprintf(p + len, cap - len, fmt, ap);
    va_end(ap);
    if (w > 0) len = std::min(cap - 1, len + static_cast<size_t>(w));
  }
};

// Where an out-of-bounds access [a, a + n) lies: near null, another thread's stack, a guard page,
// read-only static storage, or the nearest launch range.
void describe_access(Buf& b, uintptr_t a, size_t n, bool store) {
  if (a < 4096) {
    b.add("a null pointer (plus %zu)", static_cast<size_t>(a));
    return;
  }
  for (unsigned t = 0; t < g.block && t < g_pools->stacks.size(); ++t) {
    const Stack& s = g_pools->stacks[t];
    const uintptr_t map = reinterpret_cast<uintptr_t>(s.map);
    if (a >= s.lo && a < s.hi) {
      b.add("in the stack (local memory) of thread %u", t);
      return;
    }
    if (a >= map && a < s.lo) {
      b.add("in the guard page below the stack of thread %u (stack overflow)", t);
      return;
    }
  }
  if (store)
    for (const StaticSeg& s : g_pools->statics)
      if (!s.writable && a - s.lo < s.span) {
        b.add("in read-only static storage");
        return;
      }
  const BnbEmuRange* best = nullptr;
  size_t best_index = 0;
  uintptr_t best_dist = UINTPTR_MAX;
  for (size_t i = 0; i < g.n_ranges; ++i) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g.ranges[i].start);
    const uintptr_t hi = lo + g.ranges[i].bytes;
    uintptr_t dist;
    if (a < lo)
      dist = a + n <= lo ? lo - (a + n) : 0;
    else
      dist = a >= hi ? a - hi : 0;
    if (dist < best_dist) {
      best_dist = dist;
      best = &g.ranges[i];
      best_index = i;
    }
  }
  if (best == nullptr) {
    b.add("outside the thread's stack and static storage, and the launch was given no memory "
          "ranges");
    return;
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(best->start), hi = lo + best->bytes;
  char fallback[32];
  const char* name = best->name;
  if (name == nullptr) {
    std::snprintf(fallback, sizeof fallback, "range %zu", best_index);
    name = fallback;
  }
  if (a < lo)
    b.add("%zu bytes before the start of %s (%#zx, %zu bytes)", static_cast<size_t>(lo - a), name,
          static_cast<size_t>(lo), best->bytes);
  else
    b.add("%zu bytes past the end of %s (%#zx, %zu bytes)", static_cast<size_t>(a + n - hi), name,
          static_cast<size_t>(lo), best->bytes);
}

void format_error(char* out, size_t cap) {
  Buf b{out, cap, 0};
  out[0] = '\0';
  b.add("kernel %s, block %u, thread %u: ", g.kernel->name, g.block_index, g.err.tid);
  switch (g.err.kind) {
    case Fault::kLoad:
    case Fault::kStore: {
      const bool store = g.err.kind == Fault::kStore;
      b.add("out-of-bounds %s of %zu bytes at %#zx: ", store ? "store" : "load", g.err.bytes,
            static_cast<size_t>(g.err.addr));
      describe_access(b, g.err.addr, g.err.bytes, store);
      Dl_info info;
      if (g.err.pc != nullptr && dladdr(g.err.pc, &info) != 0 && info.dli_fbase != nullptr) {
        const char* module = info.dli_fname && info.dli_fname[0] ? base_name(info.dli_fname)
                                                                   : "main program";
        b.add("; code at %s+%#zx", module,
              static_cast<size_t>(reinterpret_cast<uintptr_t>(g.err.pc) -
                                  reinterpret_cast<uintptr_t>(info.dli_fbase)));
        if (info.dli_sname != nullptr) b.add(" (in %s)", info.dli_sname);
      }
      break;
    }
    case Fault::kTrap:
      b.add("__trap() at %s:%d", base_name(g.err.file), g.err.line);
      break;
    case Fault::kMisaligned:
      b.add("misaligned %s of %zu bytes at %#zx: needs %zu-byte alignment", g.err.what,
            g.err.bytes, static_cast<size_t>(g.err.addr), g.err.align);
      break;
    case Fault::kText:
      b.add("%s", g.err.text);
      break;
    case Fault::kNone:
      b.add("unknown error");
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Scheduler.
// ---------------------------------------------------------------------------------------------

// Source lane of lane `lane` for a shuffle, as PTX shfl.sync defines it (CUDA passes
// c = ((32 - width) << 8) | 0x1f, and 0 instead of 0x1f for .up); only b's low 5 bits count. A
// source outside the lane's segment gives the lane its own value.
unsigned shuffle_source(int kind, unsigned lane, int arg, int width) {
  const unsigned b = static_cast<unsigned>(arg) & 31u;
  const unsigned segmask = static_cast<unsigned>(32 - width) & 31u;
  const unsigned cval = kind == BNB_EMU_SHFL_UP ? 0u : 31u;
  const int max_lane = static_cast<int>((lane & segmask) | (cval & ~segmask));
  const int min_lane = static_cast<int>(lane & segmask);
  int j;
  bool ok;
  switch (kind) {
    case BNB_EMU_SHFL_UP:
      j = static_cast<int>(lane) - static_cast<int>(b);
      ok = j >= max_lane;
      break;
    case BNB_EMU_SHFL_DOWN:
      j = static_cast<int>(lane + b);
      ok = j <= max_lane;
      break;
    case BNB_EMU_SHFL_XOR:
      j = static_cast<int>(lane ^ b);
      ok = j <= max_lane;
      break;
    default:  // idx
      j = min_lane | static_cast<int>(b & ~segmask);
      ok = j <= max_lane;
      break;
  }
  return ok ? static_cast<unsigned>(j) : lane;
}

bool valid_width(int w) { return w >= 1 && w <= 32 && (w & (w - 1)) == 0; }

// Resolves the warp operations of the warp whose lane 0 is thread `base`; false after an error.
// Called when none of its lanes is runnable, so each lane waits somewhere or has exited; at
// least one lane waits at a warp operation.
bool resolve_warp(unsigned base) {
  std::vector<Fiber>& F = g_pools->fibers;
  const unsigned lanes = std::min(32u, g.block - base);
  const unsigned present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  unsigned waiting = 0;
  for (unsigned l = 0; l < lanes; ++l)
    if (F[base + l].state == State::kWarp) waiting |= 1u << l;
  if (waiting == 0) {
    error_text(base, "internal error: no warp operation to resolve");
    return false;
  }
  while (waiting != 0) {
    const unsigned L = static_cast<unsigned>(__builtin_ctz(waiting));
    const Fiber& fl = F[base + L];
    const unsigned M = fl.mask;
    const char* op = op_name(fl.kind);
    const char* file = base_name(fl.file);
    if (!((M >> L) & 1u)) {
      error_text(base + L, "%s at %s:%d with mask 0x%08x does not contain the calling lane %u",
                 op, file, fl.line, M, L);
      return false;
    }
    const unsigned group = M & present;
    for (unsigned rest = group; rest != 0; rest &= rest - 1) {
      const unsigned x = static_cast<unsigned>(__builtin_ctz(rest));
      const Fiber& fx = F[base + x];
      switch (fx.state) {
        case State::kExited:
          error_text(base + L, "%s at %s:%d with mask 0x%08x: lane %u, in the mask, has exited",
                     op, file, fl.line, M, x);
          return false;
        case State::kBarrier:
          error_text(base + L,
                     "%s at %s:%d with mask 0x%08x: lane %u, in the mask, waits at "
                     "__syncthreads() at %s:%d instead",
                     op, file, fl.line, M, x, base_name(fx.file), fx.line);
          return false;
        case State::kWarp:
          if (!same_site(fx, fl)) {
            error_text(base + L,
                       "%s at %s:%d with mask 0x%08x: lane %u, in the mask, is at %s at %s:%d "
                       "instead",
                       op, file, fl.line, M, x, op_name(fx.kind), base_name(fx.file), fx.line);
            return false;
          }
          if (fx.mask != M) {
            error_text(base + L,
                       "%s at %s:%d with mask 0x%08x: lane %u, in the mask, calls it with mask "
                       "0x%08x",
                       op, file, fl.line, M, x, fx.mask);
            return false;
          }
          break;
        case State::kRunnable:
        case State::kFailed:
          error_text(base + L, "internal error: lane %u is neither waiting nor exited", x);
          return false;
      }
    }
    for (unsigned rest = waiting & ~M; rest != 0; rest &= rest - 1) {
      const unsigned x = static_cast<unsigned>(__builtin_ctz(rest));
      const Fiber& fx = F[base + x];
      if (same_site(fx, fl) && fx.mask == M) {
        error_text(base + L,
                   "%s at %s:%d with mask 0x%08x leaves out lane %u, which takes part in the "
                   "same %s",
                   op, file, fl.line, M, x, op_group(fl.kind));
        return false;
      }
    }
    if (is_shuffle(fl.kind)) {
      for (unsigned rest = group; rest != 0; rest &= rest - 1) {
        const unsigned x = static_cast<unsigned>(__builtin_ctz(rest));
        Fiber& fx = F[base + x];
        if (!valid_width(fx.width)) {
          error_text(base + x, "%s at %s:%d with width %d: not a power of two from 1 to 32", op,
                     file, fl.line, fx.width);
          return false;
        }
        const unsigned j = shuffle_source(fx.kind, x, fx.arg, fx.width);
        if (!((group >> j) & 1u)) {
          error_text(base + x, "%s at %s:%d with mask 0x%08x reads lane %u, which %s", op, file,
                     fl.line, M, j,
                     (present >> j) & 1u ? "is not in the mask" : "does not exist in the block");
          return false;
        }
        fx.result = F[base + j].value;
      }
    } else if (fl.kind != BNB_EMU_SYNCWARP) {
      unsigned ballot = 0;
      for (unsigned rest = group; rest != 0; rest &= rest - 1) {
        const unsigned x = static_cast<unsigned>(__builtin_ctz(rest));
        if (F[base + x].value != 0) ballot |= 1u << x;
      }
      const unsigned long long r = fl.kind == BNB_EMU_VOTE_BALLOT ? ballot
                                   : fl.kind == BNB_EMU_VOTE_ANY  ? (ballot != 0)
                                                                  : (ballot == group);
      for (unsigned rest = group; rest != 0; rest &= rest - 1)
        F[base + static_cast<unsigned>(__builtin_ctz(rest))].result = r;
    }
    for (unsigned rest = group; rest != 0; rest &= rest - 1) {
      F[base + static_cast<unsigned>(__builtin_ctz(rest))].state = State::kRunnable;
      --g.n_warp;
    }
    waiting &= ~group;
  }
  return true;
}

// Releases the barrier when every live thread waits at it, at one call site; false after an
// error. Called when no thread is runnable and none waits at a warp operation.
bool release_barrier() {
  std::vector<Fiber>& F = g_pools->fibers;
  const unsigned n = g.block;
  unsigned first = n, exited = n;
  for (unsigned t = 0; t < n; ++t) {
    if (F[t].state == State::kBarrier && first == n) first = t;
    if (F[t].state == State::kExited && exited == n) exited = t;
  }
  if (first == n || g.n_barrier != n - g.n_exited) {
    error_text(0, "internal error: deadlock (%u threads at a barrier, %u exited, of %u)",
               g.n_barrier, g.n_exited, n);
    return false;
  }
  const Fiber& ff = F[first];
  if (exited != n) {
    error_text(exited, "exited while thread %u waits at __syncthreads() at %s:%d", first,
               base_name(ff.file), ff.line);
    return false;
  }
  for (unsigned t = first + 1; t < n; ++t)
    if (!same_line(F[t].file, F[t].line, ff.file, ff.line)) {
      error_text(first,
                 "__syncthreads() at %s:%d while thread %u waits at __syncthreads() at %s:%d",
                 base_name(ff.file), ff.line, t, base_name(F[t].file), F[t].line);
      return false;
    }
  for (unsigned t = 0; t < n; ++t) F[t].state = State::kRunnable;
  g.n_barrier = 0;
  return true;
}

// Runs block b to completion; false after an error (in g.err).
//
// Between two barriers each warp in turn runs as far as it can: its runnable lanes in index
// order until each blocks, exits or fails, then its warp operations are resolved, again and
// again until every lane waits at the barrier or has exited; only then does the next warp start.
// Warps go in ascending order before even barriers and descending order before odd ones. Any
// interleaving of warps is legal on a GPU; this one keeps warps as far apart as possible, so a
// missing barrier between a phase that writes shared memory and one that reads it shows up as
// wrong results in either direction.
bool run_block(unsigned b) {
  g.block_index = b;
  const unsigned n = g.block;
  std::vector<Fiber>& F = g_pools->fibers;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = F[t];
    fiber_init(&f, g_pools->stacks[t]);
    f.tid = t;
    f.state = State::kRunnable;
  }
  g.n_barrier = g.n_warp = g.n_exited = 0;
  const unsigned warps = (n + 31) / 32;
  for (unsigned phase = 0;; ++phase) {
    for (unsigned i = 0; i < warps; ++i) {
      const unsigned base = 32 * (phase % 2 == 0 ? i : warps - 1 - i);
      const unsigned end = std::min(n, base + 32);
      for (;;) {
        bool at_warp_op = false;
        for (unsigned t = base; t < end; ++t) {
          if (F[t].state == State::kRunnable) {
            resume(&F[t]);
            if (g.failed) return false;
          }
          at_warp_op |= F[t].state == State::kWarp;
        }
        if (!at_warp_op) break;
        if (!resolve_warp(base)) return false;
      }
    }
    if (g.n_exited == n) return true;
    if (!release_barrier()) return false;
  }
}

void put_message(char* message, size_t len, const char* text) {
  if (message == nullptr || len == 0) return;
  const size_t n = std::min(len - 1, std::strlen(text));
  std::memcpy(message, text, n);
  message[n] = '\0';
}

__attribute__((format(printf, 3, 4))) int invalid(char* message, size_t len, const char* fmt,
                                                  ...) {
  char text[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  put_message(message, len, text);
  return 1;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C API.
// ---------------------------------------------------------------------------------------------

extern "C" int bnb_emu_launch(const BnbEmuKernel* k, unsigned grid, unsigned block,
                              void* const* args, const size_t* arg_sizes, size_t n_args,
                              const BnbEmuRange* ranges, size_t n_ranges, char* message,
                              size_t message_len) {
  if (k == nullptr || k->call == nullptr || k->name == nullptr)
    return invalid(message, message_len, "bnb_emu_launch: no kernel");
  if (block < 1 || block > kMaxBlock)
    return invalid(message, message_len, "kernel %s: block size %u is not in 1..=%u", k->name,
                   block, kMaxBlock);
  if (grid < 1) return invalid(message, message_len, "kernel %s: grid size 0", k->name);
  if (n_args != k->n_args)
    return invalid(message, message_len, "kernel %s: %zu arguments given, the kernel has %zu",
                   k->name, n_args, k->n_args);
  if (n_args > kMaxArgs)
    return invalid(message, message_len, "kernel %s: more than %zu arguments", k->name, kMaxArgs);
  if (n_args != 0 && (args == nullptr || arg_sizes == nullptr))
    return invalid(message, message_len, "kernel %s: args or arg_sizes is NULL", k->name);
  size_t total = 0;
  for (size_t i = 0; i < n_args; ++i) {
    if (arg_sizes[i] != k->arg_sizes[i])
      return invalid(message, message_len,
                     "kernel %s: argument %zu has %zu bytes, the kernel's parameter has %zu",
                     k->name, i, arg_sizes[i], k->arg_sizes[i]);
    if (args[i] == nullptr)
      return invalid(message, message_len, "kernel %s: argument %zu is NULL", k->name, i);
    total += (arg_sizes[i] + 15) & ~size_t{15};
  }
  if (total > kArgBytes)
    return invalid(message, message_len, "kernel %s: arguments take more than %zu bytes", k->name,
                   kArgBytes);
  if (n_ranges != 0 && ranges == nullptr)
    return invalid(message, message_len, "kernel %s: ranges is NULL", k->name);
  for (size_t i = 0; i < n_ranges; ++i)
    if (ranges[i].start == nullptr && ranges[i].bytes != 0)
      return invalid(message, message_len, "kernel %s: range %zu (%s) starts at NULL", k->name, i,
                     ranges[i].name ? ranges[i].name : "unnamed");

  std::lock_guard<std::mutex> lock(g_mutex);
  init_once();
  if (!ensure_stacks(block))
    return invalid(message, message_len, "kernel %s: cannot map %u fiber stacks", k->name, block);

  size_t offset = 0;
  for (size_t i = 0; i < n_args; ++i) {
    std::memcpy(g_arg_buf + offset, args[i], arg_sizes[i]);
    g_arg_ptrs[i] = g_arg_buf + offset;
    offset += (arg_sizes[i] + 15) & ~size_t{15};
  }
  prepare_ranges(ranges, n_ranges);
  g.ranges = ranges;
  g.n_ranges = n_ranges;
  g.kernel = k;
  g.grid = grid;
  g.block = block;
  g.failed = false;
  g.err.kind = Fault::kNone;
  g.switches = 0;
  g_launches.fetch_add(1, std::memory_order_relaxed);

  int rc = 0;
  unsigned long long blocks = 0;
  for (unsigned b = grid; b-- > 0;) {
    ++blocks;
    if (!run_block(b)) {
      char text[1024];
      format_error(text, sizeof text);
      put_message(message, message_len, text);
      rc = 2;
      break;
    }
  }
  g_blocks.fetch_add(blocks, std::memory_order_relaxed);
  g_threads.fetch_add(blocks * block, std::memory_order_relaxed);
  g_switches.fetch_add(g.switches, std::memory_order_relaxed);
  g.ranges = nullptr;
  g.n_ranges = 0;
  g.merged = nullptr;
  g.n_merged = 0;
  g.hit_lo = 0;
  g.hit_span = 0;
  g.kernel = nullptr;
  return rc;
}

extern "C" void bnb_emu_stats(BnbEmuStats* out) {
  if (out == nullptr) return;
  out->launches = g_launches.load(std::memory_order_relaxed);
  out->blocks = g_blocks.load(std::memory_order_relaxed);
  out->threads = g_threads.load(std::memory_order_relaxed);
  out->switches = g_switches.load(std::memory_order_relaxed);
}
