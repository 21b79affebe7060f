// log I_v(x), log K_v(x) and their first and second derivatives in v and x on CUDA: one thread per element over
// the shared math in common/log_bessel.h (Plesner, Sorensen & Hauberg, ICS 2024; power
// series, Hankel and Debye expansions, Temme / Steed CF2 with the forward recurrence for K).
//
// Memory traffic: v and x read once, one to three outputs written once; the work is compute
// bound and evaluated in double for float32 and float64 alike (accuracy over the whole domain
// needs it; the element count, not bandwidth, sets the time). Grid-stride loop, 64-bit
// indexing. Threads of a warp may take different methods (regions); the branches are short
// compared with the series inside them.
#include "common/log_bessel.h"
#include "kernels/log_bessel.cuh"

namespace fastloss::kernels {
namespace {

namespace lb = fastloss::log_bessel;

constexpr int kThreads = 128;
constexpr int kMaxBlocks = 65535;

template <int kFn, typename T>
__global__ void __launch_bounds__(kThreads)
    log_bessel_kernel(const T* __restrict__ v, const T* __restrict__ x, T* __restrict__ out0,
                      T* __restrict__ out1, T* __restrict__ out2, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const double vi = static_cast<double>(v[i]);
    const double xi = static_cast<double>(x[i]);
    if constexpr (kFn == 0) {
      out0[i] = static_cast<T>(lb::log_iv(vi, xi));
    } else if constexpr (kFn == 1) {
      out0[i] = static_cast<T>(lb::log_kv(vi, xi));
    } else if constexpr (kFn == 2 || kFn == 3) {
      const lb::LogBesselGrad g = kFn == 2 ? lb::log_iv_grad(vi, xi) : lb::log_kv_grad(vi, xi);
      out0[i] = static_cast<T>(g.d_dv);
      out1[i] = static_cast<T>(g.d_dx);
    } else {
      const lb::LogBesselHess h = kFn == 4 ? lb::log_iv_hess(vi, xi) : lb::log_kv_hess(vi, xi);
      out0[i] = static_cast<T>(h.d_vv);
      out1[i] = static_cast<T>(h.d_vx);
      out2[i] = static_cast<T>(h.d_xx);
    }
  }
}

template <typename T>
cudaError_t launch_typed(int fn, const T* v, const T* x, T* out0, T* out1, T* out2, int64_t n,
                         cudaStream_t stream) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
  switch (fn) {
    case 0: log_bessel_kernel<0, T><<<blocks, kThreads, 0, stream>>>(v, x, out0, out1, out2, n); break;
    case 1: log_bessel_kernel<1, T><<<blocks, kThreads, 0, stream>>>(v, x, out0, out1, out2, n); break;
    case 2: log_bessel_kernel<2, T><<<blocks, kThreads, 0, stream>>>(v, x, out0, out1, out2, n); break;
    case 3: log_bessel_kernel<3, T><<<blocks, kThreads, 0, stream>>>(v, x, out0, out1, out2, n); break;
    case 4: log_bessel_kernel<4, T><<<blocks, kThreads, 0, stream>>>(v, x, out0, out1, out2, n); break;
    case 5: log_bessel_kernel<5, T><<<blocks, kThreads, 0, stream>>>(v, x, out0, out1, out2, n); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_log_bessel(int fn, bool is_double, const void* v, const void* x, void* out0,
                              void* out1, void* out2, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (out0 == nullptr || (fn >= 2 && out1 == nullptr) || (fn >= 4 && out2 == nullptr))
    return cudaErrorInvalidValue;
  if (is_double)
    return launch_typed(fn, static_cast<const double*>(v), static_cast<const double*>(x),
                        static_cast<double*>(out0), static_cast<double*>(out1), static_cast<double*>(out2),
                        n, stream);
  return launch_typed(fn, static_cast<const float*>(v), static_cast<const float*>(x),
                      static_cast<float*>(out0), static_cast<float*>(out1), static_cast<float*>(out2), n,
                      stream);
}

}  // namespace fastloss::kernels
