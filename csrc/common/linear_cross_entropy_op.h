// Argument handling shared by the CPU and CUDA implementations of the linear cross-entropy
// ops, so both devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/torch_checks.h"

namespace fastloss {

struct LinearCrossEntropyArgs {
  int64_t tokens;       // N
  int64_t dim;          // D
  int64_t vocab;        // V of this classifier (a shard's rows when vocab-parallel)
  int64_t vocab_start;  // the first vocabulary entry this classifier holds
  int64_t vocab_total;  // the whole vocabulary; targets are in [0, vocab_total)
  c10::ScalarType acc;  // float32, or float64 for float64 inputs
};

inline void check_on_hidden_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& hidden) {
  TORCH_CHECK(t.device() == hidden.device(), "fastloss.", op, ": '", arg, "' must be on the device of 'hidden' (",
              hidden.device(), "), got ", t.device());
}

inline LinearCrossEntropyArgs linear_cross_entropy_args(const char* op, const at::Tensor& hidden,
                                                        const at::Tensor& classifier, const at::Tensor& targets,
                                                        const c10::optional<at::Tensor>& bias, double softcap,
                                                        double label_smoothing, double z_loss,
                                                        int64_t vocab_start, int64_t vocab_total) {
  check_floating(op, "hidden", hidden);
  TORCH_CHECK(hidden.dim() == 2, "fastloss.", op, ": 'hidden' must be 2-d (tokens, D), got ", hidden.dim(),
              "-d of shape ", hidden.sizes());
  TORCH_CHECK(classifier.dim() == 2 && classifier.size(1) == hidden.size(1), "fastloss.", op,
              ": 'classifier' must be (V, D) with D = ", hidden.size(1), " (the last dimension of 'hidden'), got ",
              classifier.sizes());
  TORCH_CHECK(classifier.scalar_type() == hidden.scalar_type(), "fastloss.", op,
              ": 'classifier' must have the dtype of 'hidden' (", hidden.scalar_type(), "), got ",
              classifier.scalar_type());
  check_on_hidden_device(op, "classifier", classifier, hidden);
  TORCH_CHECK(targets.scalar_type() == c10::kLong || targets.scalar_type() == c10::kInt, "fastloss.", op,
              ": 'targets' must be an int64 or int32 tensor, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "fastloss.", op,
              ": 'targets' must have shape (", hidden.size(0), ") (one per row of 'hidden'), got ", targets.sizes());
  check_on_hidden_device(op, "targets", targets, hidden);
  const int64_t vocab = classifier.size(0);
  if (is_given(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == vocab, "fastloss.", op, ": 'bias' must have shape (", vocab,
                ") (one per row of 'classifier'), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "fastloss.", op,
                ": 'bias' must have the dtype of 'hidden' (", hidden.scalar_type(), "), got ", bias->scalar_type());
    check_on_hidden_device(op, "bias", *bias, hidden);
  }
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "fastloss.", op,
              ": 'softcap' must be a finite value > 0 (or 0 for no cap), got ", softcap);
  // The float32 kernels (float16 / bfloat16 too) apply the cap in float32: a cap that narrows to a
  // subnormal, to 0 (no cap) or to inf would silently change the loss.
  TORCH_CHECK(hidden.scalar_type() == c10::kDouble || softcap == 0.0 ||
                  (softcap >= std::numeric_limits<float>::min() && softcap <= std::numeric_limits<float>::max()),
              "fastloss.", op, ": 'softcap' must be a normal float32 value (", std::numeric_limits<float>::min(),
              " to ", std::numeric_limits<float>::max(), ") for ", hidden.scalar_type(),
              " 'hidden' (applied in float32), got ", softcap);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "fastloss.", op,
              ": 'label_smoothing' must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss), "fastloss.", op, ": 'z_loss' must be finite, got ", z_loss);
  const int64_t total = vocab_total < 0 ? vocab : vocab_total;
  // (vocab <= total - vocab_start: vocab_start + vocab could overflow int64.)
  TORCH_CHECK(vocab_start >= 0 && vocab <= total - vocab_start, "fastloss.", op, ": the classifier's ", vocab,
              " rows from 'vocab_start' = ", vocab_start, " must lie in the vocabulary [0, ", total,
              ") ('vocab_total')");
  TORCH_CHECK(vocab > 0, "fastloss.", op, ": 'classifier' must have at least one row, got shape ",
              classifier.sizes());
  const auto acc = hidden.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
  return {hidden.size(0), hidden.size(1), vocab, vocab_start, total, acc};
}

// The forward takes filter_eps only for autograd; it is checked there too, so a bad value
// fails at the call rather than in the backward.
inline void check_filter_eps(const char* op, double filter_eps) {
  TORCH_CHECK(filter_eps >= 0.0 && filter_eps < 1.0, "fastloss.", op,
              ": 'filter_eps' must be in [0, 1) (0: no filtering), got ", filter_eps);
}

// A per-token float tensor of the backward (grad_loss, grad_lse, lse).
inline void check_token_vector(const char* op, const char* arg, const at::Tensor& t,
                               const LinearCrossEntropyArgs& args, const at::Tensor& hidden) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == args.tokens && t.scalar_type() == args.acc, "fastloss.", op, ": '", arg,
              "' must be a ", args.acc, " tensor of shape (", args.tokens, "), got ", t.scalar_type(), " of shape ",
              t.sizes());
  check_on_hidden_device(op, arg, t, hidden);
}

inline LinearCrossEntropyArgs linear_cross_entropy_backward_args(
    const char* op, const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& classifier, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, double softcap, double label_smoothing, double z_loss, double filter_eps,
    int64_t vocab_start, int64_t vocab_total) {
  const LinearCrossEntropyArgs args = linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap,
                                                                label_smoothing, z_loss, vocab_start, vocab_total);
  check_token_vector(op, "grad_loss", grad_loss, args, hidden);
  if (is_given(grad_lse)) check_token_vector(op, "grad_lse", *grad_lse, args, hidden);
  check_token_vector(op, "lse", lse, args, hidden);
  check_filter_eps(op, filter_eps);
  return args;
}

}  // namespace fastloss
