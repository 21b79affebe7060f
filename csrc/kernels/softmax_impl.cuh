// Two-pass softmax / log-softmax on CUDA (Dukhan & Ablavatski 2020, arXiv 2001.04438).
//
// exp(x) is accumulated as (mantissa, exponent) pairs (common/exp_pair.h), so no max pass
// is needed, and partial sums from lanes, warps, blocks or row chunks merge exactly. Paths
// for rows along the last dimension (inner == 1), chosen by shape:
//   warp   size <= 1024 (512 for double): one warp (a 2^k-lane group for size <= 32) per
//          row, the row held in registers: 1 read + 1 write per element.
//   cache  one block per row, the row cached in shared memory (<= 160 KB, opt-in above
//          48 KB; the block path if the opt-in fails): 1 read + 1 write.
//   block  one block per row, rows too long for shared memory: 2 reads + 1 write.
//   split  few long rows (rows < 2 x SMs, size >= 4096, caller-provided workspace): each row
//          is cut into chunks of >= 2048 elements (~4 blocks per SM in all); kernel 1 writes one
//          pair per chunk to a small workspace, kernel 2 merges the row's pairs and writes its
//          chunk: 2 reads + 1 write, with the whole GPU busy.
// inner > 1 (softmax over a non-last dimension): a block is a tile of adjacent columns
// (coalesced across threadIdx.x) times slices of the softmax dimension (threadIdx.y); the
// slices' pairs merge in shared memory: 2 reads + 1 write.
// Rows whose entries are NaN/+inf, too large to reduce accurately, or all clamped (all -inf)
// take an exact max-subtracting path inside the same kernel, with torch.softmax's semantics;
// it is detected exactly as in cpu/softmax.cpp, with no host synchronization.
// Backward: softmax dx = y * (g - sum(g * y)), log-softmax dx = g - exp(y) * sum(g), with
// the same warp / block / split / strided shapes (2 reads + 1 write; the warp path 1 + 1).
// Accumulation in float (double for double inputs).
//
// This header holds the kernels and the typed launchers; softmax.cu dispatches on dtype, and
// each softmax_<dtype>.cu instantiates one input dtype's launchers, so the kernels of
// different dtypes compile in parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/exp_pair.h"
#include "common/softmax_math.h"
#include "kernels/device_utils.cuh"
#include "kernels/dtype.h"

namespace fastloss::kernels {
namespace {

// Rows up to this length live in one warp's registers (512 for double: 32 doubles per lane
// would cost ~240 registers).
template <typename T>
constexpr int kWarpMaxSize = sizeof(T) == 8 ? 512 : 1024;
constexpr int kWarpBlockThreads = 128;
constexpr int kSplitThreads = 256;
constexpr int kStridedMaxThreads = 512;
constexpr int64_t kSplitMinChunk = 2048;  // shorter chunks cost more in merging than they gain
constexpr int64_t kSplitMaxChunks = 1024;
constexpr int kCacheMaxBytes = 160 * 1024;

template <typename T>
using AccOf = AccType<T>;

// Register caps. Without them ptxas aims at full occupancy and trades small spills for it;
// with __launch_bounds__ minimum-block counts the caps land on 64, just below what the row
// kernels need. 80 (128 for double, whose exp/log/division need more) keeps >= 37% occupancy
// for these bandwidth-bound kernels with no spills. Block kernels launch <= 512 threads.
template <typename T>
constexpr int kBlockMaxRegs = sizeof(typename AccOf<T>::type) == 8 ? 128 : 80;
template <typename T, int kThreads>
constexpr int kMinBlocks = (sizeof(typename AccOf<T>::type) == 8 ? 512 : 1024) / kThreads;
// Warp kernels hold whole rows in registers: 128 per thread (255 for double).
template <typename T>
constexpr int kWarpMinBlocks = sizeof(typename AccOf<T>::type) == 8 ? 2 : 4;

// -------------------------------------------------------------------------------------------
// Pass-1 state of a thread; row statistics come from common/softmax_math.h.

template <typename acc_t>
struct PassOne {
  ExpSum<acc_t> s;
  acc_t nonfinite;  // sum of (x - x): NaN iff some entry is NaN or +inf

  __device__ __forceinline__ void init() {
    s = ExpSum<acc_t>::empty();
    nonfinite = 0;
  }
  __device__ __forceinline__ void add(acc_t x) {
    const acc_t xc = fl_max(low_clamp<acc_t>(), x);
    const ExpPair<acc_t> p = exp_pair(xc);
    s.add(p.mantissa, p.exponent);
    nonfinite += xc - xc;
  }
  __device__ __forceinline__ void merge(const PassOne& o) {
    s.merge(o.s);
    nonfinite += o.nonfinite;
  }
};

using kernels::shfl_xor;  // the scalar overloads, hidden by this one otherwise

template <typename acc_t>
__device__ __forceinline__ PassOne<acc_t> shfl_xor(const PassOne<acc_t>& v, int o, int w) {
  PassOne<acc_t> r;
  r.s.sum = shfl_xor(v.s.sum, o, w);
  r.s.exponent = shfl_xor(v.s.exponent, o, w);
  r.nonfinite = shfl_xor(v.nonfinite, o, w);
  return r;
}

struct MergeOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, const T& b) const {
    a.merge(b);
    return a;
  }
};

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> finish(const PassOne<acc_t>& p) {
  return finish_row(p.s, p.nonfinite);
}

// The exact path's row statistics: max m (NaN ignored), a NaN/+inf flag, sum exp(x - m).
template <typename acc_t>
struct ExactStats {
  acc_t max;
  acc_t sum;
  bool ok;  // false: the whole row is NaN (a NaN or +inf entry, or every entry -inf)
};

template <bool kLog, typename acc_t>
__device__ __forceinline__ acc_t exact_value(acc_t x, const ExactStats<acc_t>& e) {
  if (!e.ok) return dev_nan<acc_t>();
  const acc_t v = x - e.max;
  return kLog ? v - dev_log(e.sum) : dev_exp(v) / e.sum;
}

// -------------------------------------------------------------------------------------------
// Reductions

// Reduces over threadIdx.y for each threadIdx.x (blockDim.y a power of two); `red` holds
// blockDim.x * blockDim.y values.
template <typename T, typename Op>
__device__ __forceinline__ T column_allreduce(T v, Op op, void* red_raw) {
  T* red = static_cast<T*>(red_raw);
  const int bx = blockDim.x;
  const int idx = threadIdx.y * bx + threadIdx.x;
  __syncthreads();
  red[idx] = v;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.y) < s) red[idx] = op(red[idx], red[idx + s * bx]);
    __syncthreads();
  }
  return red[threadIdx.x];
}

// -------------------------------------------------------------------------------------------
// Row traversal: an unaligned scalar head, 16-byte vectors, a scalar tail. Vectorizing per
// row (rather than requiring the whole tensor to be aligned) keeps odd row lengths fast.

struct RowSplit {
  int64_t n;     // elements
  int64_t head;  // scalar elements before the first aligned vector
  int64_t nvec;  // vectors
  int64_t tail;  // index of the first scalar element after the vectors
};

template <int kVec, typename T>
__device__ __forceinline__ RowSplit split_row(const T* p, int64_t n) {
  constexpr uintptr_t kAlign = sizeof(T) * kVec;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % kAlign;
  int64_t head = 0;
  if (mis != 0) head = mis % sizeof(T) == 0 ? static_cast<int64_t>((kAlign - mis) / sizeof(T)) : n;
  RowSplit s;
  s.n = n;
  s.head = head < n ? head : n;
  s.nvec = (n - s.head) / kVec;
  s.tail = s.head + s.nvec * kVec;
  return s;
}

// Scalar-only traversal of the row, for a second array whose alignment differs.
__device__ __forceinline__ RowSplit all_scalar(int64_t n) { return {n, n, 0, n}; }

template <int kVec, typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// Each thread visits the same elements every time for the same split, which lets the cache
// path read back its own shared-memory writes without a barrier.
// kUnroll: vector loads in flight per thread.
template <int kThreads, int kVec, int kUnroll = 2, typename T, typename Scalar, typename Vector>
__device__ __forceinline__ void visit_row(const T* p, const RowSplit& s, Scalar&& scalar,
                                          Vector&& vector) {
  const int t = threadIdx.x;
  for (int64_t i = t; i < s.head; i += kThreads) scalar(i, p[i]);
  const Vec<T, kVec>* pv = reinterpret_cast<const Vec<T, kVec>*>(p + s.head);
  int64_t k = t;
  for (; k + (kUnroll - 1) * kThreads < s.nvec; k += kUnroll * kThreads) {
    Vec<T, kVec> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = pv[k + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vector(s.head + (k + u * kThreads) * kVec, v[u]);
  }
  for (; k < s.nvec; k += kThreads) vector(s.head + k * kVec, pv[k]);
  for (int64_t i = s.tail + t; i < s.n; i += kThreads) scalar(i, p[i]);
}

// Two arrays of the same type in lockstep (backward: grad_output and output).
template <int kThreads, int kVec, typename T, typename Scalar, typename Vector>
__device__ __forceinline__ void visit_rows2(const T* a, const T* b, const RowSplit& s,
                                            Scalar&& scalar, Vector&& vector) {
  constexpr int kUnroll = 2;
  const int t = threadIdx.x;
  for (int64_t i = t; i < s.head; i += kThreads) scalar(i, a[i], b[i]);
  const Vec<T, kVec>* av = reinterpret_cast<const Vec<T, kVec>*>(a + s.head);
  const Vec<T, kVec>* bv = reinterpret_cast<const Vec<T, kVec>*>(b + s.head);
  int64_t k = t;
  for (; k + (kUnroll - 1) * kThreads < s.nvec; k += kUnroll * kThreads) {
    Vec<T, kVec> va[kUnroll], vb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      va[u] = av[k + u * kThreads];
      vb[u] = bv[k + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vector(s.head + (k + u * kThreads) * kVec, va[u], vb[u]);
  }
  for (; k < s.nvec; k += kThreads) vector(s.head + k * kVec, av[k], bv[k]);
  for (int64_t i = s.tail + t; i < s.n; i += kThreads) scalar(i, a[i], b[i]);
}

template <int kVec, typename out_t, typename acc_t>
__device__ __forceinline__ void store_vec(out_t* dst, int64_t i, const acc_t (&v)[kVec], bool vec) {
  Vec<out_t, kVec> o;
#pragma unroll
  for (int e = 0; e < kVec; ++e) o.v[e] = from_acc<out_t>(v[e]);
  if (vec) {
    *reinterpret_cast<Vec<out_t, kVec>*>(dst + i) = o;
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dst[i + e] = o.v[e];
  }
}

// dst[i] = f(src[i]) over a row split by `s` (computed from the source pointer).
template <int kThreads, int kVec, typename in_t, typename out_t, typename F>
__device__ __forceinline__ void transform_row(const in_t* src, const RowSplit& s, out_t* dst, F&& f) {
  using acc_t = typename AccOf<in_t>::type;
  const bool out_vec = vec_aligned<kVec>(dst + s.head);
  visit_row<kThreads, kVec>(
      src, s, [&](int64_t i, in_t v) { dst[i] = from_acc<out_t>(f(to_acc(v))); },
      [&](int64_t i, const Vec<in_t, kVec>& v) {
        acc_t o[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) o[e] = f(to_acc(v.v[e]));
        store_vec<kVec, out_t>(dst, i, o, out_vec);
      });
}

// Pass 1 over a row (or chunk) with kVec independent accumulators per thread, so the
// dependent scale-and-add chains overlap.
template <int kThreads, int kVec, bool kCache, bool kMax, typename in_t>
__device__ __forceinline__ PassOne<typename AccOf<in_t>::type> pass_one(
    const in_t* p, const RowSplit& s, in_t* cache, typename AccOf<in_t>::type* max_out) {
  using acc_t = typename AccOf<in_t>::type;
  constexpr int kChains = kVec < 4 ? kVec : 4;
  PassOne<acc_t> acc[kChains];
#pragma unroll
  for (int e = 0; e < kChains; ++e) acc[e].init();
  acc_t m = -dev_inf<acc_t>();
  visit_row<kThreads, kVec, 4>(
      p, s,
      [&](int64_t i, in_t v) {
        if constexpr (kCache) cache[i] = v;
        const acc_t x = to_acc(v);
        acc[0].add(x);
        if constexpr (kMax) m = dev_fmax(m, x);
      },
      [&](int64_t i, const Vec<in_t, kVec>& v) {
        if constexpr (kCache) *reinterpret_cast<Vec<in_t, kVec>*>(cache + i) = v;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const acc_t x = to_acc(v.v[e]);
          acc[e % kChains].add(x);
          if constexpr (kMax) m = dev_fmax(m, x);
        }
      });
#pragma unroll
  for (int e = 1; e < kChains; ++e) acc[0].merge(acc[e]);
  if constexpr (kMax) *max_out = m;
  return acc[0];
}

// Row max (NaN ignored) and a NaN flag, then sum exp(x - max): the exact path's statistics,
// block-wide. NaN entries and +inf make the row NaN, as does a row of all -inf.
template <int kThreads, int kVec, typename in_t>
__device__ ExactStats<typename AccOf<in_t>::type> exact_stats_block(const in_t* p, const RowSplit& s,
                                                                   void* scratch) {
  using acc_t = typename AccOf<in_t>::type;
  acc_t m = -dev_inf<acc_t>();
  acc_t nan = 0;
  visit_row<kThreads, kVec>(
      p, s,
      [&](int64_t, in_t v) {
        const acc_t x = to_acc(v);
        m = dev_fmax(m, x);
        nan = x != x ? acc_t(1) : nan;
      },
      [&](int64_t, const Vec<in_t, kVec>& v) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const acc_t x = to_acc(v.v[e]);
          m = dev_fmax(m, x);
          nan = x != x ? acc_t(1) : nan;
        }
      });
  ExactStats<acc_t> st;
  st.max = block_allreduce<kThreads>(m, MaxOp{}, scratch);
  nan = block_allreduce<kThreads>(nan, MaxOp{}, scratch);
  st.ok = nan == 0 && st.max > -dev_inf<acc_t>() && st.max < dev_inf<acc_t>();
  st.sum = 0;
  if (st.ok) {  // block-uniform
    acc_t sum = 0;
    visit_row<kThreads, kVec>(
        p, s, [&](int64_t, in_t v) { sum += dev_exp(to_acc(v) - st.max); },
        [&](int64_t, const Vec<in_t, kVec>& v) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) sum += dev_exp(to_acc(v.v[e]) - st.max);
        });
    st.sum = block_allreduce<kThreads>(sum, SumOp{}, scratch);
  }
  return st;
}

template <typename acc_t>
constexpr int kScratchBytes = 32 * static_cast<int>(sizeof(PassOne<acc_t>));

// -------------------------------------------------------------------------------------------
// Forward kernels

// The rows a warp-per-row kernel visits: kGroup lanes per row, 32 / kGroup rows per warp.
// Rows advance per warp so shuffles always see all 32 lanes.
template <int kGroup>
struct WarpRows {
  static constexpr int kRowsPerBlock = kWarpBlockThreads / kGroup;
  int lane;
  int64_t first;   // this warp's first row
  int64_t stride;  // rows between a warp's iterations
  int offset;      // this lane group's row within the warp's rows

  __device__ __forceinline__ WarpRows()
      : lane(threadIdx.x % kGroup),
        first(static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x / 32) * (32 / kGroup)),
        stride(static_cast<int64_t>(gridDim.x) * kRowsPerBlock),
        offset((threadIdx.x % 32) / kGroup) {}
};

// Loads this lane's elements (it * kGroup + lane) * kVec + e of a row into registers;
// positions past the row's end, and rows that do not exist, get `fill`.
template <int kGroup, int kVec, int kIters, typename T, typename acc_t>
__device__ __forceinline__ void load_warp_row(const T* r, int size, int lane, bool valid, acc_t fill,
                                              acc_t (&v)[kIters][kVec]) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = (it * kGroup + lane) * kVec;
    if (valid && i < size) {
      if constexpr (kVec > 1) {
        const Vec<T, kVec> raw = *reinterpret_cast<const Vec<T, kVec>*>(r + i);
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[it][e] = to_acc(raw.v[e]);
      } else {
        v[it][0] = to_acc(r[i]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[it][e] = fill;
    }
  }
}

// kGroup lanes per row (32 unless the row is shorter); lane l holds elements
// (it * kGroup + l) * kVec + e. Padding is -inf: it clamps to a zero contribution in both
// the pair sum and the exact path.
template <bool kLog, int kGroup, int kVec, int kIters, typename in_t, typename out_t>
__global__ void __launch_bounds__(kWarpBlockThreads, kWarpMinBlocks<in_t>)
    softmax_warp_kernel(const in_t* __restrict__ x, out_t* __restrict__ y, int64_t rows, int size) {
  using acc_t = typename AccOf<in_t>::type;
  const WarpRows<kGroup> w;
  const int lane = w.lane;
  for (int64_t base = w.first; base < rows; base += w.stride) {
    const int64_t row = base + w.offset;
    const bool valid = row < rows;
    const in_t* xr = x + row * size;
    out_t* yr = y + row * size;
    acc_t v[kIters][kVec];
    load_warp_row<kGroup>(xr, size, lane, valid, -dev_inf<acc_t>(), v);
    PassOne<acc_t> acc[2];
    acc[0].init();
    acc[1].init();
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[(it * kVec + e) % 2].add(v[it][e]);
    }
    acc[0].merge(acc[1]);
    const RowStats<acc_t> st = finish(warp_allreduce(acc[0], MergeOp{}, kGroup));
    if (__any_sync(kFullMask, valid && st.exact)) {
      ExactStats<acc_t> ex;
      acc_t m = -dev_inf<acc_t>();
      acc_t nan = 0;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          m = dev_fmax(m, v[it][e]);
          nan = v[it][e] != v[it][e] ? acc_t(1) : nan;
        }
      }
      ex.max = warp_allreduce(m, MaxOp{}, kGroup);
      nan = warp_allreduce(nan, MaxOp{}, kGroup);
      ex.ok = nan == 0 && ex.max > -dev_inf<acc_t>() && ex.max < dev_inf<acc_t>();
      acc_t sum = 0;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum += ex.ok ? dev_exp(v[it][e] - ex.max) : acc_t(0);
      }
      ex.sum = warp_allreduce(sum, SumOp{}, kGroup);
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          v[it][e] = st.exact ? exact_value<kLog>(v[it][e], ex) : pass2_value<kLog>(v[it][e], st);
        }
      }
    } else {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[it][e] = pass2_value<kLog>(v[it][e], st);
      }
    }
    if (!valid) continue;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = (it * kGroup + lane) * kVec;
      if (i < size) {
        if constexpr (kVec > 1) {
          store_vec<kVec, out_t>(yr, i, v[it], true);
        } else {
          yr[i] = from_acc<out_t>(v[it][0]);
        }
      }
    }
  }
}

// One block per row; with kCache the row is kept in dynamic shared memory between passes.
template <bool kLog, bool kCache, int kThreads, typename in_t, typename out_t>
__global__ void FASTLOSS_MAX_REGS(kBlockMaxRegs<in_t>, kThreads)
    softmax_block_kernel(const in_t* __restrict__ x, out_t* __restrict__ y, int64_t rows, int64_t size) {
  using acc_t = typename AccOf<in_t>::type;
  constexpr int kVec = 16 / sizeof(in_t);
  extern __shared__ __align__(16) unsigned char cache_raw[];
  __shared__ __align__(16) unsigned char scratch[kScratchBytes<acc_t>];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const in_t* xr = x + row * size;
    out_t* yr = y + row * size;
    const RowSplit s = split_row<kVec>(xr, size);
    // Shifted so that the cache's vector slots are 16-byte aligned exactly where the row's are.
    in_t* cache = reinterpret_cast<in_t*>(cache_raw) + (kVec - s.head % kVec) % kVec;
    const PassOne<acc_t> part = pass_one<kThreads, kVec, kCache, false>(xr, s, cache, nullptr);
    const RowStats<acc_t> st = finish(block_allreduce<kThreads>(part, MergeOp{}, scratch));
    const in_t* src = kCache ? cache : xr;
    if (!st.exact) {  // block-uniform
      transform_row<kThreads, kVec>(src, s, yr, [&](acc_t v) { return pass2_value<kLog>(v, st); });
    } else {
      const ExactStats<acc_t> ex = exact_stats_block<kThreads, kVec>(src, s, scratch);
      transform_row<kThreads, kVec>(src, s, yr, [&](acc_t v) { return exact_value<kLog>(v, ex); });
    }
    // The next row's split may map cache slots to other threads.
    if constexpr (kCache) __syncthreads();
  }
}

// Split rows, kernel 1: one block per (chunk, row) writes the chunk's pair sum, NaN flag and
// max (the max is only used by the exact path) as 4 values to the workspace.
template <int kThreads, typename in_t>
__global__ void FASTLOSS_MAX_REGS(kBlockMaxRegs<in_t>, kThreads)
    softmax_split_partial_kernel(const in_t* __restrict__ x, typename AccOf<in_t>::type* __restrict__ ws,
                                 int64_t size, int64_t chunk_len) {
  using acc_t = typename AccOf<in_t>::type;
  constexpr int kVec = 16 / sizeof(in_t);
  __shared__ __align__(16) unsigned char scratch[kScratchBytes<acc_t>];
  const int64_t row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t n = size - begin < chunk_len ? size - begin : chunk_len;
  const in_t* p = x + row * size + begin;
  const RowSplit s = split_row<kVec>(p, n);
  acc_t m;
  PassOne<acc_t> part = pass_one<kThreads, kVec, false, true>(p, s, static_cast<in_t*>(nullptr), &m);
  part = block_allreduce<kThreads>(part, MergeOp{}, scratch);
  m = block_allreduce<kThreads>(m, MaxOp{}, scratch);
  if (threadIdx.x == 0) {
    acc_t* w = ws + (row * gridDim.x + blockIdx.x) * 4;
    w[0] = part.s.sum;
    w[1] = part.s.exponent;
    w[2] = part.nonfinite;
    w[3] = m;
  }
}

// Split rows, kernel 2: every block merges its row's chunk partials (in the same order, so all
// chunks of a row see identical statistics) and writes its chunk.
template <bool kLog, int kThreads, typename in_t, typename out_t>
__global__ void FASTLOSS_MAX_REGS(kBlockMaxRegs<in_t>, kThreads)
    softmax_split_write_kernel(const in_t* __restrict__ x, out_t* __restrict__ y,
                               const typename AccOf<in_t>::type* __restrict__ ws, int64_t size,
                               int64_t chunk_len) {
  using acc_t = typename AccOf<in_t>::type;
  constexpr int kVec = 16 / sizeof(in_t);
  __shared__ __align__(16) unsigned char scratch[kScratchBytes<acc_t>];
  const int64_t row = blockIdx.y;
  const int chunks = gridDim.x;
  PassOne<acc_t> part;
  part.init();
  acc_t m = -dev_inf<acc_t>();
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const acc_t* w = ws + (row * chunks + c) * 4;
    PassOne<acc_t> chunk;
    chunk.s.sum = w[0];
    chunk.s.exponent = w[1];
    chunk.nonfinite = w[2];
    part.merge(chunk);
    m = dev_fmax(m, w[3]);
  }
  const PassOne<acc_t> merged = block_allreduce<kThreads>(part, MergeOp{}, scratch);
  const RowStats<acc_t> st = finish(merged);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t n = size - begin < chunk_len ? size - begin : chunk_len;
  const in_t* p = x + row * size + begin;
  out_t* q = y + row * size + begin;
  const RowSplit s = split_row<kVec>(p, n);
  if (!st.exact) {  // block-uniform
    transform_row<kThreads, kVec>(p, s, q, [&](acc_t v) { return pass2_value<kLog>(v, st); });
    return;
  }
  // Exact path: the max comes from the partials; the sum needs the whole row, which every
  // chunk's block re-reads (rare rows: huge magnitudes; NaN/inf rows skip the sum).
  ExactStats<acc_t> ex;
  ex.max = block_allreduce<kThreads>(m, MaxOp{}, scratch);
  ex.ok = merged.nonfinite == 0 && ex.max > -dev_inf<acc_t>() && ex.max < dev_inf<acc_t>();
  ex.sum = 0;
  if (ex.ok) {
    const in_t* xr = x + row * size;
    const RowSplit rs = split_row<kVec>(xr, size);
    acc_t sum = 0;
    visit_row<kThreads, kVec>(
        xr, rs, [&](int64_t, in_t v) { sum += dev_exp(to_acc(v) - ex.max); },
        [&](int64_t, const Vec<in_t, kVec>& v) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) sum += dev_exp(to_acc(v.v[e]) - ex.max);
        });
    ex.sum = block_allreduce<kThreads>(sum, SumOp{}, scratch);
  }
  transform_row<kThreads, kVec>(p, s, q, [&](acc_t v) { return exact_value<kLog>(v, ex); });
}

// A thread's serial share of a long column is summed in blocks of kColumnBlock terms, each
// merged into the thread's total: one running sum lost ~log2(n) bits (as on the CPU).
constexpr int kColumnBlock = 64;

// The sum over this thread's share i = threadIdx.y, threadIdx.y + blockDim.y, ... < size:
// add(block, i) adds term i to a block, merge(total, block) folds a finished block in.
template <typename Acc, typename Add, typename Merge>
__device__ __forceinline__ Acc column_share_sum(int64_t size, Acc empty, Add add, Merge merge) {
  Acc total = empty, block = empty;
  int terms = 0;
  for (int64_t i = threadIdx.y; i < size; i += blockDim.y) {
    add(block, i);
    if (++terms == kColumnBlock) {
      merge(total, block);
      block = empty;
      terms = 0;
    }
  }
  merge(total, block);
  return total;
}

template <typename acc_t>
__device__ __forceinline__ void add_into(acc_t& total, acc_t block) {
  total += block;
}

// inner > 1: threadIdx.x walks adjacent columns (coalesced), threadIdx.y slices of the softmax
// dimension; a task is one tile of blockDim.x columns of one outer index.
template <bool kLog, typename in_t, typename out_t>
__global__ void __launch_bounds__(kStridedMaxThreads, kMinBlocks<in_t, kStridedMaxThreads>)
    softmax_strided_kernel(const in_t* __restrict__ x, out_t* __restrict__ y, int64_t outer,
                           int64_t size, int64_t inner, int64_t col_tiles) {
  using acc_t = typename AccOf<in_t>::type;
  extern __shared__ __align__(16) unsigned char red[];  // blockDim.x * blockDim.y PassOne
  const int64_t tasks = outer * col_tiles;
  const int by = blockDim.y;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t o = task / col_tiles;
    const int64_t j = (task % col_tiles) * blockDim.x + threadIdx.x;
    const bool valid = j < inner;
    const int64_t base = o * size * inner + j;
    PassOne<acc_t> acc;
    acc.init();
    if (valid) {
      acc = column_share_sum(
          size, acc, [&](PassOne<acc_t>& b, int64_t i) { b.add(to_acc(x[base + i * inner])); },
          [](PassOne<acc_t>& total, const PassOne<acc_t>& b) { total.merge(b); });
    }
    const RowStats<acc_t> st = finish(column_allreduce(acc, MergeOp{}, red));
    const bool exact = valid && st.exact;
    if (__syncthreads_or(exact)) {
      acc_t m = -dev_inf<acc_t>();
      acc_t nan = 0;
      if (valid) {
        for (int64_t i = threadIdx.y; i < size; i += by) {
          const acc_t v = to_acc(x[base + i * inner]);
          m = dev_fmax(m, v);
          nan = v != v ? acc_t(1) : nan;
        }
      }
      ExactStats<acc_t> ex;
      ex.max = column_allreduce(m, MaxOp{}, red);
      nan = column_allreduce(nan, MaxOp{}, red);
      ex.ok = nan == 0 && ex.max > -dev_inf<acc_t>() && ex.max < dev_inf<acc_t>();
      acc_t sum = 0;
      if (valid && ex.ok) {
        sum = column_share_sum(
            size, acc_t(0), [&](acc_t& b, int64_t i) { b += dev_exp(to_acc(x[base + i * inner]) - ex.max); },
            add_into<acc_t>);
      }
      ex.sum = column_allreduce(sum, SumOp{}, red);
      if (valid) {
        for (int64_t i = threadIdx.y; i < size; i += by) {
          const acc_t v = to_acc(x[base + i * inner]);
          y[base + i * inner] = from_acc<out_t>(exact ? exact_value<kLog>(v, ex) : pass2_value<kLog>(v, st));
        }
      }
    } else if (valid) {
      for (int64_t i = threadIdx.y; i < size; i += by) {
        y[base + i * inner] = from_acc<out_t>(pass2_value<kLog>(to_acc(x[base + i * inner]), st));
      }
    }
  }
}

// -------------------------------------------------------------------------------------------
// Backward kernels. term = g * y (softmax) or g (log-softmax); dx from g, y and sum(term).

template <bool kLog, typename acc_t>
__device__ __forceinline__ acc_t backward_term(acc_t g, acc_t y) {
  return kLog ? g : g * y;
}
template <bool kLog, typename acc_t>
__device__ __forceinline__ acc_t backward_value(acc_t g, acc_t y, acc_t total) {
  return kLog ? g - dev_exp(y) * total : y * (g - total);
}

template <bool kLog, int kGroup, int kVec, int kIters, typename out_t, typename grad_t>
__global__ void __launch_bounds__(kWarpBlockThreads, kWarpMinBlocks<out_t>)
    softmax_backward_warp_kernel(const out_t* __restrict__ g, const out_t* __restrict__ y,
                                 grad_t* __restrict__ dx, int64_t rows, int size) {
  using acc_t = typename AccOf<out_t>::type;
  const WarpRows<kGroup> w;
  const int lane = w.lane;
  for (int64_t base = w.first; base < rows; base += w.stride) {
    const int64_t row = base + w.offset;
    const bool valid = row < rows;
    acc_t gv[kIters][kVec], yv[kIters][kVec];
    load_warp_row<kGroup>(g + row * size, size, lane, valid, acc_t(0), gv);
    load_warp_row<kGroup>(y + row * size, size, lane, valid, acc_t(0), yv);
    acc_t partial = 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) partial += backward_term<kLog>(gv[it][e], yv[it][e]);
    }
    const acc_t total = warp_allreduce(partial, SumOp{}, kGroup);
    if (!valid) continue;
    grad_t* dr = dx + row * size;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = (it * kGroup + lane) * kVec;
      if (i < size) {
        acc_t o[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) o[e] = backward_value<kLog>(gv[it][e], yv[it][e], total);
        if constexpr (kVec > 1) {
          store_vec<kVec, grad_t>(dr, i, o, true);
        } else {
          dr[i] = from_acc<grad_t>(o[0]);
        }
      }
    }
  }
}

// Sum of the backward term over [0, n) of one row or chunk, block-wide.
template <bool kLog, int kThreads, int kVec, typename out_t>
__device__ __forceinline__ typename AccOf<out_t>::type backward_partial(const out_t* gp, const out_t* yp,
                                                                        const RowSplit& s) {
  using acc_t = typename AccOf<out_t>::type;
  acc_t part[kVec] = {};
  visit_rows2<kThreads, kVec>(
      gp, yp, s, [&](int64_t, out_t a, out_t b) { part[0] += backward_term<kLog>(to_acc(a), to_acc(b)); },
      [&](int64_t, const Vec<out_t, kVec>& a, const Vec<out_t, kVec>& b) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) part[e] += backward_term<kLog>(to_acc(a.v[e]), to_acc(b.v[e]));
      });
#pragma unroll
  for (int e = 1; e < kVec; ++e) part[0] += part[e];
  return part[0];
}

template <bool kLog, int kThreads, int kVec, typename out_t, typename grad_t>
__device__ __forceinline__ void backward_write(const out_t* gp, const out_t* yp, grad_t* dp,
                                               const RowSplit& s, typename AccOf<out_t>::type total) {
  using acc_t = typename AccOf<out_t>::type;
  const bool out_vec = vec_aligned<kVec>(dp + s.head);
  visit_rows2<kThreads, kVec>(
      gp, yp, s,
      [&](int64_t i, out_t a, out_t b) {
        dp[i] = from_acc<grad_t>(backward_value<kLog>(to_acc(a), to_acc(b), total));
      },
      [&](int64_t i, const Vec<out_t, kVec>& a, const Vec<out_t, kVec>& b) {
        acc_t o[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) o[e] = backward_value<kLog>(to_acc(a.v[e]), to_acc(b.v[e]), total);
        store_vec<kVec, grad_t>(dp, i, o, out_vec);
      });
}

// grad_output and output are vectorized together only when they are equally misaligned.
template <int kVec, typename T>
__device__ __forceinline__ RowSplit split_rows2(const T* a, const T* b, int64_t n) {
  const RowSplit s = split_row<kVec>(a, n);
  return vec_aligned<kVec>(b + s.head) ? s : all_scalar(n);
}

template <bool kLog, int kThreads, typename out_t, typename grad_t>
__global__ void FASTLOSS_MAX_REGS(kBlockMaxRegs<out_t>, kThreads)
    softmax_backward_block_kernel(const out_t* __restrict__ g, const out_t* __restrict__ y,
                                  grad_t* __restrict__ dx, int64_t rows, int64_t size) {
  using acc_t = typename AccOf<out_t>::type;
  constexpr int kVec = 16 / sizeof(out_t);
  __shared__ __align__(16) unsigned char scratch[32 * sizeof(acc_t)];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const out_t* gr = g + row * size;
    const out_t* yr = y + row * size;
    const RowSplit s = split_rows2<kVec>(gr, yr, size);
    const acc_t total =
        block_allreduce<kThreads>(backward_partial<kLog, kThreads, kVec>(gr, yr, s), SumOp{}, scratch);
    backward_write<kLog, kThreads, kVec>(gr, yr, dx + row * size, s, total);
  }
}

template <bool kLog, int kThreads, typename out_t>
__global__ void FASTLOSS_MAX_REGS(kBlockMaxRegs<out_t>, kThreads)
    softmax_backward_split_partial_kernel(const out_t* __restrict__ g, const out_t* __restrict__ y,
                                          typename AccOf<out_t>::type* __restrict__ ws, int64_t size,
                                          int64_t chunk_len) {
  using acc_t = typename AccOf<out_t>::type;
  constexpr int kVec = 16 / sizeof(out_t);
  __shared__ __align__(16) unsigned char scratch[32 * sizeof(acc_t)];
  const int64_t row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t n = size - begin < chunk_len ? size - begin : chunk_len;
  const out_t* gp = g + row * size + begin;
  const out_t* yp = y + row * size + begin;
  const RowSplit s = split_rows2<kVec>(gp, yp, n);
  const acc_t part =
      block_allreduce<kThreads>(backward_partial<kLog, kThreads, kVec>(gp, yp, s), SumOp{}, scratch);
  if (threadIdx.x == 0) ws[row * gridDim.x + blockIdx.x] = part;
}

template <bool kLog, int kThreads, typename out_t, typename grad_t>
__global__ void FASTLOSS_MAX_REGS(kBlockMaxRegs<out_t>, kThreads)
    softmax_backward_split_write_kernel(const out_t* __restrict__ g, const out_t* __restrict__ y,
                                        grad_t* __restrict__ dx,
                                        const typename AccOf<out_t>::type* __restrict__ ws,
                                        int64_t size, int64_t chunk_len) {
  using acc_t = typename AccOf<out_t>::type;
  constexpr int kVec = 16 / sizeof(out_t);
  __shared__ __align__(16) unsigned char scratch[32 * sizeof(acc_t)];
  const int64_t row = blockIdx.y;
  const int chunks = gridDim.x;
  acc_t part = 0;
  for (int c = threadIdx.x; c < chunks; c += kThreads) part += ws[row * chunks + c];
  const acc_t total = block_allreduce<kThreads>(part, SumOp{}, scratch);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t n = size - begin < chunk_len ? size - begin : chunk_len;
  const int64_t off = row * size + begin;
  const RowSplit s = split_rows2<kVec>(g + off, y + off, n);
  backward_write<kLog, kThreads, kVec>(g + off, y + off, dx + off, s, total);
}

template <bool kLog, typename out_t, typename grad_t>
__global__ void __launch_bounds__(kStridedMaxThreads, kMinBlocks<out_t, kStridedMaxThreads>)
    softmax_backward_strided_kernel(const out_t* __restrict__ g, const out_t* __restrict__ y,
                                    grad_t* __restrict__ dx, int64_t outer, int64_t size,
                                    int64_t inner, int64_t col_tiles) {
  using acc_t = typename AccOf<out_t>::type;
  extern __shared__ __align__(16) unsigned char red[];  // blockDim.x * blockDim.y acc_t
  const int64_t tasks = outer * col_tiles;
  const int by = blockDim.y;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t o = task / col_tiles;
    const int64_t j = (task % col_tiles) * blockDim.x + threadIdx.x;
    const bool valid = j < inner;
    const int64_t base = o * size * inner + j;
    acc_t part = 0;
    if (valid) {
      part = column_share_sum(
          size, acc_t(0),
          [&](acc_t& b, int64_t i) { b += backward_term<kLog>(to_acc(g[base + i * inner]), to_acc(y[base + i * inner])); },
          add_into<acc_t>);
    }
    const acc_t total = column_allreduce(part, SumOp{}, red);
    if (valid) {
      for (int64_t i = threadIdx.y; i < size; i += by) {
        const int64_t k = base + i * inner;
        dx[k] = from_acc<grad_t>(backward_value<kLog>(to_acc(g[k]), to_acc(y[k]), total));
      }
    }
  }
}

// -------------------------------------------------------------------------------------------
// Host side

unsigned grid_for(int64_t work, int64_t cap) { return static_cast<unsigned>(work < cap ? work : cap); }

// Few long rows: enough chunks per row for ~4 blocks per SM in total, chunks >= kSplitMinChunk.
struct SplitPlan {
  int64_t chunks = 0;  // 0: do not split
  int64_t chunk_len = 0;
};

SplitPlan plan_split(int64_t outer, int64_t size, int64_t inner, int sms) {
  SplitPlan p;
  if (inner != 1 || outer >= 2 * static_cast<int64_t>(sms)) return p;
  int64_t chunks = ceil_div(4 * static_cast<int64_t>(sms), outer);
  const int64_t max_chunks = size / kSplitMinChunk;
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks > kSplitMaxChunks) chunks = kSplitMaxChunks;
  if (chunks < 2) return p;
  // Multiples of 64 elements keep chunk starts as aligned as the row start.
  p.chunk_len = ceil_div(ceil_div(size, chunks), 64) * 64;
  p.chunks = ceil_div(size, p.chunk_len);
  if (p.chunks < 2) p.chunks = 0;
  return p;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <int N>
using IntC = std::integral_constant<int, N>;

// The warp path's shape: kGroup lanes per row, P = kVec * kIters elements per lane. Vectorized
// only when every row start is aligned for all arrays (vec_ok(kVec): size % kVec == 0 too).
template <typename elem_t, typename VecOk, typename Launch>
cudaError_t launch_warp_shape(int64_t size, VecOk&& vec_ok, Launch&& launch) {
  if (size <= 32) {
    switch (pow2_ceil(size)) {
      case 1: return launch(IntC<1>{}, IntC<1>{}, IntC<1>{});
      case 2: return launch(IntC<2>{}, IntC<1>{}, IntC<1>{});
      case 4: return launch(IntC<4>{}, IntC<1>{}, IntC<1>{});
      case 8: return launch(IntC<8>{}, IntC<1>{}, IntC<1>{});
      case 16: return launch(IntC<16>{}, IntC<1>{}, IntC<1>{});
      default: return launch(IntC<32>{}, IntC<1>{}, IntC<1>{});
    }
  }
  auto run = [&](auto per_lane) -> cudaError_t {
    constexpr int P = decltype(per_lane)::value;
    constexpr int kMaxVec = static_cast<int>(16 / sizeof(elem_t));
    constexpr int V = P < kMaxVec ? P : kMaxVec;
    if (vec_ok(V)) return launch(IntC<32>{}, IntC<V>{}, IntC<P / V>{});
    return launch(IntC<32>{}, IntC<1>{}, IntC<P>{});
  };
  switch (pow2_ceil(ceil_div(size, 32))) {
    case 2: return run(IntC<2>{});
    case 4: return run(IntC<4>{});
    case 8: return run(IntC<8>{});
    case 16: return run(IntC<16>{});
    default:
      if constexpr (kWarpMaxSize<elem_t> >= 1024) return run(IntC<32>{});
      return cudaErrorInvalidValue;  // callers keep size <= kWarpMaxSize<elem_t>
  }
}

// Column tiles for inner > 1: up to 32 adjacent columns per block (a full coalesced warp row),
// the rest of the block spread along the softmax dimension; 512 threads when there are too
// few tiles to fill the GPU, so long columns still get many threads.
struct StridedPlan {
  dim3 block;
  int64_t col_tiles;
  unsigned grid;
};

StridedPlan plan_strided(int64_t outer, int64_t size, int64_t inner, int sms) {
  StridedPlan p;
  const int64_t bx32 = pow2_ceil(inner < 32 ? inner : 32);
  const int64_t tiles_at_32 = outer * ceil_div(inner, bx32);
  const int64_t threads = tiles_at_32 < 2 * static_cast<int64_t>(sms) ? kStridedMaxThreads : 256;
  int64_t by = threads / bx32;
  const int64_t size_p2 = pow2_ceil(size);
  if (by > size_p2) by = size_p2;
  int64_t bx = threads / by;
  const int64_t inner_p2 = pow2_ceil(inner);
  if (bx > inner_p2) bx = inner_p2;
  p.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), 1);
  p.col_tiles = ceil_div(inner, bx);
  p.grid = grid_for(outer * p.col_tiles, static_cast<int64_t>(sms) * 32);
  return p;
}

template <bool kLog, typename in_t, typename out_t>
cudaError_t forward_typed(const in_t* x, out_t* y, int64_t outer, int64_t size, int64_t inner,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream, const DeviceInfo& dev) {
  using acc_t = typename AccOf<in_t>::type;
  const int64_t grid_cap = static_cast<int64_t>(dev.sms) * 32;
  if (inner > 1) {
    const StridedPlan p = plan_strided(outer, size, inner, dev.sms);
    const size_t smem = static_cast<size_t>(p.block.x) * p.block.y * sizeof(PassOne<acc_t>);
    softmax_strided_kernel<kLog, in_t, out_t><<<p.grid, p.block, smem, stream>>>(x, y, outer, size, inner, p.col_tiles);
    return cudaGetLastError();
  }
  if (size <= kWarpMaxSize<in_t>) {
    auto vec_ok = [&](int v) {
      return size % v == 0 && aligned(x, v * sizeof(in_t)) && aligned(y, v * sizeof(out_t));
    };
    return launch_warp_shape<in_t>(size, vec_ok, [&](auto group, auto vec, auto iters) -> cudaError_t {
                               constexpr int G = decltype(group)::value;
                               constexpr int V = decltype(vec)::value;
                               constexpr int I = decltype(iters)::value;
                               const unsigned grid = grid_for(ceil_div(outer, kWarpBlockThreads / G), grid_cap * 2);
                               softmax_warp_kernel<kLog, G, V, I, in_t, out_t>
                                   <<<grid, kWarpBlockThreads, 0, stream>>>(x, y, outer, static_cast<int>(size));
                               return cudaGetLastError();
                             });
  }
  const SplitPlan sp = plan_split(outer, size, inner, dev.sms);
  const size_t ws_needed = static_cast<size_t>(outer * sp.chunks) * 4 * sizeof(acc_t);
  if (sp.chunks > 0 && workspace != nullptr && workspace_bytes >= ws_needed &&
      aligned(workspace, 4 * sizeof(acc_t))) {
    acc_t* ws = static_cast<acc_t*>(workspace);
    const dim3 grid(static_cast<unsigned>(sp.chunks), static_cast<unsigned>(outer), 1);
    softmax_split_partial_kernel<kSplitThreads, in_t><<<grid, kSplitThreads, 0, stream>>>(x, ws, size, sp.chunk_len);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    softmax_split_write_kernel<kLog, kSplitThreads, in_t, out_t>
        <<<grid, kSplitThreads, 0, stream>>>(x, y, ws, size, sp.chunk_len);
    return cudaGetLastError();
  }
  const unsigned grid = grid_for(outer, grid_cap);
  constexpr int kVec = 16 / sizeof(in_t);
  const int64_t cache_bytes = (size + kVec) * static_cast<int64_t>(sizeof(in_t));
  // The opt-in is set on every such call (it is cheap, and it belongs to the context: a
  // flag remembering it went stale after cudaDeviceReset and the launch failed), always to
  // the same value, never to a per-call size, so concurrent host threads cannot shrink it
  // under each other's launches.
  const int cache_limit = dev.smem_optin - 2048 < kCacheMaxBytes ? dev.smem_optin - 2048 : kCacheMaxBytes;
  const bool small_rows = size <= 4096;
  if (cache_bytes <= cache_limit) {
    const void* kernel = small_rows ? reinterpret_cast<const void*>(softmax_block_kernel<kLog, true, 256, in_t, out_t>)
                                    : reinterpret_cast<const void*>(softmax_block_kernel<kLog, true, 512, in_t, out_t>);
    // The 48 KB that needs no opt-in bounds static + dynamic shared memory together.
    bool ok = cache_bytes + kScratchBytes<acc_t> <= 48 * 1024;
    if (!ok) {
      ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cache_limit) == cudaSuccess;
      if (!ok) (void)cudaGetLastError();  // not sticky: fall back to the uncached kernel
    }
    if (ok) {
      if (small_rows) {
        softmax_block_kernel<kLog, true, 256, in_t, out_t><<<grid, 256, cache_bytes, stream>>>(x, y, outer, size);
      } else {
        softmax_block_kernel<kLog, true, 512, in_t, out_t><<<grid, 512, cache_bytes, stream>>>(x, y, outer, size);
      }
      return cudaGetLastError();
    }
  }
  // Uncached rows need no shared memory, so 256-thread blocks still fill an SM several times.
  softmax_block_kernel<kLog, false, 256, in_t, out_t><<<grid, 256, 0, stream>>>(x, y, outer, size);
  return cudaGetLastError();
}

template <bool kLog, typename out_t, typename grad_t>
cudaError_t backward_typed(const out_t* g, const out_t* y, grad_t* dx, int64_t outer, int64_t size,
                           int64_t inner, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                           const DeviceInfo& dev) {
  using acc_t = typename AccOf<out_t>::type;
  const int64_t grid_cap = static_cast<int64_t>(dev.sms) * 32;
  if (inner > 1) {
    const StridedPlan p = plan_strided(outer, size, inner, dev.sms);
    const size_t smem = static_cast<size_t>(p.block.x) * p.block.y * sizeof(acc_t);
    softmax_backward_strided_kernel<kLog, out_t, grad_t>
        <<<p.grid, p.block, smem, stream>>>(g, y, dx, outer, size, inner, p.col_tiles);
    return cudaGetLastError();
  }
  if (size <= kWarpMaxSize<out_t>) {
    auto vec_ok = [&](int v) {
      return size % v == 0 && aligned(g, v * sizeof(out_t)) && aligned(y, v * sizeof(out_t)) &&
             aligned(dx, v * sizeof(grad_t));
    };
    return launch_warp_shape<out_t>(size, vec_ok, [&](auto group, auto vec, auto iters) -> cudaError_t {
                               constexpr int G = decltype(group)::value;
                               constexpr int V = decltype(vec)::value;
                               constexpr int I = decltype(iters)::value;
                               const unsigned grid = grid_for(ceil_div(outer, kWarpBlockThreads / G), grid_cap * 2);
                               softmax_backward_warp_kernel<kLog, G, V, I, out_t, grad_t>
                                   <<<grid, kWarpBlockThreads, 0, stream>>>(g, y, dx, outer, static_cast<int>(size));
                               return cudaGetLastError();
                             });
  }
  const SplitPlan sp = plan_split(outer, size, inner, dev.sms);
  const size_t ws_needed = static_cast<size_t>(outer * sp.chunks) * sizeof(acc_t);
  if (sp.chunks > 0 && workspace != nullptr && workspace_bytes >= ws_needed && aligned(workspace, sizeof(acc_t))) {
    acc_t* ws = static_cast<acc_t*>(workspace);
    const dim3 grid(static_cast<unsigned>(sp.chunks), static_cast<unsigned>(outer), 1);
    softmax_backward_split_partial_kernel<kLog, kSplitThreads, out_t>
        <<<grid, kSplitThreads, 0, stream>>>(g, y, ws, size, sp.chunk_len);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    softmax_backward_split_write_kernel<kLog, kSplitThreads, out_t, grad_t>
        <<<grid, kSplitThreads, 0, stream>>>(g, y, dx, ws, size, sp.chunk_len);
    return cudaGetLastError();
  }
  const unsigned grid = grid_for(outer, grid_cap);
  if (size <= 4096) {
    softmax_backward_block_kernel<kLog, 256, out_t, grad_t><<<grid, 256, 0, stream>>>(g, y, dx, outer, size);
  } else {
    softmax_backward_block_kernel<kLog, 512, out_t, grad_t><<<grid, 512, 0, stream>>>(g, y, dx, outer, size);
  }
  return cudaGetLastError();
}
}  // namespace

// Typed launchers, explicitly instantiated in softmax_<dtype>.cu (and only there).
namespace softmax_detail {

template <typename in_t, typename out_t>
cudaError_t forward(const void* x, void* y, int64_t outer, int64_t size, int64_t inner, bool log,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream, const DeviceInfo& dev) {
  const in_t* xp = static_cast<const in_t*>(x);
  out_t* yp = static_cast<out_t*>(y);
  return log ? forward_typed<true>(xp, yp, outer, size, inner, workspace, workspace_bytes, stream, dev)
             : forward_typed<false>(xp, yp, outer, size, inner, workspace, workspace_bytes, stream, dev);
}

template <typename out_t, typename grad_t>
cudaError_t backward(const void* grad_out, const void* out, void* grad_in, int64_t outer, int64_t size,
                     int64_t inner, bool log, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                     const DeviceInfo& dev) {
  const out_t* gp = static_cast<const out_t*>(grad_out);
  const out_t* yp = static_cast<const out_t*>(out);
  grad_t* dp = static_cast<grad_t*>(grad_in);
  return log ? backward_typed<true>(gp, yp, dp, outer, size, inner, workspace, workspace_bytes, stream, dev)
             : backward_typed<false>(gp, yp, dp, outer, size, inner, workspace, workspace_bytes, stream, dev);
}

#define FASTLOSS_SOFTMAX_FORWARD(prefix, in_t, out_t)                                                 \
  prefix template cudaError_t forward<in_t, out_t>(const void*, void*, int64_t, int64_t, int64_t, bool, \
                                                   void*, size_t, cudaStream_t, const DeviceInfo&);
#define FASTLOSS_SOFTMAX_BACKWARD(prefix, out_t, grad_t)                                           \
  prefix template cudaError_t backward<out_t, grad_t>(const void*, const void*, void*, int64_t, int64_t, \
                                                      int64_t, bool, void*, size_t, cudaStream_t,      \
                                                      const DeviceInfo&);

// Every dtype pair the launchers accept (softmax.cuh), defined in the files named.
FASTLOSS_SOFTMAX_FORWARD(extern, float, float)                 // softmax_f32.cu
FASTLOSS_SOFTMAX_BACKWARD(extern, float, float)                // softmax_f32.cu
FASTLOSS_SOFTMAX_FORWARD(extern, double, double)               // softmax_f64.cu
FASTLOSS_SOFTMAX_BACKWARD(extern, double, double)              // softmax_f64.cu
FASTLOSS_SOFTMAX_FORWARD(extern, __half, __half)               // softmax_f16.cu
FASTLOSS_SOFTMAX_FORWARD(extern, __half, float)                // softmax_f16.cu
FASTLOSS_SOFTMAX_BACKWARD(extern, __half, __half)              // softmax_f16.cu
FASTLOSS_SOFTMAX_BACKWARD(extern, float, __half)               // softmax_f16.cu
FASTLOSS_SOFTMAX_FORWARD(extern, __nv_bfloat16, __nv_bfloat16) // softmax_bf16.cu
FASTLOSS_SOFTMAX_FORWARD(extern, __nv_bfloat16, float)         // softmax_bf16.cu
FASTLOSS_SOFTMAX_BACKWARD(extern, __nv_bfloat16, __nv_bfloat16) // softmax_bf16.cu
FASTLOSS_SOFTMAX_BACKWARD(extern, float, __nv_bfloat16)        // softmax_bf16.cu

}  // namespace softmax_detail
}  // namespace fastloss::kernels
