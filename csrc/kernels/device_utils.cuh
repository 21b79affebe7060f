// Device helpers shared by the CUDA kernels: conversions between storage and accumulation
// types, warp and block all-reduces, aligned vectors, tensor-core primitives (cp.async,
// ldmatrix, mma.sync). Header-only, torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/device_info.h"

#include <cstdint>
#include <type_traits>

// A kernel's register cap. __maxnreg__ arrived in CUDA 12.4; older toolkits get the block-size
// bound alone, which lets ptxas use up to 65536 / threads registers: no spills, lower occupancy.
#if !defined(__CUDACC_VER_MAJOR__) || __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4)
#define FASTLOSS_MAX_REGS(regs, threads) __maxnreg__(regs)
#else
#define FASTLOSS_MAX_REGS(regs, threads) __launch_bounds__(threads)
#endif

namespace fastloss::kernels {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Explicit intrinsics only: torch builds define __CUDA_NO_HALF_CONVERSIONS__.
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float cast(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double cast(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return FromAcc<T>::cast(v);
}

__device__ __forceinline__ float dev_exp(float v) { return expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return exp(v); }
__device__ __forceinline__ float dev_log(float v) { return logf(v); }
__device__ __forceinline__ double dev_log(double v) { return log(v); }
__device__ __forceinline__ float dev_fmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dev_fmax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float dev_fmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double dev_fmin(double a, double b) { return fmin(a, b); }
template <typename T>
__device__ __forceinline__ T dev_inf() {
  return static_cast<T>(__int_as_float(0x7f800000));
}
template <typename T>
__device__ __forceinline__ T dev_nan() {
  return static_cast<T>(__int_as_float(0x7fc00000));
}

__device__ __forceinline__ float shfl_xor(float v, int o, int w) {
  return __shfl_xor_sync(kFullMask, v, o, w);
}
__device__ __forceinline__ double shfl_xor(double v, int o, int w) {
  return __shfl_xor_sync(kFullMask, v, o, w);
}

template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op, int width) {
  for (int o = width / 2; o > 0; o /= 2) v = op(v, shfl_xor(v, o, width));
  return v;
}

// Every thread gets the same, deterministic result (the ops are commutative, so the butterfly
// leaves identical bits in every lane). The leading barrier lets callers reuse `scratch` (>= 32 T)
// back to back.
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, void* scratch) {
  constexpr int kWarps = kThreads / 32;
  T* s = static_cast<T*>(scratch);
  v = warp_allreduce(v, op, 32);
  if constexpr (kWarps == 1) {
    return v;
  } else {
    __syncthreads();
    if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = v;
    __syncthreads();
    // Each kWarps-lane segment of every warp reduces the same values the same way.
    return warp_allreduce(s[threadIdx.x % kWarps], op, kWarps);
  }
}

// fmin/fmax are symmetric in their arguments (NaN ignored, either zero), so every thread of
// an all-reduce gets the same bits whatever order the values meet in.
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return dev_fmin(a, b);
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return dev_fmax(a, b);
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// A 16-byte (or N-element) aligned vector, for vectorized loads and stores.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// -------------------------------------------------------------------------------------------
// Tensor-core building blocks (sm_80 and later: cp.async, ldmatrix, mma.sync). Compiled for an
// older architecture (FASTLOSS_CUDA_ARCHS may list one) they trap instead of failing the build;
// the host code must not launch kernels that use them there. Fragment
// layouts of mma.m16n8k16 with 16-bit inputs (PTX ISA, "Matrix fragments for mma.m16n8k16"),
// g = lane / 4, q = lane % 4, each register holding two consecutive 16-bit values:
//   A 16x16 row-major: a0 (row g, cols 2q..2q+1), a1 (row g+8, same cols),
//                      a2 (row g, cols 2q+8..2q+9), a3 (row g+8, cols 2q+8..2q+9)
//   B 16x8 "col":      b0 (rows k = 2q..2q+1, col g), b1 (rows k = 2q+8..2q+9, col g)
//   C/D 16x8 float:    c0, c1 (row g, cols 2q, 2q+1), c2, c3 (row g+8, cols 2q, 2q+1)
// ldmatrix.x4: lane i gives the address of row i % 8 of 8x8 matrix i / 8; register j of lane l
// receives row l / 4, columns 2 (l % 4) .. +1 of matrix j, which is the layout above.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTLOSS_PRE_SM80 1
#else
#define FASTLOSS_PRE_SM80 0
#endif

#if defined(FASTLOSS_CUDA_EMU)
// The CPU emulator's versions (tests/cuda_emu), lane by lane from the layouts above.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  emu::cp_async16(smem, gmem, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  emu::cp_async_wait(kPending);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu::ldmatrix_x4(r, smem, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  emu::ldmatrix_x4(r, smem, true);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma_16816(d, a, b, std::is_same_v<T, __nv_bfloat16>);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (padding rows and
// columns past the end without a branch around the copy). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if FASTLOSS_PRE_SM80
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if !FASTLOSS_PRE_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if !FASTLOSS_PRE_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if FASTLOSS_PRE_SM80
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
#endif
}
// The same with each 8x8 matrix transposed (register j of lane l: column l / 4, rows 2 (l % 4)..+1).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if FASTLOSS_PRE_SM80
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
#endif
}

// d += a * b on tensor cores, 16x8x16, float accumulation; T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if FASTLOSS_PRE_SM80
  __trap();
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_16816: __half or __nv_bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

#endif  // FASTLOSS_CUDA_EMU

// Two floats rounded to a packed pair of 16-bit values (the low half is `lo`), as mma and
// ldmatrix hold them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "pack2: __half or __nv_bfloat16");
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// p[0] += a, p[1] += b (p 8-byte aligned): one vector atomic on sm_90, two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}
}  // namespace fastloss::kernels
