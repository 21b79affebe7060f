// Cut cross-entropy built from ATen ops, for any device: the CUDA registration's path wherever
// its tensor-core kernels do not apply (float32 and float64, a hidden size that is not a multiple
// of 8, GPUs before sm_80, the deterministic backward). The same blocked algorithm as the CPU
// kernels: for each block of kBlock vocabulary rows, one matmul gives the (N x block) logits in
// the accumulation type (float32, float64 for float64), and elementwise/row-reduction ops merge
// the block into an online LSE (forward) or turn it into the logit gradient for dE += dZ C_block
// and dC_block = dZ^T E (backward). Memory: O(N x block); the N x V logits never exist. Ignored
// tokens are masked (no nonzero(), so no host synchronization), out-of-range targets are caught
// by an asynchronous device-side assert, and there is no gradient filtering (deciding to skip a
// block would need a host synchronization).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/linear_cross_entropy_op.h"

namespace fastloss::aten_impl {

constexpr int64_t kBlock = 1024;  // O(N x kBlock) float32 temporaries, a few at a time

// Raw logits of one block (+ bias), in the accumulation type.
inline at::Tensor block_logits(const at::Tensor& e, const at::Tensor& classifier, const c10::optional<at::Tensor>& bias,
                               int64_t v0, int64_t vb, c10::ScalarType acc) {
  at::Tensor z = at::mm(e, classifier.narrow(0, v0, vb).to(acc).t());
  if (is_given(bias)) z.add_(bias->narrow(0, v0, vb).to(acc));
  return z;
}

// x, with 0 where it is -inf: a shift for exp that is not itself -inf.
inline at::Tensor shift_or_zero(const at::Tensor& x) { return at::where(x.isneginf(), at::zeros_like(x), x); }

// hidden in the accumulation type with ignored tokens' rows zeroed: their d z is 0, but
// 0 * inf padding would put NaN into dC (the CUDA kernels and the CPU path never read them).
inline at::Tensor active_hidden(const at::Tensor& hidden, const at::Tensor& active, const at::TensorOptions& options) {
  return at::where(active.unsqueeze(1), hidden.to(options.dtype()), at::zeros({}, options));
}

inline void check_targets_async(const char* op, const at::Tensor& targets, const at::Tensor& active, int64_t vocab_total) {
  const at::Tensor ok = (active.logical_not() | (targets.ge(0) & targets.lt(vocab_total))).all();
  at::_assert_async(ok, std::string("fastloss.") + op + ": 'targets' must be in [0, " + std::to_string(vocab_total) +
                            ") or equal ignore_index (device-side check)");
}

// (lse, linear) over this classifier's rows, 0 at ignored tokens; with a z_loss, (lse, loss)
// instead (the loss is formed from the LSE's unrounded parts, as token_loss does).
inline std::tuple<at::Tensor, at::Tensor> statistics(const char* op, const at::Tensor& hidden,
                                                     const at::Tensor& classifier, const at::Tensor& targets_in,
                                                     const c10::optional<at::Tensor>& bias, int64_t ignore_index,
                                                     double softcap, double label_smoothing,
                                                     c10::optional<double> z_loss,
                                                     const LinearCrossEntropyArgs& args) {
  const auto options = hidden.options().dtype(args.acc);
  const at::Tensor targets = targets_in.to(at::kLong);
  const at::Tensor active = targets.ne(ignore_index);
  check_targets_async(op, targets, active, args.vocab_total);
  at::Tensor zero = at::zeros({args.tokens}, options);
  if (args.tokens == 0) return {zero, zero.clone()};
  const at::Tensor e = active_hidden(hidden, active, options);
  const at::Tensor local = targets - args.vocab_start;
  at::Tensor run_max = at::full({args.tokens}, -std::numeric_limits<double>::infinity(), options);
  at::Tensor run_sum = at::zeros({args.tokens}, options);
  at::Tensor target_logit = at::zeros({args.tokens}, options);
  at::Tensor logit_sum = at::zeros({args.tokens}, options);
  for (int64_t v0 = 0; v0 < args.vocab; v0 += kBlock) {
    const int64_t vb = std::min(kBlock, args.vocab - v0);
    at::Tensor z = block_logits(e, classifier, bias, v0, vb, args.acc);
    if (softcap > 0) z = at::tanh(z / softcap) * softcap;
    // A block (or the running state) whose logits are all -inf (masked vocabulary entries)
    // has maximum -inf: the shifts use 0 there, since -inf - -inf would be NaN.
    const at::Tensor block_max = std::get<0>(z.max(1));
    const at::Tensor block_shift = shift_or_zero(block_max);
    const at::Tensor block_sum = (z - block_shift.unsqueeze(1)).exp_().sum(1);
    const at::Tensor new_max = at::maximum(run_max, block_max);
    const at::Tensor new_shift = shift_or_zero(new_max);
    run_sum = run_sum * (run_max - new_shift).exp() + block_sum * (block_shift - new_shift).exp();
    run_max = new_max;
    logit_sum.add_(z.sum(1));
    const at::Tensor col = local - v0;
    const at::Tensor in_block = col.ge(0) & col.lt(vb);
    const at::Tensor picked = z.gather(1, col.clamp(0, vb - 1).unsqueeze(1)).squeeze(1);
    target_logit.add_(at::where(in_block, picked, zero));
  }
  const at::Tensor log_sum = run_sum.log();
  const at::Tensor lse = at::where(active, run_max + log_sum, zero);
  // Without smoothing the logit sum is left out: it is -inf when the bias masks entries.
  at::Tensor linear = target_logit * -(1.0 - label_smoothing);
  if (label_smoothing != 0) linear = linear - logit_sum * (label_smoothing / args.vocab_total);
  linear = at::where(active, linear, zero);
  if (!z_loss) return {lse, linear};
  // token_loss's choice: from the parts without label smoothing, where the LSE is finite.
  const at::Tensor plain = lse + lse * lse * *z_loss + linear;
  if (label_smoothing != 0) return {lse, plain};
  const at::Tensor from_parts = (run_max + linear) + log_sum + lse * lse * *z_loss;
  return {lse, at::where(active & lse.isfinite(), from_parts, plain)};
}

inline std::tuple<at::Tensor, at::Tensor> forward(const char* op, const at::Tensor& hidden, const at::Tensor& classifier,
                                                  const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
                                                  int64_t ignore_index, double softcap, double label_smoothing,
                                                  double z_loss, const LinearCrossEntropyArgs& args) {
  auto [lse, loss] = statistics(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                                args);
  return {loss, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& classifier, const at::Tensor& targets_in, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, int64_t ignore_index, double softcap, double label_smoothing, double z_loss,
    std::array<bool, 3> output_mask, const LinearCrossEntropyArgs& args) {
  const auto options = hidden.options().dtype(args.acc);
  const at::Tensor targets = targets_in.to(at::kLong);
  const at::Tensor active = targets.ne(ignore_index);
  const bool need_de = output_mask[0], need_dc = output_mask[1], need_db = output_mask[2] && is_given(bias);
  // Gradients not asked for are empty tensors.
  at::Tensor de = need_de ? at::zeros({args.tokens, args.dim}, options) : at::empty({0}, hidden.options());
  at::Tensor dc = need_dc ? at::zeros(classifier.sizes(), classifier.options()) : at::empty({0}, classifier.options());
  at::Tensor dbias = need_db ? at::zeros({args.vocab}, bias->options())
                             : at::empty({0}, is_given(bias) ? bias->options() : hidden.options());
  if (args.tokens == 0 || !(need_de || need_dc || need_db)) return {need_de ? de.to(hidden.scalar_type()) : de, dc, dbias};
  const at::Tensor e = active_hidden(hidden, active, options);
  // d z_j = a p_j - b [j = target] - c per token (common/linear_cross_entropy_math.h).
  const at::Tensor zero = at::zeros({args.tokens}, options);
  const at::Tensor gl = at::where(active, grad_loss, zero);
  at::Tensor a = gl * (lse * (2.0 * z_loss) + 1.0);
  if (is_given(grad_lse)) a = a + at::where(active, *grad_lse, zero);
  const at::Tensor b = gl * (1.0 - label_smoothing);
  const at::Tensor c = gl * (label_smoothing / args.vocab_total);
  const at::Tensor local = targets - args.vocab_start;
  const at::Tensor keep = active.unsqueeze(1);
  for (int64_t v0 = 0; v0 < args.vocab; v0 += kBlock) {
    const int64_t vb = std::min(kBlock, args.vocab - v0);
    at::Tensor z = block_logits(e, classifier, bias, v0, vb, args.acc);
    at::Tensor chain;
    if (softcap > 0) {
      const at::Tensor t = at::tanh(z / softcap);
      z = t * softcap;
      chain = 1.0 - t * t;
    }
    at::Tensor d = (z - lse.unsqueeze(1)).exp_().mul_(a.unsqueeze(1)).sub_(c.unsqueeze(1));
    const at::Tensor col = local - v0;
    // The one-hot term as a comparison, not scatter_add_ (which has no deterministic CUDA kernel
    // for 2-d input, and this path serves deterministic=True); targets outside the block match
    // no column.
    const at::Tensor hit = at::arange(vb, col.options()).unsqueeze(0).eq(col.unsqueeze(1));
    d.sub_(hit.to(args.acc).mul_(b.unsqueeze(1)));
    if (chain.defined()) d.mul_(chain);
    d = at::where(keep, d, at::zeros({}, options));  // ignored rows may hold inf * 0
    if (need_de) de.addmm_(d, classifier.narrow(0, v0, vb).to(args.acc));
    if (need_dc) dc.narrow(0, v0, vb).copy_(at::mm(d.t(), e));
    if (need_db) dbias.narrow(0, v0, vb).copy_(d.sum(0));
  }
  return {need_de ? de.to(hidden.scalar_type()) : de, dc, dbias};
}

}  // namespace fastloss::aten_impl
