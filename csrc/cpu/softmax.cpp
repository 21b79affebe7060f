// Two-pass softmax / log-softmax on the CPU (Dukhan & Ablavatski 2020, arXiv 2001.04438).
//
// Pass 1 reads the row once and accumulates exp(x) as (mantissa, exponent) pairs
// (common/exp_pair.h): per L1-sized chunk along a row, per SIMD lane across rows. There is
// no max pass over memory. Pass 2 writes: rows that fit in L2 rescale the exponentials kept
// from pass 1 (input read once, one exp per element); longer rows read the input again
// (2 reads + 1 write; PyTorch's CPU kernel sweeps each row four times). Rows with NaN/+inf
// entries, all entries -inf, or entries too large to reduce accurately (|x| > ~1.4e6 in
// float) take an exact max-subtracting path with torch.softmax's NaN semantics.
//
// With AVX-512, forward rows of up to 256 bytes, of whole vectors up to 512, and softmax rows
// of up to 256 floats, are held in registers instead (forward_short_rows). Without
// AVX-512, forward rows of up to 128 floats go eight at a time, one per vector lane
// (forward_rows_per_lane).
//
// Layout: the contiguous input is viewed as (outer, size, inner) around `dim`. inner == 1
// vectorizes along the row; inner > 1 vectorizes across `inner` adjacent rows.
// Parallel over rows (at::parallel_for, torch's thread count). Accumulation in float for
// float/half/bfloat16 inputs and in double for double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "common/exp_pair.h"
#include "common/softmax_math.h"
#include "common/softmax_op.h"
#include "cpu/alloc.h"
#include "cpu/backward_in_place.h"
#include "cpu/convert.h"
#include "cpu/isa.h"
#include "cpu/rows.h"

namespace fastloss::cpu {
namespace {

// Lanes per accumulator set: two 512-bit vectors (measured faster than one or four).
template <typename acc_t>
constexpr int kLanes = 128 / sizeof(acc_t);

// Per-lane state of pass 1 across rows (softmax over a non-last dim), one element at a time:
// the pair sum, and a sum of (x - x) over the clamped inputs that becomes NaN if any entry
// is NaN or +inf.
template <typename acc_t>
struct Lanes {
  static constexpr int L = kLanes<acc_t>;
  acc_t sum[L];
  acc_t exponent[L];
  acc_t nonfinite[L];

  FASTLOSS_CPU_INLINE void reset() {
    for (int l = 0; l < L; ++l) {
      sum[l] = 0;
      exponent[l] = ExpConstants<acc_t>::kEmptyExponent;
      nonfinite[l] = 0;
    }
  }

  FASTLOSS_CPU_INLINE void add(int l, acc_t x) {
    const acc_t xc = fl_max(low_clamp<acc_t>(), x);
    const ExpPair<acc_t> p = exp_pair(xc);
    const acc_t e = fl_max(exponent[l], p.exponent);
    sum[l] = sum[l] * exp2_nonpositive(exponent[l] - e) + p.relative_to(e);
    exponent[l] = e;
    nonfinite[l] += xc - xc;
  }

  // Adds another set's pairs lane by lane (one rounding per lane).
  FASTLOSS_CPU_INLINE void merge(const Lanes& o) {
    for (int l = 0; l < L; ++l) {
      const acc_t e = fl_max(exponent[l], o.exponent[l]);
      sum[l] = sum[l] * exp2_nonpositive(exponent[l] - e) + o.sum[l] * exp2_nonpositive(o.exponent[l] - e);
      exponent[l] = e;
      nonfinite[l] += o.nonfinite[l];
    }
  }
};

// Long sums run in levels of kSumBlock. Column sums along a non-last dim: blocks of kSumBlock
// rows, merged into groups of kSumBlock blocks, merged into the total; a single running sum
// per column lost ~log2(n) bits (float32, a constant column of 200000 entries: relative error
// 7e-4, like torch's; random columns 3e-4); the levels bound the rounding by ~(3 kSumBlock +
// n / kSumBlock^2) ulp instead of n. Along the last dim, chunk pairs merge in groups of
// kSumBlock chunks (row_pass1).
constexpr int64_t kSumBlock = 64;

// Exact softmax of one strided row in acc_t with a max pass: used for rows with non-finite
// or very large entries, where it reproduces torch.softmax's semantics.
template <bool kLog, typename in_t, typename out_t, typename acc_t>
void exact_row(const in_t* x, out_t* y, int64_t n, int64_t stride) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool has_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i * stride]);
    has_nan |= std::isnan(v);
    m = std::max(m, v);
  }
  if (has_nan || !std::isfinite(m)) {
    for (int64_t i = 0; i < n; ++i) y[i * stride] = static_cast<out_t>(std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  // Compensated (Neumaier) sum: a plain running sum of a long row lost ~log2(n) bits here
  // (float32, 3000 entries near 2e6: 125 ulp against torch's 5).
  acc_t s = 0, comp = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t term = std::exp(static_cast<acc_t>(x[i * stride]) - m);
    const acc_t t = s + term;
    comp += std::abs(s) >= term ? (s - t) + term : (term - t) + s;
    s = t;
  }
  s += comp;
  const acc_t log_s = std::log(s);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i * stride]) - m;
    y[i * stride] = static_cast<out_t>(kLog ? v - log_s : std::exp(v) / s);
  }
}

// Softmax rows that fit in the L2 cache: the two-pass variant that keeps exponentials.
// Pass 1 walks the row in L1-sized chunks; for each chunk it finds the largest exponent m_c
// (within L1, not a pass over memory), writes exp(x - m_c ln2) in acc_t to `scratch` (the
// output itself when it is acc_t) and keeps the chunk's pair (s_c, m_c). Pass 2 rescales
// each chunk, still in cache, by 2^(m_c - E) / S and writes the output. One exponential per
// element instead of two, the input read once, and one rounding to the output type.
template <typename acc_t>
constexpr int64_t kChunk = 1024;
template <typename acc_t>
constexpr int64_t kMaxCachedRowBytes = 2048 * 1024;

// float16 rows longer than the staged ones below go through float a chunk at a time: GCC 12
// converts float16 one element at a time, while convert.h's conversions take whole vectors.
// The float loops then run on the converted chunk in the same order as on float input, so
// the result is still the float kernel's rounded once. Rows longer than 32768 used to convert
// element by element, and shorter ones were staged whole (convert.h's staged_float_rows).
template <typename T>
constexpr bool kStagedChunks = std::is_same_v<T, c10::Half>;

// Entries [0, c) of p for the float loops: p itself, or (float16) converted into buf.
template <typename T>
FASTLOSS_CPU_INLINE auto readable(const T* p, int64_t c, float* buf) {
  if constexpr (kStagedChunks<T>) {
    to_float(p, buf, c);
    return static_cast<const float*>(buf);
  } else {
    return p;
  }
}

// Runs write(q) to compute entries [0, c) of p into q: p itself, or (float16) buf, then
// converted into p.
template <typename T, typename Write>
FASTLOSS_CPU_INLINE void write_chunk(T* p, int64_t c, float* buf, Write&& write) {
  if constexpr (kStagedChunks<T>) {
    write(buf);
    from_float(buf, p, c);
  } else {
    write(p);
  }
}

// Buffers for readable / write_chunk: kChunk floats where T is staged, else a placeholder.
template <typename T>
constexpr int64_t kChunkBuffer = kStagedChunks<T> ? kChunk<float> : 1;
// The chunk length for a row of n entries of these types: kChunk where one is staged, else
// the whole row (the loops as they were, vectorized by GCC).
template <typename... T>
constexpr int64_t chunk_length(int64_t n) {
  return (kStagedChunks<T> || ...) ? kChunk<float> : n;
}
// Chunk boundaries fall on whole sets of lanes, so the chunked loops add in the float
// kernel's order.
static_assert(kChunk<float> % kLanes<float> == 0);

// float16 rows still staged whole, in blocks of rows: those that the register kernels take
// (forward_short_rows: up to 64 float entries; on AVX-512 whole vectors up to 128, softmax
// rows up to 256) or
// forward_rows_per_lane (lane_row), and log-softmax forward rows of up to 256,
// where the chunks' per-row conversion calls cost more than they save. Chunks against
// whole-row staging (AVX-512, 2 threads, 1M entries, ratio to torch, medians of 3 runs of 31
// rounds): log-softmax forward rows of 128 0.85x -> 0.78x and of 256 1.01x -> 0.95x, but of
// 1024 to 32768 1.17-1.30x -> 1.41-1.48x; softmax forward rows of 128 to 32768 1.10-1.55x ->
// 1.18-2.74x; log-softmax backward rows of 128 to 32768 0.87-1.13x -> 1.07-1.10x (on AVX-512
// and AVX2 the backward of rows over 32 now converts in registers:
// backward_in_registers_avx512 / _avx2).
template <bool kLog>
constexpr int64_t kStagedHalfForwardRow = kLog ? 256 : 64;
constexpr int64_t kStagedHalfBackwardRow = 64;

// bfloat16 log-softmax forward rows staged whole up to this length: GCC's code for the lane
// loops on bfloat16 was slower than converting the rows and running the float kernel
// (AVX-512, 2 threads, 1M entries, ratio to torch, in the lanes -> staged: rows of 96 0.64x
// -> 0.73x, 128 0.71x -> 0.82x, 256 0.91x -> 0.98x, 1024 1.23x -> 1.31x; rows of 4096 and
// longer were faster in the lanes, 1.31x against 1.26x staged).
constexpr int64_t kStagedBf16LogRow = 1024;

// Pass 1 over one L1-resident chunk: the chunk's largest exponent m (a max over the chunk
// in L1, not a pass over memory), then s = sum exp(x - m ln2) as the chunk's pair (s, m).
// With kStore the exponentials are also written to `e` (acc_t) for the cached variant.
template <typename acc_t>
struct ChunkSum {
  acc_t sum;
  acc_t exponent;
};

// A NaN or +inf entry makes the chunk's sum NaN (exp of NaN, or exp(x - inf) = NaN), which
// finish_row sends to the exact path: no separate flag is needed here. kPaddedTail: below.
template <bool kStore, int L, bool kPaddedTail = false, typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE ChunkSum<acc_t> chunk_pass1(const in_t* x, int64_t c, acc_t* e) {
  static_assert(!(kStore && kPaddedTail), "the padded pass keeps no exponentials");
  acc_t qmax[L], part[L];
  for (int l = 0; l < L; ++l) {
    qmax[l] = ExpConstants<acc_t>::kEmptyExponent;
    part[l] = 0;
  }
  // kPaddedTail: more than L / 2 entries past the last whole set of lanes take one more pass
  // of the L lanes, over a copy padded with -inf: a padding lane keeps its max, and its term
  // is that of a -inf entry (exactly 0 beside any entry in range; the rows where it is not
  // take the exact path). GCC's epilogues for them run up to 7 exponentials one at a time (2
  // threads, fp32 rows of 127, log-softmax forward against torch: 0.88x -> 1.07x); fewer
  // entries ran faster in the epilogues (rows of 65: 0.98x against 0.87x). Softmax rows, one
  // at a time, ran no faster with it, and slower elsewhere (rows of 300-1000 1.45x -> 1.35x).
  const int64_t full = c - c % L;
  const bool padded_tail = kPaddedTail && c - full > L / 2;
  [[maybe_unused]] in_t padded[kPaddedTail ? L : 1];
  if (padded_tail) {
    for (int l = 0; l < L; ++l) {
      padded[l] = full + l < c ? x[full + l] : static_cast<in_t>(-std::numeric_limits<float>::infinity());
    }
  }
  int64_t i = 0;
  for (; i + L <= c; i += L) {
    for (int l = 0; l < L; ++l) {
      qmax[l] = fl_max(qmax[l], static_cast<acc_t>(x[i + l]) * ExpConstants<acc_t>::kLog2e);
    }
  }
  if (padded_tail) {
    for (int l = 0; l < L; ++l) qmax[l] = fl_max(qmax[l], static_cast<acc_t>(padded[l]) * ExpConstants<acc_t>::kLog2e);
  } else {
    for (int l = 0; i + l < c; ++l) {
      qmax[l] = fl_max(qmax[l], static_cast<acc_t>(x[i + l]) * ExpConstants<acc_t>::kLog2e);
    }
  }
  // The clamp keeps an all -inf chunk's exponent finite (such rows end in the exact path).
  const acc_t m = round_to_int(fl_max(low_clamp<acc_t>() * ExpConstants<acc_t>::kLog2e,
                                      reduce_lanes<L>(qmax, [](acc_t a, acc_t b) { return fl_max(a, b); })));
  i = 0;
  for (; i + L <= c; i += L) {
    for (int l = 0; l < L; ++l) {
      const acc_t v = exp_shifted(fl_max(low_clamp<acc_t>(), static_cast<acc_t>(x[i + l])), m);
      if constexpr (kStore) e[i + l] = v;
      part[l] += v;
    }
  }
  if (padded_tail) {
    for (int l = 0; l < L; ++l) part[l] += exp_shifted(fl_max(low_clamp<acc_t>(), static_cast<acc_t>(padded[l])), m);
  } else {
    for (int l = 0; i + l < c; ++l) {
      const acc_t v = exp_shifted(fl_max(low_clamp<acc_t>(), static_cast<acc_t>(x[i + l])), m);
      if constexpr (kStore) e[i + l] = v;
      part[l] += v;
    }
  }
  return {reduce_lanes<L>(part, [](acc_t a, acc_t b) { return a + b; }), m};
}

// Pass 1 over a whole row, chunk by chunk; kStore keeps the exponentials in `e` and each
// chunk's exponent in `chunk_exp`.
template <bool kStore, bool kLog, int L, typename in_t, typename acc_t>
FASTLOSS_CPU_INLINE RowStats<acc_t> row_pass1(const in_t* x, int64_t n, acc_t* e, acc_t* chunk_exp) {
  constexpr int64_t C = kChunk<acc_t>;
  // Chunk pairs merge in groups of kSumBlock, groups into the row: one running merge over
  // thousands of chunks let rounding add up (a constant row of 1.6e7 floats: 2e-4 relative).
  ExpSum<acc_t> total = ExpSum<acc_t>::empty(), group = ExpSum<acc_t>::empty();
  float buf[kChunkBuffer<in_t>];
  for (int64_t c0 = 0, k = 0; c0 < n; c0 += C, ++k) {
    const int64_t c = std::min<int64_t>(C, n - c0);
    const ChunkSum<acc_t> cs = chunk_pass1<kStore, L>(readable(x + c0, c, buf), c, kStore ? e + c0 : e);
    if constexpr (kStore) chunk_exp[k] = cs.exponent;
    group.add(cs.sum, cs.exponent);  // a NaN chunk sum stays NaN (NaN * 0 is NaN)
    if ((k + 1) % kSumBlock == 0) {
      total.merge(group);
      group = ExpSum<acc_t>::empty();
    }
  }
  total.merge(group);
  return finish_row<acc_t, kLog>(total, acc_t(0));
}

template <int L, typename in_t, typename out_t, typename acc_t>
FASTLOSS_CPU_INLINE void softmax_row_cached(const in_t* x, out_t* out, acc_t* y, int64_t n) {
  constexpr int64_t C = kChunk<acc_t>;
  acc_t chunk_exp[kMaxCachedRowBytes<acc_t> / sizeof(acc_t) / C + 1];
  const int64_t chunks = (n + C - 1) / C;
  const RowStats<acc_t> stats = row_pass1<true, false, L>(x, n, y, chunk_exp);
  if (stats.exact) {
    exact_row<false, in_t, out_t, acc_t>(x, out, n, 1);
    return;
  }
  float buf[kChunkBuffer<out_t>];
  for (int64_t k = 0; k < chunks; ++k) {
    const acc_t scale = exp2_nonpositive(chunk_exp[k] - stats.exponent) * stats.inv_sum;
    const acc_t* yc = y + k * C;
    const int64_t c = std::min<int64_t>(C, n - k * C);
    write_chunk(out + k * C, c, buf, [&](auto* oc) FASTLOSS_CPU_INLINE_LAMBDA {
      for (int64_t i = 0; i < c; ++i) oc[i] = to_output<std::remove_pointer_t<decltype(oc)>>(yc[i] * scale);
    });
  }
}

// Runs f(l) for the W lanes of a short row. GCC unrolls loops of up to 16 iterations
// completely before it vectorizes, and such a row then took one scalar instruction per
// element (float and double rows of 16: 2-3x the time): those loops are kept rolled, which
// vectorizes them to whole (masked) vector instructions. Wider rows vectorize as they are
// (rolled blocks of one vector each kept the arrays in memory, behind run-time alias checks).
template <int W, typename acc_t, typename F>
FASTLOSS_CPU_INLINE void for_each_lane(F&& f) {
  if constexpr (W <= 16) {
    _Pragma("GCC unroll 1") for (int l = 0; l < W; ++l) f(l);
  } else {
    for (int l = 0; l < W; ++l) f(l);
  }
}

// f(lanes_used) for the first `count` of W lanes, lanes_used a compile-time W where count is
// W: a whole block of lanes then runs loops of a constant trip count, which vectorize.
template <int W, typename F>
FASTLOSS_CPU_INLINE void with_lane_count(int count, F&& f) {
  if (count == W) f(std::integral_constant<int, W>{});
  else f(count);
}

// v with lanes l and l ^ S swapped, for every l.
template <int S, typename V, int... I>
FASTLOSS_CPU_INLINE V lanes_xor(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (I ^ S)...);
}

// Folds C vectors onto v[0]: the upper half onto the lower (v[i] with v[i + C / 2] for a
// power of two), an odd count keeping its middle vector for the next step.
template <int C, typename Vec, typename Op>
FASTLOSS_CPU_INLINE void fold_vectors(Vec* v, Op op) {
  if constexpr (C > 1) {
    constexpr int h = C / 2;
    for (int i = 0; i < h; ++i) v[i] = op(v[i], v[i + C - h]);
    fold_vectors<C - h>(v, op);
  }
}

// Reduces W lanes with whole-vector operations: the row's 64-byte vectors combined, then a
// butterfly of in-register shuffles (reduce_lanes' halving steps, unrolled, became one scalar
// operation per lane). op takes vectors.
template <int W, typename acc_t, typename Op>
FASTLOSS_CPU_INLINE acc_t reduce_short(const acc_t* a, Op op) {
  constexpr int kVec = std::min<int>(W, 64 / sizeof(acc_t));
  typedef acc_t Vec __attribute__((vector_size(kVec * sizeof(acc_t))));
  Vec v[W / kVec];
  std::memcpy(v, a, sizeof(v));
  fold_vectors<W / kVec>(v, op);
  constexpr auto kLanes = std::make_integer_sequence<int, kVec>();
  if constexpr (kVec >= 16) v[0] = op(v[0], lanes_xor<8>(v[0], kLanes));
  if constexpr (kVec >= 8) v[0] = op(v[0], lanes_xor<4>(v[0], kLanes));
  if constexpr (kVec >= 4) v[0] = op(v[0], lanes_xor<2>(v[0], kLanes));
  if constexpr (kVec >= 2) v[0] = op(v[0], lanes_xor<1>(v[0], kLanes));
  return v[0][0];
}

// Lane l of a short row: x[l] for l < n, else `pad`. A row is read and written as whole
// vectors (kWhole, with_row_access) when its W lanes end within the rows [begin, end) that the
// call writes (no other thread writes there, and the following rows' stores overwrite what
// spilled); the last rows use masked loads and stores, which are slow on this AMD Zen 4
// (fp32, 65536 x 16, backward: 162 us all masked, 144 us whole).
template <bool kWhole, typename acc_t, typename in_t, typename N>
FASTLOSS_CPU_INLINE acc_t lane_or(const in_t* x, int l, N n, acc_t pad) {
  if constexpr (kWhole) {
    const acc_t v = to_acc<acc_t>(x[l]);
    return l < n ? v : pad;
  } else {
    return l < n ? to_acc<acc_t>(x[l]) : pad;
  }
}

// Runs f(std::bool_constant<kWhole>) for `row`: whole when its W lanes end within the rows
// before `end`.
template <int W, typename N, typename F>
FASTLOSS_CPU_INLINE void with_row_access(int64_t row, int64_t end, N n, F&& f) {
  if (row * n + W <= end * n) f(std::true_type());
  else f(std::false_type());
}

// The W lanes of a short row into v: x[l] for l < n, else pad. A whole row (kWhole) of the
// accumulation type is copied whole first: from lane_or GCC made masked loads, which streamed
// from memory at a third of the speed on AMD Zen 4 (2 threads, 2M entries, fp32 backward
// against torch: rows of 24 0.47x -> 1.05x; log-softmax 0.42x -> 1.13x).
template <int W, bool kWhole, typename in_t, typename acc_t, typename N>
FASTLOSS_CPU_INLINE void row_lanes(const in_t* x, N n, acc_t pad, acc_t* v) {
  if constexpr (kWhole && std::is_same_v<in_t, acc_t>) {
    std::memcpy(v, x, W * sizeof(acc_t));
    for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA { v[l] = l < n ? v[l] : pad; });
  } else {
    for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA { v[l] = lane_or<kWhole>(x, l, n, pad); });
  }
}

// Runs kernel(std::integral_constant<int, W>, n) for the narrowest W = kMin, 2 kMin, ...,
// kMax that holds a row of n (n <= kMax), with n as a compile-time constant when it fills all
// W lanes (no lane compares or selects; fp32, 65536 x 16, backward: 144 -> 104 us).
template <int kMin, int kMax, typename Kernel>
FASTLOSS_CPU_INLINE void with_short_width(int64_t n, Kernel&& kernel) {
  if constexpr (kMin < kMax) {
    if (n > kMin) return with_short_width<2 * kMin, kMax>(n, kernel);
  }
  if (n == kMin) kernel(std::integral_constant<int, kMin>(), std::integral_constant<int64_t, kMin>());
  else kernel(std::integral_constant<int, kMin>(), n);
}

// A row of at most W entries as its pair (S, E): entries in v (padded with -inf) and the terms
// exp(x - E ln2) in e. Padding lanes clamp to low_clamp, whose exponential flushes to 0.
template <int W, bool kWhole, typename in_t, typename acc_t, typename N>
FASTLOSS_CPU_INLINE ExpSum<acc_t> short_row_sum(const in_t* x, N n, acc_t* v, acc_t* e) {
  constexpr acc_t kLog2e = ExpConstants<acc_t>::kLog2e;
  acc_t q[W];
  row_lanes<W, kWhole>(x, n, -std::numeric_limits<acc_t>::infinity(), v);
  for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA { q[l] = v[l] * kLog2e; });
  const acc_t m = round_to_int(fl_max(
      low_clamp<acc_t>() * kLog2e, reduce_short<W>(q, [](auto a, auto b) FASTLOSS_CPU_INLINE_LAMBDA { return a > b ? a : b; })));
  for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA {
    e[l] = exp_shifted(fl_max(low_clamp<acc_t>(), v[l]), m);
  });
  return {reduce_short<W>(e, [](auto a, auto b) FASTLOSS_CPU_INLINE_LAMBDA { return a + b; }), m};
}

template <int W, bool kWhole, typename in_t, typename out_t, typename N>
FASTLOSS_CPU_INLINE void softmax_short_row(const in_t* xr, out_t* yr, N n) {
  using acc_t = typename AccType<in_t>::type;
  acc_t v[W], e[W];
  const RowStats<acc_t> stats = finish_row<acc_t, false>(short_row_sum<W, kWhole>(xr, n, v, e), acc_t(0));
  if (stats.exact) return exact_row<false, in_t, out_t, acc_t>(xr, yr, n, 1);
  for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA {
    if (kWhole || l < n) yr[l] = to_output<out_t>(e[l] * stats.inv_sum);
  });
}

template <int W, bool kWhole, typename in_t, typename out_t, typename acc_t, typename N>
FASTLOSS_CPU_INLINE void log_softmax_short_row(const in_t* xr, out_t* yr, N n, const RowStats<acc_t>& stats) {
  acc_t v[W];
  row_lanes<W, kWhole>(xr, n, acc_t(0), v);
  for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA {
    if (kWhole || l < n) yr[l] = to_output<out_t>(pass2_value<true>(v[l], stats));
  });
}

// Log-softmax rows take their logs kLogBatch at a time, as one vector loop: one log per row
// at the end of each row's chain of dependent steps left the row latency-bound
// (fp32, 65536 x 16: 0.82x torch).
constexpr int kLogBatch = 16;

// Log-softmax rows [begin, end) of n entries, kLogBatch at a time: sum_row(row) gives each
// row's pair (S, E), the batch's logs are one vector loop (log_of_normal, an inline series
// within 2 ulp), then write_row(row, stats) writes the row, or exact_row does.
template <typename in_t, typename out_t, typename SumRow, typename WriteRow>
FASTLOSS_CPU_INLINE void log_softmax_row_batches(const in_t* x, out_t* y, int64_t begin, int64_t end, int64_t n,
                                                 SumRow&& sum_row, WriteRow&& write_row) {
  using acc_t = typename AccType<in_t>::type;
  for (int64_t row0 = begin; row0 < end; row0 += kLogBatch) {
    const int rows = static_cast<int>(std::min<int64_t>(kLogBatch, end - row0));
    acc_t sum[kLogBatch], exponent[kLogBatch], log_sum[kLogBatch];
    for (int r = 0; r < kLogBatch; ++r) {
      ExpSum<acc_t> s{1, 0};
      if (r < rows) s = sum_row(row0 + r);
      sum[r] = s.sum;
      exponent[r] = s.exponent;
    }
    // Sums that are not positive normal numbers belong to rows of the exact path.
    for_each_lane<kLogBatch, acc_t>([&](int r) FASTLOSS_CPU_INLINE_LAMBDA { log_sum[r] = log_of_normal(sum[r]); });
    for (int r = 0; r < rows; ++r) {
      const int64_t row = row0 + r;
      RowStats<acc_t> stats = finish_row<acc_t, false>(ExpSum<acc_t>{sum[r], exponent[r]}, acc_t(0));
      if (stats.exact) {
        exact_row<true, in_t, out_t, acc_t>(x + row * n, y + row * n, n, 1);
        continue;
      }
      stats.log_offset = log_offset(exponent[r], log_sum[r]);
      write_row(row, stats);
    }
  }
}

// Rows of at most W entries (W a power of two, up to four 512-bit vectors, or five to eight
// that the row fills exactly): the row is held
// in a W-wide array padded with -inf, so every loop has a compile-time trip count and the
// row stays in registers. Its largest exponent is a reduction over registers, not a pass
// over memory. The chunked path spent most of such a row in its 32-lane tail loops and lane
// reductions (fp32, 65536 x 16: softmax 0.72x torch, log-softmax 0.41x).
template <int W, bool kLog, typename in_t, typename out_t, typename N>
FASTLOSS_CPU_INLINE void forward_short_rows(const in_t* x, out_t* y, int64_t begin, int64_t end, N n) {
  using acc_t = typename AccType<in_t>::type;
  if constexpr (!kLog) {
    for (int64_t row = begin; row < end; ++row) {
      with_row_access<W>(row, end, n, [&](auto whole) FASTLOSS_CPU_INLINE_LAMBDA {
        softmax_short_row<W, decltype(whole)::value>(x + row * n, y + row * n, n);
      });
    }
  } else {
    // The row's lanes in arrays of the row loop up to four vectors, else of the batch loop
    // (2 threads, 2M entries, against torch: fp32 rows of 24 0.62x -> 1.3x, 50 0.56x -> 1.4x
    // in the row loop; rows of 96 ran at 1.57x there, 1.81x in the batch loop).
    constexpr bool kBatchArrays = W * sizeof(acc_t) > 256;
    acc_t batch_v[kBatchArrays ? W : 1], batch_e[kBatchArrays ? W : 1];
    log_softmax_row_batches(
        x, y, begin, end, n,
        [&](int64_t row) FASTLOSS_CPU_INLINE_LAMBDA {
          ExpSum<acc_t> s{1, 0};
          with_row_access<W>(row, end, n, [&](auto whole) FASTLOSS_CPU_INLINE_LAMBDA {
            constexpr bool kWhole = decltype(whole)::value;
            if constexpr (kBatchArrays) {
              s = short_row_sum<W, kWhole>(x + row * n, n, batch_v, batch_e);
            } else {
              acc_t v[W], e[W];
              s = short_row_sum<W, kWhole>(x + row * n, n, v, e);
            }
          });
          return s;
        },
        [&](int64_t row, const RowStats<acc_t>& stats) FASTLOSS_CPU_INLINE_LAMBDA {
          with_row_access<W>(row, end, n, [&](auto whole) FASTLOSS_CPU_INLINE_LAMBDA {
            log_softmax_short_row<W, decltype(whole)::value>(x + row * n, y + row * n, n, stats);
          });
        });
  }
}

// The widest row forward_short_rows pads (to a power of two): four 512-bit vectors; beyond,
// it takes rows of whole vectors up to kFullForwardRow.
template <typename acc_t>
constexpr int kShortForwardRow = 256 / sizeof(acc_t);
// float16 rows that the float kernel sends to its register kernels are staged whole (the
// longer rows beyond, by register_row in forward_lastdim_rows).
static_assert(kStagedHalfForwardRow<false> >= kShortForwardRow<float>);

// Beyond kShortForwardRow, rows of whole 512-bit vectors up to kFullForwardRow: five to
// eight (80-128 float, 40-64 double entries), which then need no lane compares or selects;
// and softmax float rows of 65-256 entries of any length, padded to whole vectors (the last
// one's lanes past the row selected out; as with_row_access, read and written whole within
// the thread's rows). (Masked, at eight vectors GCC's code ran rows of 80 and 96 at 0.4-0.5x
// torch.) 2 threads, 1-2M entries in four rotating input sets, forward against torch, chunked
// -> registers: fp32 rows of 128 softmax 1.30-1.34x -> 2.04-2.36x, log-softmax 1.01-1.08x ->
// 1.83-1.90x; rows of 96 1.13-1.19x -> 2.18-2.25x and 0.98-1.03x -> 1.71-1.80x (with a
// run-time loop folding the vectors in reduce_short, about a third of that gain was lost:
// fold_vectors). Softmax rows between whole vectors and up to 256 (2M entries, chunked, or
// one row per lane under 96 -> registers; four rotating input sets, two rounds): fp32 rows of
// 65-97 1.07-1.59x -> 2.03-2.25x, 100-150 1.07-1.43x -> 2.08-2.21x, 200-256 1.49-1.62x ->
// 1.55-1.72x; bfloat16 and float16 (staged) rows of 65-150 0.94-5.1x -> 1.77-6.7x. The fp32
// log-softmax lost in that sweep (rows of 65-97 0.90-1.11x -> 0.58-0.72x, 241 1.21-1.30x ->
// 0.60-0.73x; from one input in cache it had gained, 0.83-1.04x -> 1.28-1.46x) and keeps
// its kernels (bfloat16 and float16, staged through them, had gained: 1.0-1.2x ->
// 1.1-1.7x); so do double rows between whole vectors (log-softmax of 33 entries 2.55x ->
// 2.07x).
template <bool kLog, typename acc_t>
constexpr bool kPartialVectorRows = std::is_same_v<acc_t, float> && !kLog;
template <bool kLog, typename acc_t>
constexpr int kFullForwardRow = (kPartialVectorRows<kLog, acc_t> ? 1024 : 512) / sizeof(acc_t);
template <typename acc_t>
constexpr int kVectorLanes = 64 / sizeof(acc_t);

// Runs kernel(std::integral_constant<int64_t, W>) for W = n among kMin, kMin + kStep, ..., kMax.
template <int kMin, int kMax, int kStep, typename Kernel>
FASTLOSS_CPU_INLINE void with_full_width(int64_t n, Kernel&& kernel) {
  static_assert((kMax - kMin) % kStep == 0, "the widths must end at kMax");
  if constexpr (kMin < kMax) {
    if (n != kMin) return with_full_width<kMin + kStep, kMax, kStep>(n, kernel);
  }
  kernel(std::integral_constant<int64_t, kMin>());
}

// Whether the float kernel holds a forward row of n entries in registers. It needs AVX-512's
// masked loads and stores: without them GCC kept the short-row loops scalar.
template <bool kLog, typename acc_t>
FASTLOSS_CPU_INLINE bool register_row(int64_t n) {
  return (n <= kShortForwardRow<acc_t> || (n <= kFullForwardRow<kLog, acc_t> &&
                                           (kPartialVectorRows<kLog, acc_t> || n % kVectorLanes<acc_t> == 0))) &&
         has_avx512();
}

// Short float rows on CPUs without AVX-512 (register_row holds them in registers with
// AVX-512's masks only): eight rows at a time, one per lane of a 256-bit vector. The block is
// transposed in registers into a buffer of n vectors, so the max, the exponentials and the
// sums are element-wise across rows (no lane reductions, no padding lanes), and transposed
// back. The lanes never mix: a row's result does not depend on which rows share its block
// (the last block's empty lanes hold 0). float16 and bfloat16 rows are staged through float.
// Measured with the AVX2 build (FASTLOSS_CPU_ARCH=x86-64-v3) on an AMD Zen 4, 2 threads, 2M
// entries, against torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2), chunked -> lanes: fp32
// softmax rows of 8 0.31x -> 1.75x, 17 0.60x -> 2.35x, 24 0.46x -> 1.48x, 64 0.89x -> 1.55x,
// 127 1.0x -> 1.3x; log-softmax 0.33-1.05x -> 1.15-1.70x; bfloat16 / float16 softmax rows of
// 17 and 33 0.57-0.70x -> 1.5-2.1x. Rows of 129 to 512 ran slower this way (fp32 softmax 400:
// 1.45x -> 1.17x, bfloat16 512: 1.5x -> 0.55x), and so did the backward for rows of 17 to 128
// (0.8-1.27x -> 0.57-0.93x: three transposes against one streaming pass).
constexpr int64_t kLaneRow = 128;
constexpr int kRowLanes = 8;
typedef float RowLanes __attribute__((vector_size(kRowLanes * sizeof(float))));
// The same at any float's address, loaded straight into registers (through a copy on the
// stack instead, the halves that GCC's generic tuning loads separately failed to forward to
// the shuffles).
typedef float UnalignedRowLanes __attribute__((vector_size(kRowLanes * sizeof(float)), aligned(alignof(float))));

// With AVX-512 softmax rows of 65-95 entries ran here too; register_row now takes them
// (kPartialVectorRows). Log-softmax rows with AVX-512 (127: 1.03x -> 0.80x) were slower.
FASTLOSS_CPU_INLINE bool lane_row(int64_t n) { return n <= kLaneRow && !has_avx512(); }

// Transposes the 8 x 8 block v in registers (unpack, 64-bit shuffle, 128-bit permute).
FASTLOSS_CPU_INLINE void transpose_8x8(RowLanes* v) {
  RowLanes t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shufflevector(v[k], v[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[k + 1] = __builtin_shufflevector(v[k], v[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shufflevector(t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[k + 1] = __builtin_shufflevector(t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[k + 2] = __builtin_shufflevector(t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[k + 3] = __builtin_shufflevector(t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    v[c + 4] = __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// t[i] = entry i of the `rows` rows at x (lanes past `rows` are 0).
FASTLOSS_CPU_INLINE void rows_to_lanes(const float* x, int64_t n, int rows, RowLanes* t) {
  int64_t i = 0;
  if (rows == kRowLanes) {
    for (; i + 8 <= n; i += 8) {
      RowLanes v[8];
      for (int r = 0; r < 8; ++r) v[r] = *reinterpret_cast<const UnalignedRowLanes*>(x + r * n + i);
      transpose_8x8(v);
      for (int c = 0; c < 8; ++c) t[i + c] = v[c];
    }
  }
  for (; i < n; ++i) {
    for (int r = 0; r < kRowLanes; ++r) t[i][r] = r < rows ? x[r * n + i] : 0.0f;
  }
}

// The inverse of rows_to_lanes for the `rows` rows at y.
FASTLOSS_CPU_INLINE void lanes_to_rows(RowLanes* t, int64_t n, int rows, float* y) {
  int64_t i = 0;
  if (rows == kRowLanes) {
    for (; i + 8 <= n; i += 8) {
      RowLanes v[8];
      for (int c = 0; c < 8; ++c) v[c] = t[i + c];
      transpose_8x8(v);
      for (int r = 0; r < 8; ++r) *reinterpret_cast<UnalignedRowLanes*>(y + r * n + i) = v[r];
    }
  }
  for (; i < n; ++i) {
    for (int r = 0; r < rows; ++r) y[r * n + i] = t[i][r];
  }
}

template <bool kLog>
FASTLOSS_CPU_INLINE void forward_rows_per_lane(const float* x, float* y, int64_t begin, int64_t end, int64_t n) {
  constexpr int R = kRowLanes;
  constexpr float kLog2e = ExpConstants<float>::kLog2e;
  RowLanes t[kLaneRow], log_terms[kLog ? kLaneRow : 1];
  for (int64_t row0 = begin; row0 < end; row0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, end - row0));
    // The block is read column by column, an order the hardware prefetchers do not follow:
    // the next block's lines are fetched ahead.
    if (row0 + 2 * R <= end) {
      for (int64_t b = 0; b < R * n * static_cast<int64_t>(sizeof(float)); b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(x + (row0 + R) * n) + b);
      }
    }
    rows_to_lanes(x + row0 * n, n, rows, t);
    // Pass 1, as short_row_sum per lane: the largest exponent, the terms (into t for softmax),
    // and their sum in four partial sums. The running max and sums are vector locals: as
    // arrays, GCC kept them in memory, a store and a load in each step's dependency chain.
    RowLanes qmax = low_clamp<float>() * kLog2e - RowLanes{};
    for (int64_t i = 0; i < n; ++i) {
      const RowLanes q = t[i] * kLog2e;
      qmax = qmax > q ? qmax : q;  // fl_max
    }
    float m[R];
    for_each_lane<R, float>([&](int r) FASTLOSS_CPU_INLINE_LAMBDA { m[r] = round_to_int(qmax[r]); });
    RowLanes* terms = kLog ? log_terms : t;
    for (int64_t i = 0; i < n; ++i) {
      for_each_lane<R, float>([&](int r) FASTLOSS_CPU_INLINE_LAMBDA {
        terms[i][r] = exp_shifted(fl_max(low_clamp<float>(), t[i][r]), m[r]);
      });
    }
    RowLanes part[4] = {};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int k = 0; k < 4; ++k) part[k] += terms[i + k];
    }
    for (int k = 0; i < n; ++i, ++k) part[k] += terms[i];
    const RowLanes sum = (part[0] + part[1]) + (part[2] + part[3]);
    // Pass 2 over the buffer. A sum that is not a positive normal number belongs to a row of
    // the exact path (its log here is unused).
    float scale[R], offset[R];
    bool exact[R], any_exact = false;
    for (int r = 0; r < R; ++r) {
      const RowStats<float> stats = finish_row<float, false>(ExpSum<float>{sum[r], m[r]}, 0.0f);
      exact[r] = stats.exact && r < rows;
      any_exact |= exact[r];
      scale[r] = stats.inv_sum;
    }
    if constexpr (kLog) {
      for_each_lane<R, float>([&](int r) FASTLOSS_CPU_INLINE_LAMBDA { offset[r] = log_offset(m[r], log_of_normal(sum[r])); });
      for (i = 0; i < n; ++i) {
        for_each_lane<R, float>([&](int r) FASTLOSS_CPU_INLINE_LAMBDA {
          t[i][r] = pass2_value<true>(t[i][r], RowStats<float>{m[r], scale[r], offset[r], false});
        });
      }
    } else {
      for (i = 0; i < n; ++i) {
        for_each_lane<R, float>([&](int r) FASTLOSS_CPU_INLINE_LAMBDA { t[i][r] *= scale[r]; });
      }
    }
    lanes_to_rows(t, n, rows, y + row0 * n);
    if (any_exact) {
      for (int r = 0; r < rows; ++r) {
        if (exact[r]) exact_row<kLog, float, float, float>(x + (row0 + r) * n, y + (row0 + r) * n, n, 1);
      }
    }
  }
}

template <bool kLog, typename in_t, typename out_t>
FASTLOSS_CPU_INLINE void forward_short_rows(const in_t* x, out_t* y, int64_t begin, int64_t end, int64_t n) {
  using acc_t = typename AccType<in_t>::type;
  constexpr int kMax = kShortForwardRow<acc_t>, kVec = kVectorLanes<acc_t>;
  if (n > kMax) {  // whole vectors, the last one padded (register_row)
    const int64_t padded = (n + kVec - 1) / kVec * kVec;
    return with_full_width<kMax + kVec, kFullForwardRow<kLog, acc_t>, kVec>(padded, [&](auto w) FASTLOSS_CPU_INLINE_LAMBDA {
      constexpr int W = static_cast<int>(decltype(w)::value);
      if (padded == n) forward_short_rows<W, kLog>(x, y, begin, end, w);
      else if constexpr (kPartialVectorRows<kLog, acc_t>) forward_short_rows<W, kLog>(x, y, begin, end, n);
    });
  }
  with_short_width<kMax / 8, kMax>(n, [&](auto w, auto width) FASTLOSS_CPU_INLINE_LAMBDA {
    forward_short_rows<decltype(w)::value, kLog>(x, y, begin, end, width);
  });
}

// float or double log-softmax rows of up to kBatchedLogRowBytes on the chunked pass, in
// log_softmax_row_batches. A row at a time, each row's pass 2 waited on its own chain of
// reductions and a library log (2 threads, fp32, 2M entries in four rotating input sets,
// against torch: rows of 65 0.79x -> 1.00x, 100 0.83x -> 0.98x, 127 0.79x -> 1.04x with
// kPaddedTail). Rows of 300 to 1000 ran 0.95-1.0x the speed batched (the batch's rows no
// longer in L1 for pass 2).
constexpr int64_t kBatchedLogRowBytes = 1024;

template <int L, typename acc_t>
FASTLOSS_CPU_INLINE void log_softmax_batched_rows(const acc_t* x, acc_t* y, int64_t begin, int64_t end, int64_t n) {
  log_softmax_row_batches(
      x, y, begin, end, n,
      [&](int64_t row) FASTLOSS_CPU_INLINE_LAMBDA {
        const ChunkSum<acc_t> s = chunk_pass1<false, L, true>(x + row * n, n, static_cast<acc_t*>(nullptr));
        return ExpSum<acc_t>{s.sum, s.exponent};
      },
      [&](int64_t row, const RowStats<acc_t>& stats) FASTLOSS_CPU_INLINE_LAMBDA {
        const acc_t* xr = x + row * n;
        acc_t* yr = y + row * n;
        for (int64_t j = 0; j < n; ++j) yr[j] = pass2_value<true>(xr[j], stats);
      });
}

// Rows staged through float (convert.h), defined below the float entry points that they call:
// short float16 rows (kStagedHalfForwardRow, kStagedHalfBackwardRow), bfloat16 log-softmax
// forward rows (kStagedBf16LogRow), bfloat16 rows short enough for the register kernels
// (in those GCC widened a row of bfloat16 in half vectors that went through memory: forward,
// 65536 x 16, 1.7x the time of float), and 16-bit forward rows of forward_rows_per_lane.
template <bool kLog, typename in_t, typename out_t>
void forward_staged(const in_t* x, out_t* y, int64_t begin, int64_t end, int64_t n);
template <bool kLog, typename out_t, typename grad_t>
void backward_staged(const out_t* g, const out_t* y, grad_t* dx, int64_t begin, int64_t end, int64_t n);

// Rows along the last (contiguous) dimension. Short rows go to the register kernels or one
// per lane (above). Softmax rows that fit in cache use the cached
// variant; log-softmax and longer rows use the recomputing two-pass form: chunk pairs merged
// into the row's (S, E), then pass 2 reads the input again (float and double log-softmax rows
// of up to kBatchedLogRowBytes 16 at a time: log_softmax_batched_rows).
template <bool kLog, typename in_t, typename out_t>
FASTLOSS_CPU_INLINE void forward_lastdim_rows(const in_t* x, out_t* y, int64_t begin, int64_t end, int64_t n) {
  if constexpr (std::is_same_v<in_t, c10::Half>) {
    if (n <= kStagedHalfForwardRow<kLog> || register_row<kLog, float>(n)) return forward_staged<kLog>(x, y, begin, end, n);
  }
  if constexpr (std::is_same_v<in_t, c10::BFloat16> && kLog) {
    if (n <= kStagedBf16LogRow) return forward_staged<kLog>(x, y, begin, end, n);
  }
  using acc_t = typename AccType<in_t>::type;
  constexpr int L = kLanes<acc_t>;
  if (register_row<kLog, acc_t>(n)) {
    if constexpr (std::is_same_v<in_t, c10::BFloat16>) return forward_staged<kLog>(x, y, begin, end, n);
    else return forward_short_rows<kLog>(x, y, begin, end, n);
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (lane_row(n)) {
      if constexpr (std::is_same_v<in_t, float>) return forward_rows_per_lane<kLog>(x, y, begin, end, n);
      else return forward_staged<kLog>(x, y, begin, end, n);
    }
  }
  if constexpr (!kLog) {
    if (n * static_cast<int64_t>(sizeof(acc_t)) <= kMaxCachedRowBytes<acc_t>) {
      if constexpr (std::is_same_v<out_t, acc_t>) {
        for (int64_t row = begin; row < end; ++row) softmax_row_cached<L>(x + row * n, y + row * n, y + row * n, n);
      } else {
        std::unique_ptr<acc_t[]> scratch(new acc_t[n]);
        for (int64_t row = begin; row < end; ++row) softmax_row_cached<L>(x + row * n, y + row * n, scratch.get(), n);
      }
      return;
    }
  }
  // (16-bit rows this short are staged: the float kernel takes them.)
  if constexpr (kLog && std::is_same_v<in_t, acc_t> && std::is_same_v<out_t, acc_t>) {
    if (n * static_cast<int64_t>(sizeof(acc_t)) <= kBatchedLogRowBytes) {
      return log_softmax_batched_rows<L>(x, y, begin, end, n);
    }
  }
  for (int64_t row = begin; row < end; ++row) {
    const in_t* xr = x + row * n;
    out_t* yr = y + row * n;
    const RowStats<acc_t> stats = row_pass1<false, kLog, L>(xr, n, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
    if (stats.exact) {
      exact_row<kLog, in_t, out_t, acc_t>(xr, yr, n, 1);
      continue;
    }
    const int64_t C = chunk_length<in_t, out_t>(n);
    float in_buf[kChunkBuffer<in_t>], out_buf[kChunkBuffer<out_t>];
    for (int64_t c0 = 0; c0 < n; c0 += C) {
      const int64_t c = std::min(C, n - c0);
      const auto* xc = readable(xr + c0, c, in_buf);
      write_chunk(yr + c0, c, out_buf, [&](auto* yc) FASTLOSS_CPU_INLINE_LAMBDA {
        for (int64_t j = 0; j < c; ++j) {
          yc[j] = to_output<std::remove_pointer_t<decltype(yc)>>(pass2_value<kLog>(static_cast<acc_t>(xc[j]), stats));
        }
      });
    }
  }
}

// Statistics of the lanes' rows as arrays, each a loop across the lanes, and log-softmax's log
// by log_of_normal (branch-free: it vectorizes): a scalar log and division per column cost
// as much as a short column's entries. Lanes past the block's count hold the empty state and
// go unused.
template <bool kLog, typename acc_t, int L>
struct LaneStats {
  acc_t exponent[L], inv_sum[L], offset[L] = {};
  bool exact[L];

  FASTLOSS_CPU_INLINE LaneStats(const acc_t* sum, const acc_t* top, const acc_t* nonfinite) {
    for (int l = 0; l < L; ++l) {
      const RowStats<acc_t> r = finish_row<acc_t, false>(ExpSum<acc_t>{sum[l], top[l]}, nonfinite[l]);
      exponent[l] = r.exponent;
      inv_sum[l] = r.inv_sum;
      exact[l] = r.exact;
    }
    if constexpr (kLog) {
      for (int l = 0; l < L; ++l) offset[l] = log_offset(top[l], log_of_normal(sum[l]));
    }
  }
  FASTLOSS_CPU_INLINE RowStats<acc_t> operator[](int l) const { return {exponent[l], inv_sum[l], offset[l], false}; }
};

// Columns of at most kShortColumn entries along a non-last dimension: each entry's pair
// (mantissa, exponent) is kept (on the stack), the column's sum taken relative to its largest
// exponent, and the softmax scales the kept pairs: one exponential per entry, where the
// general block below takes two and merges levels of partial pairs. Float32 (8, C, 2^21 / 8C)
// over dim 1, one thread, against torch: C = 2 0.37x -> 0.63x, 4 0.51x -> 0.92x, 8 0.74x ->
// 1.30x, 21 0.80x -> 1.25x (log-softmax 0.38x -> 0.65x, 0.56x -> 0.95x, 0.80x -> 1.27x).
constexpr int64_t kShortColumn = 32;

template <bool kLog, typename in_t, typename out_t>
FASTLOSS_CPU_INLINE void forward_short_columns(const in_t* x, out_t* y, int64_t n, int64_t inner, int count) {
  using acc_t = typename AccType<in_t>::type;
  constexpr int L = kLanes<acc_t>;
  acc_t mantissa[kShortColumn][L], exponent[kShortColumn][L];
  acc_t top[L], sum[L] = {}, nonfinite[L] = {};
  for (int l = 0; l < L; ++l) top[l] = ExpConstants<acc_t>::kEmptyExponent;
  with_lane_count<L>(count, [&](auto lanes_used) FASTLOSS_CPU_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < lanes_used; ++l) {
        const acc_t xc = fl_max(low_clamp<acc_t>(), static_cast<acc_t>(x[i * inner + l]));
        const ExpPair<acc_t> p = exp_pair(xc);
        mantissa[i][l] = p.mantissa;
        exponent[i][l] = p.exponent;
        top[l] = fl_max(top[l], p.exponent);
        nonfinite[l] += xc - xc;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < lanes_used; ++l) sum[l] += ExpPair<acc_t>{mantissa[i][l], exponent[i][l]}.relative_to(top[l]);
    }
  });
  const LaneStats<kLog, acc_t, L> stats(sum, top, nonfinite);
  with_lane_count<L>(count, [&](auto lanes_used) FASTLOSS_CPU_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < lanes_used; ++l) {
        acc_t v;
        if constexpr (kLog) v = pass2_value<true>(static_cast<acc_t>(x[i * inner + l]), stats[l]);
        else v = ExpPair<acc_t>{mantissa[i][l], exponent[i][l]}.relative_to(stats.exponent[l]) * stats.inv_sum[l];
        y[i * inner + l] = to_output<out_t>(v);
      }
    }
  });
  for (int l = 0; l < count; ++l) {
    if (stats.exact[l]) exact_row<kLog, in_t, out_t, acc_t>(x + l, y + l, n, inner);
  }
}

// Rows along a non-last dimension: lanes are `count` adjacent rows (adjacent in `inner`),
// each strided by `inner`, so every load is contiguous across lanes.
template <bool kLog, typename in_t, typename out_t>
FASTLOSS_CPU_INLINE void forward_strided_block(const in_t* x, out_t* y, int64_t n, int64_t inner, int count) {
  if (n <= kShortColumn) return forward_short_columns<kLog>(x, y, n, inner, count);
  using acc_t = typename AccType<in_t>::type;
  constexpr int L = kLanes<acc_t>;
  Lanes<acc_t> lanes, group, block;
  lanes.reset();
  group.reset();
  for (int64_t b0 = 0, blocks = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    block.reset();
    with_lane_count<L>(count, [&](auto lanes_used) FASTLOSS_CPU_INLINE_LAMBDA {
      for (int64_t i = b0; i < b1; ++i) {
        for (int l = 0; l < lanes_used; ++l) block.add(l, static_cast<acc_t>(x[i * inner + l]));
      }
    });
    group.merge(block);
    if (++blocks == kSumBlock || b1 == n) {
      lanes.merge(group);
      group.reset();
      blocks = 0;
    }
  }
  const LaneStats<kLog, acc_t, L> stats(lanes.sum, lanes.exponent, lanes.nonfinite);
  with_lane_count<L>(count, [&](auto lanes_used) FASTLOSS_CPU_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) {
      for (int l = 0; l < lanes_used; ++l) {
        y[i * inner + l] = to_output<out_t>(pass2_value<kLog>(static_cast<acc_t>(x[i * inner + l]), stats[l]));
      }
    }
  });
  for (int l = 0; l < count; ++l) {
    if (stats.exact[l]) exact_row<kLog, in_t, out_t, acc_t>(x + l, y + l, n, inner);
  }
}

// exp(y) for a log-softmax output y <= 0 (-inf gives 0, NaN stays NaN), vectorizable.
template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t exp_of_log_prob(acc_t y) {
  return exp_shifted(fl_max(low_clamp<acc_t>(), y), acc_t(0));
}

// One entry of the backward, given the row's sum: softmax dx = y * (g - sum(g * y)),
// log_softmax dx = g - exp(y) * sum(g).
template <bool kLog, typename acc_t>
FASTLOSS_CPU_INLINE acc_t backward_value(acc_t g, acc_t y, acc_t total) {
  if constexpr (kLog) return g - exp_of_log_prob(y) * total;
  else return y * (g - total);
}

// Backward, one row at a time in lanes. kPaddedTail: below.
template <bool kLog, int L, bool kPaddedTail, typename out_t, typename grad_t>
FASTLOSS_CPU_INLINE void backward_lastdim_rows_lanes(const out_t* g, const out_t* y, grad_t* dx, int64_t begin,
                                                     int64_t end, int64_t n) {
  using acc_t = typename AccType<out_t>::type;
  // Chunks are a multiple of L: the same order of additions as one pass over the row.
  const int64_t C = chunk_length<out_t, grad_t>(n);
  float g_buf[kChunkBuffer<out_t>], y_buf[kChunkBuffer<out_t>], d_buf[kChunkBuffer<grad_t>];
  for (int64_t row = begin; row < end; ++row) {
    const out_t* gr = g + row * n;
    const out_t* yr = y + row * n;
    grad_t* dr = dx + row * n;
    acc_t partial[L] = {};
    [[maybe_unused]] acc_t tail = 0;
    for (int64_t c0 = 0; c0 < n; c0 += C) {
      const int64_t c = std::min(C, n - c0);
      const auto* gc = readable(gr + c0, c, g_buf);
      const auto* yc = [&]() FASTLOSS_CPU_INLINE_LAMBDA {  // log-softmax sums g alone
        if constexpr (kLog) return gc;
        else return readable(yr + c0, c, y_buf);
      }();
      int64_t i = 0;
      for (; i + L <= c; i += L) {
        for (int l = 0; l < L; ++l) {
          const acc_t gv = static_cast<acc_t>(gc[i + l]);
          partial[l] += kLog ? gv : gv * static_cast<acc_t>(yc[i + l]);
        }
      }
      // The last chunk's entries past a multiple of L. kPaddedTail (AVX-512): as one more set
      // of lanes padded with zeros (which leave a lane as it was: no lane is ever -0). Else in
      // a scalar of their own, a chain of up to L - 1 dependent additions per row, which on
      // AVX-512 cost more (2 threads, softmax backward against torch: bfloat16 rows of 127
      // 0.83x -> 1.04x, float16 rows of 47 0.90x -> 1.45x) but on AVX2 less (float16 rows of
      // 47 2.47x -> 1.95x padded, fp32 log-softmax 0.87x -> 0.78x). Lanes indexed with a
      // runtime l stayed on the stack (their reduction became L scalar loads and adds).
      if constexpr (kPaddedTail) {
        if (i < c) {
          acc_t gp[L], yp[L];
          for (int l = 0; l < L; ++l) {
            gp[l] = i + l < c ? static_cast<acc_t>(gc[i + l]) : acc_t(0);
            yp[l] = kLog || i + l >= c ? acc_t(0) : static_cast<acc_t>(yc[i + l]);
          }
          for (int l = 0; l < L; ++l) partial[l] += kLog ? gp[l] : gp[l] * yp[l];
        }
      } else {
        for (; i < c; ++i) {
          const acc_t gv = static_cast<acc_t>(gc[i]);
          tail += kLog ? gv : gv * static_cast<acc_t>(yc[i]);
        }
      }
    }
    const acc_t total = reduce_lanes<L>(partial, [](acc_t a, acc_t b) { return a + b; }) + tail;
    for (int64_t c0 = 0; c0 < n; c0 += C) {
      const int64_t c = std::min(C, n - c0);
      const auto* gc = readable(gr + c0, c, g_buf);
      const auto* yc = readable(yr + c0, c, y_buf);
      write_chunk(dr + c0, c, d_buf, [&](auto* dc) FASTLOSS_CPU_INLINE_LAMBDA {
        for (int64_t j = 0; j < c; ++j) {
          dc[j] = to_output<std::remove_pointer_t<decltype(dc)>>(
              backward_value<kLog>(static_cast<acc_t>(gc[j]), static_cast<acc_t>(yc[j]), total));
        }
      });
    }
  }
}

// Short rows use half of the lanes: the row's dot product ends in log2(L) dependent
// lane-combining steps, a visible share of a short row (AVX2, a quarter of the lanes:
// 128-wide fp32 rows 0.88x -> 0.91x torch). Not a quarter: below one 512-bit vector GCC
// interleaves rows of lanes with permutes (AVX-512, 128-wide fp32 rows in cache: 1.9x the
// time of half). The forward keeps every lane: its exponentials need the independent chains
// (measured no faster with fewer).
constexpr int64_t kHalfLaneRow = 512;

// Backward rows of at most W entries in registers, as in forward_short_rows, for float rows of
// up to kShortBackwardRow (2 threads, 1M entries, fp32, time per call against the lane loops
// above: rows of 8 330 -> 106 us, of 16 176 -> 115 us, of 32 115 -> 103 us; log-softmax 16
// 369 -> 202 us). Rows of 64 ran slower in it (softmax 101 -> 112 us; log-softmax rows of 48
// 0.85x torch), and so did double rows (16 wide, with masked loads: 337 -> 623 us).
template <int W, bool kLog, bool kWhole, typename out_t, typename grad_t, typename N>
FASTLOSS_CPU_INLINE void backward_short_row(const out_t* gr, const out_t* yr, grad_t* dr, N n) {
  using acc_t = typename AccType<out_t>::type;
  acc_t gv[W], yv[W], part[W];
  row_lanes<W, kWhole>(gr, n, acc_t(0), gv);
  row_lanes<W, kWhole>(yr, n, acc_t(0), yv);
  for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA { part[l] = kLog ? gv[l] : gv[l] * yv[l]; });
  const acc_t total = reduce_short<W>(part, [](auto a, auto b) FASTLOSS_CPU_INLINE_LAMBDA { return a + b; });
  for_each_lane<W, acc_t>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA {
    if (kWhole || l < n) dr[l] = to_output<grad_t>(backward_value<kLog>(gv[l], yv[l], total));
  });
}

template <int W, bool kLog, typename out_t, typename grad_t, typename N>
FASTLOSS_CPU_INLINE void backward_short_rows(const out_t* g, const out_t* y, grad_t* dx, int64_t begin, int64_t end,
                                             N n) {
  // Written over g (softmax_backward_in_place): a row's whole-vector store would spill into
  // gradients of the next rows before they are read, so only rows that fill their vectors
  // exactly are whole.
  const bool in_place = static_cast<const void*>(g) == static_cast<const void*>(dx);
  const int64_t whole_end = in_place && n != W ? begin : end;
  for (int64_t row = begin; row < end; ++row) {
    with_row_access<W>(row, whole_end, n, [&](auto whole) FASTLOSS_CPU_INLINE_LAMBDA {
      backward_short_row<W, kLog, decltype(whole)::value>(g + row * n, y + row * n, dx + row * n, n);
    });
  }
}

constexpr int kShortBackwardRow = 32;
constexpr int64_t kRegisterLogBackwardRow = 4096;

static_assert(kStagedHalfBackwardRow >= kShortBackwardRow);

template <bool kLog, typename out_t, typename grad_t>
FASTLOSS_CPU_INLINE void backward_short_rows(const out_t* g, const out_t* y, grad_t* dx, int64_t begin, int64_t end,
                                             int64_t n) {
  with_short_width<8, kShortBackwardRow>(n, [&](auto w, auto width) FASTLOSS_CPU_INLINE_LAMBDA {
    backward_short_rows<decltype(w)::value, kLog>(g, y, dx, begin, end, width);
  });
}

#if defined(FASTLOSS_X86_CLONES)
// The last steps of reduce_lanes over 8 lanes in a register: lane l += lane l + 4, + 2, + 1.
FASTLOSS_AVX2_INLINE float reduce_halves_8(__m256 p8) {
  __m128 p4 = _mm_add_ps(_mm256_castps256_ps128(p8), _mm256_extractf128_ps(p8, 1));
  p4 = _mm_add_ps(p4, _mm_movehl_ps(p4, p4));
  p4 = _mm_add_ss(p4, _mm_shuffle_ps(p4, p4, 1));
  return _mm_cvtss_f32(p4);
}

// backward_value over the lanes of a float vector (__m512, __m256): log-softmax through the
// float kernel's own code on the stack, which GCC vectorizes the same way.
template <bool kLog, typename Vec>
FASTLOSS_CPU_INLINE Vec backward_vector(Vec g, Vec y, float total) {
  if constexpr (kLog) {
    constexpr int W = sizeof(Vec) / sizeof(float);
    float ga[W], ya[W], da[W];
    std::memcpy(ga, &g, sizeof(g));
    std::memcpy(ya, &y, sizeof(y));
    for_each_lane<W, float>([&](int l) FASTLOSS_CPU_INLINE_LAMBDA {
      da[l] = backward_value<true>(ga[l], ya[l], total);
    });
    Vec d;
    std::memcpy(&d, da, sizeof(d));
    return d;
  } else {
    return y * (g - total);
  }
}

// Rows row, row + step, ..., row + (R - 1) step of the float16 / bfloat16 softmax (kLog:
// log-softmax) backward on AVX-512, converting in registers (and of the float log-softmax
// backward of rows up to kRegisterLogBackwardRow, without conversions). Staged (float16),
// every element went into a float buffer and back (rows of 1024, 1M entries in cache, 2
// threads: 96 us against torch's 54); bfloat16 converted in GCC's vectorization of the lane
// loops (rows of 64: 110 us against 90). This is backward_lastdim_rows_lanes' float
// arithmetic in the same order, lane for lane: L lanes (fused multiply-adds, as GCC contracts
// them there), the tail as one more set of lanes padded with zeros, the lanes combined by
// halves; so the result is still the float kernel's rounded once. Log-softmax's exp(y) is
// that kernel's own code (backward_value) over each 16 converted entries, which GCC
// vectorizes the same way.
template <bool kLog, int L, int R, typename T>
FASTLOSS_AVX512_INLINE void backward_in_registers_avx512_rows(const T* g, const T* y, T* dx, int64_t row,
                                                              int64_t step, int64_t n) {
  constexpr int kVectors = L / 16;
  __m512 part[R][kVectors];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVectors; ++v) part[r][v] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        const int64_t k = (row + r * step) * n + i + 16 * v;
        part[r][v] = kLog ? _mm512_add_ps(part[r][v], avx512::load16(g + k))
                          : _mm512_fmadd_ps(avx512::load16(g + k), avx512::load16(y + k), part[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const T* gr = g + (row + r * step) * n;
    const T* yr = y + (row + r * step) * n;
    T* dr = dx + (row + r * step) * n;
    // The entries past a multiple of L: the float kernel's zero-padded set of lanes on AVX-512
    // (kPaddedTail; a vector wholly past the row adds nothing there).
    for (int v = 0; v < kVectors && i + 16 * v < n; ++v) {
      const __mmask16 m = avx512::first_lanes(n - i - 16 * v);
      const __m512 gv = avx512::load16(gr + i + 16 * v, m);
      part[r][v] = kLog ? _mm512_add_ps(part[r][v], gv)
                        : _mm512_fmadd_ps(gv, avx512::load16(yr + i + 16 * v, m), part[r][v]);
    }
    // reduce_lanes: lane l += lane l + L/2, then + L/4, ..., + 1.
    const __m512 p16 = kVectors == 2 ? _mm512_add_ps(part[r][0], part[r][kVectors - 1]) : part[r][0];
    const __m256 p8 = _mm256_add_ps(_mm512_castps512_ps256(p16), _mm512_extractf32x8_ps(p16, 1));
    const float total = reduce_halves_8(p8);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      avx512::store16(dr + j, backward_vector<kLog>(avx512::load16(gr + j), avx512::load16(yr + j), total));
    }
    if (j < n) {
      const __mmask16 m = avx512::first_lanes(n - j);
      avx512::store16(dr + j, backward_vector<kLog>(avx512::load16(gr + j, m), avx512::load16(yr + j, m), total), m);
    }
  }
}

// The register kernels take two rows at a time where the chain is long (AVX-512, 2 threads,
// 1M float16 entries, against torch: rows of 256 0.80x -> 1.00x, of 512 0.76x -> 1.02x; rows
// of 64 1.18x -> 1.02x; AVX2, float16 rows of 256 and 512: 1.17x -> 1.33-1.38x, bfloat16 the
// same): one from each half of the thread's rows [begin, end), so that each half streams in
// order. Adjacent rows in turn streamed from memory at 0.62-0.80x torch (rows of 256 and 512,
// 2M entries in four rotating input sets, 2 threads); from the two halves at 0.88-1.26x, in
// cache alike. The number of such pairs: rows begin + half .. begin + 2 half - 1 go with the
// first half's, the rest one at a time.
template <int L>
FASTLOSS_CPU_INLINE int64_t interleaved_row_pairs(int64_t begin, int64_t end, int64_t n) {
  return L == 16 && n > 128 ? (end - begin) / 2 : 0;
}

template <bool kLog, int L, typename T>
__attribute__((target("arch=x86-64-v4"))) void backward_in_registers_avx512(const T* g, const T* y, T* dx,
                                                                             int64_t begin, int64_t end, int64_t n) {
  static_assert(L == 16 || L == 32, "one or two vectors of lanes");
  const int64_t half = interleaved_row_pairs<L>(begin, end, n);
  for (int64_t row = begin; row < begin + half; ++row) backward_in_registers_avx512_rows<kLog, L, 2>(g, y, dx, row, half, n);
  for (int64_t row = begin + 2 * half; row < end; ++row) backward_in_registers_avx512_rows<kLog, L, 1>(g, y, dx, row, 1, n);
}

// The same without AVX-512, 8 entries per AVX2 register (F16C for float16): the float
// kernel's arithmetic (backward_lastdim_rows_lanes, L lanes in L / 8 registers) lane for
// lane, its tail in a scalar of its own. Partial vectors are loaded in registers (avx2::
// load8_first): through a copy on the stack they had stalled on store forwarding (float16
// rows of 100: 463 -> 205 us). AVX2 build on the AMD Zen 4, 2 threads, 2M entries, against
// torch's AVX2 kernels, lanes (bfloat16, float) or staged (float16) -> registers: bfloat16
// softmax rows of 40-63 1.8-2.9x -> 1.8-3.5x, 64-4096 0.82-0.98x -> 0.93-1.14x,
// log-softmax 40-63 1.3-2.0x -> 1.7-2.5x; float16 softmax rows of 33-63 2.5-4.7x ->
// 3.4-7.4x, log-softmax 1.6-3.1x -> 2.1-3.5x; float log-softmax rows of 40-63 0.88-1.07x
// -> 1.08-1.14x, 513 1.17x -> 1.32-1.37x (33: 1.22x -> 1.15-1.18x). The float softmax
// backward measured the same either way (rows of 64-4096, within the noise), and stays in lanes.
template <bool kLog, int L, int R, typename T>
FASTLOSS_AVX2_INLINE void backward_in_registers_avx2_rows(const T* g, const T* y, T* dx, int64_t row, int64_t step,
                                                          int64_t n) {
  constexpr int kVectors = L / 8;
  __m256 part[R][kVectors];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVectors; ++v) part[r][v] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        const int64_t k = (row + r * step) * n + i + 8 * v;
        const __m256 gv = avx2::load8(g + k);
        part[r][v] = kLog ? _mm256_add_ps(part[r][v], gv) : _mm256_fmadd_ps(gv, avx2::load8(y + k), part[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const T* gr = g + (row + r * step) * n;
    const T* yr = y + (row + r * step) * n;
    T* dr = dx + (row + r * step) * n;
    // The float kernel's tail without AVX-512: a scalar of its own.
    float tail = 0;
    if (i < n) {
      float gt[L], yt[L];
      for (int64_t k = 0; i + k < n; k += 8) {
        const int64_t c = std::min<int64_t>(8, n - i - k);
        _mm256_storeu_ps(gt + k, c == 8 ? avx2::load8(gr + i + k) : avx2::load8_first(gr + i + k, c));
        if (!kLog) _mm256_storeu_ps(yt + k, c == 8 ? avx2::load8(yr + i + k) : avx2::load8_first(yr + i + k, c));
      }
      for (int64_t k = 0; i + k < n; ++k) tail = kLog ? tail + gt[k] : std::fma(gt[k], yt[k], tail);
    }
    // reduce_lanes: lane l += lane l + L/2, then + L/4, ..., + 1.
    const __m256 p8 = kVectors == 4 ? _mm256_add_ps(_mm256_add_ps(part[r][0], part[r][2]),
                                                    _mm256_add_ps(part[r][1], part[r][3]))
                                    : _mm256_add_ps(part[r][0], part[r][kVectors - 1]);
    const float total = reduce_halves_8(p8) + tail;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      avx2::store8(dr + j, backward_vector<kLog>(avx2::load8(gr + j), avx2::load8(yr + j), total));
    }
    if (j < n) {
      const int64_t c = n - j;
      avx2::store8_first(dr + j, backward_vector<kLog>(avx2::load8_first(gr + j, c), avx2::load8_first(yr + j, c), total),
                         c);
    }
  }
}

template <bool kLog, int L, typename T>
__attribute__((target("arch=x86-64-v3"))) void backward_in_registers_avx2(const T* g, const T* y, T* dx,
                                                                           int64_t begin, int64_t end, int64_t n) {
  static_assert(L == 16 || L == 32, "two or four vectors of lanes");
  const int64_t half = interleaved_row_pairs<L>(begin, end, n);
  for (int64_t row = begin; row < begin + half; ++row) backward_in_registers_avx2_rows<kLog, L, 2>(g, y, dx, row, half, n);
  for (int64_t row = begin + 2 * half; row < end; ++row) backward_in_registers_avx2_rows<kLog, L, 1>(g, y, dx, row, 1, n);
}
#endif

template <bool kLog, typename out_t, typename grad_t>
FASTLOSS_CPU_INLINE void backward_lastdim_rows(const out_t* g, const out_t* y, grad_t* dx, int64_t begin,
                                       int64_t end, int64_t n) {
#if defined(FASTLOSS_X86_CLONES)
  constexpr bool k16Bit = std::is_same_v<out_t, grad_t> &&
                          (std::is_same_v<grad_t, c10::Half> || std::is_same_v<grad_t, c10::BFloat16>);
  // The fp32 log-softmax backward as well: GCC's epilogue of the lane loops took a row's last
  // exponentials one at a time (AVX-512, 2 threads, against torch, lanes -> registers: rows
  // of 47 0.60-0.83x -> 1.08-1.24x, 127 0.91-1.03x -> 1.02-1.11x, 513 0.79-0.86x ->
  // 1.17-1.49x, 4096 1.04-1.27x -> 0.99-1.27x, 16384 1.19x -> 1.14x). The softmax backward
  // was slower in registers (rows of 127 1.18-1.21x -> 0.92-0.93x, 300 1.26x -> 0.78-0.79x).
  constexpr bool kFloatLog = kLog && std::is_same_v<out_t, float> && std::is_same_v<grad_t, float>;
  if constexpr (k16Bit || kFloatLog) {
    // The 16-bit types follow the float kernel's dispatch: its short rows
    // (n <= kShortBackwardRow) stay staged.
    if (n > kShortBackwardRow && (k16Bit || n <= kRegisterLogBackwardRow)) {
      const bool half_lanes = n <= kHalfLaneRow;
      if (has_avx512()) {
        if (half_lanes) return backward_in_registers_avx512<kLog, kLanes<float> / 2>(g, y, dx, begin, end, n);
        return backward_in_registers_avx512<kLog, kLanes<float>>(g, y, dx, begin, end, n);
      }
      if (has_avx2()) {
        if (half_lanes) return backward_in_registers_avx2<kLog, kLanes<float> / 2>(g, y, dx, begin, end, n);
        return backward_in_registers_avx2<kLog, kLanes<float>>(g, y, dx, begin, end, n);
      }
    }
  }
#endif
  if constexpr (std::is_same_v<grad_t, c10::Half>) {
    if (n <= kStagedHalfBackwardRow) return backward_staged<kLog>(g, y, dx, begin, end, n);
  }
  using acc_t = typename AccType<out_t>::type;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n <= kShortBackwardRow && has_avx512()) {
      if constexpr (std::is_same_v<grad_t, c10::BFloat16>) return backward_staged<kLog>(g, y, dx, begin, end, n);
      else return backward_short_rows<kLog>(g, y, dx, begin, end, n);
    }
  }
  const auto lanes = [&](auto padded) FASTLOSS_CPU_INLINE_LAMBDA {
    if (n <= kHalfLaneRow) {
      backward_lastdim_rows_lanes<kLog, kLanes<acc_t> / 2, decltype(padded)::value>(g, y, dx, begin, end, n);
    } else {
      backward_lastdim_rows_lanes<kLog, kLanes<acc_t>, decltype(padded)::value>(g, y, dx, begin, end, n);
    }
  };
  if (has_avx512()) lanes(std::true_type{});
  else lanes(std::false_type{});
}

// The backward's columns along a non-last dim: blocks of up to four times kLanes adjacent
// columns, so that each row's read is 512 contiguous bytes of g and of y rather than 128 (1024
// x 1024 along dim 0, 2 threads: 0.7x torch's time -> 1.1x; 4096 x 4096: 2.0x -> 2.9x), but
// narrower where wide blocks would leave fewer than two per thread.
template <typename acc_t>
constexpr int kBackwardStridedLanes = 4 * kLanes<acc_t>;

template <typename acc_t>
int backward_strided_lanes(const RowLayout& l) {
  int lanes = kBackwardStridedLanes<acc_t>;
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (lanes > kLanes<acc_t> && l.outer * ((l.inner + lanes - 1) / lanes) < want) lanes /= 2;
  return lanes;
}

template <bool kLog, typename out_t, typename grad_t>
FASTLOSS_CPU_INLINE void backward_strided_block(const out_t* g, const out_t* y, grad_t* dx, int64_t n, int64_t inner, int count) {
  using acc_t = typename AccType<out_t>::type;
  constexpr int L = kBackwardStridedLanes<acc_t>;
  acc_t total[L] = {}, group[L] = {}, block[L];
  for (int64_t b0 = 0, blocks = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    for (int l = 0; l < L; ++l) block[l] = 0;
    for (int64_t i = b0; i < b1; ++i) {
      for (int l = 0; l < count; ++l) {
        const acc_t gv = static_cast<acc_t>(g[i * inner + l]);
        block[l] += kLog ? gv : gv * static_cast<acc_t>(y[i * inner + l]);
      }
    }
    for (int l = 0; l < L; ++l) group[l] += block[l];
    if (++blocks == kSumBlock || b1 == n) {
      for (int l = 0; l < L; ++l) {
        total[l] += group[l];
        group[l] = 0;
      }
      blocks = 0;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int l = 0; l < count; ++l) {
      const acc_t gv = static_cast<acc_t>(g[i * inner + l]);
      const acc_t yv = static_cast<acc_t>(y[i * inner + l]);
      dx[i * inner + l] = to_output<grad_t>(backward_value<kLog>(gv, yv, total[l]));
    }
  }
}

// Non-template entry points, each compiled once per instruction set (FASTLOSS_CPU_CLONES)
// and chosen at load time (or for one level: FASTLOSS_CPU_ARCH); the templates above are
// inlined into them.
#define FASTLOSS_FORWARD_ENTRY(NAME, LOG, IN, OUT)                                            \
  FASTLOSS_CPU_CLONES void NAME##_lastdim(const IN* x, OUT* y, int64_t b, int64_t e,        \
                                          int64_t n) {                                      \
    forward_lastdim_rows<LOG>(x, y, b, e, n);                                               \
  }                                                                                         \
  FASTLOSS_CPU_CLONES void NAME##_strided(const IN* x, OUT* y, int64_t n, int64_t inner,    \
                                          int count) {                                      \
    forward_strided_block<LOG>(x, y, n, inner, count);                                      \
  }
#define FASTLOSS_FORWARD_ENTRIES(SUFFIX, IN, OUT)                  \
  FASTLOSS_FORWARD_ENTRY(softmax_##SUFFIX, false, IN, OUT)        \
  FASTLOSS_FORWARD_ENTRY(log_softmax_##SUFFIX, true, IN, OUT)

FASTLOSS_FORWARD_ENTRIES(f32, float, float)
FASTLOSS_FORWARD_ENTRIES(f64, double, double)
FASTLOSS_FORWARD_ENTRIES(f16, c10::Half, c10::Half)
FASTLOSS_FORWARD_ENTRIES(bf16, c10::BFloat16, c10::BFloat16)
FASTLOSS_FORWARD_ENTRIES(f16_f32, c10::Half, float)
FASTLOSS_FORWARD_ENTRIES(bf16_f32, c10::BFloat16, float)

#define FASTLOSS_BACKWARD_ENTRY(NAME, LOG, OUT, GRAD)                                          \
  FASTLOSS_CPU_CLONES void NAME##_lastdim(const OUT* g, const OUT* y, GRAD* dx, int64_t b,   \
                                          int64_t e, int64_t n) {                            \
    backward_lastdim_rows<LOG>(g, y, dx, b, e, n);                                           \
  }                                                                                          \
  FASTLOSS_CPU_CLONES void NAME##_strided(const OUT* g, const OUT* y, GRAD* dx, int64_t n,  \
                                          int64_t inner, int count) {                        \
    backward_strided_block<LOG>(g, y, dx, n, inner, count);                                  \
  }
#define FASTLOSS_BACKWARD_ENTRIES(SUFFIX, OUT, GRAD)                         \
  FASTLOSS_BACKWARD_ENTRY(softmax_backward_##SUFFIX, false, OUT, GRAD)     \
  FASTLOSS_BACKWARD_ENTRY(log_softmax_backward_##SUFFIX, true, OUT, GRAD)

FASTLOSS_BACKWARD_ENTRIES(f32, float, float)
FASTLOSS_BACKWARD_ENTRIES(f64, double, double)
FASTLOSS_BACKWARD_ENTRIES(f16, c10::Half, c10::Half)
FASTLOSS_BACKWARD_ENTRIES(bf16, c10::BFloat16, c10::BFloat16)
FASTLOSS_BACKWARD_ENTRIES(f32_f16, float, c10::Half)
FASTLOSS_BACKWARD_ENTRIES(f32_bf16, float, c10::BFloat16)

// Rows staged through float: blocks of rows are converted to float, run through the float
// kernels, and the result converted back (one rounding to the output type, as in the direct
// kernels).
template <bool kLog, typename in_t, typename out_t>
void forward_staged(const in_t* x, out_t* y, int64_t begin, int64_t end, int64_t n) {
  const auto kernel = [&](int64_t rows, const float* xf, float* yf) {
    if constexpr (kLog) log_softmax_f32_lastdim(xf, yf, 0, rows, n);
    else softmax_f32_lastdim(xf, yf, 0, rows, n);
  };
  if constexpr (std::is_same_v<out_t, float>) {  // float output: written in place
    staged_float_rows<in_t, 1, 0>(begin, end, n, {x}, {}, [&](int64_t r, int64_t rows, const auto& in, const auto&) {
      kernel(rows, in[0], y + r * n);
    });
  } else {
    staged_float_rows<in_t, 1, 1>(begin, end, n, {x}, {y}, [&](int64_t, int64_t rows, const auto& in, const auto& out) {
      kernel(rows, in[0], out[0]);
    });
  }
}

// grad_t: c10::Half or c10::BFloat16; out_t: grad_t, or float (float output of a float16 or
// bfloat16 input, read in place).
template <bool kLog, typename out_t, typename grad_t>
void backward_staged(const out_t* g, const out_t* y, grad_t* dx, int64_t begin, int64_t end, int64_t n) {
  const auto kernel = [&](int64_t rows, const float* gf, const float* yf, float* d) {
    if constexpr (kLog) log_softmax_backward_f32_lastdim(gf, yf, d, 0, rows, n);
    else softmax_backward_f32_lastdim(gf, yf, d, 0, rows, n);
  };
  if constexpr (std::is_same_v<out_t, float>) {
    staged_float_rows<grad_t, 0, 1>(begin, end, n, {}, {dx}, [&](int64_t r, int64_t rows, const auto&, const auto& out) {
      kernel(rows, g + r * n, y + r * n, out[0]);
    });
  } else {
    staged_float_rows<grad_t, 2, 1>(begin, end, n, {g, y}, {dx}, [&](int64_t, int64_t rows, const auto& in, const auto& out) {
      kernel(rows, in[0], in[1], out[0]);
    });
  }
}

#define FASTLOSS_RUN_FORWARD(NAME, IN, OUT)                                                  \
  do {                                                                                      \
    const IN* xp = reinterpret_cast<const IN*>(x.const_data_ptr());                          \
    OUT* yp = reinterpret_cast<OUT*>(y.mutable_data_ptr());                                  \
    const WritePrefault prefault({y}, l.outer);                                             \
    for_each_row_block(                                                                     \
        l,                                                                                  \
        [&](int64_t b, int64_t e) {                                                         \
          prefault.rows(b, e, [&](int64_t cb, int64_t ce) { NAME##_lastdim(xp, yp, cb, ce, l.size); }); \
        },                                                                                  \
        [&](int64_t o, int64_t j, int count) {                                                 \
          const int64_t off = o * l.size * l.inner + j;                                      \
          NAME##_strided(xp + off, yp + off, l.size, l.inner, count);                        \
        }, \
        kLanes<typename AccType<IN>::type>);                                                 \
  } while (0)

template <bool kLog>
at::Tensor forward(const at::Tensor& self, int64_t dim, bool half_to_float) {
  const char* op = kLog ? "log_softmax" : "softmax";
  TORCH_CHECK(self.device().is_cpu(), "fastloss.", op, ": expected 'self' on the CPU");
  const SoftmaxArgs args = softmax_forward_args(op, self, dim, half_to_float);
  if (args.layout.size == 1) return singleton_softmax(self, args.out_dtype, kLog);
  const at::Tensor x = self.contiguous();
  at::Tensor y = empty_output(self.sizes(), self.options().dtype(args.out_dtype));
  if (y.numel() == 0) return y;
  const RowLayout& l = args.layout;
  const auto in = self.scalar_type();
  const bool to_float = half_to_float;
#define FASTLOSS_FORWARD_CASE(SUFFIX, IN, OUT)                                                   \
  if constexpr (kLog) FASTLOSS_RUN_FORWARD(log_softmax_##SUFFIX, IN, OUT);                      \
  else FASTLOSS_RUN_FORWARD(softmax_##SUFFIX, IN, OUT)
  if (in == c10::kFloat) {
    FASTLOSS_FORWARD_CASE(f32, float, float);
  } else if (in == c10::kDouble) {
    FASTLOSS_FORWARD_CASE(f64, double, double);
  } else if (in == c10::kHalf && !to_float) {
    FASTLOSS_FORWARD_CASE(f16, c10::Half, c10::Half);
  } else if (in == c10::kHalf) {
    FASTLOSS_FORWARD_CASE(f16_f32, c10::Half, float);
  } else if (in == c10::kBFloat16 && !to_float) {
    FASTLOSS_FORWARD_CASE(bf16, c10::BFloat16, c10::BFloat16);
  } else {
    FASTLOSS_FORWARD_CASE(bf16_f32, c10::BFloat16, float);
  }
#undef FASTLOSS_FORWARD_CASE
  return y;
}

#define FASTLOSS_RUN_BACKWARD(NAME, OUT, GRAD)                                                   \
  do {                                                                                          \
    const OUT* gp = reinterpret_cast<const OUT*>(g.const_data_ptr());                            \
    const OUT* yp = reinterpret_cast<const OUT*>(y.const_data_ptr());                            \
    GRAD* dp = reinterpret_cast<GRAD*>(dx.mutable_data_ptr());                                   \
    const WritePrefault prefault({dx}, l.outer);                                                \
    for_each_row_block(                                                                         \
        l,                                                                                      \
        [&](int64_t b, int64_t e) {                                                             \
          prefault.rows(b, e, [&](int64_t cb, int64_t ce) { NAME##_lastdim(gp, yp, dp, cb, ce, l.size); }); \
        },                                                                                      \
        [&](int64_t o, int64_t j, int count) {                                                  \
          const int64_t off = o * l.size * l.inner + j;                                         \
          NAME##_strided(gp + off, yp + off, dp + off, l.size, l.inner, count);                 \
        },                                                                                      \
        backward_strided_lanes<typename AccType<OUT>::type>(l));                                 \
  } while (0)

// dx for rows laid out as l (g, y and dx contiguous; dx may be g itself).
template <bool kLog>
void run_backward(const at::Tensor& g, const at::Tensor& y, const at::Tensor& dx, const RowLayout& l) {
  const auto out = y.scalar_type(), input_dtype = dx.scalar_type();
#define FASTLOSS_BACKWARD_CASE(SUFFIX, OUT, GRAD)                                                 \
  if constexpr (kLog) FASTLOSS_RUN_BACKWARD(log_softmax_backward_##SUFFIX, OUT, GRAD);           \
  else FASTLOSS_RUN_BACKWARD(softmax_backward_##SUFFIX, OUT, GRAD)
  if (out == c10::kDouble) {
    FASTLOSS_BACKWARD_CASE(f64, double, double);
  } else if (out == c10::kHalf) {
    FASTLOSS_BACKWARD_CASE(f16, c10::Half, c10::Half);
  } else if (out == c10::kBFloat16) {
    FASTLOSS_BACKWARD_CASE(bf16, c10::BFloat16, c10::BFloat16);
  } else if (input_dtype == c10::kHalf) {
    FASTLOSS_BACKWARD_CASE(f32_f16, float, c10::Half);
  } else if (input_dtype == c10::kBFloat16) {
    FASTLOSS_BACKWARD_CASE(f32_bf16, float, c10::BFloat16);
  } else {
    FASTLOSS_BACKWARD_CASE(f32, float, float);
  }
#undef FASTLOSS_BACKWARD_CASE
}

const char* backward_name(bool log) { return log ? "log_softmax_backward" : "softmax_backward"; }

template <bool kLog>
at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                    c10::ScalarType input_dtype) {
  const char* op = backward_name(kLog);
  TORCH_CHECK(output.device().is_cpu(), "fastloss.", op, ": expected 'output' on the CPU");
  const RowLayout l = softmax_backward_args(op, grad_output, output, dim, input_dtype);
  at::Tensor dx = empty_output(output.sizes(), output.options().dtype(input_dtype));
  if (dx.numel() > 0) run_backward<kLog>(grad_output.contiguous(), output.contiguous(), dx, l);
  return dx;
}

}  // namespace

bool softmax_backward_in_place(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                               c10::ScalarType input_dtype, bool log) {
  const char* op = backward_name(log);
  if (!output.device().is_cpu() || grad_output.scalar_type() != input_dtype || !grad_output.is_contiguous()) {
    return false;
  }
  const RowLayout l = softmax_backward_args(op, grad_output, output, dim, input_dtype);
  // Named in profiles like the op it stands in for.
  RECORD_FUNCTION(log ? "fastloss::log_softmax_backward (in place)" : "fastloss::softmax_backward (in place)",
                  c10::ArrayRef<const c10::IValue>{});
  if (grad_output.numel() == 0) return true;
  const at::Tensor y = output.contiguous();
  if (log) run_backward<true>(grad_output, y, grad_output, l);
  else run_backward<false>(grad_output, y, grad_output, l);
  return true;
}

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("softmax", &forward<false>);
  m.impl("log_softmax", &forward<true>);
  m.impl("softmax_backward", &backward<false>);
  m.impl("log_softmax_backward", &backward<true>);
}

}  // namespace fastloss::cpu
