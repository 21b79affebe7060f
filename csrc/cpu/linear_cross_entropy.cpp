// Cut cross-entropy on the CPU: the LM head fused with cross-entropy (Wijmans et al., "Cut
// Your Losses in Large-Vocabulary Language Models", ICLR 2025).
//
// The N x V logit matrix is never stored. Tokens that are not ignored are tiled (kTokenTile)
// against blocks of the vocabulary (kVocabBlock); each tile's logits come from one BLAS
// matmul in the accumulation type (float32, float64 for float64 inputs) into a reused buffer.
// Forward: one sweep per tile row adds the bias, applies the softcap, takes the block's
// maximum and sum of exponentials, and merges them into the token's running log-sum-exp
// (with the target logit and, for label smoothing, the sum of logits). Backward: the tile is
// recomputed, turned into the logit gradient in place (softmax minus one-hot, smoothing,
// z-loss, softcap chain rule), skipped when every entry is below filter_eps, and then
// dE += dZ C_block and dC_block += dZ^T E (two more matmuls, float32/64 accumulation).
// Memory: the tile buffer (kTokenTile x kVocabBlock), per-token statistics, the gradients,
// and float32 copies of E and of one classifier block for float16/bfloat16 inputs.
// bfloat16 inputs on a CPU with AVX512-BF16 (cpu/gemm_bf16.h) keep bfloat16 operands
// instead (packed for the products; see Bf16Backward): the matmuls multiply them into
// float32 directly (about 4x a float32 matmul over the op on Zen 4), and the backward rounds
// the logit gradient to bfloat16 for its two products (as eager bfloat16 does); the logits,
// LSE and the sums over the vocabulary stay float32. So do float32 inputs at
// torch.set_float32_matmul_precision("medium"), rounded to bfloat16 once.
// FLOPs: 2 N V D forward, 6 N V D backward (4 without the recompute), less skipped tiles.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/linear_cross_entropy_math.h"
#include "common/linear_cross_entropy_op.h"
#include "cpu/convert.h"
#include "cpu/gemm_bf16.h"
#include "cpu/isa.h"

#if defined(FASTLOSS_X86_CLONES)
#include <immintrin.h>
#endif

namespace fastloss::cpu {
namespace {

constexpr int64_t kTokenTile = 1024;
constexpr int64_t kVocabBlock = 512;
constexpr int kLanes = 16;

// ---------------------------------------------------------------------------------------------
// Row kernels over one tile (rows [b, e) of an nt x vb buffer of raw logits e . c).

// The logit's value after bias and softcap, and d capped / d raw (1 without a cap).
template <bool kBias, bool kCap, typename acc_t>
FASTLOSS_CPU_INLINE acc_t capped_logit(acc_t raw, const acc_t* bias, int64_t col, acc_t cap, acc_t inv_cap,
                                       acc_t& chain) {
  if constexpr (kBias) raw += bias[col];
  if constexpr (kCap) {
    const acc_t t = tanh_softcap(raw * inv_cap);
    chain = acc_t(1) - t * t;
    return cap * t;
  }
  chain = acc_t(1);
  return raw;
}

// Adds the bias, applies the softcap (in place), merges the block into the running LSE, and
// picks up the target logit (target_col in [0, vb) when the target lies in this block) and
// the logit sum. A row's last vb % kLanes entries go into the lanes as one more padded set,
// and the lanes combine pairwise (reduce_lanes): short blocks (a small head's vocabulary)
// spent most of their time in scalar tails and serial lane sums.
template <bool kBias, bool kCap, typename acc_t>
FASTLOSS_CPU_INLINE void forward_rows(acc_t* logits, int64_t vb, const acc_t* bias, acc_t cap,
                                      const int64_t* target_col, OnlineLse<acc_t>* lse, acc_t* target_logit,
                                      acc_t* logit_sum, int64_t b, int64_t e) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_cap = kCap ? acc_t(1) / cap : acc_t(0);
  const int64_t whole = vb / kLanes * kLanes;
  for (int64_t r = b; r < e; ++r) {
    acc_t* z = logits + r * vb;
    acc_t mx[kLanes], sm[kLanes];
    for (int l = 0; l < kLanes; ++l) mx[l] = kNegInf, sm[l] = 0;
    for (int64_t j = 0; j < whole; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        acc_t chain;
        const acc_t v = capped_logit<kBias, kCap>(z[j + l], bias, j + l, cap, inv_cap, chain);
        z[j + l] = v;
        mx[l] = fl_max(mx[l], v);
        sm[l] += v;
      }
    if (whole < vb) {
      for (int l = 0; l < kLanes; ++l) {
        const bool in = whole + l < vb;
        acc_t chain;
        const acc_t v = in ? capped_logit<kBias, kCap>(z[whole + l], bias, whole + l, cap, inv_cap, chain) : acc_t(0);
        if (in) z[whole + l] = v;
        mx[l] = fl_max(mx[l], in ? v : kNegInf);
        sm[l] += keep_or_zero(in, v);
      }
    }
    const acc_t row_max = reduce_lanes<kLanes>(mx, [](acc_t x, acc_t y) { return fl_max(x, y); });
    const acc_t row_sum = reduce_lanes<kLanes>(sm, [](acc_t x, acc_t y) { return x + y; });
    acc_t ex[kLanes] = {};
    for (int64_t j = 0; j < whole; j += kLanes)
      for (int l = 0; l < kLanes; ++l) ex[l] += exp_nonpositive(z[j + l] - row_max);
    if (whole < vb) {
      for (int l = 0; l < kLanes; ++l) {
        const bool in = whole + l < vb;
        ex[l] += keep_or_zero(in, exp_nonpositive((in ? z[whole + l] : row_max) - row_max));
      }
    }
    lse[r].merge(row_max, reduce_lanes<kLanes>(ex, [](acc_t x, acc_t y) { return x + y; }));
    logit_sum[r] += row_sum;
    const int64_t t = target_col[r];
    if (t >= 0 && t < vb) target_logit[r] = z[t];
  }
}

// d loss / d raw logit of one entry, without the one-hot term. Values below the smallest
// normal number come out as 0: as subnormals they sent every BLAS product that reads the tile
// down the processor's slow path (float32, logits of std 15-30: the backward took 6-14x its
// time), for a change in d hidden and d classifier below (tokens or V) x that number.
template <bool kBias, bool kCap, typename acc_t>
FASTLOSS_CPU_INLINE acc_t logit_gradient(acc_t raw, const acc_t* bias, int64_t col, acc_t cap, acc_t inv_cap,
                                         const TokenGrad<acc_t>& g, acc_t lse) {
  acc_t chain;
  const acc_t v = capped_logit<kBias, kCap>(raw, bias, col, cap, inv_cap, chain);
  const acc_t d = (g.a * exp_nonpositive(v - lse) - g.c) * chain;
  return (d < 0 ? -d : d) < std::numeric_limits<acc_t>::min() ? acc_t(0) : d;
}

// A row's one-hot term: its target's column in this block, if any, and the chain factor
// there, read before the row is overwritten.
template <typename acc_t>
struct TargetTerm {
  int64_t col = -1;
  acc_t chain = 1;

  template <bool kBias, bool kCap>
  FASTLOSS_CPU_INLINE static TargetTerm read(const acc_t* z, int64_t vb, int64_t target_col, const acc_t* bias,
                                             acc_t cap, acc_t inv_cap) {
    TargetTerm term;
    if (target_col >= 0 && target_col < vb) {
      term.col = target_col;
      capped_logit<kBias, kCap>(z[target_col], bias, target_col, cap, inv_cap, term.chain);
    }
    return term;
  }
  // Subtracts the term from the row's gradient; whether the row holds its target (a tile
  // holding one is never skipped, as on CUDA).
  FASTLOSS_CPU_INLINE bool apply(acc_t* z, const TokenGrad<acc_t>& g) const {
    if (col < 0) return false;
    z[col] -= g.b * chain;
    return true;
  }
};

// Turns raw logits into d loss / d raw logit (times the output gradients) in place; returns
// whether any entry reaches its token's filter threshold.
template <bool kBias, bool kCap, typename acc_t>
FASTLOSS_CPU_INLINE bool gradient_rows(acc_t* logits, int64_t vb, const acc_t* bias, acc_t cap,
                                       const int64_t* target_col, const acc_t* lse, const TokenGrad<acc_t>* coef,
                                       int64_t b, int64_t e) {
  const acc_t inv_cap = kCap ? acc_t(1) / cap : acc_t(0);
  bool keep = false;
  for (int64_t r = b; r < e; ++r) {
    acc_t* z = logits + r * vb;
    const TokenGrad<acc_t> g = coef[r];
    const acc_t L = lse[r];
    const auto target = TargetTerm<acc_t>::template read<kBias, kCap>(z, vb, target_col[r], bias, cap, inv_cap);
    acc_t big[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= vb; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const acc_t d = logit_gradient<kBias, kCap>(z[j + l], bias, j + l, cap, inv_cap, g, L);
        z[j + l] = d;
        big[l] = fl_max(big[l], d < 0 ? -d : d);
      }
    for (; j < vb; ++j) {
      const acc_t d = logit_gradient<kBias, kCap>(z[j], bias, j, cap, inv_cap, g, L);
      z[j] = d;
      big[0] = fl_max(big[0], d < 0 ? -d : d);
    }
    if (target.apply(z, g)) keep = true;
    acc_t row_big = big[0];
    for (int l = 1; l < kLanes; ++l) row_big = fl_max(row_big, big[l]);
    if (!(row_big < g.threshold)) keep = true;  // NaN keeps the tile
  }
  return keep;
}

#if defined(FASTLOSS_X86_CLONES)
// f over the 16 lanes of v, through scalar code that GCC vectorizes (the same code as the
// lane loops').
template <typename F>
FASTLOSS_AVX512_INLINE __m512 map_lanes16(__m512 v, F f) {
  float a[16];
  std::memcpy(a, &v, sizeof(v));
  _Pragma("GCC unroll 1") for (int l = 0; l < 16; ++l) a[l] = f(a[l]);
  std::memcpy(&v, a, sizeof(v));
  return v;
}

// Bias and softcap of 16 logits (bias entries off the mask read as 0).
template <bool kBias, bool kCap>
FASTLOSS_AVX512_INLINE __m512 adjusted16(__m512 v, const float* bias, __mmask16 m, float cap, float inv_cap) {
  if constexpr (kBias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias));
  if constexpr (kCap) {
    v = map_lanes16(v, [&](float x) FASTLOSS_CPU_INLINE_LAMBDA {
      float chain;
      return capped_logit<false, true>(x, static_cast<const float*>(nullptr), 0, cap, inv_cap, chain);
    });
  }
  return v;
}

// exp(v - shift) of 16 logits v <= shift.
FASTLOSS_AVX512_INLINE __m512 exps16(__m512 v, __m512 shift) {
  return map_lanes16(_mm512_sub_ps(v, shift), [](float x) FASTLOSS_CPU_INLINE_LAMBDA { return exp_nonpositive(x); });
}

// forward_rows for float with AVX-512 registers: a row's last vb % 16 entries as one masked
// vector, the lanes combined by the reduce instructions. GCC's code for the lane loops kept
// the lanes of short rows on the stack and combined them one by one (a small head,
// 65536 x 100 x 256 bfloat16 on a 2-core Xeon: forward_rows took ~40% of the forward).
template <bool kBias, bool kCap>
__attribute__((target("arch=x86-64-v4"))) void forward_rows_avx512(float* logits, int64_t vb, const float* bias,
                                                                   float cap, const int64_t* target_col,
                                                                   OnlineLse<float>* lse, float* target_logit,
                                                                   float* logit_sum, int64_t b, int64_t e) {
  const float inv_cap = kCap ? 1.0f / cap : 0.0f;
  const int64_t whole = vb / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (vb - whole)) - 1);
  for (int64_t r = b; r < e; ++r) {
    float* z = logits + r * vb;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sm = _mm512_setzero_ps();
    for (int64_t j = 0; j < whole; j += 16) {
      __m512 v = _mm512_loadu_ps(z + j);
      if constexpr (kBias || kCap) {
        v = adjusted16<kBias, kCap>(v, bias + j, __mmask16(0xffff), cap, inv_cap);
        _mm512_storeu_ps(z + j, v);
      }
      mx = _mm512_max_ps(mx, v);
      sm = _mm512_add_ps(sm, v);
    }
    if (tail) {
      __m512 v = _mm512_maskz_loadu_ps(tail, z + whole);
      if constexpr (kBias || kCap) {
        v = adjusted16<kBias, kCap>(v, bias + whole, tail, cap, inv_cap);
        _mm512_mask_storeu_ps(z + whole, tail, v);
      }
      mx = _mm512_mask_max_ps(mx, tail, mx, v);
      sm = _mm512_add_ps(sm, v);  // 0 past the row
    }
    const float row_max = _mm512_reduce_max_ps(mx);
    const __m512 shift = _mm512_set1_ps(row_max);
    __m512 ex = _mm512_setzero_ps();
    for (int64_t j = 0; j < whole; j += 16) ex = _mm512_add_ps(ex, exps16(_mm512_loadu_ps(z + j), shift));
    if (tail) ex = _mm512_mask_add_ps(ex, tail, ex, exps16(_mm512_maskz_loadu_ps(tail, z + whole), shift));
    lse[r].merge(row_max, _mm512_reduce_add_ps(ex));
    logit_sum[r] += _mm512_reduce_add_ps(sm);
    const int64_t t = target_col[r];
    if (t >= 0 && t < vb) target_logit[r] = z[t];
  }
}

// The logit gradient of 16 raw logits (gradient_rows' entries; bias entries off the mask
// read as 0).
template <bool kBias, bool kCap>
FASTLOSS_AVX512_INLINE __m512 gradient16(__m512 raw, const float* bias, __mmask16 m, float cap, float inv_cap,
                                         const TokenGrad<float>& g, float lse) {
  if constexpr (kBias) raw = _mm512_add_ps(raw, _mm512_maskz_loadu_ps(m, bias));
  return map_lanes16(raw, [&](float x) FASTLOSS_CPU_INLINE_LAMBDA {
    return logit_gradient<false, kCap>(x, static_cast<const float*>(nullptr), 0, cap, inv_cap, g, lse);
  });
}

// gradient_rows for float with AVX-512 registers, as forward_rows_avx512. Whether an entry
// reaches its threshold is one compare per vector (NaN counts as reaching it).
template <bool kBias, bool kCap>
__attribute__((target("arch=x86-64-v4"))) bool gradient_rows_avx512(float* logits, int64_t vb, const float* bias,
                                                                     float cap, const int64_t* target_col,
                                                                     const float* lse, const TokenGrad<float>* coef,
                                                                     int64_t b, int64_t e) {
  const float inv_cap = kCap ? 1.0f / cap : 0.0f;
  const int64_t whole = vb / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (vb - whole)) - 1);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  bool keep = false;
  for (int64_t r = b; r < e; ++r) {
    float* z = logits + r * vb;
    const TokenGrad<float> g = coef[r];
    const float L = lse[r];
    const auto target = TargetTerm<float>::template read<kBias, kCap>(z, vb, target_col[r], bias, cap, inv_cap);
    const __m512 threshold = _mm512_set1_ps(g.threshold);
    __mmask16 reached = 0;
    for (int64_t j = 0; j < whole; j += 16) {
      const __m512 d = gradient16<kBias, kCap>(_mm512_loadu_ps(z + j), bias + j, __mmask16(0xffff), cap, inv_cap, g, L);
      _mm512_storeu_ps(z + j, d);
      reached |= _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, d), threshold, _CMP_NLT_UQ);
    }
    if (tail) {
      const __m512 d = gradient16<kBias, kCap>(_mm512_maskz_loadu_ps(tail, z + whole), bias + whole, tail, cap,
                                               inv_cap, g, L);
      _mm512_mask_storeu_ps(z + whole, tail, d);
      reached |= _mm512_mask_cmp_ps_mask(tail, _mm512_andnot_ps(sign, d), threshold, _CMP_NLT_UQ);
    }
    if (target.apply(z, g) || reached) keep = true;
  }
  return keep;
}
#endif

// f(kBias, kCap) with the variant's flags as std::bool_constant, so that each inner loop is
// specialized.
template <typename T, typename F>
FASTLOSS_CPU_INLINE auto with_variant(const T* bias, T cap, F&& f) {
  if (bias && cap > 0) return f(std::true_type{}, std::true_type{});
  if (bias) return f(std::true_type{}, std::false_type{});
  if (cap > 0) return f(std::false_type{}, std::true_type{});
  return f(std::false_type{}, std::false_type{});
}

// Blocks of at most this many vocabulary rows take small_block_logits instead of a BLAS
// matmul.
constexpr int64_t kSmallBlock = 4;

// out (rows r0..r1 of a tile, vb columns) = e . c^T for a small block (vb <= kSmallBlock rows
// of c, each of length d): each hidden row is read once and stays in L1 for its vb dot
// products. BLAS's matmul of such skinny blocks, a 1024-token tile at a time, read the hidden
// rows at about half the bandwidth (V = 2, D = 256: 200 us per 1 MiB tile on one Xeon core).
template <typename acc_t>
FASTLOSS_CPU_INLINE void small_block_logits(const acc_t* e, const acc_t* c, acc_t* out, int64_t d, int64_t vb,
                                            int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* er = e + r * d;
    for (int64_t v = 0; v < vb; ++v) {
      const acc_t* cv = c + v * d;
      acc_t acc[kLanes];
      for (int l = 0; l < kLanes; ++l) acc[l] = 0;
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += er[j + l] * cv[j + l];
      acc_t tail = 0;
      for (; j < d; ++j) tail += er[j] * cv[j];
      out[r * vb + v] = reduce_lanes<kLanes>(acc, [](acc_t x, acc_t y) { return x + y; }) + tail;
    }
  }
}

// Non-template entry points, each compiled once per instruction set; the bias and softcap
// variants are chosen inside.
#define FASTLOSS_LCE_ENTRIES(SUFFIX, T)                                                                   \
  FASTLOSS_CPU_CLONES void forward_rows_##SUFFIX(T* z, int64_t vb, const T* bias, T cap, const int64_t* tc, \
                                                 OnlineLse<T>* lse, T* tl, T* ls, int64_t b, int64_t e) {   \
    with_variant(bias, cap, [&](auto kb, auto kc) FASTLOSS_CPU_INLINE_LAMBDA {                              \
      forward_rows<kb.value, kc.value>(z, vb, bias, cap, tc, lse, tl, ls, b, e);                            \
    });                                                                                                     \
  }                                                                                                         \
  FASTLOSS_CPU_CLONES bool gradient_rows_##SUFFIX(T* z, int64_t vb, const T* bias, T cap, const int64_t* tc, \
                                                  const T* lse, const TokenGrad<T>* coef, int64_t b, int64_t e) { \
    return with_variant(bias, cap, [&](auto kb, auto kc) FASTLOSS_CPU_INLINE_LAMBDA {                       \
      return gradient_rows<kb.value, kc.value>(z, vb, bias, cap, tc, lse, coef, b, e);                      \
    });                                                                                                     \
  }                                                                                                         \
  FASTLOSS_CPU_CLONES void small_block_logits_entry(const T* e, const T* c, T* out, int64_t d, int64_t vb,  \
                                                    int64_t r0, int64_t r1) {                               \
    small_block_logits(e, c, out, d, vb, r0, r1);                                                           \
  }

FASTLOSS_LCE_ENTRIES(f32, float)
FASTLOSS_LCE_ENTRIES(f64, double)
#undef FASTLOSS_LCE_ENTRIES

FASTLOSS_CPU_INLINE void forward_rows_any(float* z, int64_t vb, const float* bias, float cap, const int64_t* tc,
                                          OnlineLse<float>* lse, float* tl, float* ls, int64_t b, int64_t e) {
#if defined(FASTLOSS_X86_CLONES)
  if (has_avx512()) {
    return with_variant(bias, cap, [&](auto kb, auto kc) {
      forward_rows_avx512<kb.value, kc.value>(z, vb, bias, cap, tc, lse, tl, ls, b, e);
    });
  }
#endif
  forward_rows_f32(z, vb, bias, cap, tc, lse, tl, ls, b, e);
}
FASTLOSS_CPU_INLINE void forward_rows_any(double* z, int64_t vb, const double* bias, double cap, const int64_t* tc,
                                          OnlineLse<double>* lse, double* tl, double* ls, int64_t b, int64_t e) {
  forward_rows_f64(z, vb, bias, cap, tc, lse, tl, ls, b, e);
}
FASTLOSS_CPU_INLINE bool gradient_rows_any(float* z, int64_t vb, const float* bias, float cap, const int64_t* tc,
                                           const float* lse, const TokenGrad<float>* coef, int64_t b, int64_t e) {
#if defined(FASTLOSS_X86_CLONES)
  if (has_avx512()) {
    return with_variant(bias, cap, [&](auto kb, auto kc) {
      return gradient_rows_avx512<kb.value, kc.value>(z, vb, bias, cap, tc, lse, coef, b, e);
    });
  }
#endif
  return gradient_rows_f32(z, vb, bias, cap, tc, lse, coef, b, e);
}
FASTLOSS_CPU_INLINE bool gradient_rows_any(double* z, int64_t vb, const double* bias, double cap, const int64_t* tc,
                                           const double* lse, const TokenGrad<double>* coef, int64_t b, int64_t e) {
  return gradient_rows_f64(z, vb, bias, cap, tc, lse, coef, b, e);
}

// ---------------------------------------------------------------------------------------------
// Driver

// The tokens that are not ignored, with their targets checked against the vocabulary.
struct ActiveTokens {
  std::vector<int64_t> rows;     // indices into the N tokens
  std::vector<int64_t> targets;  // their targets
  bool all = false;              // every token is active (rows[i] == i)
};

template <typename index_t>
void scan_targets(const char* op, const index_t* t, int64_t n, int64_t ignore_index, int64_t vocab_total,
                  ActiveTokens& a) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(t[i]);
    if (v == ignore_index) continue;
    TORCH_CHECK_INDEX(v >= 0 && v < vocab_total, "fastloss.", op, ": 'targets' must be in [0, ", vocab_total,
                      ") or equal ignore_index (", ignore_index, "), got ", v, " at position ", i,
                      " of the flattened targets (the caller's position ", i + 1,
                      " if linear_cross_entropy was called with shift=True, which passes them shifted by one)");
    a.rows.push_back(i);
    a.targets.push_back(v);
  }
}

ActiveTokens active_tokens(const char* op, const at::Tensor& targets_in, int64_t ignore_index, int64_t vocab_total) {
  const at::Tensor targets = targets_in.contiguous();
  ActiveTokens a;
  const int64_t n = targets.numel();
  a.rows.reserve(n);
  a.targets.reserve(n);
  if (targets.scalar_type() == c10::kLong) {
    scan_targets(op, targets.const_data_ptr<int64_t>(), n, ignore_index, vocab_total, a);
  } else {
    scan_targets(op, targets.const_data_ptr<int32_t>(), n, ignore_index, vocab_total, a);
  }
  a.all = static_cast<int64_t>(a.rows.size()) == n;
  return a;
}

at::Tensor index_tensor(const std::vector<int64_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
  return t;
}

// The active rows of `hidden` in the accumulation type, contiguous (a view when possible).
at::Tensor active_hidden(const at::Tensor& hidden, const ActiveTokens& a, c10::ScalarType acc) {
  at::Tensor h = a.all ? hidden : hidden.index_select(0, index_tensor(a.rows));
  return h.to(acc).contiguous();
}

// Target columns relative to one vocabulary block (out of [0, vb) when not in it).
void block_target_cols(const ActiveTokens& a, int64_t first, int64_t count, int64_t block_start, int64_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = a.targets[first + i] - block_start;
}

int64_t rows_grain(int64_t vb) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, vb)); }

// With few tokens, one token tile against a vocabulary block is too small a product to keep
// the threads busy, and every block pays for its parallel regions. With bfloat16 products
// (whose micro-kernels run single-threaded inside a parallel region) the vocabulary blocks
// are then split into up to kVocabParts contiguous parts that run in parallel, each with its
// own running statistics or d hidden, merged in part order: the results do not depend on the
// thread count. Buffers are per task, not per part; d hidden takes (parts - 1) x tokens x D
// more float32 for the partial sums. bfloat16 forward+backward against eager
// (medians of 3 runs, 2 threads): 64 x 50257 x 768 0.93x -> 1.01x; 256 x 50257 x 768 and
// 128 x 32000 x 1024 within noise (1.36x -> 1.38x, 0.80x -> 0.82x).
constexpr int64_t kFewTokens = 256;
constexpr int64_t kVocabParts = 8;

int64_t vocab_blocks(int64_t vocab) { return (vocab + kVocabBlock - 1) / kVocabBlock; }

int64_t vocab_parts(bool bf16, int64_t na, int64_t vocab) {
  return bf16 && na <= kFewTokens ? std::max<int64_t>(1, std::min(kVocabParts, vocab_blocks(vocab))) : 1;
}

// Runs body(p0, p1) over parts [0, parts): in parallel when there are several (the parallel
// regions inside then run inline), else once.
template <typename Body>
void for_vocab_parts(int64_t parts, const Body& body) {
  if (parts == 1) return body(int64_t(0), int64_t(1));
  at::parallel_for(0, parts, 1, body);
}

// The vocabulary offsets of part p's blocks: [first, last) in steps of kVocabBlock.
std::pair<int64_t, int64_t> part_range(int64_t p, int64_t parts, int64_t vocab) {
  const int64_t blocks = vocab_blocks(vocab);
  return {blocks * p / parts * kVocabBlock, std::min(vocab, blocks * (p + 1) / parts * kVocabBlock)};
}

// bfloat16 products with a vocabulary of one block (V <= kVocabBlock: classification heads)
// and several token tiles: the vocabulary-block loops would spend their time on parallel
// regions around tiles too small to keep the threads busy and, in the backward, on N x D
// float32 sums of d hidden (zeroed, then rounded into d hidden) and a transposed copy of E.
// The token tiles run in parallel instead, each through its whole forward or backward at
// once (token_tile_statistics, token_part_gradients). The backward sums d classifier and
// d bias per part of contiguous tiles, merged in part order: the part count depends on the
// shape alone (results independent of the thread count): a part per tile while the parts'
// float32 V x D sums fit kTokenPartBytes, at least kTokenParts parts. So a machine with more
// threads than parts leaves the rest idle here. bfloat16 forward+backward against eager
// (medians of 5 in-process ratios, 2 threads): see the README.
constexpr int64_t kTokenParts = 8;
constexpr int64_t kTokenPartBytes = int64_t(64) << 20;
constexpr int64_t kDeRows = 64;  // d hidden's rows per product (64 x D float32 sums)

int64_t token_tiles(int64_t na) { return (na + kTokenTile - 1) / kTokenTile; }

bool one_block_token_tiles(bool bf16, int64_t na, int64_t vocab) {
  return bf16 && vocab <= kVocabBlock && token_tiles(na) > 1;
}

int64_t token_parts(int64_t na, int64_t vocab, int64_t dim) {
  const int64_t part_bytes = std::max<int64_t>(1, vocab * dim * int64_t(sizeof(float)));
  return std::min(token_tiles(na), std::max(kTokenParts, kTokenPartBytes / part_bytes));
}

// Whether the user lets oneDNN's float32 matmuls run in bfloat16
// (torch.set_float32_matmul_precision("medium"), torch.backends.mkldnn.matmul.fp32_precision).
bool float32_matmuls_in_bf16() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
#else
  try {
    return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
  } catch (const c10::Error&) {  // the legacy and the per-backend settings were mixed
    return false;
  }
#endif
}

// Whether the matmuls multiply bfloat16 operands into float32 (cpu/gemm_bf16.h): both
// operands bfloat16, or float32 where float32 matmuls may run in bfloat16 (rounded to
// bfloat16 once), and D even (the packed operands pair up entries along D).
bool bf16_products(const at::Tensor& hidden, const at::Tensor& classifier, const LinearCrossEntropyArgs& args) {
  const auto both = [&](c10::ScalarType t) { return hidden.scalar_type() == t && classifier.scalar_type() == t; };
  return (both(c10::kBFloat16) || (both(c10::kFloat) && float32_matmuls_in_bf16())) && args.dim % 2 == 0 &&
         bf16_gemm_available();
}

// Bias entries [v0, v0 + vb) in the accumulation type, contiguous; undefined without a bias.
at::Tensor block_bias(const c10::optional<at::Tensor>& bias, int64_t v0, int64_t vb, c10::ScalarType acc) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->narrow(0, v0, vb).to(acc).contiguous();
}

// The logits of the active tokens against one vocabulary block, a token tile at a time: a
// BLAS matmul in the accumulation type, or the bfloat16 product into float32.
template <typename acc_t>
class BlockLogits {
 public:
  BlockLogits(const at::Tensor& ea, const at::Tensor& classifier, const LinearCrossEntropyArgs& args, bool bf16)
      : ea_(ea), classifier_(classifier), args_(args), bf16_(bf16) {
    if (bf16_) ct_vnni_ = at::empty({args.dim * std::min(args.vocab, kVocabBlock)}, ea.options());
  }

  // Loads classifier rows [v0, v0 + vb); returns them (contiguous, bfloat16 or acc_t).
  const at::Tensor& load(int64_t v0, int64_t vb) {
    if (bf16_) {
      block_ = classifier_.narrow(0, v0, vb).to(c10::kBFloat16).contiguous();
      pack_vnni_transposed(block_.const_data_ptr<c10::BFloat16>(), args_.dim, args_.dim, vb,
                           ct_vnni_.mutable_data_ptr<c10::BFloat16>());
    } else {
      block_ = classifier_.narrow(0, v0, vb).to(args_.acc);
    }
    return block_;
  }

  // tile (rows x vb) = logits of active tokens [n0, n0 + rows) against the loaded block.
  void compute(int64_t n0, int64_t rows, at::Tensor& tile) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_) {
        const int64_t d = args_.dim;
        gemm_bf16(rows, tile.size(1), d, ea_.const_data_ptr<c10::BFloat16>() + n0 * d, d,
                  ct_vnni_.const_data_ptr<c10::BFloat16>(), tile.mutable_data_ptr<float>(), tile.size(1), false);
        return;
      }
    }
    const int64_t vb = tile.size(1), d = args_.dim;
    if (vb <= kSmallBlock && ea_.is_contiguous() && block_.is_contiguous()) {
      const acc_t* e = ea_.const_data_ptr<acc_t>() + n0 * d;
      const acc_t* c = block_.const_data_ptr<acc_t>();
      acc_t* out = tile.mutable_data_ptr<acc_t>();
      at::parallel_for(0, rows, rows_grain(vb * d), [&](int64_t b, int64_t e_) {
        small_block_logits_entry(e, c, out, d, vb, b, e_);
      });
      return;
    }
    at::mm_out(tile, ea_.narrow(0, n0, rows), block_.t());
  }

 private:
  const at::Tensor& ea_;
  const at::Tensor& classifier_;
  const LinearCrossEntropyArgs& args_;
  const bool bf16_;
  at::Tensor block_, ct_vnni_;
};

// The logits of active tokens [n0, n0 + rows) against the loaded block (vb rows), in
// `buffer`, and their targets' columns relative to the block (v0: the block's first row).
template <typename acc_t>
at::Tensor tile_logits(BlockLogits<acc_t>& logits, const at::Tensor& buffer, const ActiveTokens& a,
                       const LinearCrossEntropyArgs& args, int64_t n0, int64_t rows, int64_t v0, int64_t vb,
                       int64_t* cols) {
  at::Tensor tile = buffer.narrow(0, 0, rows * vb).view({rows, vb});
  logits.compute(n0, rows, tile);
  block_target_cols(a, n0, rows, args.vocab_start + v0, cols);
  return tile;
}

// The statistics of a one-block vocabulary (one_block_token_tiles): the token tiles in
// parallel, each token's running LSE, target logit and logit sum computed as in
// shard_statistics.
template <typename acc_t>
void token_tile_statistics(const at::Tensor& ea, const at::Tensor& classifier, const c10::optional<at::Tensor>& bias,
                           const ActiveTokens& a, const LinearCrossEntropyArgs& args, acc_t cap, OnlineLse<acc_t>* lse,
                           acc_t* target_logit, acc_t* logit_sum) {
  RECORD_FUNCTION("fastloss::linear_cross_entropy (token tiles)", c10::ArrayRef<const c10::IValue>{});
  const int64_t na = ea.size(0), vb = args.vocab;
  BlockLogits<acc_t> logits(ea, classifier, args, true);
  logits.load(0, vb);
  const at::Tensor bb = block_bias(bias, 0, vb, args.acc);
  const acc_t* bp = bb.defined() ? bb.const_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, token_tiles(na), 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> cols(kTokenTile);
    at::Tensor buffer = at::empty({kTokenTile * vb}, ea.options().dtype(args.acc));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTokenTile, rows = std::min(kTokenTile, na - n0);
      at::Tensor tile = tile_logits(logits, buffer, a, args, n0, rows, 0, vb, cols.data());
      forward_rows_any(tile.mutable_data_ptr<acc_t>(), vb, bp, cap, cols.data(), lse + n0, target_logit + n0,
                       logit_sum + n0, 0, rows);
    }
  });
}

// Per-token (lse, linear) over this classifier's rows for the active tokens; with a z_loss,
// (lse, loss) instead (the loss is formed from the LSE's unrounded parts).
template <typename acc_t>
void shard_statistics(const at::Tensor& ea, const at::Tensor& classifier, const c10::optional<at::Tensor>& bias,
                      const ActiveTokens& a, const LinearCrossEntropyArgs& args, double softcap,
                      double label_smoothing, bool bf16, c10::optional<double> z_loss, acc_t* lse_out,
                      acc_t* linear_out) {
  const int64_t na = ea.size(0), parts = vocab_parts(bf16, na, args.vocab);
  // Per part: the running LSE, the target logit (from the one block holding the target, 0
  // elsewhere) and the logit sum of each token.
  std::vector<OnlineLse<acc_t>> lse(parts * na, OnlineLse<acc_t>{-std::numeric_limits<acc_t>::infinity(), acc_t(0)});
  std::vector<acc_t> target_logit(parts * na, acc_t(0)), logit_sum(parts * na, acc_t(0));
  const int64_t nt = std::min(na, kTokenTile), vbmax = std::min(args.vocab, kVocabBlock);
  const acc_t cap = static_cast<acc_t>(softcap);
  // The same bits either way: the token tiles in parallel where there are enough to go round.
  if (one_block_token_tiles(bf16, na, args.vocab) && token_tiles(na) >= at::get_num_threads()) {
    token_tile_statistics(ea, classifier, bias, a, args, cap, lse.data(), target_logit.data(), logit_sum.data());
  } else {
    for_vocab_parts(parts, [&](int64_t p0, int64_t p1) {
      std::vector<int64_t> cols(kTokenTile);
      at::Tensor buffer = at::empty({nt * vbmax}, ea.options().dtype(args.acc));
      BlockLogits<acc_t> logits(ea, classifier, args, bf16);
      for (int64_t p = p0; p < p1; ++p) {
        const auto [first, last] = part_range(p, parts, args.vocab);
        OnlineLse<acc_t>* part_lse = lse.data() + p * na;
        acc_t* part_target = target_logit.data() + p * na;
        acc_t* part_sum = logit_sum.data() + p * na;
        for (int64_t v0 = first; v0 < last; v0 += kVocabBlock) {
          const int64_t vb = std::min(kVocabBlock, args.vocab - v0);
          logits.load(v0, vb);
          const at::Tensor bb = block_bias(bias, v0, vb, args.acc);
          const acc_t* bp = bb.defined() ? bb.const_data_ptr<acc_t>() : nullptr;
          for (int64_t n0 = 0; n0 < na; n0 += kTokenTile) {
            const int64_t rows = std::min(kTokenTile, na - n0);
            at::Tensor tile = tile_logits(logits, buffer, a, args, n0, rows, v0, vb, cols.data());
            acc_t* zp = tile.mutable_data_ptr<acc_t>();
            at::parallel_for(0, rows, rows_grain(vb), [&](int64_t b, int64_t e) {
              forward_rows_any(zp, vb, bp, cap, cols.data(), part_lse + n0, part_target + n0, part_sum + n0, b, e);
            });
          }
        }
      }
    });
  }
  for (int64_t p = 1; p < parts; ++p) {
    for (int64_t i = 0; i < na; ++i) {
      lse[i].merge(lse[p * na + i].max, lse[p * na + i].sum);
      target_logit[i] += target_logit[p * na + i];
      logit_sum[i] += logit_sum[p * na + i];
    }
  }
  const acc_t ls = static_cast<acc_t>(label_smoothing), inv_vocab = acc_t(1) / static_cast<acc_t>(args.vocab_total);
  for (int64_t i = 0; i < na; ++i) {
    // A NaN logit makes the token's LSE NaN, like torch. The running maxima may drop it (a
    // part whose first block holds the NaN stays "empty" at -inf and merges as nothing), the
    // logit sum does not.
    const acc_t log_sum = lse[i].log_sum();
    lse_out[i] = logit_sum[i] != logit_sum[i] ? logit_sum[i] : lse[i].value();
    const acc_t linear = token_linear(target_logit[i], logit_sum[i], ls, inv_vocab);
    linear_out[i] = z_loss ? token_loss(lse[i].max, log_sum, lse_out[i], linear, static_cast<acc_t>(*z_loss), ls) : linear;
  }
}

// Per-token statistics of the active tokens, (lse, linear) or with a z_loss (lse, loss),
// scattered to (N) tensors with 0 at ignored tokens.
std::tuple<at::Tensor, at::Tensor> statistics(const char* op, const at::Tensor& hidden, const at::Tensor& classifier,
                                              const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
                                              int64_t ignore_index, double softcap, double label_smoothing,
                                              c10::optional<double> z_loss, const LinearCrossEntropyArgs& args) {
  const auto options = hidden.options().dtype(args.acc);
  at::Tensor lse = at::zeros({args.tokens}, options), linear = at::zeros({args.tokens}, options);
  const ActiveTokens a = active_tokens(op, targets, ignore_index, args.vocab_total);
  const int64_t na = static_cast<int64_t>(a.rows.size());
  if (na == 0 || args.vocab == 0) return {lse, linear};
  const bool bf16 = bf16_products(hidden, classifier, args);
  const at::Tensor ea = active_hidden(hidden, a, bf16 ? c10::kBFloat16 : args.acc);
  at::Tensor lse_a = a.all ? lse : at::empty({na}, options), linear_a = a.all ? linear : at::empty({na}, options);
  if (args.acc == c10::kDouble) {
    shard_statistics<double>(ea, classifier, bias, a, args, softcap, label_smoothing, false, z_loss,
                             lse_a.mutable_data_ptr<double>(), linear_a.mutable_data_ptr<double>());
  } else {
    shard_statistics<float>(ea, classifier, bias, a, args, softcap, label_smoothing, bf16, z_loss,
                            lse_a.mutable_data_ptr<float>(), linear_a.mutable_data_ptr<float>());
  }
  if (!a.all) {
    const at::Tensor idx = index_tensor(a.rows);
    lse.index_copy_(0, idx, lse_a);
    linear.index_copy_(0, idx, linear_a);
  }
  return {lse, linear};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& classifier,
                                                        const at::Tensor& targets,
                                                        const c10::optional<at::Tensor>& bias, int64_t ignore_index,
                                                        double softcap, double label_smoothing, double z_loss,
                                                        double filter_eps /* autograd only */,
                                                        bool /*deterministic: autograd only*/) {
  const char* op = "linear_cross_entropy";
  TORCH_CHECK(hidden.device().is_cpu(), "fastloss.", op, ": expected 'hidden' on the CPU");
  const LinearCrossEntropyArgs args =
      linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap, label_smoothing, z_loss, 0, -1);
  check_filter_eps(op, filter_eps);
  // Ignored tokens: loss 0.
  auto [lse, loss] = statistics(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                                args);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_shard(const at::Tensor& hidden, const at::Tensor& classifier,
                                                              const at::Tensor& targets,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t ignore_index, double softcap,
                                                              double label_smoothing, int64_t vocab_start,
                                                              int64_t vocab_total) {
  const char* op = "linear_cross_entropy_shard";
  TORCH_CHECK(hidden.device().is_cpu(), "fastloss.", op, ": expected 'hidden' on the CPU");
  const LinearCrossEntropyArgs args = linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap,
                                                                label_smoothing, 0.0, vocab_start, vocab_total);
  return statistics(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, c10::nullopt, args);
}

// The logit-gradient tile (rows x vb, float32) rounded to bfloat16 for the two products:
// row-major with row stride vb2 (>= vb, the extra column zero) as the left operand of dE
// (when dz is given), and packed (VNNI, `depth` rows, those past the tile's zero) as the
// right operand of dC^T in Bf16Backward's transposed form (when dz_vnni is given).
void round_gradient_tile(const float* z, int64_t rows, int64_t vb, int64_t vb2, c10::BFloat16* dz,
                         c10::BFloat16* dz_vnni, int64_t depth) {
  const c10::BFloat16 zero(0.0f);
  at::parallel_for(0, std::max(vnni_depth(rows), depth) / 2, rows_grain(vb), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t r = 2 * p;
      const float* z0 = z + r * vb;
      const float* z1 = z0 + vb;
      if (dz_vnni && r < depth) {
        c10::BFloat16* pv = dz_vnni + r * vb;
        for (int64_t j = 0; j < vb; ++j) {
          pv[2 * j] = r < rows ? c10::BFloat16(z0[j]) : zero;
          pv[2 * j + 1] = r + 1 < rows ? c10::BFloat16(z1[j]) : zero;
        }
      }
      if (!dz) continue;
      for (int64_t i = r; i < std::min(rows, r + 2); ++i) {
        c10::BFloat16* out = dz + i * vb2;
        const float* in = z + i * vb;
        for (int64_t j = 0; j < vb; ++j) out[j] = c10::BFloat16(in[j]);
        std::fill(out + vb, out + vb2, zero);
      }
    }
  });
}

// The backward's bfloat16 operands (bf16_products). dE += dZ C_block: the classifier block
// packed as the right operand and the rounded gradient tile. dC takes the form that
// transposes fewer entries per vocabulary block:
//  * direct, for fewer tokens than D: dC_block = dZ^T E, each gradient tile transposed and
//    rounded (tokens x vb entries), E packed as the right operand tile by tile, the result
//    written into dC's rows (through a float32 block when dC is bfloat16);
//  * transposed: dC_block^T = E^T dZ, E^T stored tile by tile, the gradient tile packed, and
//    dC^T transposed into dC's rows once per block (D x vb entries).
// bfloat16 forward+backward against eager, transposed -> direct (medians of 3 runs; 1 / 2
// threads): 64 x 50257 x 768, where the final transposes were the hot spot, 1.06x -> 1.11x /
// 0.89x -> 0.94x; 256 x 50257 x 768 1.22x -> 1.27x / 1.31x -> 1.39x; at 4096 x 32000 x 1024
// the direct form took 3.5% longer (2 threads).
// The micro-kernels are compiled per shape and stride and kept per thread, so strides are
// fixed and the depth of the dC product is the tile's tokens rounded up to a multiple of 64
// (zero past them in both operands): the number of kernels stays bounded however the count
// of ignored tokens changes between steps.
struct Bf16Backward {
  bool dc_direct = false, tile_by_tile = false;
  at::Tensor c_vnni, dz;            // dE
  at::Tensor e_vnni, dzt, dc_f32;   // dC, direct (dc_f32 where dC is bfloat16)
  at::Tensor et, dz_vnni, dct;      // dC, transposed

  // tile_by_tile (token parts: a vocabulary of one block): E's tiles are packed as they come,
  // into one tile's space, dC takes the direct form, and dE's rows come from de_rows.
  Bf16Backward(const at::Tensor& ea, const LinearCrossEntropyArgs& args, bool need_de, bool need_dc,
               c10::ScalarType dc_dtype, bool tile_by_tile = false)
      : tile_by_tile(tile_by_tile) {
    const int64_t na = ea.size(0), d = args.dim;
    const int64_t nt = std::min(na, kTokenTile), vbmax = std::min(args.vocab, kVocabBlock);
    if (need_de) {
      c_vnni = at::empty({vnni_depth(vbmax) * d}, ea.options());
      dz = at::empty({nt * vnni_depth(vbmax)}, ea.options());
    }
    if (!need_dc) return;
    dc_direct = tile_by_tile || na < d;
    const int64_t tiles = (na + kTokenTile - 1) / kTokenTile;
    const c10::BFloat16 zero(0.0f);
    if (dc_direct) {
      // Tiles of kTokenTile x D, the last one only as deep as its product.
      e_vnni = at::empty({tile_by_tile ? dc_depth(nt) * d
                                       : ((tiles - 1) * kTokenTile + dc_depth(na - (tiles - 1) * kTokenTile)) * d},
                         ea.options());
      for (int64_t t = 0; t < tiles && !tile_by_tile; ++t) pack_e_tile(ea, t);
      dzt = at::empty({vbmax * dc_depth(nt)}, ea.options());
      if (dc_dtype != c10::kFloat) dc_f32 = at::empty({vbmax * d}, ea.options().dtype(c10::kFloat));
    } else {
      const c10::BFloat16* e = ea.const_data_ptr<c10::BFloat16>();
      et = at::empty({tiles, d, kTokenTile}, ea.options());
      c10::BFloat16* etp = et.mutable_data_ptr<c10::BFloat16>();
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * kTokenTile, rows = std::min(kTokenTile, na - n0);
        c10::BFloat16* tile = etp + t * d * kTokenTile;
        transpose_bf16(e + n0 * d, rows, d, d, tile, kTokenTile);
        if (rows < kTokenTile)
          for (int64_t k = 0; k < d; ++k) std::fill(tile + k * kTokenTile + rows, tile + (k + 1) * kTokenTile, zero);
      }
      dz_vnni = at::empty({dc_depth(nt) * vbmax}, ea.options());
      dct = at::empty({d * vbmax}, ea.options().dtype(c10::kFloat));
    }
  }

  // E's token tile t packed (VNNI, zero past its rows up to the product's depth) as the right
  // operand of the direct dC; into its own place, or the one tile's place when tile_by_tile.
  void pack_e_tile(const at::Tensor& ea, int64_t t) {
    const int64_t na = ea.size(0), d = ea.size(1), n0 = t * kTokenTile, rows = std::min(kTokenTile, na - n0);
    c10::BFloat16* tile = e_vnni.mutable_data_ptr<c10::BFloat16>() + (tile_by_tile ? 0 : n0 * d);
    pack_vnni(ea.const_data_ptr<c10::BFloat16>() + n0 * d, d, rows, d, tile);
    std::fill(tile + vnni_depth(rows) * d, tile + dc_depth(rows) * d, c10::BFloat16(0.0f));
  }

  static int64_t dc_depth(int64_t rows) { return std::min(kTokenTile, (rows + 63) / 64 * 64); }

  void load(const at::Tensor& block, int64_t vb, int64_t d) {
    if (c_vnni.defined())
      pack_vnni(block.const_data_ptr<c10::BFloat16>(), d, vb, d, c_vnni.mutable_data_ptr<c10::BFloat16>());
  }

  // dE_tile (rows x D, when wanted) += dZ C_block, and dC's block (when wanted: dc, its
  // block of rows) (+)= dZ^T E_tile (= on the block's first tile that is not filtered out).
  // E is ea (tile_by_tile: its tile n0 is packed here).
  void accumulate(const at::Tensor& ea, const float* z, int64_t n0, int64_t rows, int64_t vb, int64_t d,
                  float* de_tile, at::Tensor& dc, int64_t v0, bool first_dc) {
    const bool need_dc = dc.defined(), transposed_dc = need_dc && !dc_direct;
    const int64_t vb2 = vnni_depth(vb), depth = dc_depth(rows);
    c10::BFloat16* dzp = dz.defined() ? dz.mutable_data_ptr<c10::BFloat16>() : nullptr;
    c10::BFloat16* dzv = transposed_dc ? dz_vnni.mutable_data_ptr<c10::BFloat16>() : nullptr;
    if (dzp || dzv) round_gradient_tile(z, rows, vb, vb2, dzp, dzv, transposed_dc ? depth : 0);
    if (de_tile) gemm_bf16(rows, d, vb2, dzp, vb2, c_vnni.const_data_ptr<c10::BFloat16>(), de_tile, d, true);
    if (need_dc && tile_by_tile) pack_e_tile(ea, n0 / kTokenTile);
    if (transposed_dc) {
      gemm_bf16(d, vb, depth, et.const_data_ptr<c10::BFloat16>() + (n0 / kTokenTile) * d * kTokenTile, kTokenTile,
                dzv, dct.mutable_data_ptr<float>(), vb, !first_dc);
    } else if (need_dc) {
      c10::BFloat16* dztp = dzt.mutable_data_ptr<c10::BFloat16>();
      transpose_to_bf16(z, rows, vb, vb, dztp, depth);
      if (rows < depth)
        for (int64_t j = 0; j < vb; ++j) std::fill(dztp + j * depth + rows, dztp + (j + 1) * depth, c10::BFloat16(0.0f));
      float* out = dc_f32.defined() ? dc_f32.mutable_data_ptr<float>() : dc.mutable_data_ptr<float>() + v0 * d;
      gemm_bf16(vb, d, depth, dztp, depth, e_vnni.const_data_ptr<c10::BFloat16>() + (tile_by_tile ? 0 : n0 * d), out, d,
                !first_dc);
    }
  }

  // tile_by_tile, after accumulate: out (count x D) = rows [r0, r0 + count) of the one block's
  // dE product, a few rows at a time so that the float32 sums stay in cache.
  void de_rows(int64_t r0, int64_t count, int64_t vb, int64_t d, float* out) const {
    const int64_t vb2 = vnni_depth(vb);
    gemm_bf16(count, d, vb2, dz.const_data_ptr<c10::BFloat16>() + r0 * vb2, vb2, c_vnni.const_data_ptr<c10::BFloat16>(),
              out, d, false);
  }

  // dC's rows [v0, v0 + vb) from the block's sums (written: any tile was accumulated).
  void finish_block(at::Tensor& dc, int64_t v0, int64_t vb, int64_t d, bool written) {
    at::Tensor rows = dc.narrow(0, v0, vb);
    if (!written) {
      rows.zero_();
    } else if (!dc_direct) {
      if (dc.scalar_type() == c10::kFloat)
        transpose_f32(dct.const_data_ptr<float>(), d, vb, vb, rows.mutable_data_ptr<float>(), d);
      else
        transpose_to_bf16(dct.const_data_ptr<float>(), d, vb, vb, rows.mutable_data_ptr<c10::BFloat16>(), d);
    } else if (dc_f32.defined()) {
      rows.copy_(dc_f32.narrow(0, 0, vb * d).view({vb, d}));
    }
  }
};

template <typename acc_t>
void shard_gradients(const at::Tensor& ea, const at::Tensor& classifier, const c10::optional<at::Tensor>& bias,
                     const ActiveTokens& a, const LinearCrossEntropyArgs& args, const std::vector<TokenGrad<acc_t>>& coef,
                     const std::vector<acc_t>& lse, double softcap, bool bf16, at::Tensor& dea, at::Tensor& dc,
                     at::Tensor& dbias) {
  // An undefined dea / dc / dbias is not wanted: its matmul (or sum) is skipped. Without
  // bfloat16 products dea comes uninitialized (at::empty): each token tile's first product
  // writes it, later ones add, and tiles that no block wrote (all filtered) are zeroed at the
  // end. A zero fill and an addmm into it moved d hidden three times, as much as the
  // products themselves at small vocabularies (V = 2: 64 MiB each).
  const bool need_de = dea.defined(), need_dc = dc.defined(), need_db = dbias.defined();
  const int64_t na = ea.size(0), parts = vocab_parts(bf16, na, args.vocab);
  std::vector<char> de_written(need_de && !bf16 ? token_tiles(na) : 0, 0);
  const int64_t nt = std::min(na, kTokenTile), vbmax = std::min(args.vocab, kVocabBlock);
  TORCH_INTERNAL_ASSERT(!bf16 || args.acc == c10::kFloat);
  TORCH_INTERNAL_ASSERT(parts == 1 || bf16);
  // dC accumulates in the accumulation type: directly in the output when it has that type.
  const bool dc_in_place = need_dc && dc.scalar_type() == args.acc;
  const acc_t cap = static_cast<acc_t>(softcap);
  // d hidden of each part after the first (bfloat16 products, float32), added in part order.
  at::Tensor de_parts = need_de && parts > 1 ? at::zeros({parts - 1, na, args.dim}, dea.options()) : at::Tensor();
  for_vocab_parts(parts, [&](int64_t p0, int64_t p1) {
    std::vector<int64_t> cols(kTokenTile);
    at::Tensor buffer = at::empty({nt * vbmax}, ea.options().dtype(args.acc));
    BlockLogits<acc_t> logits(ea, classifier, args, bf16);
    std::optional<Bf16Backward> bf16_operands;
    if (bf16) bf16_operands.emplace(ea, args, need_de, need_dc, need_dc ? dc.scalar_type() : c10::kFloat);
    at::Tensor dc_block =
        !need_dc || dc_in_place || bf16 ? at::Tensor() : at::empty({vbmax, args.dim}, ea.options().dtype(args.acc));
    for (int64_t p = p0; p < p1; ++p) {
      const auto [first, last] = part_range(p, parts, args.vocab);
      at::Tensor de_part = !need_de ? at::Tensor() : p == 0 ? dea : de_parts[p - 1];
      for (int64_t v0 = first; v0 < last; v0 += kVocabBlock) {
        const int64_t vb = std::min(kVocabBlock, args.vocab - v0);
        const at::Tensor& cb = logits.load(v0, vb);
        if (bf16_operands) bf16_operands->load(cb, vb, args.dim);
        const at::Tensor bb = block_bias(bias, v0, vb, args.acc);
        const acc_t* bp = bb.defined() ? bb.const_data_ptr<acc_t>() : nullptr;
        at::Tensor dcb =
            !need_dc || bf16 ? at::Tensor() : dc_in_place ? dc.narrow(0, v0, vb) : dc_block.narrow(0, 0, vb);
        at::Tensor dbb = need_db ? dbias.narrow(0, v0, vb) : at::Tensor();
        bool dcb_written = false;
        for (int64_t n0 = 0; n0 < na; n0 += kTokenTile) {
          const int64_t rows = std::min(kTokenTile, na - n0);
          at::Tensor tile = tile_logits(logits, buffer, a, args, n0, rows, v0, vb, cols.data());
          acc_t* zp = tile.mutable_data_ptr<acc_t>();
          std::atomic<bool> keep{false};
          at::parallel_for(0, rows, rows_grain(vb), [&](int64_t b, int64_t e) {
            if (gradient_rows_any(zp, vb, bp, cap, cols.data(), lse.data() + n0, coef.data() + n0, b, e))
              keep.store(true, std::memory_order_relaxed);
          });
          if (!keep.load()) continue;  // every entry below filter_eps: the tile adds nothing
          bool accumulated = false;
          if constexpr (std::is_same_v<acc_t, float>) {
            if (bf16_operands) {
              bf16_operands->accumulate(ea, zp, n0, rows, vb, args.dim,
                                        need_de ? de_part.mutable_data_ptr<float>() + n0 * args.dim : nullptr, dc,
                                        v0, !dcb_written);
              dcb_written = need_dc;
              accumulated = true;
            }
          }
          if (!accumulated) {
            const at::Tensor e_tile = ea.narrow(0, n0, rows);
            if (need_de) {
              at::Tensor de_tile = de_part.narrow(0, n0, rows);
              char& written = de_written[n0 / kTokenTile];
              if (written) {
                de_tile.addmm_(tile, cb);
              } else {
                at::mm_out(de_tile, tile, cb);
                written = 1;
              }
            }
            if (need_dc && dcb_written) {
              dcb.addmm_(tile.t(), e_tile);
            } else if (need_dc) {
              at::mm_out(dcb, tile.t(), e_tile);
              dcb_written = true;
            }
          }
          if (need_db) dbb.add_(tile.sum(0));  // the float32 gradient, also with bfloat16 products
        }
        if (!need_dc) continue;
        if (bf16_operands) {
          bf16_operands->finish_block(dc, v0, vb, args.dim, dcb_written);
          continue;
        }
        if (!dcb_written) dcb.zero_();
        if (!dc_in_place) dc.narrow(0, v0, vb).copy_(dcb);
      }
    }
  });
  for (int64_t p = 1; p < parts && need_de; ++p) dea.add_(de_parts[p - 1]);
  for (size_t t = 0; t < de_written.size(); ++t) {
    const int64_t n0 = static_cast<int64_t>(t) * kTokenTile;
    if (!de_written[t]) dea.narrow(0, n0, std::min(kTokenTile, na - n0)).zero_();
  }
}

// The gradients of a one-block vocabulary (one_block_token_tiles) in `parts` parts of
// contiguous token tiles. de: d hidden itself (hidden's rows and dtype; zero at ignored
// tokens), dc and dbias (zeros) in their own dtypes; undefined when not wanted.
void token_part_gradients(const at::Tensor& ea, const at::Tensor& classifier, const c10::optional<at::Tensor>& bias,
                          const ActiveTokens& a, const LinearCrossEntropyArgs& args,
                          const std::vector<TokenGrad<float>>& coef, const std::vector<float>& lse, double softcap,
                          int64_t parts, at::Tensor& de, at::Tensor& dc, at::Tensor& dbias) {
  RECORD_FUNCTION("fastloss::linear_cross_entropy_backward (token parts)", c10::ArrayRef<const c10::IValue>{});
  const bool need_de = de.defined(), need_dc = dc.defined(), need_db = dbias.defined();
  const int64_t na = ea.size(0), d = args.dim, vb = args.vocab, tiles = token_tiles(na);
  const at::Tensor bb = block_bias(bias, 0, vb, c10::kFloat);
  const float* bp = bb.defined() ? bb.const_data_ptr<float>() : nullptr;
  const float cap = static_cast<float>(softcap);
  at::Tensor dc_parts = need_dc ? at::empty({parts, vb, d}, ea.options().dtype(c10::kFloat)) : at::Tensor();
  at::Tensor db_parts = need_db ? at::zeros({parts, vb}, ea.options().dtype(c10::kFloat)) : at::Tensor();
  std::vector<char> dc_written(parts, 0);
  BlockLogits<float> logits(ea, classifier, args, true);
  const at::Tensor& cb = logits.load(0, vb);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t nt = std::min(na, kTokenTile);
    std::vector<int64_t> cols(kTokenTile);
    std::vector<float> db_block(need_db ? vb : 0);
    at::Tensor buffer = at::empty({nt * vb}, ea.options().dtype(c10::kFloat));
    at::Tensor de_rows = need_de ? at::empty({kDeRows, d}, ea.options().dtype(c10::kFloat)) : at::Tensor();
    Bf16Backward operands(ea, args, need_de, need_dc, c10::kFloat, /*tile_by_tile=*/true);
    operands.load(cb, vb, d);
    for (int64_t p = p0; p < p1; ++p) {
      at::Tensor dc_part = need_dc ? dc_parts[p] : at::Tensor();
      float* db = need_db ? db_parts.mutable_data_ptr<float>() + p * vb : nullptr;
      for (int64_t t = tiles * p / parts; t < tiles * (p + 1) / parts; ++t) {
        const int64_t n0 = t * kTokenTile, rows = std::min(kTokenTile, na - n0);
        at::Tensor tile = tile_logits(logits, buffer, a, args, n0, rows, 0, vb, cols.data());
        float* zp = tile.mutable_data_ptr<float>();
        const bool keep = gradient_rows_any(zp, vb, bp, cap, cols.data(), lse.data() + n0, coef.data() + n0, 0, rows);
        if (keep) {  // else every entry is below filter_eps: the tile adds nothing
          operands.accumulate(ea, zp, n0, rows, vb, d, nullptr, dc_part, 0, !dc_written[p]);
          dc_written[p] = need_dc;
          // d bias: column sums of 64-row blocks added to the part's (short float32 chains)
          for (int64_t r0 = 0; r0 < rows && db; r0 += 64) {
            std::fill(db_block.begin(), db_block.end(), 0.0f);
            for (int64_t r = r0; r < std::min(rows, r0 + 64); ++r)
              for (int64_t j = 0; j < vb; ++j) db_block[j] += zp[r * vb + j];
            for (int64_t j = 0; j < vb; ++j) db[j] += db_block[j];
          }
        }
        if (!need_de) continue;
        float* src = de_rows.mutable_data_ptr<float>();
        for (int64_t r0 = 0; r0 < rows; r0 += kDeRows) {
          const int64_t count = std::min(kDeRows, rows - r0);
          if (keep) operands.de_rows(r0, count, vb, d, src);
          else std::fill(src, src + count * d, 0.0f);
          for (int64_t r = 0; r < count; ++r) {
            const int64_t row = a.all ? n0 + r0 + r : a.rows[n0 + r0 + r];
            if (de.scalar_type() == c10::kFloat)
              std::copy(src + r * d, src + (r + 1) * d, de.mutable_data_ptr<float>() + row * d);
            else
              from_float(src + r * d, de.mutable_data_ptr<c10::BFloat16>() + row * d, d);
          }
        }
      }
    }
  });
  if (need_dc) {
    // The written parts' sums, in part order.
    at::Tensor sum;
    for (int64_t p = 0; p < parts; ++p) {
      if (!dc_written[p]) continue;
      if (sum.defined()) sum.add_(dc_parts[p]);
      else sum = dc_parts[p];
    }
    if (sum.defined()) dc.copy_(sum);
    else dc.zero_();
  }
  for (int64_t p = 0; p < parts && need_db; ++p) dbias.add_(db_parts[p]);  // dbias: zeros
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss_in, const c10::optional<at::Tensor>& grad_lse_in, const at::Tensor& hidden,
    const at::Tensor& classifier, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse_in, int64_t ignore_index, double softcap, double label_smoothing, double z_loss,
    double filter_eps, std::array<bool, 3> output_mask, int64_t vocab_start, int64_t vocab_total,
    bool /*deterministic: the CPU always is*/) {
  const char* op = "linear_cross_entropy_backward";
  TORCH_CHECK(hidden.device().is_cpu(), "fastloss.", op, ": expected 'hidden' on the CPU");
  const LinearCrossEntropyArgs args =
      linear_cross_entropy_backward_args(op, grad_loss_in, grad_lse_in, hidden, classifier, targets, bias, lse_in,
                                         softcap, label_smoothing, z_loss, filter_eps, vocab_start, vocab_total);
  const bool need_de = output_mask[0], need_dc = output_mask[1];
  const bool need_db = output_mask[2] && is_given(bias);
  at::Tensor dc = need_dc ? at::empty(classifier.sizes(), classifier.options()) : at::Tensor();
  // d bias accumulates tile column sums: in the accumulation type.
  at::Tensor dbias_acc = need_db ? at::zeros({args.vocab}, hidden.options().dtype(args.acc)) : at::Tensor();
  const ActiveTokens a = active_tokens(op, targets, ignore_index, args.vocab_total);
  const int64_t na = static_cast<int64_t>(a.rows.size());
  const bool bf16 = na > 0 && bf16_products(hidden, classifier, args);
  const int64_t parts = one_block_token_tiles(bf16, na, args.vocab) ? token_parts(na, args.vocab, args.dim) : 1;
  // Token parts write d hidden's rows as they come (zero at ignored tokens); otherwise d hidden
  // accumulates over the vocabulary blocks: in place when it has the accumulation type.
  const bool de_rows = need_de && parts > 1;
  const bool de_direct = need_de && !de_rows && a.all && hidden.scalar_type() == args.acc;
  // (Uninitialized where shard_gradients writes every row itself: without bfloat16 products.)
  at::Tensor de = (de_rows && a.all) || (de_direct && !bf16) ? at::empty(hidden.sizes(), hidden.options())
                  : de_rows || de_direct                     ? at::zeros(hidden.sizes(), hidden.options())
                                                             : at::Tensor();
  const auto dea_options = hidden.options().dtype(args.acc);
  at::Tensor dea = !need_de              ? at::Tensor()
                   : de_rows || de_direct ? de
                   : bf16                 ? at::zeros({na, args.dim}, dea_options)
                                          : at::empty({na, args.dim}, dea_options);
  if (na == 0 || !(need_de || need_dc || need_db)) {
    if (need_dc) dc.zero_();
  } else {
    const at::Tensor ea = active_hidden(hidden, a, bf16 ? c10::kBFloat16 : args.acc);
    const at::Tensor grad_loss = grad_loss_in.contiguous(), lse_t = lse_in.contiguous();
    const bool has_grad_lse = is_given(grad_lse_in);
    const at::Tensor grad_lse = has_grad_lse ? grad_lse_in->contiguous() : at::Tensor();
    auto run = [&](auto zero) {
      using acc_t = decltype(zero);
      std::vector<TokenGrad<acc_t>> coef(na);
      std::vector<acc_t> lse(na);
      const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
      const acc_t* gs = has_grad_lse ? grad_lse.const_data_ptr<acc_t>() : nullptr;
      const acc_t* sp = lse_t.const_data_ptr<acc_t>();
      const acc_t inv_vocab = acc_t(1) / static_cast<acc_t>(args.vocab_total);
      for (int64_t i = 0; i < na; ++i) {
        const int64_t r = a.rows[i];
        lse[i] = sp[r];
        coef[i] = token_grad<acc_t>(gl[r], gs ? gs[r] : acc_t(0), sp[r], static_cast<acc_t>(label_smoothing),
                                    static_cast<acc_t>(z_loss), inv_vocab, static_cast<acc_t>(filter_eps));
      }
      if constexpr (std::is_same_v<acc_t, float>) {
        if (parts > 1) return token_part_gradients(ea, classifier, bias, a, args, coef, lse, softcap, parts, dea, dc,
                                                   dbias_acc);
      }
      shard_gradients<acc_t>(ea, classifier, bias, a, args, coef, lse, softcap, bf16, dea, dc, dbias_acc);
    };
    if (args.acc == c10::kDouble) run(0.0);
    else run(0.0f);
  }
  if (need_de && !de_direct && !de_rows) {
    de = na > 0 && a.all ? at::empty(hidden.sizes(), hidden.options()) : at::zeros(hidden.sizes(), hidden.options());
    if (na > 0) {
      if (a.all) de.copy_(dea);
      else de.index_copy_(0, index_tensor(a.rows), dea.to(hidden.scalar_type()));
    }
  }
  // Gradients not asked for are empty tensors (the schema returns three tensors).
  if (!need_de) de = at::empty({0}, hidden.options());
  if (!need_dc) dc = at::empty({0}, classifier.options());
  at::Tensor dbias = need_db ? dbias_acc.to(bias->scalar_type())
                             : at::empty({0}, is_given(bias) ? bias->options() : hidden.options());
  return {de, dc, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy);
  m.impl("linear_cross_entropy_shard", &linear_cross_entropy_shard);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace fastloss::cpu
