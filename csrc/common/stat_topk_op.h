// Argument handling shared by the CPU and CUDA implementations of the statistical top-k
// ops, so both devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/normal_quantile.h"
#include "common/torch_checks.h"

namespace fastloss {

struct StatTopKArgs {
  RowLayout layout;
  c10::ScalarType stat_dtype;       // float32, or float64 for float64 input
  std::vector<int64_t> stat_shape;  // the input's shape with size 1 along dim
  double z;                         // PhiInv(sparsity)
};

// PhiInv of the sparsity: `sparsity`, or with k > 0 (k entries kept per row) 1 - k / row_length.
inline double stat_topk_quantile(const char* op, double sparsity, int64_t k, int64_t row_length) {
  if (k != 0) {
    TORCH_CHECK(k > 0 && k < row_length, "fastloss.", op, ": 'k' must be in (0, ", row_length,
                ") for rows of length ", row_length, ", got ", k);
    return normal_quantile(1.0 - static_cast<double>(k) / static_cast<double>(row_length));
  }
  TORCH_CHECK(sparsity > 0.0 && sparsity < 1.0, "fastloss.", op,
              ": 'sparsity' must be in (0, 1) (the fraction of each row that is zeroed), got ",
              sparsity);
  return normal_quantile(sparsity);
}

inline StatTopKArgs stat_topk_forward_args(const char* op, const char* arg, const at::Tensor& x,
                                           int64_t dim, double sparsity, int64_t k) {
  check_floating(op, arg, x);
  const int64_t wrapped = wrap_dim(op, dim, x.dim());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (!shape.empty()) shape[wrapped] = 1;
  const auto stat = x.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
  const RowLayout layout = row_layout(x, wrapped);
  return {layout, stat, shape, stat_topk_quantile(op, sparsity, k, layout.size)};
}

inline void check_stat(const char* op, const char* arg, const at::Tensor& t,
                       const StatTopKArgs& args, const char* x_arg, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(args.stat_shape) && t.scalar_type() == args.stat_dtype,
              "fastloss.", op, ": '", arg, "' must be a ", args.stat_dtype, " tensor of shape ",
              at::IntArrayRef(args.stat_shape), ", got ", t.scalar_type(), " of shape ", t.sizes());
  check_same_device(op, arg, t, x_arg, x);
}

// stat_topk_backward: grad_y like x; theta, mean, std and (optional) grad_theta per row.
inline StatTopKArgs stat_topk_backward_args(const char* op, const at::Tensor& grad_y,
                                            const c10::optional<at::Tensor>& grad_theta,
                                            const at::Tensor& x, const at::Tensor& theta,
                                            const at::Tensor& mean, const at::Tensor& std,
                                            int64_t dim, double sparsity, int64_t k) {
  StatTopKArgs args = stat_topk_forward_args(op, "x", x, dim, sparsity, k);
  check_like(op, "grad_y", grad_y, "x", x);
  check_stat(op, "theta", theta, args, "x", x);
  check_stat(op, "mean", mean, args, "x", x);
  check_stat(op, "std", std, args, "x", x);
  if (is_given(grad_theta)) check_stat(op, "grad_theta", *grad_theta, args, "x", x);
  return args;
}

// The fused Gemma 3n activation works on the last dimension of gate and up.
inline StatTopKArgs gelu_mul_args(const char* op, const at::Tensor& gate, const at::Tensor& up,
                                  double sparsity, int64_t k) {
  TORCH_CHECK(gate.dim() >= 1, "fastloss.", op, ": 'gate' must have at least one dimension, got a 0-d tensor");
  check_like(op, "up", up, "gate", gate);
  return stat_topk_forward_args(op, "gate", gate, -1, sparsity, k);
}

inline StatTopKArgs gelu_mul_backward_args(const char* op, const at::Tensor& grad_out,
                                           const at::Tensor& gate, const at::Tensor& up,
                                           const at::Tensor& theta, const at::Tensor& mean,
                                           const at::Tensor& std, double sparsity, int64_t k) {
  StatTopKArgs args = gelu_mul_args(op, gate, up, sparsity, k);
  check_like(op, "grad_out", grad_out, "gate", gate);
  check_stat(op, "theta", theta, args, "gate", gate);
  check_stat(op, "mean", mean, args, "gate", gate);
  check_stat(op, "std", std, args, "gate", gate);
  return args;
}

// (y, theta, mean, std) of stat_topk and stat_topk_gelu_mul, allocated like `like`; rows of
// length 0 get NaN statistics (the mean of nothing).
using StatTopKResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline StatTopKResult stat_topk_outputs(const at::Tensor& like, const StatTopKArgs& args) {
  const auto stat_options = like.options().dtype(args.stat_dtype);
  StatTopKResult r{at::empty(like.sizes(), like.options()), at::empty(args.stat_shape, stat_options),
                   at::empty(args.stat_shape, stat_options), at::empty(args.stat_shape, stat_options)};
  if (args.layout.size == 0) {
    std::get<1>(r).fill_(NAN), std::get<2>(r).fill_(NAN), std::get<3>(r).fill_(NAN);
  }
  return r;
}

}  // namespace fastloss
