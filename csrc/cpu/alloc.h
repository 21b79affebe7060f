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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
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

// A large output is fresh pages (allocations above glibc's 32 MiB mmap threshold always are),
// and each 4 KB page costs a fault on first touch. Faulting a chunk in with one
// madvise(MADV_POPULATE_WRITE) (Linux 5.14) just before writing it saves the per-fault entry
// and exit and leaves the zeroed lines in cache for the writes (2 threads, timed in turns:
// softmax 4096 x 32768 fp32 forward 0.94x the time, forward+backward 0.87x; stat_topk
// 4096 x 16384 0.89-0.95x). Off for an output whose last page is already resident
// (a reused heap block) and, after the first refusal, where the kernel lacks the advice.
class WritePrefault {
 public:
  // outputs: tensors written row by row, `rows` contiguous rows each (same row count).
  WritePrefault(std::initializer_list<at::Tensor> outputs, int64_t rows) {
#if defined(__linux__)
    if (rows <= 0 || !supported().load(std::memory_order_relaxed)) return;
    for (const at::Tensor& out : outputs) {
      if (count_ == kMaxOutputs || out.nbytes() < kMinBytes || !out.is_contiguous() || !fresh(out)) continue;
      bases_[count_] = static_cast<char*>(out.data_ptr());
      row_bytes_[count_++] = out.nbytes() / static_cast<size_t>(rows);
    }
#endif
    (void)outputs, (void)rows;
  }

  // Calls write(b, e) over rows [begin, end), chunk by chunk, each chunk's rows faulted in
  // first in every output.
  template <typename WriteFn>
  void rows(int64_t begin, int64_t end, WriteFn&& write) const {
    if (count_ == 0) return write(begin, end);
    size_t bytes = 0;
    for (int i = 0; i < count_; ++i) bytes += row_bytes_[i];
    const int64_t step = std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes / std::max<size_t>(1, bytes)));
    for (int64_t b = begin; b < end; b += step) {
      const int64_t e = std::min(end, b + step);
      for (int i = 0; i < count_; ++i) populate(bases_[i] + b * row_bytes_[i], static_cast<size_t>(e - b) * row_bytes_[i]);
      write(b, e);
    }
  }

 private:
  static constexpr size_t kMinBytes = size_t(32) << 20;
  static constexpr size_t kChunkBytes = size_t(256) << 10;  // half an L2 on small cores
  static constexpr int kMaxOutputs = 2;
  char* bases_[kMaxOutputs] = {};
  size_t row_bytes_[kMaxOutputs] = {};
  int count_ = 0;

  static std::atomic<bool>& supported() {
    static std::atomic<bool> ok{true};
    return ok;
  }

#if defined(__linux__)
  static uintptr_t page_size() {
    static const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    return page;
  }

  // The last page: the first holds the allocator's chunk header, touched either way.
  static bool fresh(const at::Tensor& out) {
    const uintptr_t last = (reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes() - 1) & ~(page_size() - 1);
    unsigned char resident = 0;
    return mincore(reinterpret_cast<void*>(last), page_size(), &resident) == 0 && !(resident & 1);
  }

  static void populate(char* p, size_t bytes) {
    constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(page_size() - 1);
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    if (madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateWrite) != 0) {
      supported().store(false, std::memory_order_relaxed);
    }
  }
#else
  static void populate(char*, size_t) {}
#endif
};

}  // namespace fastloss::cpu
