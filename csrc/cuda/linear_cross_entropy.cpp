// CUDA glue for the linear cross-entropy ops: the argument checks shared with the CPU
// (common/linear_cross_entropy_op.h), the device guard, allocation and registration, all on
// the current stream with no host synchronization.
//
// Dispatch rule (all three ops): float16 and bfloat16 inputs with D > 0 a multiple of 8 (and
// tokens, V, D <= 2^31 - 257) on a GPU of compute capability 8.0 or later (with sm_80+ code
// for it in the build) run the tensor-core kernels of kernels/linear_cross_entropy.cu; hidden
// or classifier with a layout those kernels do not take (last stride != 1, a row stride that
// is not a multiple of 8 elements, a base pointer not 16-byte aligned) are copied to
// contiguous tensors first. Everything else (float32, float64, other D, no tokens, GPUs before
// sm_80, builds without sm_80+ code for the GPU) runs the blocked cuBLAS + ATen implementation
// (common/linear_cross_entropy_aten.h), which does not filter
// (filter_eps is ignored there). The kernel backward adds into float32 buffers with atomics
// (then cast to the inputs' dtypes), so its last bits can vary between runs; with
// deterministic=True, or torch.use_deterministic_algorithms(True), the backward takes the
// ATen implementation instead: a fixed-order sum over vocabulary blocks with cuBLAS matmuls
// (no atomics), bitwise reproducible on a given GPU and library version, in float32.
// Targets outside [0, V) that are not ignore_index trip an asynchronous device-side assert on
// every path (the kernels also write NaN for such tokens' loss and LSE, which makes their
// gradients NaN).
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>

#include "common/linear_cross_entropy_aten.h"
#include "common/linear_cross_entropy_op.h"
#include "cuda/glue.h"
#include "kernels/linear_cross_entropy.cuh"

namespace fastloss::cuda {
namespace {

// Called under the device guard: the kernels use sm_80 instructions (cp.async, ldmatrix,
// mma.sync with bfloat16), so older GPUs, and builds with no sm_80+ code for this GPU, take
// the ATen path.
bool use_kernels(const at::Tensor& hidden, const LinearCrossEntropyArgs& args) {
  return kernels::linear_cross_entropy_shape_ok(kernel_dtype(hidden.scalar_type()), args.tokens, args.vocab,
                                                args.dim) &&
         kernels::linear_cross_entropy_kernels_runnable();
}

// A (rows, D) matrix as the kernels read it: unit last stride, row stride a multiple of 8
// elements, 16-byte aligned; anything else is copied to a fresh (aligned) contiguous tensor.
at::Tensor kernel_layout(const at::Tensor& t) {
  const bool ok = t.stride(1) == 1 && t.stride(0) % 8 == 0 && t.stride(0) >= t.size(1) &&
                  reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_targets(const char* op, const at::Tensor& targets, int64_t ignore_index, const LinearCrossEntropyArgs& args) {
  const at::Tensor t = targets.to(at::kLong);
  aten_impl::check_targets_async(op, t, t.ne(ignore_index), args.vocab_total);
}

// The kernels' view of the inputs; h and c already in kernel_layout.
kernels::LinearCrossEntropyInputs kernel_inputs(const char* op, const at::Tensor& h, const at::Tensor& c,
                                                const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
                                                int64_t ignore_index, double softcap, double label_smoothing,
                                                double z_loss, const LinearCrossEntropyArgs& args) {
  const bool has_bias = is_given(bias);
  kernels::LinearCrossEntropyInputs a{};
  a.dtype = kernel_dtype(h.scalar_type());
  a.hidden = h.const_data_ptr();
  a.hidden_stride = h.stride(0);
  a.classifier = c.const_data_ptr();
  a.classifier_stride = c.stride(0);
  a.bias = has_bias ? bias->const_data_ptr() : nullptr;
  a.bias_stride = has_bias ? bias->stride(0) : 0;
  a.targets = targets.const_data_ptr();
  a.targets_int64 = targets.scalar_type() == at::kLong;
  a.targets_stride = targets.stride(0);
  a.tokens = args.tokens;
  a.vocab = args.vocab;
  a.dim = args.dim;
  a.vocab_start = args.vocab_start;
  a.vocab_total = args.vocab_total;
  a.ignore_index = ignore_index;
  a.softcap = static_cast<float>(softcap);
  a.label_smoothing = static_cast<float>(label_smoothing);
  a.z_loss = static_cast<float>(z_loss);
  TORCH_CHECK(kernels::linear_cross_entropy_layout_ok(a.dtype, a.tokens, a.vocab, a.dim, a.hidden, a.hidden_stride,
                                                      a.classifier, a.classifier_stride),
              "fastloss.", op, ": internal error: 'hidden' / 'classifier' layout not accepted by the kernels");
  return a;
}

// (loss, lse) of the whole vocabulary, or (lse, linear) of a shard, from the kernels.
std::tuple<at::Tensor, at::Tensor> kernel_forward(const char* op, const at::Tensor& hidden,
                                                  const at::Tensor& classifier, const at::Tensor& targets,
                                                  const c10::optional<at::Tensor>& bias, int64_t ignore_index,
                                                  double softcap, double label_smoothing, double z_loss, bool shard,
                                                  const LinearCrossEntropyArgs& args) {
  check_targets(op, targets, ignore_index, args);
  const at::Tensor h = kernel_layout(hidden), c = kernel_layout(classifier);
  const auto options = hidden.options().dtype(at::kFloat);
  at::Tensor out0 = at::empty({args.tokens}, options), out1 = at::empty({args.tokens}, options);
  kernels::LinearCrossEntropyForwardArgs a{};
  a.in = kernel_inputs(op, h, c, targets, bias, ignore_index, softcap, label_smoothing, z_loss, args);
  a.shard = shard;
  a.out0 = out0.mutable_data_ptr<float>();
  a.out1 = out1.mutable_data_ptr<float>();
  const size_t ws_bytes = kernels::linear_cross_entropy_forward_workspace_bytes(args.tokens, args.vocab, args.dim);
  at::Tensor ws = workspace(ws_bytes, h);
  C10_CUDA_CHECK(kernels::launch_linear_cross_entropy_forward(a, data_or_null(ws), ws_bytes,
                                                              c10::cuda::getCurrentCUDAStream()));
  return {out0, out1};
}

// Vocabulary rows per backward launch when d classifier is wanted. d classifier accumulates
// in float32 one chunk at a time (then is cast into its slice of the output), so the float32
// buffer is chunk x D rather than V x D: the memory bound is dE + dC in the inputs' dtype. A
// chunk is a shard of the vocabulary (the kernels' vocab_start), and keeps at least ~8
// blocks' worth of tiles per SM in each launch when there are few tokens, as far as a
// 256 MiB buffer allows (with 128 tokens that wish was 1056 tiles, 4.4 GB at D = 8192).
// At least 16 tiles: with many tokens the buffer stays small (Llama-3 head, 8192 tokens,
// D = 4096: 17 tiles, 34 MiB, against 128 MiB at the former floor of 64), at the price of
// ~60 launches over a 128K vocabulary.
int64_t classifier_chunk_rows(int64_t tokens, int64_t vocab, int64_t dim) {
  constexpr int64_t kTile = 128;  // the kernels' token and vocabulary tile
  constexpr int64_t kMaxBufferBytes = int64_t{256} << 20;
  const int64_t token_tiles = (tokens + kTile - 1) / kTile;
  const int64_t sms = multiprocessor_count();
  const int64_t wanted = std::max<int64_t>(16, (8 * sms + token_tiles - 1) / token_tiles);
  const int64_t affordable = std::max<int64_t>(1, kMaxBufferBytes / (kTile * std::max<int64_t>(dim, 1) * 4));
  return std::min(vocab, std::min(wanted, affordable) * kTile);
}

// (d hidden, d classifier, d bias) from the kernel: float32 accumulation buffers, then the
// inputs' dtypes. Gradients not asked for are empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(
    const char* op, const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& classifier, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, int64_t ignore_index, double softcap, double label_smoothing, double z_loss,
    double filter_eps, std::array<bool, 3> output_mask, const LinearCrossEntropyArgs& args) {
  check_targets(op, targets, ignore_index, args);
  const bool has_bias = is_given(bias);
  const bool need_de = output_mask[0], need_dc = output_mask[1], need_db = output_mask[2] && has_bias;
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor de = need_de ? at::zeros({args.tokens, args.dim}, f32) : at::Tensor();
  at::Tensor dc = need_dc ? at::empty({args.vocab, args.dim}, classifier.options()) : at::Tensor();
  at::Tensor db = need_db ? at::zeros({args.vocab}, f32) : at::Tensor();
  if (need_de || need_dc || need_db) {
    const at::Tensor h = kernel_layout(hidden), c = kernel_layout(classifier);
    const at::Tensor gl = grad_loss.contiguous(), l = lse.contiguous();
    const at::Tensor gs = is_given(grad_lse) ? grad_lse->contiguous() : at::Tensor();
    const int64_t chunk = need_dc ? classifier_chunk_rows(args.tokens, args.vocab, args.dim) : args.vocab;
    at::Tensor dc_acc = need_dc ? at::empty({chunk, args.dim}, f32) : at::Tensor();
    for (int64_t v0 = 0; v0 < args.vocab; v0 += chunk) {
      const int64_t rows = std::min(chunk, args.vocab - v0);
      // This chunk as a shard of the vocabulary: its rows of the classifier and bias, and the
      // targets relative to vocab_start. Row offsets keep the kernels' 16-byte alignment (the
      // row stride is a multiple of 8 elements).
      LinearCrossEntropyArgs chunk_args = args;
      chunk_args.vocab = rows;
      chunk_args.vocab_start = args.vocab_start + v0;
      const c10::optional<at::Tensor> chunk_bias =
          has_bias ? c10::optional<at::Tensor>(bias->narrow(0, v0, rows)) : c10::nullopt;
      kernels::LinearCrossEntropyBackwardArgs a{};
      a.in = kernel_inputs(op, h, c.narrow(0, v0, rows), targets, chunk_bias, ignore_index, softcap, label_smoothing,
                           z_loss, chunk_args);
      a.filter_eps = static_cast<float>(filter_eps);
      a.grad_loss = gl.const_data_ptr<float>();
      a.grad_lse = gs.defined() ? gs.const_data_ptr<float>() : nullptr;
      a.lse = l.const_data_ptr<float>();
      a.d_hidden = need_de ? de.mutable_data_ptr<float>() : nullptr;
      at::Tensor dc_rows = need_dc ? dc_acc.narrow(0, 0, rows) : at::Tensor();
      if (need_dc) dc_rows.zero_();
      a.d_classifier = need_dc ? dc_rows.mutable_data_ptr<float>() : nullptr;
      a.d_bias = need_db ? db.narrow(0, v0, rows).mutable_data_ptr<float>() : nullptr;
      C10_CUDA_CHECK(kernels::launch_linear_cross_entropy_backward(a, c10::cuda::getCurrentCUDAStream()));
      if (need_dc) dc.narrow(0, v0, rows).copy_(dc_rows);
    }
  }
  return {need_de ? de.to(hidden.scalar_type()) : at::empty({0}, hidden.options()),
          need_dc ? dc : at::empty({0}, classifier.options()),
          need_db ? db.to(bias->scalar_type()) : at::empty({0}, has_bias ? bias->options() : hidden.options())};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& classifier,
                                                        const at::Tensor& targets,
                                                        const c10::optional<at::Tensor>& bias, int64_t ignore_index,
                                                        double softcap, double label_smoothing, double z_loss,
                                                        double filter_eps /* autograd only */,
                                                        bool /*deterministic: autograd only*/) {
  const char* op = "linear_cross_entropy";
  check_cuda(op, "hidden", hidden);
  const LinearCrossEntropyArgs args =
      linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap, label_smoothing, z_loss, 0, -1);
  check_filter_eps(op, filter_eps);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  if (use_kernels(hidden, args)) {
    return kernel_forward(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                          /*shard=*/false, args);
  }
  return aten_impl::forward(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                            args);
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_shard(const at::Tensor& hidden, const at::Tensor& classifier,
                                                              const at::Tensor& targets,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t ignore_index, double softcap,
                                                              double label_smoothing, int64_t vocab_start,
                                                              int64_t vocab_total) {
  const char* op = "linear_cross_entropy_shard";
  check_cuda(op, "hidden", hidden);
  const LinearCrossEntropyArgs args = linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap,
                                                                label_smoothing, 0.0, vocab_start, vocab_total);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  if (use_kernels(hidden, args)) {
    return kernel_forward(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, 0.0,
                          /*shard=*/true, args);
  }
  return aten_impl::statistics(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing,
                               c10::nullopt, args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& classifier, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, int64_t ignore_index, double softcap, double label_smoothing, double z_loss,
    double filter_eps, std::array<bool, 3> output_mask, int64_t vocab_start, int64_t vocab_total,
    bool deterministic) {
  const char* op = "linear_cross_entropy_backward";
  check_cuda(op, "hidden", hidden);
  const LinearCrossEntropyArgs args =
      linear_cross_entropy_backward_args(op, grad_loss, grad_lse, hidden, classifier, targets, bias, lse, softcap,
                                         label_smoothing, z_loss, filter_eps, vocab_start, vocab_total);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  if (use_kernels(hidden, args) && !deterministic && !at::globalContext().deterministicAlgorithms()) {
    return kernel_backward(op, grad_loss, grad_lse, hidden, classifier, targets, bias, lse, ignore_index, softcap,
                           label_smoothing, z_loss, filter_eps, output_mask, args);
  }
  return aten_impl::backward(grad_loss, grad_lse, hidden, classifier, targets, bias, lse, ignore_index, softcap,
                             label_smoothing, z_loss, output_mask, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy);
  m.impl("linear_cross_entropy_shard", &linear_cross_entropy_shard);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace fastloss::cuda
