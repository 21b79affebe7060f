// exp(x) as a (mantissa, exponent) pair, the arithmetic behind two-pass softmax
// (Dukhan & Ablavatski 2020, arXiv 2001.04438).
//
//   n = round(x * log2(e))      integer-valued, kept in floating point so it cannot overflow
//   t = x - n * ln2             Cody-Waite reduction with fma: |t| <= ln2 / 2
//   p = exp(t)                  polynomial, p in [2^-1/2, 2^1/2]
//   exp(x) = p * 2^n
//
// A running sum of such terms is the pair (S, E) meaning S * 2^E. Merging two pairs scales
// each by 2^(exponent - max exponent) <= 1, so S never overflows and the merge is
// associative: rows can be split across SIMD lanes, threads or blocks and merged exactly.
// Shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace fastloss {
inline namespace FASTLOSS_ISA_NAMESPACE {

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  static constexpr float kLog2e = 0x1.715476p+0f;
  static constexpr float kLn2Hi = 0x1.62e430p-1f;   // float(ln 2)
  static constexpr float kLn2Lo = -0x1.05c610p-29f; // ln 2 - kLn2Hi
  static constexpr float kLn2 = 0x1.62e430p-1f;
  // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer for |q| < 2^22.
  static constexpr float kRoundMagic = 0x1.8p+23f;
  // |q| beyond this is routed to the exact fallback (reduction loses accuracy there).
  static constexpr float kMaxReducible = 0x1.0p+21f;
  static constexpr float kMinExponent = -127.0f;  // 2^-127 and below flush to zero
  static constexpr float kMaxExponent = 127.0f;   // the largest finite power of two
  // The sentinel exponent of an empty sum: finite, so sentinel - sentinel == 0.
  static constexpr float kEmptyExponent = -0x1.fffffep+127f;
};

template <>
struct ExpConstants<double> {
  static constexpr double kLog2e = 0x1.71547652b82fep+0;
  static constexpr double kLn2Hi = 0x1.62e42fefa39efp-1;
  static constexpr double kLn2Lo = 0x1.abc9e3b39803fp-56;
  static constexpr double kLn2 = 0x1.62e42fefa39efp-1;
  static constexpr double kRoundMagic = 0x1.8p+52;
  static constexpr double kMaxReducible = 0x1.0p+40;
  static constexpr double kMinExponent = -1023.0;
  static constexpr double kMaxExponent = 1023.0;
  static constexpr double kEmptyExponent = -0x1.fffffffffffffp+1023;
};

// a > b ? a : b (and a < b ? a : b): a NaN in b comes out, a NaN in a does not, where fmax
// and fmin drop a NaN on either side. Callers that clamp pass the clamped value as a.
FASTLOSS_HD float fl_max(float a, float b) { return a > b ? a : b; }
FASTLOSS_HD double fl_max(double a, double b) { return a > b ? a : b; }
FASTLOSS_HD float fl_min(float a, float b) { return a < b ? a : b; }
FASTLOSS_HD double fl_min(double a, double b) { return a < b ? a : b; }

// fl_log, fl_exp, fl_tanh: the C library's function on the host, CUDA's on the device.
#if defined(__CUDA_ARCH__)
#define FASTLOSS_LIBM(name)                                          \
  FASTLOSS_HD float fl_##name(float v) { return ::name##f(v); }      \
  FASTLOSS_HD double fl_##name(double v) { return ::name(v); }
#else
#define FASTLOSS_LIBM(name)                                          \
  FASTLOSS_HD float fl_##name(float v) { return std::name(v); }      \
  FASTLOSS_HD double fl_##name(double v) { return std::name(v); }
#endif
FASTLOSS_LIBM(log)
FASTLOSS_LIBM(exp)
FASTLOSS_LIBM(tanh)
#undef FASTLOSS_LIBM

FASTLOSS_HD float fl_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
FASTLOSS_HD double fl_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// exp(t) for |t| <= ln2/2 (slightly beyond is fine). float: degree-6 minimax-style fit,
// < 1e-7 relative error; double: degree-13 Taylor, truncation < 1e-17.
FASTLOSS_HD float exp_reduced(float t) {
  float p = 0x1.6ada76p-10f;
  p = fl_fma(p, t, 0x1.12752ap-7f);
  p = fl_fma(p, t, 0x1.55585ep-5f);
  p = fl_fma(p, t, 0x1.555400p-3f);
  p = fl_fma(p, t, 0x1.fffffcp-2f);
  p = fl_fma(p, t, 1.0f);
  return fl_fma(p, t, 1.0f);
}
FASTLOSS_HD double exp_reduced(double t) {
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = fl_fma(p, t, 1.0 / 479001600.0);
  p = fl_fma(p, t, 1.0 / 39916800.0);
  p = fl_fma(p, t, 1.0 / 3628800.0);
  p = fl_fma(p, t, 1.0 / 362880.0);
  p = fl_fma(p, t, 1.0 / 40320.0);
  p = fl_fma(p, t, 1.0 / 5040.0);
  p = fl_fma(p, t, 1.0 / 720.0);
  p = fl_fma(p, t, 1.0 / 120.0);
  p = fl_fma(p, t, 1.0 / 24.0);
  p = fl_fma(p, t, 1.0 / 6.0);
  p = fl_fma(p, t, 0.5);
  p = fl_fma(p, t, 1.0);
  return fl_fma(p, t, 1.0);
}

// The same degree-13 Taylor polynomial by Estrin's scheme: depth 4 instead of a chain of 13
// fma, for the CPU's SIMD packs of doubles (T: double or a vector of doubles), whose loops
// wait on its latency.
template <typename T>
FASTLOSS_HD T exp_reduced_estrin(const T& t) {
  const T t2 = t * t, t4 = t2 * t2, t8 = t4 * t4;
  const T c01 = 1.0 + t, c23 = (1.0 / 2) + t * (1.0 / 6), c45 = (1.0 / 24) + t * (1.0 / 120);
  const T c67 = (1.0 / 720) + t * (1.0 / 5040), c89 = (1.0 / 40320) + t * (1.0 / 362880);
  const T cab = (1.0 / 3628800) + t * (1.0 / 39916800), ccd = (1.0 / 479001600) + t * (1.0 / 6227020800.0);
  const T c03 = c01 + t2 * c23, c47 = c45 + t2 * c67, c8b = c89 + t2 * cab;
  const T c07 = c03 + t4 * c47, c8d = c8b + t4 * ccd;
  return c07 + t8 * c8d;
}

// 2^k for integer-valued k in [kMinExponent, max exponent], from the exponent bits (no libm
// call, vectorizes on the CPU); k = kMinExponent gives +0. Callers clamp k.
FASTLOSS_HD float exp2_bits(float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
#endif
}
FASTLOSS_HD double exp2_bits(double k) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((static_cast<int64_t>(k) + 1023) << 52);
#else
  // k + 1023 as the low bits of k + 1023 + kRoundMagic (1.5 * 2^52; exact for integer k),
  // shifted into the exponent field: no double -> int64 conversion, which AVX2 lacks (GCC
  // kept the loops around it scalar: float64 softmax at 0.4-0.5x torch there).
  const double biased = k + (1023.0 + ExpConstants<double>::kRoundMagic);
  uint64_t bits;
  std::memcpy(&bits, &biased, sizeof(bits));
  bits <<= 52;
  double r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
#endif
}

// 2^k for integer-valued k <= 0; k below the smallest normal exponent gives 0 (those terms
// are below the accumulator's resolution anyway).
FASTLOSS_HD float exp2_nonpositive(float k) { return exp2_bits(fl_max(k, ExpConstants<float>::kMinExponent)); }
FASTLOSS_HD double exp2_nonpositive(double k) { return exp2_bits(fl_max(k, ExpConstants<double>::kMinExponent)); }

// 2^k for integer-valued k clamped to [kMinExponent, kMaxExponent] (+0 at the bottom and for
// a NaN k).
template <typename T>
FASTLOSS_HD T exp2_clamped(T k) {
  return exp2_bits(fl_min(fl_max(k, ExpConstants<T>::kMinExponent), ExpConstants<T>::kMaxExponent));
}

// 2^k for an integer k clamped to the normal range: never 0 or inf, so 2^k and 2^-k can
// scale a value and undo it exactly.
template <typename T>
FASTLOSS_HD T exp2_normal(int k) {
  constexpr int kLo = std::numeric_limits<T>::min_exponent - 1;
  constexpr int kHi = std::numeric_limits<T>::max_exponent - 1;
  return exp2_bits(static_cast<T>(k < kLo ? kLo : (k > kHi ? kHi : k)));
}

// Round to nearest integer (ties to even) for |q| < 2^22 (float) / 2^51 (double).
template <typename T>
FASTLOSS_HD T round_to_int(T q) {
#if defined(__CUDA_ARCH__)
  return rint(q);
#else
  // The add-subtract trick vectorizes where rint() would be a libm call; it relies on
  // IEEE semantics (no -ffast-math), which this project's flags keep.
  return (q + ExpConstants<T>::kRoundMagic) - ExpConstants<T>::kRoundMagic;
#endif
}

// One element's pair: exp(x) = mantissa * 2^exponent.
template <typename T>
struct ExpPair {
  T mantissa;
  T exponent;

  // exp(x) / 2^e for an integer-valued e >= exponent (a row's or a chunk's largest).
  FASTLOSS_HD T relative_to(T e) const { return mantissa * exp2_nonpositive(exponent - e); }
};

template <typename T>
FASTLOSS_HD ExpPair<T> exp_pair(T x) {
  using C = ExpConstants<T>;
  const T n = round_to_int(x * C::kLog2e);
  T t = fl_fma(n, -C::kLn2Hi, x);
  t = fl_fma(n, -C::kLn2Lo, t);
  return {exp_reduced(t), n};
}

// A sum of exponentials, S * 2^E.
template <typename T>
struct ExpSum {
  T sum;
  T exponent;

  FASTLOSS_HD static ExpSum empty() { return {T(0), ExpConstants<T>::kEmptyExponent}; }

  // Adds mantissa * 2^exponent. The scales are powers of two, so both products are exact
  // (short of subnormals) and an fma contraction changes nothing: merge(p, q) and merge(q, p)
  // give the same bits, and every lane of a butterfly reduction agrees.
  FASTLOSS_HD void add(T mantissa, T exponent_in) {
    const T e = fl_max(exponent, exponent_in);
    sum = sum * exp2_nonpositive(exponent - e) + mantissa * exp2_nonpositive(exponent_in - e);
    exponent = e;
  }
  FASTLOSS_HD void merge(const ExpSum& other) { add(other.sum, other.exponent); }
};

}  // namespace FASTLOSS_ISA_NAMESPACE
}  // namespace fastloss
