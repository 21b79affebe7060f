// Raw-pointer launchers for the batched log-domain Sinkhorn CUDA kernels. No torch headers:
// this compiles with plain nvcc, so CI without a CUDA torch still builds the kernels.
//
// Every array is contiguous and of the accumulation type T (float or double): cost (B, n, m),
// a / log_a (B, n), b / log_b (B, m); outputs plan (B, n, m), alpha (B, n), beta (B, m),
// value, error (B) and n_iter (B, int64). Launchers run asynchronously on `stream`, never
// synchronize with the host and never allocate; they return the first launch error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastloss::kernels {

template <typename T>
struct SinkhornArgs {
  const T* cost;
  const T* a;
  const T* b;
  const T* log_a;
  const T* log_b;
  int64_t batch, n, m;
  T inv_eps;
  int64_t max_iter;
  T tol;
  double mass_tol;  // relative tolerance on |sum a - sum b|; an invalid problem gives NaN results
  int error_norm;  // of the row-marginal error that tol bounds (MarginalErrorNorm::p: 1, 2, 0 = inf)
  T* plan;
  T* alpha;
  T* beta;
  T* value;
  int64_t* n_iter;
  T* error;
};

// Scratch bytes the launcher needs on the current device for this shape (0 when every
// problem runs in one thread block).
size_t sinkhorn_workspace_bytes(int64_t batch, int64_t n, int64_t m, size_t elem_size);

cudaError_t launch_sinkhorn(const SinkhornArgs<float>& args, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);
cudaError_t launch_sinkhorn(const SinkhornArgs<double>& args, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

}  // namespace fastloss::kernels
