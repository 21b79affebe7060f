// The von Mises-Fisher helpers on the CPU (A_p and its derivatives, 1 - A_p, log C_p, the
// entropy and the maximum-likelihood concentration), over the shared math in common/vmf_math.h.
//
// Elementwise and compute bound: each element costs ~0.1-1 us (a continued fraction or
// Debye's expansion carried in truncated Taylor series; kappa_mle a few Newton steps of
// both), evaluated in double for every dtype. Parallel over elements (at::parallel_for,
// torch's thread count); compiled per instruction set (FASTLOSS_CPU_CLONES) for FMA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/vmf_math.h"
#include "common/vmf_op.h"
#include "cpu/isa.h"

namespace fastloss::cpu {
namespace {

constexpr int64_t kGrain = 256;  // elements per parallel task

template <vmf::Fn kFn>
FASTLOSS_CPU_INLINE void evaluate_block(const double* in, double* out, int64_t n, const vmf::Order& o,
                                        int iterations) {
  for (int64_t i = 0; i < n; ++i) out[i] = vmf::evaluate<kFn>(o, iterations, in[i]);
}

FASTLOSS_CPU_CLONES void evaluate_range(vmf::Fn fn, const double* in, double* out, int64_t n,
                                        const vmf::Order& o, int iterations) {
  switch (fn) {
    case vmf::Fn::MeanResultant: return evaluate_block<vmf::Fn::MeanResultant>(in, out, n, o, iterations);
    case vmf::Fn::MeanResultantSlope: return evaluate_block<vmf::Fn::MeanResultantSlope>(in, out, n, o, iterations);
    case vmf::Fn::MeanResultantCurvature:
      return evaluate_block<vmf::Fn::MeanResultantCurvature>(in, out, n, o, iterations);
    case vmf::Fn::Complement: return evaluate_block<vmf::Fn::Complement>(in, out, n, o, iterations);
    case vmf::Fn::Entropy: return evaluate_block<vmf::Fn::Entropy>(in, out, n, o, iterations);
    case vmf::Fn::KappaMle: return evaluate_block<vmf::Fn::KappaMle>(in, out, n, o, iterations);
    case vmf::Fn::LogNormalizer: return evaluate_block<vmf::Fn::LogNormalizer>(in, out, n, o, iterations);
  }
}

// Elements [begin, end) of src into dst, through double blocks for the other dtypes.
template <typename scalar_t>
void evaluate_elements(vmf::Fn fn, const scalar_t* src, scalar_t* dst, int64_t begin, int64_t end,
                       const vmf::Order& o, int iterations) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    evaluate_range(fn, src + begin, dst + begin, end - begin, o, iterations);
  } else {
    double block_in[kGrain], block_out[kGrain];
    for (int64_t b = begin; b < end; b += kGrain) {
      const int64_t m = std::min<int64_t>(kGrain, end - b);
      for (int64_t i = 0; i < m; ++i) block_in[i] = static_cast<double>(src[b + i]);
      evaluate_range(fn, block_in, block_out, m, o, iterations);
      for (int64_t i = 0; i < m; ++i) dst[b + i] = static_cast<scalar_t>(block_out[i]);
    }
  }
}

at::Tensor evaluate(const char* op, const char* arg, vmf::Fn fn, const at::Tensor& input, int64_t p,
                    int64_t iterations) {
  TORCH_CHECK(input.device().is_cpu(), "fastloss.", op, ": expected '", arg, "' to be a CPU tensor, got ",
              input.device());
  vmf_check_args(op, arg, input, p);
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  if (out.numel() == 0) return out;
  const vmf::Order order = vmf::make_order(static_cast<double>(p));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "vmf", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, in.numel(), kGrain, [&](int64_t begin, int64_t end) {
      evaluate_elements(fn, src, dst, begin, end, order, static_cast<int>(iterations));
    });
  });
  return out;
}

FASTLOSS_CPU_CLONES void sample_w_derivative_range(const double* w, const double* kappa, double* out, int64_t n,
                                                   const vmf::Order& o, const vmf::GaussLegendre& rule) {
  for (int64_t i = 0; i < n; ++i) out[i] = vmf::sample_w_derivative(o, rule, w[i], kappa[i]);
}

// ~5 us per element (a 256-node quadrature): the float64 copies of w and kappa cost nothing
// next to it.
at::Tensor sample_w_derivative(const at::Tensor& w, const at::Tensor& kappa, int64_t p) {
  TORCH_CHECK(w.device().is_cpu(), "fastloss.vmf_sample_w_derivative: expected 'w' to be a CPU tensor, got ",
              w.device());
  vmf_check_sample_args(w, kappa, p);
  const at::Tensor w64 = w.to(at::kDouble).contiguous(), k64 = kappa.to(at::kDouble).contiguous();
  at::Tensor out = at::empty(w64.sizes(), w64.options());
  if (out.numel() == 0) return out.to(w.scalar_type());
  const vmf::Order order = vmf::make_order(static_cast<double>(p));
  static const vmf::GaussLegendre rule = vmf::make_gauss_legendre();
  const double* wp = w64.const_data_ptr<double>();
  const double* kp = k64.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, out.numel(), 16, [&](int64_t begin, int64_t end) {
    sample_w_derivative_range(wp + begin, kp + begin, op + begin, end - begin, order, rule);
  });
  return out.to(w.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  VmfOps<&evaluate>::register_impls(m);
  m.impl("vmf_sample_w_derivative", &sample_w_derivative);
}

}  // namespace fastloss::cpu
