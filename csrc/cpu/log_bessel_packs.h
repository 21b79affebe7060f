// The SIMD-pack path of the CPU log-Bessel values (cpu/log_bessel_packs.cpp): one source
// compiled as separate translation units, for x86-64-v4 (AVX-512, packs of 8 doubles) and for
// x86-64-v3 (AVX2 + FMA, packs of 4; and packs of 8 for the tests), each called only where its
// instruction set runs. Not
// inside the target_clones functions: GCC lowers a generic vector comparison for the
// instruction set of the function that holds it before inlining, so the pack helpers'
// comparisons, inlined into a clone, became lane-by-lane scalar code (2x slower Debye).
#pragma once

#include <cstdint>

namespace fastloss::cpu {
constexpr int kLogBesselBlock = 256;  // elements per call of the value loops

// The path the CPU log-Bessel values take on this machine, for the build information
// (defined in cpu/log_bessel.cpp).
const char* log_bessel_cpu_path();
}  // namespace fastloss::cpu

// Defined by CMake where the units are built (x86-64 GCC / Clang that take -march=x86-64-v4).
#if defined(FASTLOSS_LOG_BESSEL_PACKS)
namespace fastloss::cpu::packs {

// log I_v(x) or log K_v(x) of n <= kLogBesselBlock contiguous doubles, per instruction set, and
// their derivatives in v and x (*_grad_packs).
namespace avx512 {
void log_iv_packs(const double* v, const double* x, double* out, int n);
void log_kv_packs(const double* v, const double* x, double* out, int n);
void log_iv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n);
void log_kv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n);
}  // namespace avx512
namespace avx2 {
void log_iv_packs(const double* v, const double* x, double* out, int n);
void log_kv_packs(const double* v, const double* x, double* out, int n);
void log_iv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n);
void log_kv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n);
}  // namespace avx2
// Packs of 8 compiled for AVX2: the AVX-512 unit's lane logic where AVX-512 is absent (tests).
namespace avx2_lanes8 {
void log_iv_packs(const double* v, const double* x, double* out, int n);
void log_kv_packs(const double* v, const double* x, double* out, int n);
void log_iv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n);
void log_kv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n);
}  // namespace avx2_lanes8

}  // namespace fastloss::cpu::packs
#endif
