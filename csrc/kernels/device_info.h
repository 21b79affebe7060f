// The device properties the launchers size their grids by, cached per device. Host-only and
// torch-free: the kernels (through device_utils.cuh) and the torch glue share it.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

namespace fastloss::kernels {

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int device;
  int sms;
  int smem_optin;  // the per-block shared memory limit with the opt-in attribute
};

// The current device's properties.
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

}  // namespace fastloss::kernels
