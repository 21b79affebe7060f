// Raw-pointer launcher for the log-Bessel CUDA kernels. No torch headers: this compiles with
// plain nvcc, so CI without a CUDA torch still builds the kernels.
//
// v, x and the outputs are contiguous arrays of n float32 or float64 values (the torch glue
// broadcasts v against x and converts float16/bfloat16 to float32). `fn` selects log I_v(x),
// log K_v(x) (into out0), the derivatives of either log in v (out0) and x (out1), or its second
// derivatives in v, v and x, and x (out0, out1, out2); its values are those of
// fastloss::LogBesselFn. Outputs a function does not write may be null. The launcher runs
// asynchronously on `stream`, never synchronizes or allocates, and returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastloss::kernels {

cudaError_t launch_log_bessel(int fn, bool is_double, const void* v, const void* x, void* out0,
                              void* out1, void* out2, int64_t n, cudaStream_t stream);

}  // namespace fastloss::kernels
