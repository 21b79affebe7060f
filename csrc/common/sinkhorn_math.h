// Log-domain Sinkhorn arithmetic shared by the CPU and CUDA kernels (Cuturi 2013; log-domain
// stabilization and absorption as in Schmitzer 2019, arXiv 1610.06519).
//
// Scaled dual variables: u = alpha / eps, v = beta / eps, where alpha = f - eps log a and
// beta = g - eps log b stay finite even where a marginal entry is zero. One iteration is
//   u_i = -LSE_j(log b_j + v_j - C_ij / eps)        (row update: rows of P sum to a)
//   v_j = -LSE_i(log a_i + u_i - C_ij / eps)        (column update: columns sum to b)
//   P_ij = exp(log a_i + log b_j + u_i + v_j - C_ij / eps).
// Warm-shifted sums: each LSE is evaluated as s + log(sum exp(x - s)) with s = the previous
// value of the same LSE (-u_old or -v_old), so a single pass with one exp per element
// suffices; a sum outside [kMinSum, kMaxSum] (first iterations, or large potential moves)
// is redone exactly with a max pass. A row's warm sum is also its row marginal divided by
// a_i under the current iterate, so the marginal error (a_i |sum_i - 1|)_i is free.
// Scaling form (the CPU kernel): with K_ij = exp(u_i + v_j - C_ij / eps) stored for fixed
// (u, v), the same iterates are x_i = 1 / sum_j K_ij b_j y_j, y_j = 1 / sum_i a_i x_i K_ij
// (potentials u + log x, v + log y): no exp per entry. Absorption folds log x, log y back
// into (u, v) and rebuilds K before a scaling vector leaves [1/kMaxScaling, kMaxScaling].
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/exp_pair.h"
#include "common/macros.h"

namespace fastloss {

template <typename T>
struct SinkhornConstants;

template <>
struct SinkhornConstants<float> {
  // exp(x) is 0 below kMinArg (about the smallest normal number) and clamped at kMaxArg:
  // exp(kMaxArg) > kMaxSum, so a clamped overflow always falls back to the exact path.
  static constexpr float kMinArg = -87.0f;
  static constexpr float kMaxArg = 88.0f;
  // exp_with_subnormals: exp(x) rounds to 0 below this.
  static constexpr float kMinSubnormalArg = -104.0f;
  // A warm sum in this range has a dominant term far above float's underflow and cannot
  // have overflowed, so it is as accurate as the exact max-subtracting sum.
  static constexpr float kMinSum = 0x1.0p-60f;
  static constexpr float kMaxSum = 0x1.0p+60f;
  // Scaling form (stabilized scaling with absorption): a scaling vector stays within
  // [1/kMaxScaling, kMaxScaling] of its kernel, and kernel entries below kMinKernel are 0, so
  // a dropped entry holds under kMinKernel * kMaxScaling^2 = 2^-40 of its row's or column's
  // mass, and products of kernel entries with scalings and marginals down to ~2^-38 are
  // normal numbers (no subnormal slow path; the CPU loop flushes those of smaller marginals).
  static constexpr float kMaxScaling = 0x1.0p+16f;
  static constexpr float kMinKernel = 0x1.0p-72f;
};

template <>
struct SinkhornConstants<double> {
  static constexpr double kMinArg = -708.0;
  static constexpr double kMaxArg = 709.0;
  static constexpr double kMinSubnormalArg = -746.0;
  static constexpr double kMinSum = 0x1.0p-500;
  static constexpr double kMaxSum = 0x1.0p+500;
  static constexpr double kMaxScaling = 0x1.0p+64;
  static constexpr double kMinKernel = 0x1.0p-900;
};

// exp(x) for x <= kMaxArg, 0 below kMinArg (so exp(-inf) = 0), exp(kMaxArg) above it, NaN
// for NaN: branch-free, so loops over it vectorize on the CPU; within ~2 ulp of exp.
template <typename T>
FASTLOSS_HD T sinkhorn_exp(T x) {
  using K = SinkhornConstants<T>;
  const T xc = x < K::kMinArg ? K::kMinArg : (x > K::kMaxArg ? K::kMaxArg : x);
  const ExpPair<T> p = exp_pair(xc);
  const T r = p.mantissa * exp2_clamped(p.exponent);
  return x < K::kMinArg ? T(0) : r;
}

// exp(x) for x <= kMaxArg with the C library's gradual underflow: results below the smallest
// normal number are subnormals, not 0. SinKD's kernel exp(-W / eps) takes it, as its eager
// formulation (torch.exp) does: flushing at kMinArg changed the loss by 32% (float32) or
// made it NaN (float64, a row of entries all near 1e-315) where the formulation is finite.
// Small results are built as (m 2^(e + 64)) 2^-64: one rounding, into the subnormal.
template <typename T>
FASTLOSS_HD T exp_with_subnormals(T x) {
  using K = SinkhornConstants<T>;
  const T xc = x < K::kMinSubnormalArg ? K::kMinSubnormalArg : (x > K::kMaxArg ? K::kMaxArg : x);
  const ExpPair<T> p = exp_pair(xc);
  const T shift = xc < K::kMinArg ? T(64) : T(0);
  const T r = p.mantissa * exp2_clamped(p.exponent + shift) * exp2_bits(-shift);
  return x < K::kMinSubnormalArg ? T(0) : r;
}

// Whether a marginal entry carries mass, from its log (log 0 = -inf).
template <typename T>
FASTLOSS_HD bool has_mass(T log_mass) {
  return log_mass > -std::numeric_limits<T>::infinity();
}

// The exponent fma(c, -inv_eps, y) of a cost entry whose other index has mass (log_mass =
// log a_i in a column pass, log b_j in a row pass, > -inf), and -inf (a zero term) otherwise:
// a zero-mass row or column takes no part in the other side's updates whatever its costs
// (+-inf, NaN) or its potential (NaN for those).
template <typename T>
FASTLOSS_HD T masked_exponent(T log_mass, T c, T inv_eps, T y) {
  return has_mass(log_mass) ? fl_fma(c, -inv_eps, y) : -std::numeric_limits<T>::infinity();
}

// P_ij = exp(fma(c, -inv_eps, z_i + lb_j + v_j)) with z_i = log a_i + u_i, and 0 for a zero-mass
// row or column whatever its cost or potential (a_i b_j = 0 mass).
template <typename T>
FASTLOSS_HD T plan_entry(T c, T inv_eps, T la_i, T z_i, T lb_j, T v_j) {
  return has_mass(la_i) && has_mass(lb_j) ? sinkhorn_exp(fl_fma(c, -inv_eps, z_i + lb_j + v_j)) : T(0);
}

// The potential (u or v) of a zero-mass row or column: the exact c-transform -LSE_k x_k over
// the other side's exponents x_k (masked_exponent), given their largest value `top` (NaN terms
// left out), s = sum_k exp(x_k - top) and whether some x_k was NaN. It is the envelope
// gradient of the value in that entry's mass: +inf when no term is above -inf (a padded row of
// +inf costs: mass added there has nowhere to go), -inf when one is +inf (a -inf cost).
template <typename T>
FASTLOSS_HD T zero_mass_potential(T top, T s, bool any_nan) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  if (any_nan) return std::numeric_limits<T>::quiet_NaN();
  if (top == -inf) return inf;
  if (top == inf) return -inf;
  return -(top + fl_log(s));
}

// zero_mass_potential of the exponents exponent(q), q < count, in one thread (two passes).
template <typename T, typename Exponent>
FASTLOSS_HD T zero_mass_c_transform(int64_t count, Exponent exponent) {
  T top = -std::numeric_limits<T>::infinity();
  bool any_nan = false;
  for (int64_t q = 0; q < count; ++q) {
    const T x = exponent(q);
    any_nan |= x != x;
    if (x == x) top = fl_max(top, x);
  }
  T s = 0;
  if (!any_nan && top - top == T(0))
    for (int64_t q = 0; q < count; ++q) s += sinkhorn_exp(exponent(q) - top);
  return zero_mass_potential(top, s, any_nan);
}

// False when a warm-shifted sum must be redone exactly (also for NaN).
template <typename T>
FASTLOSS_HD bool warm_sum_ok(T sum) {
  return sum >= SinkhornConstants<T>::kMinSum && sum <= SinkhornConstants<T>::kMaxSum;
}

// False when a row or column sum of the scaling form would take its scaling vector out of
// range, so the potentials must be updated in the log domain instead (also for NaN).
template <typename T>
FASTLOSS_HD bool scaling_in_range(T sum) {
  return sum >= T(1) / SinkhornConstants<T>::kMaxScaling && sum <= SinkhornConstants<T>::kMaxScaling;
}

// The norm of the row-marginal error vector e_i = a_i |r_i / a_i - 1| (r = P 1) that the
// stopping rule measures: p = 1 (the default), 2, or infinity (coded as 0). Accumulators hold
// term(e_i) combined by operator() (sums of e_i or e_i^2, or the largest e_i; NaN is kept,
// so a NaN row still ends the loop); finish() turns an accumulator into the norm.
struct MarginalErrorNorm {
  int p;

  template <typename T>
  FASTLOSS_HD T term(T e) const {
    return p == 2 ? e * e : e;
  }
  template <typename T>
  FASTLOSS_HD T operator()(T x, T y) const {
    if (p == 0) return (y > x || y != y) ? y : x;
    return x + y;
  }
  template <typename T>
  FASTLOSS_HD T finish(T acc) const {
#if defined(__CUDA_ARCH__)
    return p == 2 ? ::sqrt(acc) : acc;
#else
    return p == 2 ? std::sqrt(acc) : acc;
#endif
  }
};

// The SinKD loss (Cui et al. 2024) uses plain (not log-domain) normalizations on
// K = exp(-W / eps) with W in [0, 2]: these are the scaling-vector forms of its row and
// column steps. After t steps, P_t = diag(x_t) K diag(y_t) with
//   x_t = 1 / (K y_{t-1}),   y_t = 1 / (K^T x_t),   y_0 = 1
// (for the kernels' column-shifted K, y_0 = exp(-c / eps) instead: the same P_t).

}  // namespace fastloss
