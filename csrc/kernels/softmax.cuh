// Raw-pointer launchers for the two-pass softmax / log-softmax CUDA kernels. No torch
// headers: this compiles with plain nvcc, so CI without a CUDA torch still builds the kernels.
//
// Tensors are contiguous and viewed as (outer, size, inner) around the softmax dimension.
// Forward (in -> out): f32->f32, f64->f64, f16->f16, bf16->bf16, f16->f32, bf16->f32.
// Backward (grad_output/output of dtype `out_dtype` -> grad_input of dtype `in_dtype`):
// the same dtype, or f32 -> f16 / bf16 (after a half_to_float forward).
// Other pairs return cudaErrorInvalidValue. Every launcher runs asynchronously on `stream`,
// never synchronizes with the host and never allocates; it returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace fastloss::kernels {

// Scratch bytes the forward needs on the current device for this shape (0 for most shapes:
// only a few long rows split across blocks use it). Pass at least this much to the launcher;
// with less (or nullptr) it still works, one block per row.
size_t softmax_forward_workspace_bytes(int64_t outer, int64_t size, int64_t inner, DType in,
                                       DType out);

cudaError_t launch_softmax_forward(const void* x, DType in, void* y, DType out, int64_t outer,
                                   int64_t size, int64_t inner, bool log, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

// Same contract as the forward's workspace, for the backward.
size_t softmax_backward_workspace_bytes(int64_t outer, int64_t size, int64_t inner,
                                        DType out_dtype, DType in_dtype);

// softmax:     grad_in = out * (grad_out - sum(grad_out * out))
// log_softmax: grad_in = grad_out - exp(out) * sum(grad_out)
cudaError_t launch_softmax_backward(const void* grad_out, const void* out, DType out_dtype,
                                    void* grad_in, DType in_dtype, int64_t outer, int64_t size,
                                    int64_t inner, bool log, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastloss::kernels
