// A CPU emulator for the torch-free CUDA kernels (csrc/kernels), for tests on machines without
// a GPU. Force-included (g++ -include) into each kernel file after build.py has rewritten its
// launches (`k<<<grid, block, smem, stream>>>(args)`) and its __shared__ declarations.
//
// Each CUDA thread is a fiber (ucontext) on one OS thread; a fiber runs until it reaches a
// barrier (__syncthreads, a warp collective, a grid sync) or returns. The scheduler releases a
// barrier once every live thread of its scope (block, warp's mask, grid) waits there, and
// reports a deadlock (threads of one scope waiting at different barriers) as a launch error.
// A block runs warp after warp: each warp's threads one after another (warp collectives
// complete as soon as the warp arrives) up to a __syncthreads, then the next warp; a
// cooperative grid runs block after block up to each grid sync. The order is increasing or
// (FASTLOSS_EMU_ORDER=reverse) decreasing, and in reverse order cp.async copies land at once
// instead of at their wait, so a missing barrier shows up as results that differ between the
// orders.
// Shared memory and fresh outputs start filled with 0xff bytes (NaN, -1), so a read of
// something never written is visible; shared memory (dynamic and static) and test buffers end
// at a guard page.
//
// The tensor-core primitives (cp.async, ldmatrix, mma.sync) are emulated lane by lane from the
// PTX ISA's fragment layouts (device_utils.cuh calls emu:: versions under FASTLOSS_CUDA_EMU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>

#define FASTLOSS_CUDA_EMU 1

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __maxnreg__(...)

// After the CUDA headers, whose host compilation must not see it: the device branches of
// csrc/common are the ones under test.
#ifndef FASTLOSS_EMU_ARCH
#define FASTLOSS_EMU_ARCH 900
#endif
#define __CUDA_ARCH__ FASTLOSS_EMU_ARCH

namespace emu {

struct Thread {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running fiber's indices (valid inside a kernel).
Thread* current();

// Barriers: the calling fiber waits until its scope is complete.
void sync_block();
int sync_block_or(int predicate);
void sync_warp(unsigned mask);
void sync_grid();

// Warp collective: deposits `bytes` (<= 16) of the calling lane, waits for the lanes of
// `mask`, and returns the deposits of all 32 lanes (lane l's at offset 16 l), readable until
// the calling lane's next collective. Lanes of one mask must call the same `kind`.
enum Collective { kShuffle = 1, kVote, kSyncWarp, kLdmatrix, kMmaA, kMmaB };
const unsigned char* warp_collect(unsigned mask, const void* mine, int bytes, int kind);
int warp_lane();

// Dynamic shared memory of the running block, and a block's static __shared__ variable (one
// per declaration `key` and block).
void* dynamic_smem();
void* block_static(const void* key, size_t bytes, size_t align);
template <typename T>
T& shared_var(const void* key) {
  return *static_cast<T*>(block_static(key, sizeof(T), alignof(T) < 16 ? 16 : alignof(T)));
}

// Ends the running thread with a launch failure (device-side trap or assert).
[[noreturn]] void trap(const char* what);

// A kernel's __launch_bounds__ (build.py puts the call at the top of its body).
inline void check_max_threads(long long max_threads);

// Runs `body` as every thread of a grid: block after block, or (cooperative) all blocks in one
// schedule, each up to a grid sync in turn.
cudaError_t launch(const void* fn, const char* name, dim3 grid, dim3 block, size_t smem, bool cooperative,
                   std::function<void()> body);

template <typename F>
const void* kernel_address(F* f) {
  return reinterpret_cast<const void*>(f);
}

template <typename... A, size_t... I>
void call_with_args(void (*fn)(A...), void** args, std::index_sequence<I...>) {
  fn(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
cudaError_t launch_cooperative(void (*fn)(A...), const char* name, dim3 grid, dim3 block, void** args,
                               size_t smem, cudaStream_t) {
  // The arguments are copied before the launch returns, as cudaLaunchCooperativeKernel does.
  return launch(reinterpret_cast<const void*>(fn), name, grid, block, smem, true,
                [fn, args] { call_with_args(fn, args, std::index_sequence_for<A...>{}); });
}

// Tensor-core primitives (warp-collective where the hardware's are).
// cp.async copies land at the wait that retires their group (a read of shared memory before
// the wait sees the 0xff fill), or in reverse order at once.
void cp_async16(void* smem, const void* gmem, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);

}  // namespace emu

inline void emu::check_max_threads(long long max_threads) {
  const Thread* t = current();
  if (static_cast<long long>(t->block_dim.x) * t->block_dim.y * t->block_dim.z > max_threads) {
    trap("block larger than the kernel's __launch_bounds__");
  }
}

#define threadIdx (::emu::current()->thread_idx)
#define blockIdx (::emu::current()->block_idx)
#define blockDim (::emu::current()->block_dim)
#define gridDim (::emu::current()->grid_dim)
#ifndef warpSize
#define warpSize 32
#endif

inline void __syncthreads() { ::emu::sync_block(); }
inline int __syncthreads_or(int p) { return ::emu::sync_block_or(p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::sync_warp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { ::emu::trap("__trap()"); }

namespace emu {
// shfl.sync's rule (PTX ISA): lanes form segments of `width`; a source lane past the end of the
// caller's segment (or before its start, for up) gives the caller its own value; a source lane
// outside the mask is an error here (undefined on a GPU).
template <typename T>
inline T shuffle(unsigned mask, T v, int src, bool valid) {
  static_assert(sizeof(T) <= 16, "warp shuffles move at most 16 bytes");
  const unsigned char* all = warp_collect(mask, &v, sizeof(T), kShuffle);
  if (!valid) return v;
  if (!(mask >> src & 1u)) trap("shuffle from a lane outside the mask");
  T r;
  std::memcpy(&r, all + 16 * src, sizeof(T));
  return r;
}
inline int segment_start(int width) { return warp_lane() & ~(width - 1) & 31; }
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int src = ::emu::warp_lane() ^ (lane_mask & 31);
  return ::emu::shuffle(mask, v, src, src <= (::emu::segment_start(width) | (width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int src = ::emu::warp_lane() + static_cast<int>(delta & 31);
  return ::emu::shuffle(mask, v, src, src <= (::emu::segment_start(width) | (width - 1)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int src = ::emu::warp_lane() - static_cast<int>(delta & 31);
  return ::emu::shuffle(mask, v, src, src >= ::emu::segment_start(width));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::emu::shuffle(mask, v, ::emu::segment_start(width) | (src_lane & (width - 1)), true);
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  const int mine = p != 0;
  const unsigned char* all = ::emu::warp_collect(mask, &mine, sizeof mine, ::emu::kVote);
  unsigned result = 0;
  for (int l = 0; l < 32; ++l) {
    int v;
    std::memcpy(&v, all + 16 * l, sizeof v);
    if ((mask >> l & 1u) && v) result |= 1u << l;
  }
  return result;
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return __ballot_sync(mask, p) == mask; }

// CUDA's global math overloads that host C++ has only in std.
using std::ceil;
using std::erf;
using std::erfc;
using std::exp;
using std::expm1;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::lgamma;
using std::log;
using std::log1p;
using std::pow;
using std::rint;
using std::sqrt;
using std::tanh;
// Floating-point min/max drop a NaN argument, as CUDA's fminf/fmaxf.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  return a < b ? b : a;
}

inline float __int_as_float(int v) {
  float r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline int __float_as_int(float v) {
  int r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline double __longlong_as_double(long long v) {
  double r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline long long __double_as_longlong(double v) {
  long long r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
// Never fused with a neighbouring add or multiply, as CUDA's (out of line: the contracting
// build cannot fuse across the call).
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float exp10f(float v) { return std::pow(10.0f, v); }
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Atomics: fibers are never preempted inside a read-modify-write, so plain ones are atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline float2 atomicAdd(float2* p, float2 v) {
  const float2 old = *p;
  p->x = old.x + v.x;
  p->y = old.y + v.y;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
