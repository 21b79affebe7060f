// Raw-pointer launcher for the von Mises-Fisher CUDA kernels. No torch headers: this compiles
// with plain nvcc, so CI without a CUDA torch still builds the kernels.
//
// `in` and `out` are contiguous arrays of n float32 or float64 values (the torch glue converts
// float16/bfloat16 to float32). `fn` (a value of fastloss::vmf::Fn) selects A_p, A_p', A_p'',
// 1 - A_p, log C_p or the entropy of the concentrations in `in`, or the maximum-likelihood
// concentration of the mean resultant lengths in `in` (at most `iterations` Newton steps).
// The launcher runs asynchronously on `stream`, never synchronizes or allocates, and returns
// cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastloss::kernels {

cudaError_t launch_vmf(int fn, bool is_double, const void* in, void* out, int64_t n, double p, int iterations,
                       cudaStream_t stream);

// d w / d kappa of vMF samples (fastloss::vmf::sample_w_derivative) for n pairs (w[i],
// kappa[i]), contiguous float32 or float64 arrays; same contract as launch_vmf.
cudaError_t launch_vmf_sample_w_derivative(bool is_double, const void* w, const void* kappa, void* out, int64_t n,
                                           double p, cudaStream_t stream);

}  // namespace fastloss::kernels
