// Device helpers shared by the CUDA kernels: conversions between storage and accumulation
// types, warp and block all-reduces, aligned vectors. Header-only, torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

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

struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b < a ? b : a;
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
// Host side: device properties the launchers size their grids by.

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int device;
  int sms;
  int smem_optin;
};

inline cudaError_t device_info(DeviceInfo* d) {
  // Cached per device: attribute queries are cheap but not free, and launches are frequent.
  static std::atomic<int> sms_cache[kMaxDevices];
  static std::atomic<int> smem_cache[kMaxDevices];
  cudaError_t err = cudaGetDevice(&d->device);
  if (err != cudaSuccess) return err;
  const bool cacheable = d->device >= 0 && d->device < kMaxDevices;
  if (cacheable) {
    d->sms = sms_cache[d->device].load(std::memory_order_relaxed);
    d->smem_optin = smem_cache[d->device].load(std::memory_order_relaxed);
    if (d->sms > 0 && d->smem_optin > 0) return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, d->device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&d->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d->device);
  if (err != cudaSuccess) return err;
  if (cacheable) {
    sms_cache[d->device].store(d->sms, std::memory_order_relaxed);
    smem_cache[d->device].store(d->smem_optin, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}
}  // namespace fastloss::kernels
