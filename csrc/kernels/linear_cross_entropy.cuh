// Raw-pointer launchers for the cut cross-entropy CUDA kernels (tensor cores, float16 and
// bfloat16). No torch headers: this compiles with plain nvcc, so CI without a CUDA torch
// still builds the kernels.
//
// The kernels need sm_80 or later (cp.async, ldmatrix, mma.sync with bf16), and a build
// whose code for the device was compiled for sm_80 or later; the caller checks both with
// linear_cross_entropy_kernels_runnable().
// Layout preconditions (linear_cross_entropy_layout_ok): dtype F16 or BF16, D > 0 and a
// multiple of 8, hidden and classifier rows contiguous (unit last stride), row strides a
// multiple of 8 elements and 16-byte aligned base pointers, tokens, V, D <= 2^31 - 257. The bias and
// targets may have any stride; targets are int64 or int32. Launchers run asynchronously on
// `stream`, never synchronize with the host and never allocate (the caller passes the
// workspace); they return the first launch error (cudaErrorInvalidValue for arguments that
// break the preconditions or a workspace smaller than needed for one vocabulary split).
//
// Targets: ignore_index gives 0 in both outputs. A target outside [0, vocab_total) that is not
// ignore_index gives NaN in both outputs for that token (no assert; the torch glue adds an
// asynchronous device-side assert on top, as on the other CUDA paths).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace fastloss::kernels {

// The inputs shared by the forward and the backward.
struct LinearCrossEntropyInputs {
  DType dtype;                // F16 or BF16, for hidden, classifier and bias
  const void* hidden;         // (tokens, dim), row stride hidden_stride
  int64_t hidden_stride;
  const void* classifier;     // (vocab, dim), row stride classifier_stride: rows
  int64_t classifier_stride;  // [vocab_start, vocab_start + vocab) of the vocabulary
  const void* bias;           // (vocab) with stride bias_stride, or nullptr
  int64_t bias_stride;
  const void* targets;        // (tokens) with stride targets_stride
  bool targets_int64;         // int64, else int32
  int64_t targets_stride;
  int64_t tokens, vocab, dim;
  int64_t vocab_start, vocab_total;
  int64_t ignore_index;
  float softcap;  // 0: none
  float label_smoothing;
  float z_loss;
};

struct LinearCrossEntropyForwardArgs {
  LinearCrossEntropyInputs in;
  // false: out0 = loss = lse + z_loss lse^2 + linear, out1 = lse (the whole-vocabulary op);
  // true:  out0 = lse over this classifier's rows, out1 = linear (the vocabulary-shard op),
  // linear = -(1 - label_smoothing) z_target [target in the shard] - label_smoothing /
  // vocab_total * sum of the shard's logits. float32, contiguous, (tokens) each.
  bool shard;
  float* out0;
  float* out1;
};

// Gradients of sum_i grad_loss_i loss_i + grad_lse_i lse_i. A (token tile x vocabulary tile)
// whose every logit-gradient entry is below filter_eps times its token's scale and that holds
// no target adds nothing (as on the CPU). The outputs are float32 buffers the caller has
// zero-filled (the kernel adds into them with atomics, so the summation order, and the last
// bits, can differ between runs); nullptr skips that gradient. Ignored tokens add nothing.
struct LinearCrossEntropyBackwardArgs {
  LinearCrossEntropyInputs in;
  float filter_eps;        // [0, 1] (the op's [0, 1) in float: values above 1 - 2^-25 round to 1); 0: exact
  const float* grad_loss;  // (tokens), contiguous
  const float* grad_lse;   // (tokens), contiguous, or nullptr
  const float* lse;        // (tokens), contiguous: the whole vocabulary's LSE
  float* d_hidden;         // (tokens, dim), contiguous
  float* d_classifier;     // (vocab, dim), contiguous
  float* d_bias;           // (vocab), contiguous
};

// Whether the current device can run the kernels of this build: compute capability 8.0 or
// later, and the code it would run (its SASS, or PTX JIT-compiled) built for sm_80 or later.
// A build for older architectures only, or none compatible with the device, answers false.
// Cached per device.
bool linear_cross_entropy_kernels_runnable();

// tokens, vocab and dim fit an int with room for one more tile: the kernels form m0 + row,
// tile * kBN + column and (vocab + kBN - 1) in int arithmetic.
constexpr int64_t kLinearCrossEntropyMaxIndex = 0x7fffffff - 256;

// Whether the kernels accept this dtype and these sizes (the part of the preconditions
// that no copy of the inputs can change).
inline bool linear_cross_entropy_shape_ok(DType dtype, int64_t tokens, int64_t vocab, int64_t dim) {
  return (dtype == DType::F16 || dtype == DType::BF16) && dim > 0 && dim % 8 == 0 &&
         dim <= kLinearCrossEntropyMaxIndex && tokens > 0 && tokens <= kLinearCrossEntropyMaxIndex && vocab > 0 &&
         vocab <= kLinearCrossEntropyMaxIndex;
}

// Whether the kernels accept these dtype, sizes, strides and pointers (see above).
bool linear_cross_entropy_layout_ok(DType dtype, int64_t tokens, int64_t vocab, int64_t dim,
                                    const void* hidden, int64_t hidden_stride,
                                    const void* classifier, int64_t classifier_stride);

// Workspace the forward needs on the current device: per-(token, vocabulary split) partial
// statistics, 16 bytes each. Passing less makes the launcher use fewer splits (at least
// tokens x 16 bytes are required).
size_t linear_cross_entropy_forward_workspace_bytes(int64_t tokens, int64_t vocab, int64_t dim);

cudaError_t launch_linear_cross_entropy_forward(const LinearCrossEntropyForwardArgs& args, void* workspace,
                                                size_t workspace_bytes, cudaStream_t stream);

cudaError_t launch_linear_cross_entropy_backward(const LinearCrossEntropyBackwardArgs& args, cudaStream_t stream);

}  // namespace fastloss::kernels
