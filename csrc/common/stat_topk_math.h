// Statistical top-k (Spark Transformer, arXiv 2506.06644; Gemma 3n): per-row math shared by
// the CPU and CUDA kernels.
//
//   theta = mean(x) + std(x) * z,  z = PhiInv(sparsity), std the biased one
//   soft: y = relu(x - theta)      hard: y = x * [x > theta]
//   gelu-mul (Gemma 3n MLP): out = gelu_tanh(relu(gate - theta)) * up
//
// Row moments are merged with Chan's formula from chunks whose own moments are taken in two
// passes over data that is in cache or registers, so the variance never comes from a
// cancelling sum of squares. The row's min and max ride along: a constant row gets exactly
// its value as mean and std = 0, whatever the rounding of the sum. Squared deviations are
// kept in units of a power of two at least the spread squared (spread_exponent), so float32 statistics stay finite and exact for
// any finite values (unscaled, (x - mean)^2 summed over a row overflows past ~1e17). The gradient through theta (exact VJP):
//   d theta / d x_i = 1/d + z (x_i - mean) / (d std)
// with the std term taken as 0 for a constant row (std = 0, where it is not differentiable).
#pragma once

#include "common/exp_pair.h"
#include "common/macros.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastloss {

// The backward's row sums run in three levels: blocks of kSumBlock adds, groups of kSumBlock
// blocks, the total. One running sum let rounding pile up on long rows (a constant cotangent,
// as a mean's, over 2e6 entries: 7e-5 relative on the CPU's last dim, ~6e-3 along dim 0 with
// one running sum per column, CPU and CUDA alike).
constexpr int64_t kSumBlock = 64;

// The upper two levels: the caller sums blocks of up to kSumBlock terms and adds each block.
template <typename acc_t>
struct LevelSum {
  acc_t group{}, total{};
  int blocks = 0;

  FASTLOSS_HD void add_block(acc_t block) {
    group += block;
    if (++blocks == kSumBlock) {
      total += group;
      group = acc_t{};
      blocks = 0;
    }
  }
  FASTLOSS_HD acc_t result() const { return total + group; }
};

// Count, mean, sum of squared deviations, min and max of a set of values (n = 0: empty, the
// other fields unused). m2 is in units of (2^spread_exponent(lo, hi))^2. The mean is the pair
// mean + mean_err: a rounded mean carries an error of up to half its ulp, which with a large
// common offset (1e7 + N(0, 1) in float32: ulp 1) is as large as the spread, and Chan's merge
// squares the difference of two parts' means: the std came out 2-7% off after the CUDA
// kernels' merges of 8-value parts, 3e-4 to 4e-3 after the CPU's of 2048.
template <typename acc_t>
struct Moments {
  acc_t n;
  acc_t mean;
  acc_t m2;
  acc_t lo;
  acc_t hi;
  acc_t mean_err;
};

// a + b as the rounded sum and its exact rounding error (Knuth's two-sum: no multiply, so no
// contraction into an fma can change it); the error is 0 where the sum is not finite.
template <typename acc_t>
FASTLOSS_HD acc_t two_sum(acc_t a, acc_t b, acc_t& err) {
  const acc_t s = a + b;
  const acc_t bb = s - a;
  const acc_t e = (a - (s - bb)) + (b - bb);
  err = s - s == acc_t(0) ? e : acc_t(0);
  return s;
}

// e with v in [2^(e-1), 2^e) for a positive normal v (frexp's exponent), from the bits; a
// subnormal v gives the smallest normal exponent's e.
FASTLOSS_HD int exponent_above(float v) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = static_cast<uint32_t>(__float_as_int(v));
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  const int biased = static_cast<int>((bits >> 23) & 0xffu);
  return (biased == 0 ? 1 : biased) - 126;
}
FASTLOSS_HD int exponent_above(double v) {
#if defined(__CUDA_ARCH__)
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  const int biased = static_cast<int>((bits >> 52) & 0x7ffu);
  return (biased == 0 ? 1 : biased) - 1022;
}

// The unit of a set's squared deviations is 2^spread_exponent(lo, hi) >= hi - lo (or the
// largest power of two whose inverse is normal), which bounds every deviation from the mean and
// every difference between merged means, so m2 <= n (<= 16 n at the top). The exponent is 0
// when the spread is 0 (a constant set: m2 = 0, see constant_moments) or NaN (inf or NaN
// values, whose statistics stay NaN as unscaled); finite values spread beyond the largest
// float (2e38 and -2e38 in float32) take the largest exponent.
template <typename acc_t>
FASTLOSS_HD int spread_exponent(acc_t lo, acc_t hi) {
  constexpr int kLo = std::numeric_limits<acc_t>::min_exponent - 1;
  constexpr int kHi = std::numeric_limits<acc_t>::max_exponent - 2;
  const acc_t d = hi - lo;
  const acc_t big = std::numeric_limits<acc_t>::max();
  if (!(d > acc_t(0))) return 0;
  if (!(d <= big)) return (lo >= -big && hi <= big) ? kHi : 0;  // finite ends: the spread overflowed
  const int e = exponent_above(d);
  return e < kLo ? kLo : (e > kHi ? kHi : e);
}

// (x - mean) / 2^e as fma(x, inv_s, -mean * inv_s) with inv_s = 2^-e: the same rounding (the
// power-of-two scalings are exact), without overflow where x - mean exceeds the largest float.
template <typename acc_t>
FASTLOSS_HD acc_t scaled_deviation(acc_t x, acc_t inv_s, acc_t neg_scaled_mean) {
  return fl_fma(x, inv_s, neg_scaled_mean);
}

template <typename acc_t>
FASTLOSS_HD acc_t min_of(acc_t a, acc_t b) { return b < a ? b : a; }
template <typename acc_t>
FASTLOSS_HD acc_t max_of(acc_t a, acc_t b) { return b > a ? b : a; }

// The mean of n values from their plain sum, or, where that sum overflowed although the
// values are finite (|values| near max / n), from rescaled_sum(2^-e): the sum of the values
// times 2^-e, e two less than the exponent above the largest magnitude (at most the largest
// exponent whose 2^-e is normal), so every scaled value is below 4 and the sum below 4n (a
// power of two: exact but for values that become subnormal, far below the mean's rounding).
// The rare second sum rereads the caller's values (in cache or registers). NaN stays NaN; an
// infinite value is left to the plain sum.
template <typename acc_t, typename RescaledSum>
FASTLOSS_HD acc_t overflow_safe_mean(acc_t sum, acc_t n, acc_t lo, acc_t hi, RescaledSum&& rescaled_sum) {
  // +-inf, or NaN from partial sums that overflowed both ways (a NaN value, which min/max may
  // skip, makes the rescaled sum NaN as well).
  const bool overflowed = !(sum - sum == acc_t(0));
  if (!overflowed || !(lo - lo == acc_t(0)) || !(hi - hi == acc_t(0))) return sum / n;
  const int e = exponent_above(max_of(-lo, hi)) - 2;  // <= max_exponent - 2: 2^-e is normal
  return rescaled_sum(exp2_normal<acc_t>(-e)) / n * exp2_normal<acc_t>(e);
}

// Means come from sums of x - shift, shift a finite value of the set (its first; 0 if that is
// not finite): with a large common offset (1e7 + N(0, 1) in float32) a plain sum of the values
// rounds at the offset's scale, and the mean's error (tens of units there) went into the
// spread as well; the shifted values carry no offset. shift + shifted_sum / n is then exact
// to the mean's rounding. A shifted sum that is not finite takes overflow_safe_mean's paths
// (inf or NaN values; finite values whose shifted sum overflowed: the rescaled sum).
template <typename acc_t>
FASTLOSS_HD acc_t sum_shift(acc_t first) {
  return first - first == acc_t(0) ? first : acc_t(0);
}

template <typename acc_t, typename RescaledSum>
FASTLOSS_HD acc_t shifted_mean(acc_t shift, acc_t shifted_sum, acc_t n, acc_t lo, acc_t hi,
                               RescaledSum&& rescaled_sum) {
  if (shifted_sum - shifted_sum == acc_t(0)) return shift + shifted_sum / n;
  return overflow_safe_mean(shifted_sum, n, lo, hi, rescaled_sum);
}

// The corrected two-pass moments (Chan, Golub and LeVeque 1983): the second pass sums the
// scaled deviations from the first pass's mean (dev_sum, in units of 2^e) as well as their
// squares (sq); the mean then moves by dev_sum / n units and m2 drops by dev_sum^2 / n. The
// first pass's mean is only as good as the values' distances from its shift (a far outlier as
// the shift: theta 1.7e-3 off relative); the deviations from that mean are accurate.
// Returns the moments of n values in [lo, hi] whose first pass gave `mean`; the moved mean
// keeps its rounding error in mean_err (Moments).
template <typename acc_t>
FASTLOSS_HD Moments<acc_t> corrected_moments(acc_t n, acc_t mean, acc_t lo, acc_t hi, acc_t dev_sum, acc_t sq,
                                             acc_t unit) {
  const acc_t step = dev_sum / n;
  Moments<acc_t> m{n, acc_t(0), max_of(sq - dev_sum * step, acc_t(0)), lo, hi, acc_t(0)};  // (NaN stays NaN)
  m.mean = two_sum(mean, step * unit, m.mean_err);
  return m;
}

// Chan's formula, with each part's m2 moved to the merged set's unit (exact powers of two) and
// the means' difference taken from both parts of each mean.
template <typename acc_t>
FASTLOSS_HD Moments<acc_t> merge_moments(Moments<acc_t> a, Moments<acc_t> b) {
  const acc_t n = a.n + b.n;
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t lo = min_of(a.lo, b.lo), hi = max_of(a.hi, b.hi);
  const int e = spread_exponent(lo, hi);
  const acc_t ra = exp2_normal<acc_t>(spread_exponent(a.lo, a.hi) - e), rb = exp2_normal<acc_t>(spread_exponent(b.lo, b.hi) - e);
  const acc_t inv_s = exp2_normal<acc_t>(-e);
  // (b.mean - a.mean) / 2^e: the difference of the rounded means is exact when they are close.
  const acc_t ds = scaled_deviation(b.mean, inv_s, -a.mean * inv_s) + (b.mean_err - a.mean_err) * inv_s;
  const acc_t wb = b.n / n;
  acc_t step_err;
  const acc_t mean = two_sum(a.mean, ds * wb * exp2_normal<acc_t>(e), step_err);
  acc_t err;  // renormalised: mean is the pair's rounded value
  const acc_t merged_mean = two_sum(mean, a.mean_err + step_err, err);
  return {n, merged_mean, a.m2 * ra * ra + b.m2 * rb * rb + ds * ds * a.n * wb, lo, hi, err};
}

// Moments of many parts in three levels: kParts parts merge into a group, kParts groups into
// a block, blocks into the total. One running merge over thousands of parts lets the merges'
// rounding add up (4e6 entries along a column, in chunks of 256: ~130 half-ulps in theta, 3
// with groups); with two levels, parts of 8 values (a CUDA thread per column, 2e6 entries:
// ~3900 group merges) still came to 5-7 ulps, with three 0.4-0.6.
template <typename acc_t, int kParts = 64>
struct GroupedMoments {
  Moments<acc_t> total{};
  Moments<acc_t> block{};
  Moments<acc_t> group{};
  int parts = 0;
  int groups = 0;
  FASTLOSS_HD void add(const Moments<acc_t>& m) {
    group = merge_moments(group, m);
    if (++parts == kParts) {
      block = merge_moments(block, group);
      group = {};
      parts = 0;
      if (++groups == kParts) {
        total = merge_moments(total, block);
        block = {};
        groups = 0;
      }
    }
  }
  FASTLOSS_HD Moments<acc_t> result() const { return merge_moments(total, merge_moments(block, group)); }
};

// A set whose values are all one finite number (a set of inf has NaN std, as in torch).
template <typename acc_t>
FASTLOSS_HD bool finite_constant(acc_t lo, acc_t hi) {
  return lo == hi && lo - lo == acc_t(0);
}

// The moments of a constant set of n finite values (lo == hi, no NaN) into `out`, else false: its
// exact value as the mean and m2 = 0. Its spread_exponent is 0, so the rounded mean's
// deviations would be unscaled and could overflow m2 for |v| > ~1e26.
template <typename acc_t>
FASTLOSS_HD bool constant_moments(acc_t n, acc_t lo, acc_t hi, acc_t mean, Moments<acc_t>& out) {
  if (!(finite_constant(lo, hi) && mean == mean)) return false;  // min/max may skip a NaN; the mean does not
  out = {n, lo, acc_t(0), lo, hi, acc_t(0)};
  return true;
}

// Moments of the first `count` (1..kMax) values of v, held in registers: the mean, then the
// deviations. The loops run to kMax with a predicate so that v stays in registers on a GPU.
template <typename acc_t, int kMax>
FASTLOSS_HD Moments<acc_t> moments_of(const acc_t (&v)[kMax], int count) {
  const acc_t shift = sum_shift(v[0]);
  acc_t sum = 0, lo = v[0], hi = v[0];
FASTLOSS_UNROLL
  for (int k = 0; k < kMax; ++k) {
    if (k < count) {
      sum += v[k] - shift;
      lo = min_of(lo, v[k]);
      hi = max_of(hi, v[k]);
    }
  }
  const acc_t mean = shifted_mean(shift, sum, static_cast<acc_t>(count), lo, hi, [&](acc_t scale) {
    acc_t scaled = 0;
FASTLOSS_UNROLL
    for (int k = 0; k < kMax; ++k) {
      if (k < count) scaled += v[k] * scale;
    }
    return scaled;
  });
  Moments<acc_t> constant;
  if (constant_moments(static_cast<acc_t>(count), lo, hi, mean, constant)) return constant;
  const int e = spread_exponent(lo, hi);
  const acc_t inv_s = exp2_normal<acc_t>(-e);
  const acc_t neg_scaled_mean = -mean * inv_s;
  acc_t sq = 0, dev = 0;
FASTLOSS_UNROLL
  for (int k = 0; k < kMax; ++k) {
    if (k < count) {
      const acc_t d = scaled_deviation(v[k], inv_s, neg_scaled_mean);
      sq += d * d;
      dev += d;
    }
  }
  return corrected_moments(static_cast<acc_t>(count), mean, lo, hi, dev, sq, exp2_normal<acc_t>(e));
}

// Per-row threshold and the statistics the backward needs.
template <typename acc_t>
struct RowThreshold {
  acc_t mean;
  acc_t std;
  acc_t theta;
};

template <typename acc_t>
FASTLOSS_HD RowThreshold<acc_t> row_threshold(Moments<acc_t> m, acc_t z) {
  // Finite constant row: exact mean, std 0. (min/max may skip a NaN; the NaN mean does not.)
  if (finite_constant(m.lo, m.hi) && m.mean == m.mean) {
    m.mean = m.lo;
    m.mean_err = 0;
    m.m2 = 0;
  }
  // m2 >= 0 in exact arithmetic; the test only guards a -0 from rounding.
  const acc_t var = m.m2 > acc_t(0) ? m.m2 / m.n : acc_t(0);
  const acc_t sd = std::sqrt(var) * exp2_normal<acc_t>(spread_exponent(m.lo, m.hi));
  // A NaN anywhere in the row makes m2 NaN (the comparison above is false): keep it NaN.
  const acc_t std_v = m.m2 != m.m2 ? m.m2 : sd;
  return {m.mean + m.mean_err, std_v, m.mean + (std_v * z + m.mean_err)};
}

// relu(x - theta) that propagates NaN like torch.relu.
template <typename acc_t>
FASTLOSS_HD acc_t soft_threshold(acc_t x, acc_t theta) {
  const acc_t v = x - theta;
  return v > acc_t(0) ? v : (v != v ? v : acc_t(0));
}

// x * [x > theta], with x * 0 (NaN for NaN or inf x) below, like the eager formula.
template <typename acc_t>
FASTLOSS_HD acc_t hard_threshold(acc_t x, acc_t theta) {
  return x > theta ? x : x * acc_t(0);
}

template <typename acc_t>
FASTLOSS_HD acc_t apply_threshold(bool hard, acc_t x, acc_t theta) {
  return hard ? hard_threshold(x, theta) : soft_threshold(x, theta);
}

// The path through theta of one row's backward: with c the gradient reaching theta,
// c d theta / d x_i = a + b (x_i - mean) / std, added to each element's direct term.
// (x_i - mean) / std is taken as (x_i - mean) 2^-e / (std 2^-e), 2^e near std: 1 / std
// overflows below ~1e-38 in float32 and x_i - mean beyond the largest float, where the true
// term is finite. With no gradient reaching theta (hard mode or threshold_grad=False, and no
// gradient for a returned theta: c = 0) the term is left out rather than multiplied by 0, so a
// row's NaN mean (a NaN or inf entry) does not turn its direct gradients into NaN. Where the
// outputs do reach theta (`live`: soft mode or the gelu-mul with threshold_grad) the term
// stays, so such a row's gradient is NaN, as the eager formula's (it was 0).
// The saved mean is rounded to acc_t: off the row's true mean by up to half an ulp of |mean|,
// which sets every (x_i - mean) / std off by as much, ulp(mean) / std relative (float32 theta
// gradients of rows 1e4 + N(0, 1) were 1e-4 off). The chain rule through the mean inside the
// std subtracts the deviations' row mean, 0 for the exact mean, and with the saved mean just
// that rounding: so the backward sums the scaled deviations (dev_sum, `Deviation`'s units)
// and theta_grad takes their mean out of the term.
template <typename acc_t>
struct Deviation {
  acc_t inv_s;  // 2^-e, 2^e near std (1 where std is 0, inf or NaN)
  acc_t neg_scaled_mean;
  FASTLOSS_HD acc_t operator()(acc_t x) const { return scaled_deviation(x, inv_s, neg_scaled_mean); }
};

template <typename acc_t>
FASTLOSS_HD bool spread_std(acc_t std_v) { return std_v > acc_t(0) && std_v - std_v == acc_t(0); }

template <typename acc_t>
FASTLOSS_HD Deviation<acc_t> deviation_of(acc_t mean, acc_t std_v) {
  const acc_t inv_s = spread_std(std_v) ? exp2_normal<acc_t>(-exponent_above(std_v)) : acc_t(1);
  return {inv_s, -mean * inv_s};
}

// The row sums the path through theta needs, taken in one pass: the direct terms (their sum
// enters c where the outputs reach theta) and the scaled deviations (dev_sum).
template <typename acc_t>
struct ThetaSums {
  acc_t direct{}, dev{};
  FASTLOSS_HD ThetaSums& operator+=(const ThetaSums& o) {
    direct += o.direct;
    dev += o.dev;
    return *this;
  }
  FASTLOSS_HD ThetaSums operator+(const ThetaSums& o) const { return ThetaSums(*this) += o; }
};

template <typename acc_t>
struct ThetaGrad {
  bool active;
  acc_t a;
  acc_t b;  // c z / (n std 2^-e)
  Deviation<acc_t> dev;
  FASTLOSS_HD acc_t add(acc_t direct, acc_t x) const { return active ? direct + a + b * dev(x) : direct; }
};

// dev_sum: the row's sum of Deviation's scaled deviations (used where std is spread).
template <typename acc_t>
FASTLOSS_HD ThetaGrad<acc_t> theta_grad(acc_t c, acc_t n, acc_t mean, acc_t std_v, acc_t z, bool live,
                                        acc_t dev_sum) {
  const acc_t inv_n = acc_t(1) / n;
  const bool spread = spread_std(std_v);
  const Deviation<acc_t> dev = deviation_of(mean, std_v);
  const acc_t b = spread ? c * (z * inv_n) / (std_v * dev.inv_s) : (std_v > acc_t(0) ? c * acc_t(0) : acc_t(0));
  const acc_t a = spread ? c * inv_n - b * (dev_sum * inv_n) : c * inv_n;
  return {live || c != acc_t(0), a, b, dev};
}

// gelu with the tanh approximation, written as h * sigmoid(2u), u = sqrt(2/pi) (h + c h^3):
// 0.5 (1 + tanh(u)) = sigmoid(2u). Only called with h >= 0 (relu outputs), where exp(-2u)
// is in (0, 1]: it is built from an exp pair (vectorizable on the CPU, no libm call).
template <typename acc_t>
struct GeluTanh {
  static constexpr acc_t kSqrt2OverPi = acc_t(0.79788456080286535588);
  static constexpr acc_t kCubic = acc_t(0.044715);
};

// sigmoid(2u) = 1 / (1 + e), e = exp(-2u), with its complement 1 - sigmoid(2u) = e / (1 + e)
// taken as e s: past h ~ 1, s lies within 1e-3 of 1, and 1 - s formed by subtraction cancelled
// (the float32 gelu' was up to 1.3e-6 off at h in [3, 4), torch's 3.5e-7).
template <typename acc_t>
struct GeluSigmoid {
  acc_t s;           // sigmoid(2u)
  acc_t complement;  // 1 - s
};

template <typename acc_t>
FASTLOSS_HD GeluSigmoid<acc_t> gelu_tanh_sigmoid(acc_t h) {
  const acc_t u = GeluTanh<acc_t>::kSqrt2OverPi * (h + GeluTanh<acc_t>::kCubic * h * h * h);
  acc_t arg = acc_t(-2) * u;
  arg = arg < acc_t(-1000) ? acc_t(-1000) : arg;  // exp underflows to 0 well before
  const ExpPair<acc_t> p = exp_pair(arg);
  const acc_t e = p.mantissa * exp2_nonpositive(p.exponent);
  const acc_t s = acc_t(1) / (acc_t(1) + e);
  return {s, e * s};
}

template <typename acc_t>
FASTLOSS_HD acc_t gelu_tanh(acc_t h) {
  return h * gelu_tanh_sigmoid(h).s;
}

// d gelu_tanh / dh from the same sigmoid: s + h * 2 s (1 - s) du/dh. Past h = 8 the second
// term is below 1e-19 (1 - s < 6e-22), while for huge h, h^2 overflows and inf * (1 - s) = inf * 0
// would be NaN: it is evaluated at min(h, 8) (NaN stays NaN).
template <typename acc_t>
FASTLOSS_HD acc_t gelu_tanh_grad(acc_t h, GeluSigmoid<acc_t> sig) {
  const acc_t hc = h > acc_t(8) ? acc_t(8) : h;
  const acc_t du = GeluTanh<acc_t>::kSqrt2OverPi * (acc_t(1) + acc_t(3) * GeluTanh<acc_t>::kCubic * hc * hc);
  return sig.s + acc_t(2) * hc * sig.s * sig.complement * du;
}

}  // namespace fastloss
