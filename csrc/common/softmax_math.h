// Row statistics of two-pass softmax, shared by the CPU and CUDA kernels so both devices
// take the same decisions (which rows need the exact path) and compute the same values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/exp_pair.h"

namespace fastloss {

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Inputs are clamped from below (-inf included) before the reduction. A clamped entry's
// exponent lies more than the flush distance (-kMinExponent, where exp2_nonpositive gives 0)
// below -kMaxReducible, so it adds exactly 0 to any row whose maximum is in range (E >=
// -kMaxReducible), and a row where every entry was clamped takes the exact path. (A clamp
// just below -kMaxReducible let -inf entries add up to 1/4 of a term to rows whose maximum
// was within 127 binades of it.) fl_max(low_clamp, x) keeps NaN.
template <typename acc_t>
FASTLOSS_HD constexpr acc_t low_clamp() {
  using C = ExpConstants<acc_t>;
  return -(C::kMaxReducible - C::kMinExponent + 32) * C::kLn2;
}

// log(s) for a positive normal s, without a library call and without branches (so a loop
// over sums vectorizes): s = m 2^k with m in [2^-1/2, 2^1/2); log m = 2 atanh(u),
// u = (m - 1) / (m + 1), |u| <= 0.172, by its series to u^9 (float, truncation 2e-9) or u^21
// (double, 1e-19). Within 2 ulp of log(s).
template <typename T>
FASTLOSS_HD T log_of_normal(T s) {
  using Bits = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  constexpr int kMantissaBits = std::numeric_limits<T>::digits - 1;
  constexpr Bits kSqrtHalfBits = sizeof(T) == 8 ? Bits(0x3fe6a09e667f3bcdLL) : Bits(0x3f3504f3);
  Bits bits;
  std::memcpy(&bits, &s, sizeof(s));
  const Bits k = (bits - kSqrtHalfBits) >> kMantissaBits;  // floor(log2(s) + 1/2)
  bits -= k * (Bits(1) << kMantissaBits);
  T m;
  std::memcpy(&m, &bits, sizeof(m));
  const T f = m - 1;  // exact
  const T u = f / (2 + f), u2 = u * u;
  constexpr int kTerms = sizeof(T) == 8 ? 10 : 4;  // 1/3, 1/5, ..., 1/(2 kTerms + 1)
  T p = T(1) / (2 * kTerms + 1);
  for (int j = kTerms - 1; j >= 1; --j) p = fl_fma(p, u2, T(1) / (2 * j + 1));
  const T log_m = fl_fma(2 * u * u2, p, 2 * u);
  using C = ExpConstants<T>;
  T kf = T(k);
#if !defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 8) {  // as in exp2_bits: AVX2 has no int64 -> double conversion
    Bits biased;  // the bits of k + kRoundMagic: those of kRoundMagic, plus k
    std::memcpy(&biased, &C::kRoundMagic, sizeof(biased));
    biased += k;
    std::memcpy(&kf, &biased, sizeof(kf));
    kf -= C::kRoundMagic;
  }
#endif
  return fl_fma(kf, C::kLn2Hi, fl_fma(kf, C::kLn2Lo, log_m));
}

// What pass 2 needs of a row.
template <typename acc_t>
struct RowStats {
  acc_t exponent;    // E
  acc_t inv_sum;     // 1 / S              (softmax)
  acc_t log_offset;  // E * ln2_lo + log S (log-softmax; E * ln2_hi is applied by fma)
  bool exact;        // the row takes the exact max-subtracting path
};

// Log-softmax's offset beyond E ln2_hi (which pass 2 applies by fma): E ln2_lo + log S.
template <typename acc_t>
FASTLOSS_HD acc_t log_offset(acc_t exponent, acc_t log_sum) {
  return exponent * ExpConstants<acc_t>::kLn2Lo + log_sum;
}

// The exact path takes rows with a NaN or +inf entry (the sum, or `nonfinite`, a sum of
// (xc - xc) over the clamped inputs, is NaN), rows whose maximum is too large to reduce
// accurately, and rows where every entry was clamped (all -inf, or all very negative).
// kNeedLog = false skips the log that only log-softmax needs.
template <typename acc_t, bool kNeedLog = true>
FASTLOSS_HD RowStats<acc_t> finish_row(const ExpSum<acc_t>& s, acc_t nonfinite) {
  using C = ExpConstants<acc_t>;
  RowStats<acc_t> r;
  r.exponent = s.exponent;
  r.inv_sum = acc_t(1) / s.sum;
  r.log_offset = kNeedLog ? log_offset(s.exponent, fl_log(s.sum)) : acc_t(0);
  // !(a <= b) is also true for NaN.
  r.exact = nonfinite != nonfinite || s.sum != s.sum || !(s.exponent <= C::kMaxReducible) ||
            s.exponent < -C::kMaxReducible;
  return r;
}

// Pass 2 of the recomputing variant: softmax p * 2^(n - E) / S, log-softmax x - E ln2 - log S.
template <bool kLog, typename acc_t>
FASTLOSS_HD acc_t pass2_value(acc_t x, const RowStats<acc_t>& r) {
  if constexpr (kLog) {
    // At most 0: a row's largest entry came out up to an ulp above 0 through exp then log
    // (log_softmax([0.3, -inf]) gave 6e-8 where torch gives 0). NaN stays NaN.
    return fl_min(acc_t(0), fl_fma(r.exponent, -ExpConstants<acc_t>::kLn2Hi, x) - r.log_offset);
  } else {
    const ExpPair<acc_t> p = exp_pair(fl_max(low_clamp<acc_t>(), x));
    return p.relative_to(r.exponent) * r.inv_sum;
  }
}

// exp(x - m ln2) for an integer-valued m >= round(x log2 e) (a chunk's largest exponent):
// x itself is reduced, so |t| <= ln2/2 and the shift only lowers the power of two. No
// rounding of x - m ln2, and two fewer fmas than reducing the shifted value.
template <typename acc_t>
FASTLOSS_HD acc_t exp_shifted(acc_t x, acc_t m) {
  return exp_pair(x).relative_to(m);
}

}  // namespace fastloss
