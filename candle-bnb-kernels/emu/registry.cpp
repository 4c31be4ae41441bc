// bnb_emu_find_kernel and bnb_emu_kernel_at over every emulator unit. Compiled without
// instrumentation. Includes the generated file units.inc: one line `BNB_EMU_UNIT(<name>)` per
// unit (unit.cpp compiled with BNB_EMU_UNIT <name>).
#include <algorithm>
#include <cstring>
#include <vector>

#include "runtime.h"

#define BNB_EMU_UNIT(name) extern "C" const BnbEmuKernel* bnb_emu_unit_##name(size_t* count);
#include "units.inc"
#undef BNB_EMU_UNIT

namespace {

using Entry = const BnbEmuKernel*;

bool name_less(Entry a, Entry b) { return std::strcmp(a->name, b->name) < 0; }

// Every kernel of every unit, sorted by name; built once (thread-safe static initialization) and
// never freed (no static destructor: another thread may still look up a kernel during exit).
const std::vector<Entry>& kernel_index() {
  static const std::vector<Entry>* index = [] {
    auto* all_ptr = new std::vector<Entry>;
    std::vector<Entry>& all = *all_ptr;
    size_t count = 0;
    const BnbEmuKernel* table = nullptr;
#define BNB_EMU_UNIT(name)                                         \
  count = 0;                                                       \
  table = bnb_emu_unit_##name(&count);                             \
  for (size_t i = 0; i < count; ++i) all.push_back(table + i);
#include "units.inc"
#undef BNB_EMU_UNIT
    (void)table;
    std::sort(all.begin(), all.end(), name_less);
    return all_ptr;
  }();
  return *index;
}

}  // namespace

extern "C" const BnbEmuKernel* bnb_emu_find_kernel(const char* name) {
  if (name == nullptr) return nullptr;
  const std::vector<Entry>& index = kernel_index();
  BnbEmuKernel key{name, nullptr, 0, nullptr};
  auto it = std::lower_bound(index.begin(), index.end(), &key, name_less);
  if (it == index.end() || std::strcmp((*it)->name, name) != 0) return nullptr;
  return *it;
}

extern "C" const BnbEmuKernel* bnb_emu_kernel_at(size_t i) {
  const std::vector<Entry>& index = kernel_index();
  return i < index.size() ? index[i] : nullptr;
}
