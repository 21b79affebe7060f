// Raw-pointer launchers for the statistical top-k CUDA kernels (stat_topk and the fused
// Gemma 3n gelu-mul). No torch headers, so they compile with plain nvcc.
//
// Tensors are contiguous and viewed as (outer, size, inner) around the reduced dimension
// (gelu-mul: inner == 1). Elements are `dtype`; the per-row statistics (theta, mean, std,
// grad_theta), laid out as (outer, inner), are float, or double for F64. z = PhiInv(sparsity).
// Every launcher runs asynchronously on `stream`, never synchronizes with the host and never
// allocates; it returns cudaGetLastError(). Workspace: pass at least *_workspace_bytes()
// bytes (0 for most shapes; only a few long rows split across blocks use it).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace fastloss::kernels {

size_t stat_topk_workspace_bytes(int64_t outer, int64_t size, int64_t inner, DType dtype);

// y = relu(x - theta) (soft) or x * [x > theta] (hard), theta = mean + std * z per row.
cudaError_t launch_stat_topk_forward(const void* x, void* y, void* theta, void* mean, void* std,
                                     DType dtype, int64_t outer, int64_t size, int64_t inner,
                                     double z, bool hard, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream);

// dx = g [x > theta] + c (1/size + z (x - mean) / (size std)), c = grad_theta (0 if null)
// - (soft and threshold_grad ? sum(g [x > theta]) : 0).
cudaError_t launch_stat_topk_backward(const void* grad_y, const void* x, const void* theta,
                                      const void* mean, const void* std, const void* grad_theta,
                                      void* dx, DType dtype, int64_t outer, int64_t size,
                                      int64_t inner, double z, bool hard, bool threshold_grad,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

// out = gelu_tanh(relu(gate - theta)) * up over rows of length `size`.
cudaError_t launch_gelu_mul_forward(const void* gate, const void* up, void* out, void* theta,
                                    void* mean, void* std, DType dtype, int64_t rows, int64_t size,
                                    double z, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// d up = g gelu(h); dh = g up gelu'(h) [gate > theta]; d gate = dh - (threshold_grad ?
// sum(dh) : 0) (1/size + z (gate - mean) / (size std)).
cudaError_t launch_gelu_mul_backward(const void* grad_out, const void* gate, const void* up,
                                     const void* theta, const void* mean, const void* std,
                                     void* dgate, void* dup, DType dtype, int64_t rows,
                                     int64_t size, double z, bool threshold_grad, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastloss::kernels
