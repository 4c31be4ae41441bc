// One kernel source as an emulator unit. Compiled once per kernel file, instrumented (see
// README.md for the flags), through a generated wrapper:
//
//   #define BNB_EMU_SOURCE "quantize.cu"               // the kernel source (found via -I kernels)
//   #define BNB_EMU_KERNELS "quantize.kernels.inc"     // BNB_EMU_KERNEL(<name>) per line, one per
//                                                      // extern "C" __global__ function
//   #define BNB_EMU_UNIT quantize                      // the unit's name (an identifier)
//   #include "unit.cpp"
//
// Exports `extern "C" const BnbEmuKernel* bnb_emu_unit_<BNB_EMU_UNIT>(size_t* count)`: the unit's
// kernel table and its length, which registry.cpp collects.
#ifndef BNB_EMU_SOURCE
#error "define BNB_EMU_SOURCE, BNB_EMU_KERNELS and BNB_EMU_UNIT before including unit.cpp"
#endif

#include BNB_EMU_SOURCE

#include "runtime.h"

#define BNB_EMU_KERNEL(name)                                                        \
  {#name, &::bnb_emu::call<&name>, ::bnb_emu::Signature<decltype(&name)>::arity,    \
   ::bnb_emu::Signature<decltype(&name)>::sizes},

namespace {
// The unit's kernels, then a terminator (so that a unit without kernels still has an array).
const BnbEmuKernel bnb_emu_unit_table[] = {
#include BNB_EMU_KERNELS
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

#undef BNB_EMU_KERNEL

#define BNB_EMU_UNIT_CAT2(a, b) a##b
#define BNB_EMU_UNIT_CAT(a, b) BNB_EMU_UNIT_CAT2(a, b)

// Not instrumented: called by the registry outside any launch.
extern "C" __attribute__((no_sanitize_address)) const BnbEmuKernel* BNB_EMU_UNIT_CAT(
    bnb_emu_unit_, BNB_EMU_UNIT)(size_t* count) {
  *count = sizeof bnb_emu_unit_table / sizeof bnb_emu_unit_table[0] - 1;
  return bnb_emu_unit_table;
}
