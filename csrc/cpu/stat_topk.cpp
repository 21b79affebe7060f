// Statistical top-k masking on the CPU (Spark Transformer, arXiv 2506.06644; Gemma 3n).
//
// Per row: theta = mean + std * PhiInv(sparsity); soft y = relu(x - theta), hard
// y = x * [x > theta]; the fused Gemma 3n activation gelu_tanh(relu(gate - theta)) * up.
// Rows along the last dimension are read in chunks of kChunk elements: each chunk's mean and
// squared deviations are taken in two sweeps while it is in L1, and chunks merge with
// Chan's formula, so memory sees one read for the statistics and one read + one write for
// the output (the row is usually still in L2). Rows along other dimensions are processed
// kLanes columns at a time, each load contiguous across the lanes. Parallel over rows with
// at::parallel_for; accumulation in float (double for double). Backward: one sweep for
// sum(g * mask), one for dx.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/softmax_math.h"
#include "common/stat_topk_math.h"
#include "common/stat_topk_op.h"
#include "cpu/alloc.h"
#include "cpu/backward_in_place.h"
#include "cpu/convert.h"
#include "cpu/isa.h"
#include "cpu/rows.h"

namespace fastloss::cpu {
namespace {

constexpr int kLanes = 64;  // four AVX-512 accumulators of float: breaks the add latency chains
constexpr int64_t kChunk = 2048;

template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t sum_lanes(const acc_t* a) {
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += a[l];
  return s;
}

// The sum of term(i) over i in [0, n) in kSumBlock's three levels, per lane; term is called
// once per i, in order within each lane.
template <typename acc_t, typename Term>
FASTLOSS_CPU_INLINE acc_t row_sum(int64_t n, Term&& term) {
  LevelSum<acc_t> sums[kLanes];
  const int64_t full = n - n % kLanes;
  for (int64_t b0 = 0; b0 < full; b0 += kSumBlock * kLanes) {
    acc_t block[kLanes] = {};
    const int64_t b1 = std::min(full, b0 + kSumBlock * kLanes);
    for (int64_t i = b0; i < b1; i += kLanes)
      for (int l = 0; l < kLanes; ++l) block[l] += term(i + l);
    for (int l = 0; l < kLanes; ++l) sums[l].add_block(block[l]);
  }
  acc_t total[kLanes];
  for (int l = 0; l < kLanes; ++l) total[l] = sums[l].result();
  acc_t s = sum_lanes(total);
  for (int64_t i = full; i < n; ++i) s += term(i);
  return s;
}

template <typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE Moments<acc_t> chunk_moments(const in_t* x, int64_t c) {
  acc_t lanes[kLanes] = {}, lo[kLanes], hi[kLanes];
  for (int l = 0; l < kLanes; ++l) lo[l] = hi[l] = to_acc<acc_t>(x[0]);
  const acc_t shift = sum_shift(to_acc<acc_t>(x[0]));
  int64_t i = 0;
  for (; i + kLanes <= c; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = to_acc<acc_t>(x[i + l]);
      lanes[l] += v - shift;
      lo[l] = min_of(lo[l], v);
      hi[l] = max_of(hi[l], v);
    }
  acc_t sum = sum_lanes(lanes), row_lo = lo[0], row_hi = hi[0];
  for (int l = 1; l < kLanes; ++l) {
    row_lo = min_of(row_lo, lo[l]);
    row_hi = max_of(row_hi, hi[l]);
  }
  for (; i < c; ++i) {
    const acc_t v = to_acc<acc_t>(x[i]);
    sum += v - shift;
    row_lo = min_of(row_lo, v);
    row_hi = max_of(row_hi, v);
  }
  const acc_t mean = shifted_mean(shift, sum, static_cast<acc_t>(c), row_lo, row_hi, [&](acc_t scale) {
    acc_t scaled = 0;
    for (int64_t j = 0; j < c; ++j) scaled += to_acc<acc_t>(x[j]) * scale;
    return scaled;
  });
  Moments<acc_t> constant;
  if (constant_moments(static_cast<acc_t>(c), row_lo, row_hi, mean, constant)) return constant;
  const int e = spread_exponent(row_lo, row_hi);  // m2's unit (Moments)
  const acc_t inv_s = exp2_normal<acc_t>(-e);
  const acc_t neg_scaled_mean = -mean * inv_s;
  acc_t sq[kLanes] = {}, dev[kLanes] = {};
  for (i = 0; i + kLanes <= c; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = scaled_deviation(to_acc<acc_t>(x[i + l]), inv_s, neg_scaled_mean);
      sq[l] += d * d;
      dev[l] += d;
    }
  acc_t sq_sum = sum_lanes(sq), dev_sum = sum_lanes(dev);
  for (; i < c; ++i) {
    const acc_t d = scaled_deviation(to_acc<acc_t>(x[i]), inv_s, neg_scaled_mean);
    sq_sum += d * d;
    dev_sum += d;
  }
  return corrected_moments(static_cast<acc_t>(c), mean, row_lo, row_hi, dev_sum, sq_sum, exp2_normal<acc_t>(e));
}

template <typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE RowThreshold<acc_t> row_stats(const in_t* x, int64_t n, acc_t z) {
  GroupedMoments<acc_t> m;
  for (int64_t i = 0; i < n; i += kChunk) m.add(chunk_moments<in_t, acc_t>(x + i, std::min(kChunk, n - i)));
  return row_threshold(m.result(), z);
}

template <typename acc_t>
FASTLOSS_CPU_INLINE void store_stats(const RowThreshold<acc_t>& t, acc_t* mean, acc_t* std_out, acc_t* theta) {
  *mean = t.mean;
  *std_out = t.std;
  *theta = t.theta;
}

template <bool kHard, typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE void threshold_row(const in_t* x, in_t* y, int64_t n, acc_t theta) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = to_output<in_t>(kHard ? hard_threshold(to_acc<acc_t>(x[i]), theta)
                                   : soft_threshold(to_acc<acc_t>(x[i]), theta));
}

// float16 rows, staged through float (convert.h): defined below the float entry points that
// they call. Rows past kMaxStagedRow used to convert element by element in the kernels (GCC
// 12 converts float16 one at a time); staged, 64 x 65536 on 2 threads (medians of 3 runs)
// went from 1.02 to 0.76 ms forward, 10.8 to 2.0 ms forward+backward, and 10.3 to 6.1 ms for
// the gelu-mul's forward+backward.
using c10::Half;
// Longer rows convert entry by entry in the kernels rather than stage whole: the staged
// buffers take 4 bytes per entry for each input and output of every thread (a float16 row of
// 2^26 entries needed 4-12x its own bytes more; now nothing). Measured at 4 x 2^20, 2 threads:
// forwards 0.8x the staged time, forward+backward 1.75x (stat_topk) and 1.08x (gelu-mul).
constexpr int64_t kMaxHalfStagedRow = int64_t(1) << 20;
void forward_half_staged(const Half* x, Half* y, float* mean, float* sd, float* theta, int64_t b, int64_t e,
                         int64_t n, float z, bool hard);
void backward_half_staged(const Half* g, const Half* x, const float* theta, const float* mean, const float* sd,
                          const float* gtheta, Half* dx, int64_t b, int64_t e, int64_t n, float z, bool hard,
                          bool threshold_grad);
void gelu_mul_forward_half_staged(const Half* gate, const Half* up, Half* out, float* theta, float* mean,
                                  float* sd, int64_t b, int64_t e, int64_t n, float z);
void gelu_mul_backward_half_staged(const Half* g, const Half* gate, const Half* up, const float* theta,
                                   const float* mean, const float* sd, Half* dgate, Half* dup, float* scratch,
                                   int64_t b, int64_t e, int64_t n, float z, bool threshold_grad);

template <typename in_t>
FASTLOSS_CPU_INLINE void forward_lastdim(const in_t* x, in_t* y, typename AccType<in_t>::type* mean,
                                         typename AccType<in_t>::type* std_out,
                                         typename AccType<in_t>::type* theta, int64_t b, int64_t e,
                                         int64_t n, typename AccType<in_t>::type z, bool hard) {
  if constexpr (std::is_same_v<in_t, Half>) {
    if (n <= kMaxHalfStagedRow) return forward_half_staged(x, y, mean, std_out, theta, b, e, n, z, hard);
  }
  using acc_t = typename AccType<in_t>::type;
  for (int64_t r = b; r < e; ++r) {
    const RowThreshold<acc_t> t = row_stats<in_t, acc_t>(x + r * n, n, z);
    store_stats(t, mean + r, std_out + r, theta + r);
    if (hard) threshold_row<true>(x + r * n, y + r * n, n, t.theta);
    else threshold_row<false>(x + r * n, y + r * n, n, t.theta);
  }
}

// `count` <= kLanes columns of one (size, inner) block; x points at its first column and the
// statistics at that column's entry of the (outer, inner) statistics. The statistics come
// from chunks of kStridedChunk entries along the reduced dimension (two sweeps each, in
// cache) merged with Chan's formula, as on the last-dim path: one float accumulator over a
// whole column lost digits as columns grew (theta off by 2.9e-4 relative at 1e6 entries).
constexpr int64_t kStridedChunk = 256;

template <typename in_t>
FASTLOSS_CPU_INLINE void forward_strided(const in_t* x, in_t* y, typename AccType<in_t>::type* mean,
                                         typename AccType<in_t>::type* std_out,
                                         typename AccType<in_t>::type* theta, int64_t n,
                                         int64_t inner, int count, typename AccType<in_t>::type z,
                                         bool hard) {
  using acc_t = typename AccType<in_t>::type;
  GroupedMoments<acc_t> row[kLanes];
  for (int64_t i0 = 0; i0 < n; i0 += kStridedChunk) {
    const int64_t i1 = std::min(n, i0 + kStridedChunk);
    const acc_t c = static_cast<acc_t>(i1 - i0);
    acc_t sum[kLanes] = {}, sq[kLanes] = {}, dev[kLanes] = {}, lo[kLanes], hi[kLanes], chunk_mean[kLanes],
          unit[kLanes], inv_s[kLanes], neg_scaled_mean[kLanes];
    acc_t shift[kLanes];
    for (int l = 0; l < count; ++l) {
      lo[l] = hi[l] = to_acc<acc_t>(x[i0 * inner + l]);
      shift[l] = sum_shift(lo[l]);
    }
    for (int64_t i = i0; i < i1; ++i)
      for (int l = 0; l < count; ++l) {
        const acc_t v = to_acc<acc_t>(x[i * inner + l]);
        sum[l] += v - shift[l];
        lo[l] = min_of(lo[l], v);
        hi[l] = max_of(hi[l], v);
      }
    for (int l = 0; l < count; ++l) {
      chunk_mean[l] = shifted_mean(shift[l], sum[l], c, lo[l], hi[l], [&](acc_t scale) {
        acc_t scaled = 0;
        for (int64_t i = i0; i < i1; ++i) scaled += to_acc<acc_t>(x[i * inner + l]) * scale;
        return scaled;
      });
      const int e = spread_exponent(lo[l], hi[l]);  // m2's unit (Moments)
      unit[l] = exp2_normal<acc_t>(e);
      inv_s[l] = exp2_normal<acc_t>(-e);
      neg_scaled_mean[l] = -chunk_mean[l] * inv_s[l];
    }
    for (int64_t i = i0; i < i1; ++i)
      for (int l = 0; l < count; ++l) {
        const acc_t d = scaled_deviation(to_acc<acc_t>(x[i * inner + l]), inv_s[l], neg_scaled_mean[l]);
        sq[l] += d * d;
        dev[l] += d;
      }
    for (int l = 0; l < count; ++l) {
      Moments<acc_t> part = corrected_moments(c, chunk_mean[l], lo[l], hi[l], dev[l], sq[l], unit[l]);
      constant_moments(c, lo[l], hi[l], chunk_mean[l], part);
      row[l].add(part);
    }
  }
  acc_t th[kLanes];
  for (int l = 0; l < count; ++l) {
    const RowThreshold<acc_t> t = row_threshold(row[l].result(), z);
    store_stats(t, mean + l, std_out + l, theta + l);
    th[l] = t.theta;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int l = 0; l < count; ++l) {
      const acc_t v = to_acc<acc_t>(x[i * inner + l]);
      y[i * inner + l] = to_output<in_t>(apply_threshold(hard, v, th[l]));
    }
}

// The row's sum of scaled deviations from its saved mean (theta_grad's dev_sum).
template <typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE acc_t deviation_sum(const in_t* x, int64_t n, acc_t mean, acc_t std_v) {
  const Deviation<acc_t> dev = deviation_of(mean, std_v);
  return row_sum<acc_t>(n, [&](int64_t i) { return dev(to_acc<acc_t>(x[i])); });
}

// dx_i = g_i [x_i > theta] + c (a + b (x_i - mean)), c = grad_theta - (soft and
// threshold_grad ? sum_j g_j [x_j > theta] : 0).
template <typename in_t>
FASTLOSS_CPU_INLINE void backward_lastdim(const in_t* g, const in_t* x,
                                          const typename AccType<in_t>::type* theta_in,
                                          const typename AccType<in_t>::type* mean,
                                          const typename AccType<in_t>::type* std_in,
                                          const typename AccType<in_t>::type* grad_theta, in_t* dx,
                                          int64_t b, int64_t e, int64_t n,
                                          typename AccType<in_t>::type z, bool hard, bool threshold_grad) {
  if constexpr (std::is_same_v<in_t, Half>) {
    if (n <= kMaxHalfStagedRow)
      return backward_half_staged(g, x, theta_in, mean, std_in, grad_theta, dx, b, e, n, z, hard, threshold_grad);
  }
  using acc_t = typename AccType<in_t>::type;
  for (int64_t r = b; r < e; ++r) {
    const in_t* gr = g + r * n;
    const in_t* xr = x + r * n;
    const acc_t theta = theta_in[r];
    acc_t c = grad_theta ? grad_theta[r] : acc_t(0);
    const bool live = !hard && threshold_grad;
    if (live) {
      c -= row_sum<acc_t>(n, [&](int64_t i) { return keep_or_zero(to_acc<acc_t>(xr[i]) > theta, to_acc<acc_t>(gr[i])); });
    }
    const acc_t dev_sum = live || c != acc_t(0) ? deviation_sum(xr, n, mean[r], std_in[r]) : acc_t(0);
    const ThetaGrad<acc_t> tg = theta_grad(c, static_cast<acc_t>(n), mean[r], std_in[r], z, live, dev_sum);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xv = to_acc<acc_t>(xr[i]);
      dx[r * n + i] = to_output<in_t>(tg.add(keep_or_zero(xv > theta, to_acc<acc_t>(gr[i])), xv));
    }
  }
}

template <typename in_t>
FASTLOSS_CPU_INLINE void backward_strided(const in_t* g, const in_t* x,
                                          const typename AccType<in_t>::type* theta_in,
                                          const typename AccType<in_t>::type* mean,
                                          const typename AccType<in_t>::type* std_in,
                                          const typename AccType<in_t>::type* grad_theta, in_t* dx,
                                          int64_t n, int64_t inner, int count,
                                          typename AccType<in_t>::type z, bool hard, bool threshold_grad) {
  using acc_t = typename AccType<in_t>::type;
  // Per column, in kSumBlock's three levels (blocks of kSumBlock rows): the direct terms (live)
  // and the scaled deviations (wherever a gradient reaches theta).
  const bool live = !hard && threshold_grad;
  bool reaches_theta = live;
  Deviation<acc_t> dev[kLanes];
  for (int l = 0; l < count; ++l) {
    dev[l] = deviation_of(mean[l], std_in[l]);
    reaches_theta = reaches_theta || (grad_theta && grad_theta[l] != acc_t(0));
  }
  LevelSum<acc_t> sums[kLanes], dev_sums[kLanes];
  if (reaches_theta) {
    for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
      acc_t block[kLanes] = {}, dev_block[kLanes] = {};
      const int64_t b1 = std::min(n, b0 + kSumBlock);
      for (int64_t i = b0; i < b1; ++i)
        for (int l = 0; l < count; ++l) {
          const acc_t xv = to_acc<acc_t>(x[i * inner + l]);
          if (live) block[l] += keep_or_zero(xv > theta_in[l], to_acc<acc_t>(g[i * inner + l]));
          dev_block[l] += dev[l](xv);
        }
      for (int l = 0; l < count; ++l) {
        sums[l].add_block(block[l]);
        dev_sums[l].add_block(dev_block[l]);
      }
    }
  }
  ThetaGrad<acc_t> tg[kLanes];
  for (int l = 0; l < count; ++l) {
    const acc_t c = (grad_theta ? grad_theta[l] : acc_t(0)) - sums[l].result();
    tg[l] = theta_grad(c, static_cast<acc_t>(n), mean[l], std_in[l], z, live, dev_sums[l].result());
  }
  for (int64_t i = 0; i < n; ++i)
    for (int l = 0; l < count; ++l) {
      const acc_t xv = to_acc<acc_t>(x[i * inner + l]);
      dx[i * inner + l] = to_output<in_t>(tg[l].add(keep_or_zero(xv > theta_in[l], to_acc<acc_t>(g[i * inner + l])), xv));
    }
}

// out = gelu_tanh(relu(gate - theta)) * up, theta from gate's row.
template <typename in_t>
FASTLOSS_CPU_INLINE void gelu_mul_forward_rows(const in_t* gate, const in_t* up, in_t* out,
                                               typename AccType<in_t>::type* theta,
                                               typename AccType<in_t>::type* mean,
                                               typename AccType<in_t>::type* std_out, int64_t b,
                                               int64_t e, int64_t n, typename AccType<in_t>::type z) {
  if constexpr (std::is_same_v<in_t, Half>) {
    if (n <= kMaxHalfStagedRow) return gelu_mul_forward_half_staged(gate, up, out, theta, mean, std_out, b, e, n, z);
  }
  using acc_t = typename AccType<in_t>::type;
  for (int64_t r = b; r < e; ++r) {
    const RowThreshold<acc_t> t = row_stats<in_t, acc_t>(gate + r * n, n, z);
    store_stats(t, mean + r, std_out + r, theta + r);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t h = soft_threshold(to_acc<acc_t>(gate[r * n + i]), t.theta);
      out[r * n + i] = to_output<in_t>(gelu_tanh(h) * to_acc<acc_t>(up[r * n + i]));
    }
  }
}

// One element of the gelu-mul backward's first sweep: writes d up, keeps dh, returns dh.
template <typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE acc_t gelu_mul_grad_element(const in_t* g, const in_t* gate, const in_t* up, in_t* dup,
                                                acc_t* scratch, int64_t k, acc_t theta) {
  const acc_t xv = to_acc<acc_t>(gate[k]);
  const acc_t h = soft_threshold(xv, theta);
  const GeluSigmoid<acc_t> sig = gelu_tanh_sigmoid(h);
  const acc_t gv = to_acc<acc_t>(g[k]);
  dup[k] = to_output<in_t>(gv * h * sig.s);
  const acc_t dh = keep_or_zero(xv > theta, gv * to_acc<acc_t>(up[k]) * gelu_tanh_grad(h, sig));
  scratch[k] = dh;
  return dh;
}

// d up = g gelu(h); dh = g up gelu'(h) [gate > theta]; d gate = dh - (threshold_grad ?
// sum(dh) : 0) (a + b (gate - mean)). dh is kept in `scratch` (n values) between the sweeps.
template <typename in_t>
FASTLOSS_CPU_INLINE void gelu_mul_backward_rows(const in_t* g, const in_t* gate, const in_t* up,
                                                const typename AccType<in_t>::type* theta_in,
                                                const typename AccType<in_t>::type* mean,
                                                const typename AccType<in_t>::type* std_in,
                                                in_t* dgate, in_t* dup, typename AccType<in_t>::type* scratch,
                                                int64_t b, int64_t e, int64_t n,
                                                typename AccType<in_t>::type z, bool threshold_grad) {
  if constexpr (std::is_same_v<in_t, Half>) {
    if (n <= kMaxHalfStagedRow)
      return gelu_mul_backward_half_staged(g, gate, up, theta_in, mean, std_in, dgate, dup, scratch, b, e, n, z,
                                           threshold_grad);
  }
  using acc_t = typename AccType<in_t>::type;
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * n;
    const acc_t theta = theta_in[r];
    const acc_t sum = row_sum<acc_t>(
        n, [&](int64_t i) { return gelu_mul_grad_element(g + o, gate + o, up + o, dup + o, scratch, i, theta); });
    const acc_t dev_sum = threshold_grad ? deviation_sum(gate + o, n, mean[r], std_in[r]) : acc_t(0);
    const ThetaGrad<acc_t> tg = theta_grad(threshold_grad ? -sum : acc_t(0), static_cast<acc_t>(n), mean[r],
                                           std_in[r], z, threshold_grad, dev_sum);
    for (int64_t i = 0; i < n; ++i) dgate[o + i] = to_output<in_t>(tg.add(scratch[i], to_acc<acc_t>(gate[o + i])));
  }
}

// Non-template entry points, each compiled once per instruction set.
#define FASTLOSS_STAT_TOPK_ENTRIES(SUFFIX, T)                                                        \
  using acc_##SUFFIX = AccType<T>::type;                                                             \
  FASTLOSS_CPU_CLONES void forward_lastdim_##SUFFIX(const T* x, T* y, acc_##SUFFIX* mean,            \
                                                    acc_##SUFFIX* sd, acc_##SUFFIX* theta, int64_t b, \
                                                    int64_t e, int64_t n, acc_##SUFFIX z, bool hard) { \
    forward_lastdim<T>(x, y, mean, sd, theta, b, e, n, z, hard);                                     \
  }                                                                                                  \
  FASTLOSS_CPU_CLONES void forward_strided_##SUFFIX(const T* x, T* y, acc_##SUFFIX* mean,            \
                                                    acc_##SUFFIX* sd, acc_##SUFFIX* theta, int64_t n, \
                                                    int64_t inner, int count, acc_##SUFFIX z, bool hard) { \
    forward_strided<T>(x, y, mean, sd, theta, n, inner, count, z, hard);                             \
  }                                                                                                  \
  FASTLOSS_CPU_CLONES void backward_lastdim_##SUFFIX(                                                \
      const T* g, const T* x, const acc_##SUFFIX* theta, const acc_##SUFFIX* mean,                   \
      const acc_##SUFFIX* sd, const acc_##SUFFIX* gtheta, T* dx, int64_t b, int64_t e, int64_t n,    \
      acc_##SUFFIX z, bool hard, bool tg) {                                                          \
    backward_lastdim<T>(g, x, theta, mean, sd, gtheta, dx, b, e, n, z, hard, tg);                    \
  }                                                                                                  \
  FASTLOSS_CPU_CLONES void backward_strided_##SUFFIX(                                                \
      const T* g, const T* x, const acc_##SUFFIX* theta, const acc_##SUFFIX* mean,                   \
      const acc_##SUFFIX* sd, const acc_##SUFFIX* gtheta, T* dx, int64_t n, int64_t inner, int count, \
      acc_##SUFFIX z, bool hard, bool tg) {                                                          \
    backward_strided<T>(g, x, theta, mean, sd, gtheta, dx, n, inner, count, z, hard, tg);            \
  }                                                                                                  \
  FASTLOSS_CPU_CLONES void gelu_mul_forward_##SUFFIX(const T* gate, const T* up, T* out,             \
                                                     acc_##SUFFIX* theta, acc_##SUFFIX* mean,        \
                                                     acc_##SUFFIX* sd, int64_t b, int64_t e,         \
                                                     int64_t n, acc_##SUFFIX z) {                    \
    gelu_mul_forward_rows<T>(gate, up, out, theta, mean, sd, b, e, n, z);                            \
  }                                                                                                  \
  FASTLOSS_CPU_CLONES void gelu_mul_backward_##SUFFIX(                                               \
      const T* g, const T* gate, const T* up, const acc_##SUFFIX* theta, const acc_##SUFFIX* mean,   \
      const acc_##SUFFIX* sd, T* dgate, T* dup, acc_##SUFFIX* scratch, int64_t b, int64_t e,         \
      int64_t n, acc_##SUFFIX z, bool tg) {                                                          \
    gelu_mul_backward_rows<T>(g, gate, up, theta, mean, sd, dgate, dup, scratch, b, e, n, z, tg);    \
  }

FASTLOSS_STAT_TOPK_ENTRIES(f32, float)
FASTLOSS_STAT_TOPK_ENTRIES(f64, double)
FASTLOSS_STAT_TOPK_ENTRIES(f16, c10::Half)
FASTLOSS_STAT_TOPK_ENTRIES(bf16, c10::BFloat16)
#undef FASTLOSS_STAT_TOPK_ENTRIES

// float16 rows staged through float: blocks of rows are converted with the hardware
// instructions, run through the float kernels, and the outputs converted back (one rounding
// to float16, as in the direct kernels). Per-row statistics stay float.
void forward_half_staged(const Half* x, Half* y, float* mean, float* sd, float* theta, int64_t b, int64_t e,
                         int64_t n, float z, bool hard) {
  staged_float_rows<Half, 1, 1>(b, e, n, {x}, {y}, [&](int64_t r, int64_t rows, const auto& in, const auto& out) {
    forward_lastdim_f32(in[0], out[0], mean + r, sd + r, theta + r, 0, rows, n, z, hard);
  });
}

void backward_half_staged(const Half* g, const Half* x, const float* theta, const float* mean, const float* sd,
                          const float* gtheta, Half* dx, int64_t b, int64_t e, int64_t n, float z, bool hard,
                          bool threshold_grad) {
  staged_float_rows<Half, 2, 1>(b, e, n, {g, x}, {dx}, [&](int64_t r, int64_t rows, const auto& in, const auto& out) {
    backward_lastdim_f32(in[0], in[1], theta + r, mean + r, sd + r, gtheta ? gtheta + r : nullptr, out[0], 0, rows,
                         n, z, hard, threshold_grad);
  });
}

void gelu_mul_forward_half_staged(const Half* gate, const Half* up, Half* out, float* theta, float* mean,
                                  float* sd, int64_t b, int64_t e, int64_t n, float z) {
  staged_float_rows<Half, 2, 1>(b, e, n, {gate, up}, {out}, [&](int64_t r, int64_t rows, const auto& in, const auto& o) {
    gelu_mul_forward_f32(in[0], in[1], o[0], theta + r, mean + r, sd + r, 0, rows, n, z);
  });
}

void gelu_mul_backward_half_staged(const Half* g, const Half* gate, const Half* up, const float* theta,
                                   const float* mean, const float* sd, Half* dgate, Half* dup, float* scratch,
                                   int64_t b, int64_t e, int64_t n, float z, bool threshold_grad) {
  staged_float_rows<Half, 3, 2>(b, e, n, {g, gate, up}, {dgate, dup},
                         [&](int64_t r, int64_t rows, const auto& in, const auto& out) {
                           gelu_mul_backward_f32(in[0], in[1], in[2], theta + r, mean + r, sd + r, out[0], out[1],
                                                 scratch, 0, rows, n, z, threshold_grad);
                         });
}

// Runs CASE(SUFFIX, T) for the tensor dtype (checked to be one of the four before).
#define FASTLOSS_STAT_TOPK_DISPATCH(DTYPE, CASE)  \
  switch (DTYPE) {                                \
    case c10::kFloat: CASE(f32, float); break;    \
    case c10::kDouble: CASE(f64, double); break;  \
    case c10::kHalf: CASE(f16, c10::Half); break; \
    default: CASE(bf16, c10::BFloat16); break;    \
  }

StatTopKResult stat_topk(const at::Tensor& input, int64_t dim, double sparsity, bool hard,
                         bool /*threshold_grad: autograd only*/, int64_t k) {
  const char* op = "stat_topk";
  TORCH_CHECK(input.device().is_cpu(), "fastloss.", op, ": expected 'x' on the CPU");
  const StatTopKArgs args = stat_topk_forward_args(op, "x", input, dim, sparsity, k);
  StatTopKResult result = stat_topk_outputs(input, args);
  auto& [y, theta, mean, sd] = result;
  const RowLayout& l = args.layout;
  if (y.numel() == 0) return result;
  const at::Tensor x = input.contiguous();
#define FASTLOSS_CASE(SUFFIX, T)                                                                         \
  {                                                                                                      \
    using acc_t = AccType<T>::type;                                                                      \
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());                                        \
    T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());                                                  \
    acc_t* mp = mean.mutable_data_ptr<acc_t>();                                                          \
    acc_t* sp = sd.mutable_data_ptr<acc_t>();                                                            \
    acc_t* tp = theta.mutable_data_ptr<acc_t>();                                                         \
    const acc_t z = static_cast<acc_t>(args.z);                                                          \
    const WritePrefault prefault({y}, l.outer);                                                          \
    for_each_row_block(                                                                                  \
        l,                                                                                               \
        [&](int64_t b, int64_t e) {                                                                      \
          prefault.rows(b, e, [&](int64_t cb, int64_t ce) {                                              \
            forward_lastdim_##SUFFIX(xp, yp, mp, sp, tp, cb, ce, l.size, z, hard);                       \
          });                                                                                            \
        },                                                                                               \
        [&](int64_t o, int64_t j, int count) {                                                           \
          const int64_t off = o * l.size * l.inner + j, s = o * l.inner + j;                             \
          forward_strided_##SUFFIX(xp + off, yp + off, mp + s, sp + s, tp + s, l.size, l.inner, count, z, hard); \
        },                                                                                               \
        kLanes);                                                                                         \
  }
  FASTLOSS_STAT_TOPK_DISPATCH(input.scalar_type(), FASTLOSS_CASE)
#undef FASTLOSS_CASE
  return result;
}

// dx into `dx` (a fresh tensor, or grad_y itself: each entry is read before it is written).
void stat_topk_backward_into(const at::Tensor& dx, const at::Tensor& grad_y,
                             const c10::optional<at::Tensor>& grad_theta, const at::Tensor& input,
                             const at::Tensor& theta_in, const at::Tensor& mean_in, const at::Tensor& std_in,
                             const StatTopKArgs& args, bool hard, bool threshold_grad) {
  const RowLayout& l = args.layout;
  const at::Tensor x = input.contiguous(), g = grad_y.contiguous();
  const at::Tensor theta = theta_in.contiguous(), mean = mean_in.contiguous(), sd = std_in.contiguous();
  const bool has_gt = is_given(grad_theta);
  const at::Tensor gt = has_gt ? grad_theta->contiguous() : at::Tensor();
#define FASTLOSS_CASE(SUFFIX, T)                                                                         \
  {                                                                                                      \
    using acc_t = AccType<T>::type;                                                                      \
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());                                        \
    const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());                                        \
    T* dp = reinterpret_cast<T*>(dx.mutable_data_ptr());                                                 \
    const acc_t* thp = theta.const_data_ptr<acc_t>();                                                    \
    const acc_t* mp = mean.const_data_ptr<acc_t>();                                                      \
    const acc_t* sp = sd.const_data_ptr<acc_t>();                                                        \
    const acc_t* tp = has_gt ? gt.const_data_ptr<acc_t>() : nullptr;                                     \
    const acc_t z = static_cast<acc_t>(args.z);                                                          \
    const WritePrefault prefault({dx}, l.outer);                                                         \
    for_each_row_block(                                                                                  \
        l,                                                                                               \
        [&](int64_t b, int64_t e) {                                                                      \
          prefault.rows(b, e, [&](int64_t cb, int64_t ce) {                                              \
            backward_lastdim_##SUFFIX(gp, xp, thp, mp, sp, tp, dp, cb, ce, l.size, z, hard, threshold_grad); \
          });                                                                                            \
        },                                                                                               \
        [&](int64_t o, int64_t j, int count) {                                                           \
          const int64_t off = o * l.size * l.inner + j, s = o * l.inner + j;                             \
          backward_strided_##SUFFIX(gp + off, xp + off, thp + s, mp + s, sp + s, tp ? tp + s : nullptr,  \
                                    dp + off, l.size, l.inner, count, z, hard, threshold_grad);          \
        },                                                                                               \
        kLanes);                                                                                         \
  }
  FASTLOSS_STAT_TOPK_DISPATCH(input.scalar_type(), FASTLOSS_CASE)
#undef FASTLOSS_CASE
}

at::Tensor stat_topk_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_theta,
                              const at::Tensor& input, const at::Tensor& theta, const at::Tensor& mean,
                              const at::Tensor& std, int64_t dim, double sparsity, bool hard,
                              bool threshold_grad, int64_t k) {
  const char* op = "stat_topk_backward";
  TORCH_CHECK(input.device().is_cpu(), "fastloss.", op, ": expected 'x' on the CPU");
  const StatTopKArgs args = stat_topk_backward_args(op, grad_y, grad_theta, input, theta, mean, std, dim, sparsity, k);
  at::Tensor dx = at::empty(input.sizes(), input.options());
  if (dx.numel() > 0) stat_topk_backward_into(dx, grad_y, grad_theta, input, theta, mean, std, args, hard, threshold_grad);
  return dx;
}

StatTopKResult stat_topk_gelu_mul(const at::Tensor& gate_in, const at::Tensor& up_in, double sparsity,
                                  bool /*threshold_grad: autograd only*/, int64_t k) {
  const char* op = "stat_topk_gelu_mul";
  TORCH_CHECK(gate_in.device().is_cpu(), "fastloss.", op, ": expected 'gate' on the CPU");
  const StatTopKArgs args = gelu_mul_args(op, gate_in, up_in, sparsity, k);
  StatTopKResult result = stat_topk_outputs(gate_in, args);
  auto& [out, theta, mean, sd] = result;
  const RowLayout& l = args.layout;
  if (out.numel() == 0) return result;
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  const int64_t grain = std::max<int64_t>(1, 32768 / l.size);
#define FASTLOSS_CASE(SUFFIX, T)                                                                     \
  {                                                                                                  \
    using acc_t = AccType<T>::type;                                                                  \
    const T* gp = reinterpret_cast<const T*>(gate.const_data_ptr());                                 \
    const T* up_p = reinterpret_cast<const T*>(up.const_data_ptr());                                 \
    T* op_ = reinterpret_cast<T*>(out.mutable_data_ptr());                                           \
    acc_t* tp = theta.mutable_data_ptr<acc_t>();                                                     \
    acc_t* mp = mean.mutable_data_ptr<acc_t>();                                                      \
    acc_t* sp = sd.mutable_data_ptr<acc_t>();                                                        \
    const acc_t z = static_cast<acc_t>(args.z);                                                      \
    const WritePrefault prefault({out}, l.outer);                                                    \
    at::parallel_for(0, l.outer, grain, [&](int64_t b, int64_t e) {                                  \
      prefault.rows(b, e, [&](int64_t cb, int64_t ce) {                                              \
        gelu_mul_forward_##SUFFIX(gp, up_p, op_, tp, mp, sp, cb, ce, l.size, z);                     \
      });                                                                                            \
    });                                                                                              \
  }
  FASTLOSS_STAT_TOPK_DISPATCH(gate_in.scalar_type(), FASTLOSS_CASE)
#undef FASTLOSS_CASE
  return result;
}

// d gate and d up into `dgate` and `dup` (fresh tensors, or dup = grad_out itself: the first
// sweep reads each entry of the gradient before it writes d up there, and the second sweep
// does not read the gradient).
void gelu_mul_backward_into(const at::Tensor& dgate, const at::Tensor& dup, const at::Tensor& grad_out,
                            const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& theta_in,
                            const at::Tensor& mean_in, const at::Tensor& std_in, const StatTopKArgs& args,
                            bool threshold_grad) {
  const RowLayout& l = args.layout;
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous(), g = grad_out.contiguous();
  const at::Tensor theta = theta_in.contiguous(), mean = mean_in.contiguous(), sd = std_in.contiguous();
  const int64_t grain = std::max<int64_t>(1, 32768 / l.size);
#define FASTLOSS_CASE(SUFFIX, T)                                                                     \
  {                                                                                                  \
    using acc_t = AccType<T>::type;                                                                  \
    const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());                                    \
    const T* gate_p = reinterpret_cast<const T*>(gate.const_data_ptr());                             \
    const T* up_p = reinterpret_cast<const T*>(up.const_data_ptr());                                 \
    T* dg = reinterpret_cast<T*>(dgate.mutable_data_ptr());                                          \
    T* du = reinterpret_cast<T*>(dup.mutable_data_ptr());                                            \
    const acc_t* tp = theta.const_data_ptr<acc_t>();                                                 \
    const acc_t* mp = mean.const_data_ptr<acc_t>();                                                  \
    const acc_t* sp = sd.const_data_ptr<acc_t>();                                                    \
    const acc_t z = static_cast<acc_t>(args.z);                                                      \
    const WritePrefault prefault({dgate, dup}, l.outer);                                             \
    at::parallel_for(0, l.outer, grain, [&](int64_t b, int64_t e) {                                  \
      std::vector<acc_t> scratch(static_cast<size_t>(l.size));                                       \
      prefault.rows(b, e, [&](int64_t cb, int64_t ce) {                                              \
        gelu_mul_backward_##SUFFIX(gp, gate_p, up_p, tp, mp, sp, dg, du, scratch.data(), cb, ce,     \
                                   l.size, z, threshold_grad);                                       \
      });                                                                                            \
    });                                                                                              \
  }
  FASTLOSS_STAT_TOPK_DISPATCH(gate_in.scalar_type(), FASTLOSS_CASE)
#undef FASTLOSS_CASE
}

std::tuple<at::Tensor, at::Tensor> stat_topk_gelu_mul_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                               const at::Tensor& up, const at::Tensor& theta,
                                                               const at::Tensor& mean, const at::Tensor& std,
                                                               double sparsity, bool threshold_grad, int64_t k) {
  const char* op = "stat_topk_gelu_mul_backward";
  TORCH_CHECK(gate.device().is_cpu(), "fastloss.", op, ": expected 'gate' on the CPU");
  const StatTopKArgs args = gelu_mul_backward_args(op, grad_out, gate, up, theta, mean, std, sparsity, k);
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  if (dgate.numel() > 0) gelu_mul_backward_into(dgate, dup, grad_out, gate, up, theta, mean, std, args, threshold_grad);
  return {dgate, dup};
}

#undef FASTLOSS_STAT_TOPK_DISPATCH

}  // namespace

bool stat_topk_backward_in_place(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_theta,
                                 const at::Tensor& input, const at::Tensor& theta, const at::Tensor& mean,
                                 const at::Tensor& std, int64_t dim, double sparsity, bool hard, bool threshold_grad,
                                 int64_t k) {
  const char* op = "stat_topk_backward";
  if (!input.device().is_cpu() || grad_y.scalar_type() != input.scalar_type() || !grad_y.is_contiguous()) return false;
  const StatTopKArgs args = stat_topk_backward_args(op, grad_y, grad_theta, input, theta, mean, std, dim, sparsity, k);
  RECORD_FUNCTION("fastloss::stat_topk_backward (in place)", c10::ArrayRef<const c10::IValue>{});
  if (grad_y.numel() > 0) stat_topk_backward_into(grad_y, grad_y, grad_theta, input, theta, mean, std, args, hard, threshold_grad);
  return true;
}

std::optional<at::Tensor> stat_topk_gelu_mul_backward_in_place(const at::Tensor& grad_out, const at::Tensor& gate,
                                                               const at::Tensor& up, const at::Tensor& theta,
                                                               const at::Tensor& mean, const at::Tensor& std,
                                                               double sparsity, bool threshold_grad, int64_t k) {
  const char* op = "stat_topk_gelu_mul_backward";
  if (!gate.device().is_cpu() || grad_out.scalar_type() != gate.scalar_type() || !grad_out.is_contiguous()) {
    return std::nullopt;
  }
  const StatTopKArgs args = gelu_mul_backward_args(op, grad_out, gate, up, theta, mean, std, sparsity, k);
  RECORD_FUNCTION("fastloss::stat_topk_gelu_mul_backward (in place)", c10::ArrayRef<const c10::IValue>{});
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  if (dgate.numel() > 0) gelu_mul_backward_into(dgate, grad_out, grad_out, gate, up, theta, mean, std, args, threshold_grad);
  return dgate;
}

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("stat_topk", &stat_topk);
  m.impl("stat_topk_backward", &stat_topk_backward);
  m.impl("stat_topk_gelu_mul", &stat_topk_gelu_mul);
  m.impl("stat_topk_gelu_mul_backward", &stat_topk_gelu_mul_backward);
}

}  // namespace fastloss::cpu
