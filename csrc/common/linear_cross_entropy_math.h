// Per-element and per-token math of cut cross-entropy (Wijmans et al., ICLR 2025), shared by
// the CPU and CUDA implementations so both compute the same values.
//
//   z = softcap(e . c + b),  softcap(x) = s tanh(x / s)  (s = 0: no cap)
//   loss = lse + z_loss lse^2 - (1 - ls) z_target - (ls / V) sum_j z_j   (ls: label smoothing)
//   d loss / d z_j = (1 + 2 z_loss lse) p_j - (1 - ls) [j = target] - ls / V,  p = softmax(z)
#pragma once

#include <cmath>
#include <limits>

#include "common/macros.h"
#include "common/softmax_math.h"

namespace fastloss {

// exp(v) for v <= 0 (the argument is a logit minus an upper bound of the logits): the
// vectorizable two-pass-softmax exponential; very negative v gives 0.
template <typename acc_t>
FASTLOSS_HD acc_t exp_nonpositive(acc_t v) {
  const ExpPair<acc_t> p = exp_pair(fl_max(low_clamp<acc_t>(), v));
  return p.mantissa * exp2_nonpositive(p.exponent);
}

// tanh without a libm call, so that the softcap loops vectorize (float: within a few ulp).
// |y| < 1/4: odd Taylor series to y^11 (next term < 2^-30 relative); otherwise
// (1 - e) / (1 + e) with e = exp(-2|y|) <= 0.61, so the subtraction loses at most ~2 bits.
// double keeps the library tanh (float64 is the reference precision).
FASTLOSS_HD float tanh_softcap(float y) {
  const float a = y < 0 ? -y : y;
  const float y2 = y * y;
  const float series =
      y * (1.0f + y2 * (-1.0f / 3 + y2 * (2.0f / 15 + y2 * (-17.0f / 315 + y2 * (62.0f / 2835 + y2 * (-1382.0f / 155925))))));
  const float e = exp_nonpositive(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  return a < 0.25f ? series : (y < 0 ? -big : big);
}
FASTLOSS_HD double tanh_softcap(double y) { return fl_tanh(y); }

// A running log-sum-exp: sum * exp(max). Blocks of the vocabulary merge in any order.
template <typename acc_t>
struct OnlineLse {
  acc_t max;
  acc_t sum;

  // The block's maximum and its sum of exp(z - block_max).
  FASTLOSS_HD void merge(acc_t block_max, acc_t block_sum) {
    // A block of -inf logits only (masked vocabulary entries) adds nothing; its sum, formed
    // with z - block_max = -inf - -inf, would be NaN.
    if (block_max == -std::numeric_limits<acc_t>::infinity()) return;
    if (block_max > max) {
      sum = sum * fl_exp(max - block_max) + block_sum;  // exp(-inf) = 0 for the empty state
      max = block_max;
    } else {
      sum += block_sum * fl_exp(block_max - max);
    }
  }
  FASTLOSS_HD acc_t log_sum() const { return fl_log(sum); }
  FASTLOSS_HD acc_t value() const { return max + log_sum(); }
};

// Coefficients of one token's logit gradient: d z_j = a p_j - b [j = target] - c, and the
// filter threshold (entries below it in a whole tile are skipped).
template <typename acc_t>
struct TokenGrad {
  acc_t a;
  acc_t b;
  acc_t c;
  acc_t threshold;
};

// grad_loss and grad_lse: the output gradients of this token's loss and LSE.
template <typename acc_t>
FASTLOSS_HD TokenGrad<acc_t> token_grad(acc_t grad_loss, acc_t grad_lse, acc_t lse, acc_t label_smoothing,
                                        acc_t z_loss, acc_t inv_vocab, acc_t filter_eps) {
  TokenGrad<acc_t> t;
  t.a = grad_loss * (acc_t(1) + acc_t(2) * z_loss * lse) + grad_lse;
  t.b = grad_loss * (acc_t(1) - label_smoothing);
  // Without smoothing c is 0, not grad_loss * 0: an infinite output gradient would make it NaN
  // and spread NaN over the token's whole row of d classifier (torch's is inf there).
  t.c = label_smoothing == acc_t(0) ? acc_t(0) : grad_loss * label_smoothing * inv_vocab;
  // Relative to the token's own gradient scale: plain cross-entropy skips p_j < filter_eps.
  // With label smoothing every entry carries -c: each is below any useful threshold, their
  // sum is not, so nothing is skipped (threshold 0).
  t.threshold = label_smoothing == acc_t(0) ? filter_eps * fl_max(t.a < 0 ? -t.a : t.a, t.b < 0 ? -t.b : t.b)
                                            : acc_t(0);
  return t;
}

// The per-token loss from the merged statistics.
template <typename acc_t>
FASTLOSS_HD acc_t token_loss(acc_t lse, acc_t linear, acc_t z_loss) {
  return lse + z_loss * lse * lse + linear;
}

// The same from the LSE's parts, max + log_sum (lse: their rounded sum): (max + linear) +
// log_sum, as eager's (z - max) - log(sum) does. lse + linear would carry the rounding of lse,
// up to |lse| x 2^-24 in float32, into a loss that may be much smaller than |lse|. With label
// smoothing, linear's float32 sum of the logits has errors of that size already (neither form
// is better), and an infinite or NaN lse keeps token_loss's special values: both as before.
template <typename acc_t>
FASTLOSS_HD acc_t token_loss(acc_t max, acc_t log_sum, acc_t lse, acc_t linear, acc_t z_loss,
                             acc_t label_smoothing) {
  const acc_t finite_bound = std::numeric_limits<acc_t>::max();
  if (label_smoothing != acc_t(0) || !(lse >= -finite_bound && lse <= finite_bound)) {
    return token_loss(lse, linear, z_loss);
  }
  return (max + linear) + log_sum + z_loss * lse * lse;
}

// The non-LSE part of the loss: -(1 - ls) z_target - (ls / V) sum_j z_j. Without smoothing the
// sum is left out, not multiplied by 0: a logit of -inf (a masked vocabulary entry) makes it
// -inf, and 0 * -inf would be NaN where torch's loss is finite.
template <typename acc_t>
FASTLOSS_HD acc_t token_linear(acc_t target_logit, acc_t logit_sum, acc_t label_smoothing, acc_t inv_vocab) {
  const acc_t linear = -(acc_t(1) - label_smoothing) * target_logit;
  return label_smoothing == acc_t(0) ? linear : linear - label_smoothing * inv_vocab * logit_sum;
}

}  // namespace fastloss
