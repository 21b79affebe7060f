// Output allocation for the CPU kernels. Large outputs are fresh pages, and first-touch
// page faults can cost more than the kernel itself (512 MB: ~130 ms of 4 KB faults vs
// ~35 ms to write it). Asking for transparent huge pages (Linux, THP in "madvise" mode)
// cuts that several-fold; elsewhere, or if the kernel refuses, nothing changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastloss::cpu {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
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
