// The von Mises-Fisher helpers on CUDA: one thread per element over the shared math in
// common/vmf_math.h (continued fraction, Debye's expansion in truncated Taylor series,
// Newton's method for the maximum-likelihood concentration).
//
// Compute bound and evaluated in double for float32 and float64 alike (the accuracy the
// helpers promise needs it): one read and one write per element. Grid-stride loop, 64-bit
// indexing. Threads of a warp may take different methods; kappa_mle's threads may stop after
// different numbers of Newton steps.
#include "common/vmf_math.h"
#include "kernels/vmf.cuh"

namespace fastloss::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxBlocks = 65535;

template <vmf::Fn kFn, typename T>
__global__ void __launch_bounds__(kThreads)
    vmf_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n, const vmf::Order order, int iterations) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = static_cast<T>(vmf::evaluate<kFn>(order, iterations, static_cast<double>(in[i])));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_w_derivative_kernel(const T* __restrict__ w, const T* __restrict__ kappa, T* __restrict__ out, int64_t n,
                               const vmf::Order order, const vmf::GaussLegendre rule) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = static_cast<T>(
        vmf::sample_w_derivative(order, rule, static_cast<double>(w[i]), static_cast<double>(kappa[i])));
}

int grid_blocks(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
}

template <typename T>
cudaError_t launch_typed(int fn, const T* in, T* out, int64_t n, const vmf::Order& order, int iterations,
                         cudaStream_t stream) {
  const int blocks = grid_blocks(n);
  switch (static_cast<vmf::Fn>(fn)) {
#define FASTLOSS_VMF_CASE(F)                                                                   \
  case vmf::Fn::F:                                                                             \
    vmf_kernel<vmf::Fn::F, T><<<blocks, kThreads, 0, stream>>>(in, out, n, order, iterations); \
    break;
    FASTLOSS_VMF_CASE(MeanResultant)
    FASTLOSS_VMF_CASE(MeanResultantSlope)
    FASTLOSS_VMF_CASE(MeanResultantCurvature)
    FASTLOSS_VMF_CASE(Complement)
    FASTLOSS_VMF_CASE(Entropy)
    FASTLOSS_VMF_CASE(KappaMle)
    FASTLOSS_VMF_CASE(LogNormalizer)
#undef FASTLOSS_VMF_CASE
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_vmf(int fn, bool is_double, const void* in, void* out, int64_t n, double p, int iterations,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const vmf::Order order = vmf::make_order(p);  // ~500 bytes: a kernel argument, read from the constant bank
  if (is_double)
    return launch_typed(fn, static_cast<const double*>(in), static_cast<double*>(out), n, order, iterations, stream);
  return launch_typed(fn, static_cast<const float*>(in), static_cast<float*>(out), n, order, iterations, stream);
}

cudaError_t launch_vmf_sample_w_derivative(bool is_double, const void* w, const void* kappa, void* out, int64_t n,
                                           double p, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const vmf::Order order = vmf::make_order(p);
  static const vmf::GaussLegendre rule = vmf::make_gauss_legendre();  // 256 bytes more of kernel arguments
  if (is_double) {
    sample_w_derivative_kernel<double><<<grid_blocks(n), kThreads, 0, stream>>>(
        static_cast<const double*>(w), static_cast<const double*>(kappa), static_cast<double*>(out), n, order, rule);
  } else {
    sample_w_derivative_kernel<float><<<grid_blocks(n), kThreads, 0, stream>>>(
        static_cast<const float*>(w), static_cast<const float*>(kappa), static_cast<float*>(out), n, order, rule);
  }
  return cudaGetLastError();
}

}  // namespace fastloss::kernels
