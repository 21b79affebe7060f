// Argument handling shared by the CPU and CUDA implementations of the log-Bessel ops, so both
// devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/torch_checks.h"

#include <algorithm>
#include <vector>

namespace fastloss {

// Which function a log-Bessel kernel evaluates (values; d/dv and d/dx of the log; or its second
// derivatives d^2/dv^2, d^2/dv dx, d^2/dx^2).
enum class LogBesselFn : int { LogIv = 0, LogKv = 1, LogIvGrad = 2, LogKvGrad = 3, LogIvHess = 4, LogKvHess = 5 };

struct LogBesselArgs {
  at::Tensor v;  // broadcast to `shape`, contiguous (with keep_single, one element stays one)
  at::Tensor x;
  std::vector<int64_t> shape;  // the broadcast shape of v and x: the outputs'
};

// v and x: floating, one dtype (the Python wrapper promotes), one device, broadcastable.
// keep_single: an operand of one element (log_bessel_iv(2.5, x)) is not copied out to the
// full shape; the caller reads it with stride 0.
inline LogBesselArgs log_bessel_args(const char* op, const at::Tensor& v, const at::Tensor& x,
                                     bool keep_single = false) {
  check_floating(op, "v", v);
  check_floating(op, "x", x);
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "fastloss.", op,
              ": expected 'v' and 'x' to have the same dtype, got ", v.scalar_type(), " and ",
              x.scalar_type());
  check_same_device(op, "v", v, "x", x);
  const int64_t ndim = std::max(v.dim(), x.dim());
  std::vector<int64_t> shape(ndim, 1);
  for (int64_t i = 0; i < ndim; ++i) {
    const int64_t a = i < ndim - v.dim() ? 1 : v.size(i - (ndim - v.dim()));
    const int64_t b = i < ndim - x.dim() ? 1 : x.size(i - (ndim - x.dim()));
    TORCH_CHECK(a == b || a == 1 || b == 1, "fastloss.", op, ": 'v' of shape ", v.sizes(),
                " and 'x' of shape ", x.sizes(), " do not broadcast together");
    shape[i] = a == 1 ? b : a;
  }
  const auto prepare = [&](const at::Tensor& t) {
    return keep_single && t.numel() == 1 ? t.reshape({1}).contiguous() : t.expand(shape).contiguous();
  };
  return {prepare(v), prepare(x), shape};
}

}  // namespace fastloss
