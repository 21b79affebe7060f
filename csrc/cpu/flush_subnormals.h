// Flush-to-zero and denormals-are-zero for the calling thread while a ScopedFlushSubnormals
// lives (the FTZ and DAZ bits of x86's MXCSR, restored after; elsewhere it does nothing). For
// loops whose subnormal intermediates lie below every tolerance of their results but would
// take the processor's slow path (a microcode assist per operation, 10-100x its time).
// at::parallel_for runs tasks on other threads: each task that needs it takes its own.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastloss::cpu {

class ScopedFlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  ScopedFlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~ScopedFlushSubnormals() { _mm_setcsr(saved_); }
#else
  ScopedFlushSubnormals() = default;
#endif
  ScopedFlushSubnormals(const ScopedFlushSubnormals&) = delete;
  ScopedFlushSubnormals& operator=(const ScopedFlushSubnormals&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr unsigned kFtzDaz = 0x8040;  // FTZ (bit 15) | DAZ (bit 6)
  unsigned saved_;
#endif
};

}  // namespace fastloss::cpu
