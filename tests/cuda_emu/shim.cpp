// C entry points over the torch-free launchers (csrc/kernels/*.cuh) for ctypes: enums and
// bools as ints, structs as their fields, the null stream.
#include "kernels/linear_cross_entropy.cuh"
#include "kernels/log_bessel.cuh"
#include "kernels/sinkhorn.cuh"
#include "kernels/softmax.cuh"
#include "kernels/stat_topk.cuh"
#include "kernels/vmf.cuh"

using namespace fastloss::kernels;

namespace {
DType dt(int v) { return static_cast<DType>(v); }
}  // namespace

extern "C" {

size_t emu_softmax_forward_workspace_bytes(int64_t outer, int64_t size, int64_t inner, int in, int out) {
  return softmax_forward_workspace_bytes(outer, size, inner, dt(in), dt(out));
}
int emu_softmax_forward(const void* x, int in, void* y, int out, int64_t outer, int64_t size, int64_t inner,
                        int log, void* ws, size_t ws_bytes) {
  return launch_softmax_forward(x, dt(in), y, dt(out), outer, size, inner, log != 0, ws, ws_bytes, nullptr);
}
size_t emu_softmax_backward_workspace_bytes(int64_t outer, int64_t size, int64_t inner, int out, int in) {
  return softmax_backward_workspace_bytes(outer, size, inner, dt(out), dt(in));
}
int emu_softmax_backward(const void* g, const void* y, int out, void* dx, int in, int64_t outer, int64_t size,
                         int64_t inner, int log, void* ws, size_t ws_bytes) {
  return launch_softmax_backward(g, y, dt(out), dx, dt(in), outer, size, inner, log != 0, ws, ws_bytes, nullptr);
}

size_t emu_stat_topk_workspace_bytes(int64_t outer, int64_t size, int64_t inner, int dtype) {
  return stat_topk_workspace_bytes(outer, size, inner, dt(dtype));
}
int emu_stat_topk_forward(const void* x, void* y, void* theta, void* mean, void* sd, int dtype, int64_t outer,
                          int64_t size, int64_t inner, double z, int hard, void* ws, size_t ws_bytes) {
  return launch_stat_topk_forward(x, y, theta, mean, sd, dt(dtype), outer, size, inner, z, hard != 0, ws, ws_bytes,
                                  nullptr);
}
int emu_stat_topk_backward(const void* grad_y, const void* x, const void* theta, const void* mean, const void* sd,
                           const void* grad_theta, void* dx, int dtype, int64_t outer, int64_t size, int64_t inner,
                           double z, int hard, int threshold_grad, void* ws, size_t ws_bytes) {
  return launch_stat_topk_backward(grad_y, x, theta, mean, sd, grad_theta, dx, dt(dtype), outer, size, inner, z,
                                   hard != 0, threshold_grad != 0, ws, ws_bytes, nullptr);
}
int emu_gelu_mul_forward(const void* gate, const void* up, void* out, void* theta, void* mean, void* sd, int dtype,
                         int64_t rows, int64_t size, double z, void* ws, size_t ws_bytes) {
  return launch_gelu_mul_forward(gate, up, out, theta, mean, sd, dt(dtype), rows, size, z, ws, ws_bytes, nullptr);
}
int emu_gelu_mul_backward(const void* grad_out, const void* gate, const void* up, const void* theta,
                          const void* mean, const void* sd, void* dgate, void* dup, int dtype, int64_t rows,
                          int64_t size, double z, int threshold_grad, void* ws, size_t ws_bytes) {
  return launch_gelu_mul_backward(grad_out, gate, up, theta, mean, sd, dgate, dup, dt(dtype), rows, size, z,
                                  threshold_grad != 0, ws, ws_bytes, nullptr);
}

int emu_log_bessel(int fn, int is_double, const void* v, const void* x, void* out0, void* out1, void* out2,
                   int64_t n) {
  return launch_log_bessel(fn, is_double != 0, v, x, out0, out1, out2, n, nullptr);
}
int emu_vmf(int fn, int is_double, const void* in, void* out, int64_t n, double p, int iterations) {
  return launch_vmf(fn, is_double != 0, in, out, n, p, iterations, nullptr);
}
int emu_vmf_sample_w_derivative(int is_double, const void* w, const void* kappa, void* out, int64_t n, double p) {
  return launch_vmf_sample_w_derivative(is_double != 0, w, kappa, out, n, p, nullptr);
}

size_t emu_sinkhorn_workspace_bytes(int64_t batch, int64_t n, int64_t m, size_t elem) {
  return sinkhorn_workspace_bytes(batch, n, m, elem);
}
// Pointers in SinkhornArgs order: cost, a, b, log_a, log_b, plan, alpha, beta, value, n_iter, error.
int emu_sinkhorn(int is_double, void** ptrs, int64_t batch, int64_t n, int64_t m, double inv_eps, int64_t max_iter,
                 double tol, double mass_tol, int error_norm, void* ws, size_t ws_bytes) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    SinkhornArgs<T> p{};
    p.cost = static_cast<const T*>(ptrs[0]);
    p.a = static_cast<const T*>(ptrs[1]);
    p.b = static_cast<const T*>(ptrs[2]);
    p.log_a = static_cast<const T*>(ptrs[3]);
    p.log_b = static_cast<const T*>(ptrs[4]);
    p.batch = batch;
    p.n = n;
    p.m = m;
    p.inv_eps = static_cast<T>(inv_eps);
    p.max_iter = max_iter;
    p.tol = static_cast<T>(tol);
    p.mass_tol = mass_tol;
    p.error_norm = error_norm;
    p.plan = static_cast<T*>(ptrs[5]);
    p.alpha = static_cast<T*>(ptrs[6]);
    p.beta = static_cast<T*>(ptrs[7]);
    p.value = static_cast<T*>(ptrs[8]);
    p.n_iter = static_cast<int64_t*>(ptrs[9]);
    p.error = static_cast<T*>(ptrs[10]);
    return launch_sinkhorn(p, ws, ws_bytes, nullptr);
  };
  return is_double ? run(0.0) : run(0.0f);
}

// LinearCrossEntropyInputs from its fields: pointers (hidden, classifier, bias, targets),
// int64s (hidden_stride, classifier_stride, bias_stride, targets_stride, tokens, vocab, dim,
// vocab_start, vocab_total, ignore_index), floats (softcap, label_smoothing, z_loss).
static LinearCrossEntropyInputs lce_inputs(int dtype, const void** p, const int64_t* i, const float* f,
                                           int targets_int64) {
  LinearCrossEntropyInputs a{};
  a.dtype = dt(dtype);
  a.hidden = p[0];
  a.classifier = p[1];
  a.bias = p[2];
  a.targets = p[3];
  a.hidden_stride = i[0];
  a.classifier_stride = i[1];
  a.bias_stride = i[2];
  a.targets_stride = i[3];
  a.tokens = i[4];
  a.vocab = i[5];
  a.dim = i[6];
  a.vocab_start = i[7];
  a.vocab_total = i[8];
  a.ignore_index = i[9];
  a.targets_int64 = targets_int64 != 0;
  a.softcap = f[0];
  a.label_smoothing = f[1];
  a.z_loss = f[2];
  return a;
}

int emu_lce_runnable() { return linear_cross_entropy_kernels_runnable(); }
size_t emu_lce_forward_workspace_bytes(int64_t tokens, int64_t vocab, int64_t dim) {
  return linear_cross_entropy_forward_workspace_bytes(tokens, vocab, dim);
}
int emu_lce_forward(int dtype, const void** p, const int64_t* i, const float* f, int targets_int64, int shard,
                    float* out0, float* out1, void* ws, size_t ws_bytes) {
  LinearCrossEntropyForwardArgs a{};
  a.in = lce_inputs(dtype, p, i, f, targets_int64);
  a.shard = shard != 0;
  a.out0 = out0;
  a.out1 = out1;
  return launch_linear_cross_entropy_forward(a, ws, ws_bytes, nullptr);
}
// g: grad_loss, grad_lse (or null), lse; d: d_hidden, d_classifier, d_bias (each or null).
int emu_lce_backward(int dtype, const void** p, const int64_t* i, const float* f, int targets_int64, float filter_eps,
                     const float** g, float** d) {
  LinearCrossEntropyBackwardArgs a{};
  a.in = lce_inputs(dtype, p, i, f, targets_int64);
  a.filter_eps = filter_eps;
  a.grad_loss = g[0];
  a.grad_lse = g[1];
  a.lse = g[2];
  a.d_hidden = d[0];
  a.d_classifier = d[1];
  a.d_bias = d[2];
  return launch_linear_cross_entropy_backward(a, nullptr);
}

}  // extern "C"
