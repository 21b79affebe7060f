// Runtime choice among the instruction-set variants that the CPU kernels are compiled for
// (GCC/Clang target_clones: x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, and a baseline; or one
// level only, CMake's FASTLOSS_CPU_ARCH).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "common/macros.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#if defined(FASTLOSS_CPU_ARCH)  // one level only (CMake's FASTLOSS_CPU_ARCH)
#define FASTLOSS_CPU_CLONES __attribute__((target("arch=" FASTLOSS_CPU_ARCH)))
#else
#define FASTLOSS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
// x86-64 with GCC/Clang: functions with target("arch=x86-64-v4") and AVX-512 intrinsics can
// be called where has_avx512() holds.
#define FASTLOSS_X86_CLONES 1
// An always-inlined helper of such functions.
#define FASTLOSS_AVX512_INLINE __attribute__((target("arch=x86-64-v4"), always_inline)) inline
// The same for AVX2 + FMA + F16C helpers, called where has_avx2() holds.
#define FASTLOSS_AVX2_INLINE __attribute__((target("arch=x86-64-v3"), always_inline)) inline
#else
#define FASTLOSS_CPU_CLONES
#endif

// Every kernel template called from a FASTLOSS_CPU_CLONES entry must be inlined into it:
// a call that is not inlined runs the baseline build (where fma is a libm call).
#define FASTLOSS_CPU_INLINE inline __attribute__((always_inline))
// The same for a lambda: [&](int i) FASTLOSS_CPU_INLINE_LAMBDA { ... }.
#define FASTLOSS_CPU_INLINE_LAMBDA __attribute__((always_inline))

namespace fastloss::cpu {
inline namespace FASTLOSS_ISA_NAMESPACE {

// v if keep, else +0, by masking the bits. Written this way because GCC 12 -O3 miscompiles
// vectorized reductions of `keep ? v : 0` for AVX2/AVX-512 (wrong sums); the bitwise form
// vectorizes to the same instructions and is computed correctly.
template <typename T>
FASTLOSS_CPU_INLINE T keep_or_zero(bool keep, T v) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits b;
  std::memcpy(&b, &v, sizeof(T));
  b &= -static_cast<Bits>(keep);
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Combines L lanes pairwise (log2 L dependent steps, each vectorizable) instead of a serial
// chain of L - 1 dependent operations, which dominates the cost of short rows (softmax; cut
// cross-entropy's vocabulary blocks). The widths are template constants: with a runtime
// width GCC kept the lanes on the stack and looped over them (softmax forward, 128-wide fp32
// rows in cache on AVX-512: 1.3x the time). Clobbers `a`.
template <int W, typename acc_t, typename Op>
FASTLOSS_CPU_INLINE void reduce_halves(acc_t* a, Op op) {
  if constexpr (W > 0) {
    for (int l = 0; l < W; ++l) a[l] = op(a[l], a[l + W]);
    reduce_halves<W / 2>(a, op);
  }
}

template <int L, typename acc_t, typename Op>
FASTLOSS_CPU_INLINE acc_t reduce_lanes(acc_t* a, Op op) {
  reduce_halves<L / 2>(a, op);
  return a[0];
}

// Whether FASTLOSS_CPU_ARCH builds for one level only, and whether it is `level`.
#if defined(FASTLOSS_CPU_ARCH)
inline constexpr bool kSingleArch = true;
inline constexpr bool single_arch(const char* level) { return std::string_view(FASTLOSS_CPU_ARCH) == level; }
#else
inline constexpr bool kSingleArch = false;
inline constexpr bool single_arch(const char*) { return false; }
#endif

// Whether the AVX-512 clone runs.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
  if (kSingleArch && !single_arch("x86-64-v4")) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v4");
#else
  return false;
#endif
}

// FASTLOSS_CPU_AVX512=0: the kernels' own dispatch (has_avx512) takes the paths of a CPU
// without AVX-512, so that tests run those paths on an AVX-512 machine too (the functions'
// target clones stay as the CPU selects them).
inline bool avx512_paths_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("FASTLOSS_CPU_AVX512");
    return v != nullptr && std::strcmp(v, "0") == 0;
  }();
  return disabled;
}

// Whether kernels whose vector form only pays off with 512-bit registers and their mask
// instructions take it (they branch on this once per call).
inline bool has_avx512() { return cpu_has_avx512() && !avx512_paths_disabled(); }

// Whether the kernels may use AVX2 + FMA (x86-64-v3): the CPU has them, and the build's level
// includes them.
inline bool has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
  if (kSingleArch && !single_arch("x86-64-v3") && !single_arch("x86-64-v4")) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
#else
  return false;
#endif
}

// Whether this CPU runs the kernels' build: false only for a FASTLOSS_CPU_ARCH build whose
// level the CPU lacks (its kernels would stop on an illegal instruction).
inline bool cpu_runs_build() {
#if defined(FASTLOSS_CPU_ARCH) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports(FASTLOSS_CPU_ARCH);
#else
  return true;
#endif
}

inline const char* selected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#if defined(FASTLOSS_CPU_ARCH)
  if (single_arch("x86-64-v4")) {
    return avx512_paths_disabled()
               ? "x86-64-v4 (AVX-512; FASTLOSS_CPU_ARCH build; its own kernel paths off: FASTLOSS_CPU_AVX512=0)"
               : "x86-64-v4 (AVX-512; FASTLOSS_CPU_ARCH build)";
  }
  if (single_arch("x86-64-v3")) return "x86-64-v3 (AVX2, FMA; FASTLOSS_CPU_ARCH build)";
  return FASTLOSS_CPU_ARCH " (FASTLOSS_CPU_ARCH build)";
#endif
  if (cpu_has_avx512()) {
    return avx512_paths_disabled() ? "x86-64-v4 (AVX-512; its own kernel paths off: FASTLOSS_CPU_AVX512=0)"
                                   : "x86-64-v4 (AVX-512)";
  }
  if (has_avx2()) return "x86-64-v3 (AVX2, FMA)";
  return "x86-64 baseline";
#else
  return "generic";
#endif
}

}  // namespace FASTLOSS_ISA_NAMESPACE
}  // namespace fastloss::cpu
