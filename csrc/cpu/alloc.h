// Output allocation for the CPU kernels. Large outputs are fresh pages, and first-touch
// page faults can cost more than the kernel itself (512 MB: ~130 ms of 4 KB faults vs
// ~35 ms to write it). Asking for transparent huge pages (Linux, THP in "madvise" mode)
// cuts that several-fold on an unfragmented machine, but where the kernel compacts memory
// synchronously to find huge pages (THP defrag "madvise", a common default) a fragmented
// heap turns it into stalls of several times the kernel's run time. So it is opt-in:
// FASTLOSS_HUGE_PAGES=1.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastloss::cpu {

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTLOSS_HUGE_PAGES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_enabled()) return out;
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = end & ~(kHugePage - 1);
  if (aligned_end >= aligned_begin + 2 * kHugePage) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace fastloss::cpu
