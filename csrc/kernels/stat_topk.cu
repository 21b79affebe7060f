// Statistical top-k masking on CUDA (Spark Transformer, arXiv 2506.06644; Gemma 3n's sparse
// MLP): theta = mean + std * PhiInv(sparsity) per row, then relu(x - theta), x * [x > theta],
// or the fused gelu_tanh(relu(gate - theta)) * up. Math shared with the CPU lives in
// common/stat_topk_math.h. Paths for rows along the last dimension, chosen by shape:
//   on-chip  one block per row, the row held in registers (16-byte vector loads; rows up to
//            32 values per thread x 1024 threads forward, 16 backward): the mean, then the
//            squared deviations from it, from registers: 1 read + 1 write.
//   chunked  rows too long for registers, unaligned rows, or few long rows: each row is cut
//            into chunks (one chunk per row unless rows are fewer than SMs); kernel 1 takes
//            each chunk's moments (per-thread Welford, Chan merges) into a small workspace,
//            kernel 2 merges the row's moments and writes its chunk: 2 reads + 1 write. With
//            one chunk per row a single kernel does both.
//   strided  rows along another dimension: a thread per column, coalesced across columns.
// Backward: the direct term g [x > theta] (or the gelu chain) and its row sum, then
// dx = direct + c (1/n + z (x - mean) / (n std)), with the same shapes; where a gradient
// reaches theta, x - mean less its row mean (the saved mean's rounding: common/
// stat_topk_math.h's ThetaGrad), summed in the same pass as the direct terms. Every reduction is in
// a fixed order and leaves identical bits in every thread, so theta and the mask agree
// across the row and with the stored theta. Accumulation in float (double for double).
#include "kernels/stat_topk.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/softmax_math.h"
#include "common/stat_topk_math.h"
#include "kernels/device_utils.cuh"

namespace fastloss::kernels {
namespace {

template <typename T>
using acc_of = typename AccType<T>::type;

constexpr int kMaxThreads = 1024;
constexpr int kChunkThreads = 256;
constexpr int kStridedThreads = 256;
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMaxGridRows = 0x7fffffff;  // rows per launch (grid x limit); more are batched

template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));
// Values per thread kept in registers on the on-chip paths (the backward keeps two per element).
template <typename T>
constexpr int kForwardCap = sizeof(acc_of<T>) == 8 ? 16 : 32;
template <typename T>
constexpr int kBackwardCap = sizeof(acc_of<T>) == 8 ? 8 : 16;

template <typename acc_t>
struct RowStatsOut {
  acc_t* theta;
  acc_t* mean;
  acc_t* std;
};

template <typename acc_t>
struct RowStatsIn {
  const acc_t* theta;
  const acc_t* mean;
  const acc_t* std;
  const acc_t* grad_theta;  // may be null
};

template <int kV, typename T>
__device__ __forceinline__ Vec<T, kV> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, kV>*>(p);
}
template <int kV, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, kV>& v) {
  *reinterpret_cast<Vec<T, kV>*>(p) = v;
}
template <int kV, typename T>
__device__ __forceinline__ void store_converted(T* p, const acc_of<T> (&v)[kV]) {
  Vec<T, kV> o;
#pragma unroll
  for (int k = 0; k < kV; ++k) o.v[k] = from_acc<T>(v[k]);
  store_vec<kV>(p, o);
}

// -------------------------------------------------------------------------------------------
// Moments: per-thread groups of kGroup values (mean, then deviations, from registers) merged
// with Chan's formula, then a deterministic block merge.

constexpr int kGroup = 8;

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shfl_down(const Moments<acc_t>& m, int o) {
  return {__shfl_down_sync(kFullMask, m.n, o), __shfl_down_sync(kFullMask, m.mean, o),
          __shfl_down_sync(kFullMask, m.m2, o), __shfl_down_sync(kFullMask, m.lo, o),
          __shfl_down_sync(kFullMask, m.hi, o), __shfl_down_sync(kFullMask, m.mean_err, o)};
}

// Lane 0 merges the warp (tree order), then every thread merges the warps' results in warp
// order: every thread returns the same bits. `smem` holds >= 32 Moments.
template <int kThreads, typename acc_t>
__device__ __forceinline__ Moments<acc_t> block_moments(Moments<acc_t> m, Moments<acc_t>* smem) {
  for (int o = 16; o > 0; o /= 2) m = merge_moments(m, shfl_down(m, o));
  constexpr int kWarps = kThreads / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = m;
  __syncthreads();
  Moments<acc_t> r{};
  for (int w = 0; w < kWarps; ++w) r = merge_moments(r, smem[w]);
  return r;
}

// -------------------------------------------------------------------------------------------
// What the forward writes per element, and the backward's per-element direct term.

template <typename T>
struct ThresholdOut {
  T* y;
  bool hard;
  template <int kV>
  __device__ __forceinline__ void write(int64_t off, const acc_of<T> (&v)[kV], acc_of<T> theta) const {
    Vec<T, kV> o;
#pragma unroll
    for (int k = 0; k < kV; ++k) o.v[k] = from_acc<T>(apply_threshold(hard, v[k], theta));
    store_vec<kV>(y + off, o);
  }
};

template <typename T>
struct GeluMulOut {
  const T* up;
  T* out;
  template <int kV>
  __device__ __forceinline__ void write(int64_t off, const acc_of<T> (&v)[kV], acc_of<T> theta) const {
    const Vec<T, kV> u = load_vec<kV>(up + off);
    Vec<T, kV> o;
#pragma unroll
    for (int k = 0; k < kV; ++k) o.v[k] = from_acc<T>(gelu_tanh(soft_threshold(v[k], theta)) * to_acc(u.v[k]));
    store_vec<kV>(out + off, o);
  }
};

// d = g [x > theta]; dx is written by store().
template <typename T>
struct ThresholdGrad {
  const T* g;
  T* dx;
  template <int kV, bool kSide>
  __device__ __forceinline__ void direct(int64_t off, const acc_of<T> (&x)[kV], acc_of<T> theta,
                                         acc_of<T> (&d)[kV]) const {
    const Vec<T, kV> gv = load_vec<kV>(g + off);
#pragma unroll
    for (int k = 0; k < kV; ++k) d[k] = x[k] > theta ? to_acc(gv.v[k]) : acc_of<T>(0);
  }
  template <int kV>
  __device__ __forceinline__ void store(int64_t off, const acc_of<T> (&v)[kV]) const {
    store_converted<kV>(dx + off, v);
  }
};

// d = g up gelu'(h) [gate > theta], h = relu(gate - theta); with kSide also d up = g gelu(h).
template <typename T>
struct GeluMulGrad {
  const T* g;
  const T* up;
  T* dgate;
  T* dup;
  template <int kV, bool kSide>
  __device__ __forceinline__ void direct(int64_t off, const acc_of<T> (&x)[kV], acc_of<T> theta,
                                         acc_of<T> (&d)[kV]) const {
    using acc_t = acc_of<T>;
    const Vec<T, kV> gv = load_vec<kV>(g + off);
    const Vec<T, kV> uv = load_vec<kV>(up + off);
    Vec<T, kV> du;
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      const acc_t h = soft_threshold(x[k], theta);
      const GeluSigmoid<acc_t> sig = gelu_tanh_sigmoid(h);
      const acc_t gk = to_acc(gv.v[k]);
      if constexpr (kSide) du.v[k] = from_acc<T>(gk * h * sig.s);
      d[k] = x[k] > theta ? gk * to_acc(uv.v[k]) * gelu_tanh_grad(h, sig) : acc_t(0);
    }
    if constexpr (kSide) store_vec<kV>(dup + off, du);
  }
  template <int kV>
  __device__ __forceinline__ void store(int64_t off, const acc_of<T> (&v)[kV]) const {
    store_converted<kV>(dgate + off, v);
  }
};

// -------------------------------------------------------------------------------------------
// On-chip paths: one block per row, the row in registers.

// fn(value) for each value of the row this thread holds in v (element (it * kThreads + thread)
// * kVec + k of the row, below n).
template <int kThreads, int kIters, int kVec, typename acc_t, typename Fn>
__device__ __forceinline__ void for_each_held(const acc_t (&v)[kIters][kVec], int64_t n, Fn&& fn) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t off = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kVec;
    if (off < n) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) fn(v[it][k]);
    }
  }
}

template <int kThreads, typename T, typename Out>
__global__ void __launch_bounds__(kThreads) onchip_forward_kernel(const T* __restrict__ x, Out out,
                                                                  RowStatsOut<acc_of<T>> st, int64_t n,
                                                                  acc_of<T> z, int64_t row0) {
  using acc_t = acc_of<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kIters = kForwardCap<T> / kVec;
  __shared__ acc_t red[32];
  const int64_t row = row0 + blockIdx.x;
  const T* xr = x + row * n;
  acc_t v[kIters][kVec];
  acc_t sum = 0, lo = to_acc(xr[0]), hi = lo;
  const acc_t shift = sum_shift(lo);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t off = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kVec;
    if (off < n) {
      const Vec<T, kVec> pv = load_vec<kVec>(xr + off);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        v[it][k] = to_acc(pv.v[k]);
        sum += v[it][k] - shift;
        lo = min_of(lo, v[it][k]);
        hi = max_of(hi, v[it][k]);
      }
    }
  }
  lo = block_allreduce<kThreads>(lo, MinOp{}, red);
  hi = block_allreduce<kThreads>(hi, MaxOp{}, red);
  // Block-uniform: every thread holds the same sum, lo and hi, so all take the rare rescaled sum.
  const acc_t mean = shifted_mean(shift, block_allreduce<kThreads>(sum, SumOp{}, red), static_cast<acc_t>(n), lo, hi,
                                  [&](acc_t scale) {
                                    acc_t scaled = 0;
                                    for_each_held<kThreads>(v, n, [&](acc_t x) { scaled += x * scale; });
                                    return block_allreduce<kThreads>(scaled, SumOp{}, red);
                                  });
  const int e = spread_exponent(lo, hi);  // m2's unit (Moments)
  const acc_t inv_s = exp2_normal<acc_t>(-e);
  const acc_t neg_scaled_mean = -mean * inv_s;
  acc_t sq = 0, dev = 0;
  for_each_held<kThreads>(v, n, [&](acc_t x) {
    const acc_t d = scaled_deviation(x, inv_s, neg_scaled_mean);
    sq += d * d;
    dev += d;
  });
  const acc_t sq_sum = block_allreduce<kThreads>(sq, SumOp{}, red);
  const acc_t dev_sum = block_allreduce<kThreads>(dev, SumOp{}, red);
  const RowThreshold<acc_t> t =
      row_threshold(corrected_moments(static_cast<acc_t>(n), mean, lo, hi, dev_sum, sq_sum, exp2_normal<acc_t>(e)), z);
  if (threadIdx.x == 0) {
    st.theta[row] = t.theta;
    st.mean[row] = t.mean;
    st.std[row] = t.std;
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t off = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kVec;
    if (off < n) out.template write<kVec>(row * n + off, v[it], t.theta);
  }
}

template <int kThreads, typename T, typename Grad>
__global__ void __launch_bounds__(kThreads) onchip_backward_kernel(const T* __restrict__ x, Grad grad,
                                                                   RowStatsIn<acc_of<T>> st, int64_t n,
                                                                   acc_of<T> z, bool subtract, int64_t row0) {
  using acc_t = acc_of<T>;
  constexpr int kVec = kVecOf<T>;
  constexpr int kIters = kBackwardCap<T> / kVec;
  __shared__ acc_t red[32];
  const int64_t row = row0 + blockIdx.x;
  const acc_t theta = st.theta[row];
  const Deviation<acc_t> dev = deviation_of(st.mean[row], st.std[row]);
  acc_t xv[kIters][kVec], d[kIters][kVec];
  acc_t s = 0, ds = 0;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t off = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kVec;
    if (off < n) {
      const Vec<T, kVec> pv = load_vec<kVec>(x + row * n + off);
#pragma unroll
      for (int k = 0; k < kVec; ++k) xv[it][k] = to_acc(pv.v[k]);
      grad.template direct<kVec, true>(row * n + off, xv[it], theta, d[it]);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        s += d[it][k];
        ds += dev(xv[it][k]);
      }
    }
  }
  acc_t c = st.grad_theta ? st.grad_theta[row] : acc_t(0);
  if (subtract) c -= block_allreduce<kThreads>(s, SumOp{}, red);
  // c is the same in every thread of the block (the branch is uniform).
  const acc_t dev_sum = subtract || c != acc_t(0) ? block_allreduce<kThreads>(ds, SumOp{}, red) : acc_t(0);
  const ThetaGrad<acc_t> tg = theta_grad(c, static_cast<acc_t>(n), st.mean[row], st.std[row], z, subtract, dev_sum);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t off = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kVec;
    if (off < n) {
      acc_t o[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) o[k] = tg.add(d[it][k], xv[it][k]);
      grad.template store<kVec>(row * n + off, o);
    }
  }
}

// -------------------------------------------------------------------------------------------
// Chunked paths: grid (rows, chunks), scalar accesses.

template <typename T>
__device__ __forceinline__ Moments<acc_of<T>> range_moments(const T* xr, int64_t begin, int64_t end,
                                                            Moments<acc_of<T>>* smem) {
  using acc_t = acc_of<T>;
  GroupedMoments<acc_t> m;  // a thread's groups of kGroup values
  for (int64_t base = begin + threadIdx.x; base < end; base += kChunkThreads * kGroup) {
    acc_t v[kGroup];
    int count = 0;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int64_t i = base + static_cast<int64_t>(g) * kChunkThreads;  // coalesced across threads
      if (i < end) {
        v[g] = to_acc(xr[i]);
        count = g + 1;
      }
    }
    m.add(moments_of(v, count));
  }
  return block_moments<kChunkThreads>(m.result(), smem);
}

template <typename T>
__global__ void __launch_bounds__(kChunkThreads) chunk_moments_kernel(const T* __restrict__ x, int64_t n,
                                                                      int64_t chunk,
                                                                      Moments<acc_of<T>>* ws, int64_t row0) {
  __shared__ Moments<acc_of<T>> smem[32];
  const int64_t row = row0 + blockIdx.x, begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const Moments<acc_of<T>> m = range_moments(x + row * n, begin, end, smem);
  if (threadIdx.x == 0) ws[row * gridDim.y + blockIdx.y] = m;
}

// ws == nullptr: one chunk per row, whose moments this block takes itself.
template <typename T, typename Out>
__global__ void __launch_bounds__(kChunkThreads) chunk_forward_kernel(const T* __restrict__ x, Out out,
                                                                      RowStatsOut<acc_of<T>> st, int64_t n,
                                                                      int64_t chunk,
                                                                      const Moments<acc_of<T>>* ws,
                                                                      acc_of<T> z, int64_t row0) {
  using acc_t = acc_of<T>;
  __shared__ Moments<acc_t> smem[32];
  const int64_t row = row0 + blockIdx.x, begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const T* xr = x + row * n;
  Moments<acc_t> m{};
  if (ws == nullptr) {
    m = range_moments(xr, 0, n, smem);
  } else {
    for (unsigned c = 0; c < gridDim.y; ++c) m = merge_moments(m, ws[row * gridDim.y + c]);
  }
  const RowThreshold<acc_t> t = row_threshold(m, z);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    st.theta[row] = t.theta;
    st.mean[row] = t.mean;
    st.std[row] = t.std;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kChunkThreads) {
    const acc_t v[1] = {to_acc(xr[i])};
    out.template write<1>(row * n + i, v, t.theta);
  }
}

// The ThetaSums of a row's [begin, end): the direct terms with subtract (their pass writes the
// side outputs), and the scaled deviations.
template <typename T, typename Grad>
__device__ __forceinline__ ThetaSums<acc_of<T>> range_theta_sums(const T* x, const Grad& grad, int64_t base,
                                                                 int64_t begin, int64_t end, acc_of<T> theta,
                                                                 Deviation<acc_of<T>> dev, bool subtract,
                                                                 acc_of<T>* red) {
  acc_of<T> s = 0, ds = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kChunkThreads) {
    const acc_of<T> xv[1] = {to_acc(x[base + i])};
    if (subtract) {
      acc_of<T> d[1];
      grad.template direct<1, true>(base + i, xv, theta, d);
      s += d[0];
    }
    ds += dev(xv[0]);
  }
  const acc_of<T> direct = subtract ? block_allreduce<kChunkThreads>(s, SumOp{}, red) : acc_of<T>(0);
  return {direct, block_allreduce<kChunkThreads>(ds, SumOp{}, red)};
}

template <typename T, typename Grad>
__global__ void __launch_bounds__(kChunkThreads) chunk_theta_sums_kernel(const T* __restrict__ x, Grad grad,
                                                                         RowStatsIn<acc_of<T>> st, int64_t n,
                                                                         int64_t chunk, ThetaSums<acc_of<T>>* ws,
                                                                         bool subtract, int64_t row0) {
  __shared__ acc_of<T> red[32];
  const int64_t row = row0 + blockIdx.x, begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const ThetaSums<acc_of<T>> s = range_theta_sums(x, grad, row * n, begin, end, st.theta[row],
                                                  deviation_of(st.mean[row], st.std[row]), subtract, red);
  if (threadIdx.x == 0) ws[row * gridDim.y + blockIdx.y] = s;
}

// The row's ThetaSums come from ws (chunk partials, whose kernel also wrote the side outputs
// with subtract) or, with ws == nullptr, from this block; with subtract the direct terms' sum
// enters c.
template <typename T, typename Grad>
__global__ void __launch_bounds__(kChunkThreads) chunk_backward_kernel(const T* __restrict__ x, Grad grad,
                                                                       RowStatsIn<acc_of<T>> st, int64_t n,
                                                                       int64_t chunk,
                                                                       const ThetaSums<acc_of<T>>* ws,
                                                                       acc_of<T> z, bool subtract, int64_t row0) {
  using acc_t = acc_of<T>;
  __shared__ acc_t red[32];
  const int64_t row = row0 + blockIdx.x, begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const int64_t base = row * n;
  const acc_t theta = st.theta[row];
  acc_t c = st.grad_theta ? st.grad_theta[row] : acc_t(0);
  acc_t dev_sum = 0;
  if (subtract || c != acc_t(0)) {  // the same in every thread of the block
    ThetaSums<acc_t> total;
    if (ws == nullptr) {
      total = range_theta_sums(x, grad, base, 0, n, theta, deviation_of(st.mean[row], st.std[row]), subtract, red);
    } else {
      for (unsigned k = 0; k < gridDim.y; ++k) total += ws[row * gridDim.y + k];
    }
    if (subtract) c -= total.direct;
    dev_sum = total.dev;
  }
  const ThetaGrad<acc_t> tg = theta_grad(c, static_cast<acc_t>(n), st.mean[row], st.std[row], z, subtract, dev_sum);
  for (int64_t i = begin + threadIdx.x; i < end; i += kChunkThreads) {
    const acc_t xv[1] = {to_acc(x[base + i])};
    acc_t d[1];
    // Side outputs are written once: by the sum pass when there was one.
    if (subtract) grad.template direct<1, false>(base + i, xv, theta, d);
    else grad.template direct<1, true>(base + i, xv, theta, d);
    const acc_t o[1] = {tg.add(d[0], xv[0])};
    grad.template store<1>(base + i, o);
  }
}

// -------------------------------------------------------------------------------------------
// Strided paths (stat_topk over a non-last dimension): a thread per (outer, inner) column.

template <typename T>
__global__ void __launch_bounds__(kStridedThreads) strided_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                          RowStatsOut<acc_of<T>> st, int64_t columns,
                                                                          int64_t size, int64_t inner, acc_of<T> z,
                                                                          bool hard) {
  using acc_t = acc_of<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kStridedThreads + threadIdx.x;
  if (col >= columns) return;
  const int64_t base = (col / inner) * size * inner + col % inner;
  GroupedMoments<acc_t> m;
  for (int64_t i0 = 0; i0 < size; i0 += kGroup) {
    acc_t v[kGroup];
    int count = 0;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (i0 + g < size) {
        v[g] = to_acc(x[base + (i0 + g) * inner]);
        count = g + 1;
      }
    }
    m.add(moments_of(v, count));
  }
  const RowThreshold<acc_t> t = row_threshold(m.result(), z);
  st.theta[col] = t.theta;
  st.mean[col] = t.mean;
  st.std[col] = t.std;
  for (int64_t i = 0; i < size; ++i)
    y[base + i * inner] = from_acc<T>(apply_threshold(hard, to_acc(x[base + i * inner]), t.theta));
}

template <typename T>
__global__ void __launch_bounds__(kStridedThreads) strided_backward_kernel(
    const T* __restrict__ g, const T* __restrict__ x, RowStatsIn<acc_of<T>> st, T* __restrict__ dx,
    int64_t columns, int64_t size, int64_t inner, acc_of<T> z, bool subtract) {
  using acc_t = acc_of<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kStridedThreads + threadIdx.x;
  if (col >= columns) return;
  const int64_t base = (col / inner) * size * inner + col % inner;
  const acc_t theta = st.theta[col];
  acc_t c = st.grad_theta ? st.grad_theta[col] : acc_t(0);
  acc_t dev_sum = 0;
  if (subtract || c != acc_t(0)) {
    // kSumBlock's three levels, as on the CPU.
    const Deviation<acc_t> dev = deviation_of(st.mean[col], st.std[col]);
    LevelSum<ThetaSums<acc_t>> sums;
    for (int64_t b0 = 0; b0 < size; b0 += kSumBlock) {
      ThetaSums<acc_t> block;
      const int64_t b1 = b0 + kSumBlock < size ? b0 + kSumBlock : size;
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t k = base + i * inner;
        const acc_t xv = to_acc(x[k]);
        block.direct += xv > theta ? to_acc(g[k]) : acc_t(0);
        block.dev += dev(xv);
      }
      sums.add_block(block);
    }
    const ThetaSums<acc_t> total = sums.result();
    if (subtract) c -= total.direct;
    dev_sum = total.dev;
  }
  const ThetaGrad<acc_t> tg =
      theta_grad(c, static_cast<acc_t>(size), st.mean[col], st.std[col], z, subtract, dev_sum);
  for (int64_t i = 0; i < size; ++i) {
    const int64_t k = base + i * inner;
    const acc_t xv = to_acc(x[k]);
    dx[k] = from_acc<T>(tg.add(xv > theta ? to_acc(g[k]) : acc_t(0), xv));
  }
}

// -------------------------------------------------------------------------------------------
// Host side

struct Plan {
  int onchip_threads = 0;  // > 0: the on-chip path with this many threads per row
  int64_t chunks = 1;      // chunked path: chunks per row (> 1 needs the workspace)
  int64_t chunk = 0;
};

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// rows, size: the inner == 1 view. per_thread: the on-chip capacity in elements.
Plan make_plan(int64_t rows, int64_t size, int elem_bytes, int per_thread, bool aligned, int sms,
               size_t workspace_bytes, size_t partial_bytes) {
  Plan p;
  const bool few_long_rows = rows < sms && size >= 2 * kMinChunk;
  const bool vectorizable = aligned && (size * elem_bytes) % 16 == 0;
  if (vectorizable && size <= static_cast<int64_t>(per_thread) * kMaxThreads && !few_long_rows) {
    p.onchip_threads = static_cast<int>(pow2_ceil(ceil_div(size, per_thread)));
    if (p.onchip_threads < 64) p.onchip_threads = 64;
    return p;
  }
  if (few_long_rows) {
    int64_t chunks = ceil_div(4 * static_cast<int64_t>(sms), rows);
    const int64_t by_size = size / kMinChunk;
    chunks = chunks < by_size ? chunks : by_size;
    chunks = chunks < kMaxChunks ? chunks : kMaxChunks;
    if (chunks > 1 && static_cast<size_t>(rows * chunks) * partial_bytes <= workspace_bytes) p.chunks = chunks;
  }
  p.chunk = ceil_div(size, p.chunks);
  return p;
}

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(static_cast<float*>(nullptr));
    case DType::F64: return f(static_cast<double*>(nullptr));
    case DType::F16: return f(static_cast<__half*>(nullptr));
    case DType::BF16: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t dispatch_threads(int threads, F&& f) {
  switch (threads) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    case 512: return f(std::integral_constant<int, 512>{});
    case 1024: return f(std::integral_constant<int, 1024>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Out>
cudaError_t forward_rows(const T* x, Out out, RowStatsOut<acc_of<T>> st, int64_t rows, int64_t size, double z,
                         bool aligned, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  const Plan p = make_plan(rows, size, sizeof(T), kForwardCap<T>, aligned, dev.sms, workspace_bytes,
                           sizeof(Moments<acc_t>));
  const acc_t za = static_cast<acc_t>(z);
  auto* ws = p.onchip_threads == 0 && p.chunks > 1 ? static_cast<Moments<acc_t>*>(workspace) : nullptr;
  for (int64_t row0 = 0; row0 < rows; row0 += kMaxGridRows) {
    const unsigned batch = static_cast<unsigned>(rows - row0 < kMaxGridRows ? rows - row0 : kMaxGridRows);
    if (p.onchip_threads > 0) {
      err = dispatch_threads(p.onchip_threads, [&](auto threads) {
        onchip_forward_kernel<decltype(threads)::value, T><<<batch, threads(), 0, stream>>>(x, out, st, size, za, row0);
        return cudaGetLastError();
      });
    } else {
      const dim3 grid(batch, static_cast<unsigned>(p.chunks));
      if (ws != nullptr) chunk_moments_kernel<T><<<grid, kChunkThreads, 0, stream>>>(x, size, p.chunk, ws, row0);
      chunk_forward_kernel<T><<<grid, kChunkThreads, 0, stream>>>(x, out, st, size, p.chunk, ws, za, row0);
      err = cudaGetLastError();
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, typename Grad>
cudaError_t backward_rows(const T* x, Grad grad, RowStatsIn<acc_of<T>> st, int64_t rows, int64_t size, double z,
                          bool subtract, bool aligned, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
  using acc_t = acc_of<T>;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  const Plan p = make_plan(rows, size, sizeof(T), kBackwardCap<T>, aligned, dev.sms, workspace_bytes,
                           sizeof(ThetaSums<acc_t>));
  const acc_t za = static_cast<acc_t>(z);
  // Partial sums per chunk wherever a gradient may reach theta (a grad_theta's values are on
  // the device: its presence decides).
  const bool reaches_theta = subtract || st.grad_theta != nullptr;
  auto* ws = p.onchip_threads == 0 && p.chunks > 1 && reaches_theta ? static_cast<ThetaSums<acc_t>*>(workspace)
                                                                     : nullptr;
  for (int64_t row0 = 0; row0 < rows; row0 += kMaxGridRows) {
    const unsigned batch = static_cast<unsigned>(rows - row0 < kMaxGridRows ? rows - row0 : kMaxGridRows);
    if (p.onchip_threads > 0) {
      err = dispatch_threads(p.onchip_threads, [&](auto threads) {
        onchip_backward_kernel<decltype(threads)::value, T>
            <<<batch, threads(), 0, stream>>>(x, grad, st, size, za, subtract, row0);
        return cudaGetLastError();
      });
    } else {
      const dim3 grid(batch, static_cast<unsigned>(p.chunks));
      if (ws != nullptr)
        chunk_theta_sums_kernel<T><<<grid, kChunkThreads, 0, stream>>>(x, grad, st, size, p.chunk, ws, subtract,
                                                                       row0);
      chunk_backward_kernel<T><<<grid, kChunkThreads, 0, stream>>>(x, grad, st, size, p.chunk, ws, za, subtract, row0);
      err = cudaGetLastError();
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

unsigned strided_blocks(int64_t columns) { return static_cast<unsigned>(ceil_div(columns, kStridedThreads)); }

}  // namespace

size_t stat_topk_workspace_bytes(int64_t outer, int64_t size, int64_t inner, DType dtype) {
  if (inner != 1 || outer == 0 || size == 0) return 0;
  DeviceInfo dev;
  if (device_info(&dev) != cudaSuccess) {
    (void)cudaGetLastError();  // the launch reports it; leave no stale error behind
    return 0;
  }
  const bool wide = dtype == DType::F64;
  const int elem = dtype == DType::F64 ? 8 : dtype == DType::F32 ? 4 : 2;
  const size_t partial = wide ? sizeof(Moments<double>) : sizeof(Moments<float>);
  // The forward's per-thread capacity is the larger one, so its plan splits least often;
  // the backward's partials are smaller. Size for the larger of the two needs.
  const int caps[2] = {wide ? 16 : 32, wide ? 8 : 16};
  size_t need = 0;
  for (int cap : caps) {
    const Plan p = make_plan(outer, size, elem, cap, true, dev.sms, SIZE_MAX, partial);
    const size_t bytes = p.chunks > 1 ? static_cast<size_t>(outer * p.chunks) * partial : 0;
    need = bytes > need ? bytes : need;
  }
  return need;
}

cudaError_t launch_stat_topk_forward(const void* x, void* y, void* theta, void* mean, void* std, DType dtype,
                                     int64_t outer, int64_t size, int64_t inner, double z, bool hard,
                                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (outer == 0 || size == 0 || inner == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = acc_of<T>;
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const RowStatsOut<acc_t> st{static_cast<acc_t*>(theta), static_cast<acc_t*>(mean), static_cast<acc_t*>(std)};
    if (inner > 1) {
      const int64_t columns = outer * inner;
      strided_forward_kernel<T><<<strided_blocks(columns), kStridedThreads, 0, stream>>>(
          xp, yp, st, columns, size, inner, static_cast<acc_t>(z), hard);
      return cudaGetLastError();
    }
    return forward_rows(xp, ThresholdOut<T>{yp, hard}, st, outer, size, z, aligned16(x) && aligned16(y),
                        workspace, workspace_bytes, stream);
  });
}

cudaError_t launch_stat_topk_backward(const void* grad_y, const void* x, const void* theta, const void* mean,
                                      const void* std, const void* grad_theta, void* dx, DType dtype,
                                      int64_t outer, int64_t size, int64_t inner, double z, bool hard,
                                      bool threshold_grad, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  if (outer == 0 || size == 0 || inner == 0) return cudaSuccess;
  const bool subtract = !hard && threshold_grad;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = acc_of<T>;
    const T* gp = static_cast<const T*>(grad_y);
    const T* xp = static_cast<const T*>(x);
    T* dp = static_cast<T*>(dx);
    const RowStatsIn<acc_t> st{static_cast<const acc_t*>(theta), static_cast<const acc_t*>(mean),
                               static_cast<const acc_t*>(std), static_cast<const acc_t*>(grad_theta)};
    if (inner > 1) {
      const int64_t columns = outer * inner;
      strided_backward_kernel<T><<<strided_blocks(columns), kStridedThreads, 0, stream>>>(
          gp, xp, st, dp, columns, size, inner, static_cast<acc_t>(z), subtract);
      return cudaGetLastError();
    }
    const bool aligned = aligned16(grad_y) && aligned16(x) && aligned16(dx);
    return backward_rows(xp, ThresholdGrad<T>{gp, dp}, st, outer, size, z, subtract, aligned, workspace,
                         workspace_bytes, stream);
  });
}

cudaError_t launch_gelu_mul_forward(const void* gate, const void* up, void* out, void* theta, void* mean,
                                    void* std, DType dtype, int64_t rows, int64_t size, double z,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (rows == 0 || size == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = acc_of<T>;
    const RowStatsOut<acc_t> st{static_cast<acc_t*>(theta), static_cast<acc_t*>(mean), static_cast<acc_t*>(std)};
    const bool aligned = aligned16(gate) && aligned16(up) && aligned16(out);
    return forward_rows(static_cast<const T*>(gate), GeluMulOut<T>{static_cast<const T*>(up), static_cast<T*>(out)},
                        st, rows, size, z, aligned, workspace, workspace_bytes, stream);
  });
}

cudaError_t launch_gelu_mul_backward(const void* grad_out, const void* gate, const void* up, const void* theta,
                                     const void* mean, const void* std, void* dgate, void* dup, DType dtype,
                                     int64_t rows, int64_t size, double z, bool threshold_grad, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream) {
  if (rows == 0 || size == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = acc_of<T>;
    const RowStatsIn<acc_t> st{static_cast<const acc_t*>(theta), static_cast<const acc_t*>(mean),
                               static_cast<const acc_t*>(std), nullptr};
    const GeluMulGrad<T> grad{static_cast<const T*>(grad_out), static_cast<const T*>(up), static_cast<T*>(dgate),
                              static_cast<T*>(dup)};
    const bool aligned = aligned16(grad_out) && aligned16(gate) && aligned16(up) && aligned16(dgate) && aligned16(dup);
    return backward_rows(static_cast<const T*>(gate), grad, st, rows, size, z, threshold_grad, aligned, workspace,
                         workspace_bytes, stream);
  });
}

}  // namespace fastloss::kernels
