// SinKD pieces written with ATen ops, shared by the CUDA glue (cuda/sinkhorn.cpp) and the
// differentiable create_graph path (autograd.cpp). The CPU kernels build the same kernel in
// their own loops (cpu/sinkhorn.cpp, kernel_matrix).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/ones.h>

#include <cstdint>

namespace fastloss {

// SinKD's kernel: exp(-W / eps), shifted when there are normalizations (n_iter > 0) by each
// row's and then each column's smallest cost, K = exp(-((W - r) - c) / eps), with the first
// column scaling y_0 = exp(-c / eps) written to *y0 if given (and n_iter > 0). The iterates and gradients are
// those of the unshifted kernel, and rows or columns whose every exp(-W / eps) underflows stay
// finite. The shifts are constants to autograd (the loss does not depend on them).
inline at::Tensor sinkhorn_kd_kernel(const at::Tensor& W, double eps, int64_t n_iter, at::Tensor* y0 = nullptr) {
  // (An empty batch has no minima to shift by.)
  if (n_iter == 0 || W.numel() == 0) {
    if (y0 != nullptr && n_iter > 0) *y0 = at::ones({W.size(1)}, W.options());
    return at::exp(W * (-1.0 / eps));
  }
  const at::Tensor rows = W - W.detach().amin(1, true);
  const at::Tensor c = rows.detach().amin(0, true);
  if (y0 != nullptr) *y0 = at::exp(c.squeeze(0) * (-1.0 / eps));
  return at::exp((rows - c) * (-1.0 / eps));
}

// The vector-Jacobian product of p = softmax(z / T) along rows: p (g - sum(g p)) / T.
inline at::Tensor softmax_temperature_vjp(const at::Tensor& g, const at::Tensor& p, double temperature) {
  return p * (g - (g * p).sum(1, true)) * (1.0 / temperature);
}

}  // namespace fastloss
