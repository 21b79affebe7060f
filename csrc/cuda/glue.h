// Helpers shared by the CUDA torch glue files: dtype mapping, device checks, workspace.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "kernels/device_info.h"
#include "kernels/dtype.h"

namespace fastloss::cuda {

using kernels::DType;

// Only called after check_floating has accepted the dtype.
inline DType kernel_dtype(c10::ScalarType t) {
  if (t == c10::kFloat) return DType::F32;
  if (t == c10::kDouble) return DType::F64;
  if (t == c10::kHalf) return DType::F16;
  TORCH_CHECK(t == c10::kBFloat16, "fastloss: no CUDA kernel for dtype ", t);
  return DType::BF16;
}

inline void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "fastloss.", op, ": expected '", arg,
              "' to be a CUDA tensor, got a tensor on ", t.device());
}

// Scratch for rows split across blocks; freed back to the caching allocator on return, which
// is safe because later users of the block are ordered after the kernel on the same stream.
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

inline void* data_or_null(at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

// The current device's multiprocessor count, from the kernels' cached query: ATen's
// device-properties helper lives in a header (ATen/cuda/CUDAContext.h) that needs the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit assembled from pip packages may lack.
inline int multiprocessor_count() {
  kernels::DeviceInfo dev;
  C10_CUDA_CHECK(kernels::device_info(&dev));
  return dev.sms;
}

}  // namespace fastloss::cuda
