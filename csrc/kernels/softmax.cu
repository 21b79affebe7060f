// Dtype dispatch for the two-pass softmax / log-softmax launchers (kernels/softmax.cuh). The
// kernels and typed launchers are in kernels/softmax_impl.cuh, instantiated per input dtype
// in softmax_<dtype>.cu.
#include "kernels/softmax.cuh"

#include "kernels/softmax_impl.cuh"

namespace fastloss::kernels {
namespace {

size_t acc_bytes(DType t) { return t == DType::F64 ? sizeof(double) : sizeof(float); }

bool bad_shape(int64_t outer, int64_t size, int64_t inner) { return outer < 0 || size < 0 || inner < 0; }

}  // namespace

size_t softmax_forward_workspace_bytes(int64_t outer, int64_t size, int64_t inner, DType in, DType out) {
  (void)out;
  if (bad_shape(outer, size, inner) || outer == 0 || size == 0 || inner == 0) return 0;
  DeviceInfo dev;
  if (device_info(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const SplitPlan sp = plan_split(outer, size, inner, dev.sms);
  return static_cast<size_t>(outer * sp.chunks) * 4 * acc_bytes(in);
}

size_t softmax_backward_workspace_bytes(int64_t outer, int64_t size, int64_t inner, DType out_dtype,
                                        DType in_dtype) {
  (void)in_dtype;
  if (bad_shape(outer, size, inner) || outer == 0 || size == 0 || inner == 0) return 0;
  DeviceInfo dev;
  if (device_info(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const SplitPlan sp = plan_split(outer, size, inner, dev.sms);
  return static_cast<size_t>(outer * sp.chunks) * acc_bytes(out_dtype);
}

cudaError_t launch_softmax_forward(const void* x, DType in, void* y, DType out, int64_t outer, int64_t size,
                                   int64_t inner, bool log, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream) {
  if (bad_shape(outer, size, inner)) return cudaErrorInvalidValue;
  if (outer == 0 || size == 0 || inner == 0) return cudaSuccess;
  DeviceInfo dev;
  const cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  using namespace softmax_detail;
  auto run = [&](auto typed) { return typed(x, y, outer, size, inner, log, workspace, workspace_bytes, stream, dev); };
  if (in == DType::F32 && out == DType::F32) return run(forward<float, float>);
  if (in == DType::F64 && out == DType::F64) return run(forward<double, double>);
  if (in == DType::F16 && out == DType::F16) return run(forward<__half, __half>);
  if (in == DType::BF16 && out == DType::BF16) return run(forward<__nv_bfloat16, __nv_bfloat16>);
  if (in == DType::F16 && out == DType::F32) return run(forward<__half, float>);
  if (in == DType::BF16 && out == DType::F32) return run(forward<__nv_bfloat16, float>);
  return cudaErrorInvalidValue;
}

cudaError_t launch_softmax_backward(const void* grad_out, const void* out, DType out_dtype, void* grad_in,
                                    DType in_dtype, int64_t outer, int64_t size, int64_t inner, bool log,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (bad_shape(outer, size, inner)) return cudaErrorInvalidValue;
  if (outer == 0 || size == 0 || inner == 0) return cudaSuccess;
  DeviceInfo dev;
  const cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  using namespace softmax_detail;
  auto run = [&](auto typed) {
    return typed(grad_out, out, grad_in, outer, size, inner, log, workspace, workspace_bytes, stream, dev);
  };
  // (output dtype, grad_input dtype)
  if (out_dtype == DType::F32 && in_dtype == DType::F32) return run(backward<float, float>);
  if (out_dtype == DType::F64 && in_dtype == DType::F64) return run(backward<double, double>);
  if (out_dtype == DType::F16 && in_dtype == DType::F16) return run(backward<__half, __half>);
  if (out_dtype == DType::BF16 && in_dtype == DType::BF16) return run(backward<__nv_bfloat16, __nv_bfloat16>);
  if (out_dtype == DType::F32 && in_dtype == DType::F16) return run(backward<float, __half>);
  if (out_dtype == DType::F32 && in_dtype == DType::BF16) return run(backward<float, __nv_bfloat16>);
  return cudaErrorInvalidValue;
}

}  // namespace fastloss::kernels
