// Argument handling shared by the CPU and CUDA implementations of the von Mises-Fisher ops,
// so both devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/torch_checks.h"
#include "common/vmf_math.h"

namespace fastloss {

// The argument of every vMF op is one floating tensor (kappa, or rbar for kappa_mle); p >= 2.
inline void vmf_check_args(const char* op, const char* arg, const at::Tensor& t, int64_t p) {
  check_floating(op, arg, t);
  TORCH_CHECK_VALUE(p >= 2, "fastloss.", op, ": expected the dimension 'p' to be >= 2, got ", p);
}

// vmf_mean_resultant's `derivative` as the function its kernels evaluate.
inline vmf::Fn vmf_mean_resultant_fn(int64_t derivative) {
  TORCH_CHECK_VALUE(derivative >= 0 && derivative <= 2,
                    "fastloss.vmf_mean_resultant: expected 'derivative' to be 0, 1 or 2, got ", derivative);
  return derivative == 0 ? vmf::Fn::MeanResultant
         : derivative == 1 ? vmf::Fn::MeanResultantSlope
                           : vmf::Fn::MeanResultantCurvature;
}

// vmf_sample_w_derivative's arguments: w and kappa floating, of one shape, dtype and device.
inline void vmf_check_sample_args(const at::Tensor& w, const at::Tensor& kappa, int64_t p) {
  constexpr const char* op = "vmf_sample_w_derivative";
  vmf_check_args(op, "w", w, p);
  check_floating(op, "kappa", kappa);
  TORCH_CHECK_VALUE(w.sizes() == kappa.sizes(), "fastloss.", op, ": expected 'w' and 'kappa' of one shape, got ",
                    w.sizes(), " and ", kappa.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == kappa.scalar_type(), "fastloss.", op,
                    ": expected 'w' and 'kappa' of one dtype, got ", w.scalar_type(), " and ", kappa.scalar_type());
  check_same_device(op, "w", w, "kappa", kappa);
}

inline void vmf_check_iterations(int64_t iterations) {
  TORCH_CHECK_VALUE(iterations >= 1 && iterations <= 1000,
                    "fastloss.vmf_kappa_mle: expected 'iterations' in [1, 1000], got ", iterations);
}

// The vMF ops of one device, over its elementwise evaluator
// `kEvaluate(op, arg, fn, input, p, iterations)` (which checks the device and the arguments).
template <at::Tensor (*kEvaluate)(const char*, const char*, vmf::Fn, const at::Tensor&, int64_t, int64_t)>
struct VmfOps {
  static at::Tensor mean_resultant(const at::Tensor& kappa, int64_t p, int64_t derivative) {
    return kEvaluate("vmf_mean_resultant", "kappa", vmf_mean_resultant_fn(derivative), kappa, p, 1);
  }
  static at::Tensor complement(const at::Tensor& kappa, int64_t p) {
    return kEvaluate("vmf_mean_resultant_complement", "kappa", vmf::Fn::Complement, kappa, p, 1);
  }
  static at::Tensor entropy(const at::Tensor& kappa, int64_t p) {
    return kEvaluate("vmf_entropy", "kappa", vmf::Fn::Entropy, kappa, p, 1);
  }
  static at::Tensor log_normalizer(const at::Tensor& kappa, int64_t p) {
    return kEvaluate("vmf_log_normalizer", "kappa", vmf::Fn::LogNormalizer, kappa, p, 1);
  }
  static at::Tensor kappa_mle(const at::Tensor& rbar, int64_t p, int64_t iterations) {
    vmf_check_iterations(iterations);
    return kEvaluate("vmf_kappa_mle", "rbar", vmf::Fn::KappaMle, rbar, p, iterations);
  }
  // Called from the device's TORCH_LIBRARY_IMPL block.
  static void register_impls(torch::Library& m) {
    m.impl("vmf_mean_resultant", &mean_resultant);
    m.impl("vmf_mean_resultant_complement", &complement);
    m.impl("vmf_entropy", &entropy);
    m.impl("vmf_log_normalizer", &log_normalizer);
    m.impl("vmf_kappa_mle", &kappa_mle);
  }
};

}  // namespace fastloss
