// Every fastloss op schema, and the thin `fastloss._C` Python module. Importing `_C`
// registers the ops (static initializers below and in cpu/ and cuda/); the module reports
// how the library was built and has direct entry points for the ops called most often on
// small tensors.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "cpu/gemm_bf16.h"
#include "cpu/isa.h"
#include "cpu/log_bessel_packs.h"

TORCH_LIBRARY(fastloss, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // Two-pass softmax over `dim` (Dukhan & Ablavatski); half_to_float: fp16/bf16 in, fp32 out.
  m.def("softmax(Tensor self, int dim, bool half_to_float=False) -> Tensor", tags);
  // Two-pass log-softmax over `dim`; same arguments as softmax.
  m.def("log_softmax(Tensor self, int dim, bool half_to_float=False) -> Tensor", tags);
  // d softmax: grad_output * output - output * sum(grad_output * output), in input_dtype.
  m.def(
      "softmax_backward(Tensor grad_output, Tensor output, int dim, ScalarType input_dtype) "
      "-> Tensor",
      tags);
  // d log_softmax: grad_output - exp(output) * sum(grad_output), in input_dtype.
  m.def(
      "log_softmax_backward(Tensor grad_output, Tensor output, int dim, ScalarType input_dtype) "
      "-> Tensor",
      tags);
  // Statistical top-k over `dim` (Spark Transformer): theta = mean + std * PhiInv(sparsity)
  // per row (biased std); y = relu(x - theta), or x * [x > theta] if hard. Returns
  // (y, theta, mean, std), the statistics in float32 (float64 for float64 x), size 1 at dim.
  // threshold_grad only matters to autograd (False: no gradient through theta). k > 0 keeps
  // k entries per row instead: sparsity = 1 - k / row length, taken when the op runs (so a
  // graph traced with a symbolic row length needs no guard on it); `sparsity` is then unused.
  m.def(
      "stat_topk(Tensor x, int dim, float sparsity, bool hard=False, bool threshold_grad=True, SymInt k=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  // d stat_topk / d x from grad_y and (optionally) the gradient of theta; the forward's theta
  // gives the mask, so both agree bit for bit. threshold_grad=False drops the path from y
  // through theta.
  m.def(
      "stat_topk_backward(Tensor grad_y, Tensor? grad_theta, Tensor x, Tensor theta, Tensor mean, "
      "Tensor std, int dim, float sparsity, bool hard, bool threshold_grad, SymInt k=0) -> Tensor",
      tags);
  // Gemma 3n sparse MLP activation over the last dim: gelu_tanh(relu(gate - theta)) * up,
  // theta from gate's row statistics. Returns (out, theta, mean, std) like stat_topk.
  m.def(
      "stat_topk_gelu_mul(Tensor gate, Tensor up, float sparsity, bool threshold_grad=True, SymInt k=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  // (d gate, d up) of stat_topk_gelu_mul.
  m.def(
      "stat_topk_gelu_mul_backward(Tensor grad_out, Tensor gate, Tensor up, Tensor theta, "
      "Tensor mean, Tensor std, float sparsity, bool threshold_grad, SymInt k=0) -> (Tensor, Tensor)",
      tags);
  // Batched log-domain Sinkhorn: cost (B, n, m), marginals a (B, n), b (B, m); per problem the
  // plan, alpha = f - eps log a, beta = g - eps log b, the value <a, alpha> + <b, beta>, the
  // iterations used and the final row-marginal error in the norm the stopping rule measures
  // (error_norm: 1, 2 or inf). Float32 results for fp16/bf16 costs.
  m.def(
      "sinkhorn(Tensor cost, Tensor a, Tensor b, float eps, int max_iter, float tol, float error_norm=1.0) -> "
      "(Tensor plan, Tensor alpha, Tensor beta, Tensor value, Tensor n_iter, Tensor marginal_error)",
      tags);
  // SinKD loss (Cui et al. 2024): the loss and what its fused backward needs (softmaxes,
  // B x B L1 cost, scaling vectors x, y of shape (n_iter + 1, B)).
  m.def(
      "sinkhorn_kd(Tensor student_logits, Tensor teacher_logits, float temperature, float eps, int n_iter, "
      "float scale) -> (Tensor loss, Tensor p_student, Tensor p_teacher, Tensor cost, Tensor x, Tensor y)",
      tags);
  // The exact gradient of sinkhorn_kd's loss through its n_iter normalizations (reverse sweep).
  m.def(
      "sinkhorn_kd_backward(Tensor grad_loss, Tensor p_student, Tensor p_teacher, Tensor cost, Tensor x, "
      "Tensor y, float temperature, float eps, float scale, bool student_grad, bool teacher_grad, "
      "ScalarType student_dtype, ScalarType teacher_dtype) -> (Tensor, Tensor)",
      tags);
  // log I_v(x), elementwise with v broadcast against x (v >= 0); any float dtype.
  m.def("log_bessel_iv(Tensor v, Tensor x) -> Tensor", tags);
  // log K_v(x), elementwise with v broadcast against x (any real v).
  m.def("log_bessel_kv(Tensor v, Tensor x) -> Tensor", tags);
  // (d/dv, d/dx) of log I_v(x), in the broadcast shape.
  m.def("log_bessel_iv_grad(Tensor v, Tensor x) -> (Tensor, Tensor)", tags);
  // (d/dv, d/dx) of log K_v(x), in the broadcast shape.
  m.def("log_bessel_kv_grad(Tensor v, Tensor x) -> (Tensor, Tensor)", tags);
  // (d^2/dv^2, d^2/dv dx, d^2/dx^2) of log I_v(x) and of log K_v(x), in the broadcast shape.
  m.def("log_bessel_iv_hess(Tensor v, Tensor x) -> (Tensor, Tensor, Tensor)", tags);
  m.def("log_bessel_kv_hess(Tensor v, Tensor x) -> (Tensor, Tensor, Tensor)", tags);
  // von Mises-Fisher helpers on S^(p-1), elementwise over a concentration tensor kappa (any
  // float dtype, computed in double): the `derivative`-th derivative (0, 1 or 2) of the mean
  // resultant length A_p(kappa) = I_(p/2)(kappa) / I_(p/2-1)(kappa).
  m.def("vmf_mean_resultant(Tensor kappa, int p, int derivative=0) -> Tensor", tags);
  // 1 - A_p(kappa) to full relative precision.
  m.def("vmf_mean_resultant_complement(Tensor kappa, int p) -> Tensor", tags);
  // The differential entropy -log C_p(kappa) - kappa A_p(kappa).
  m.def("vmf_entropy(Tensor kappa, int p) -> Tensor", tags);
  // log C_p(kappa), the log normalizing constant of the density.
  m.def("vmf_log_normalizer(Tensor kappa, int p) -> Tensor", tags);
  // The maximum-likelihood concentration: the root of A_p(kappa) = rbar (at most `iterations`
  // Newton steps; NaN outside 0 <= rbar < 1).
  m.def("vmf_kappa_mle(Tensor rbar, int p, int iterations) -> Tensor", tags);
  // d w / d kappa of a sample's w = mu . x at its fixed CDF value (the reparameterization
  // gradient of rsample), elementwise over w and kappa of one shape and dtype (computed in
  // double); 0 at w = +-1, NaN for w outside [-1, 1], kappa < 0, kappa = inf or NaN.
  m.def("vmf_sample_w_derivative(Tensor w, Tensor kappa, int p) -> Tensor", tags);
  // Cut cross-entropy (Wijmans et al.): per-token loss and LSE of softcap(hidden @ classifier.T
  // + bias) against targets, without materializing the logits. hidden (N, D), classifier (V, D),
  // targets (N) int64/int32; softcap 0 = none. Returns float32 (float64 for float64) (loss, lse),
  // both 0 at ignored tokens. filter_eps and deterministic only matter to autograd (0: no
  // gradient filtering; deterministic: bitwise-reproducible gradients).
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor classifier, Tensor targets, Tensor? bias, int ignore_index, "
      "float softcap, float label_smoothing, float z_loss, float filter_eps, bool deterministic=False) "
      "-> (Tensor, Tensor)",
      tags);
  // One vocabulary shard's part of linear_cross_entropy: classifier holds rows [vocab_start,
  // vocab_start + V) of a vocabulary of vocab_total. Returns (lse over the shard, linear), linear =
  // -(1 - label_smoothing) z_target [target in shard] - label_smoothing / vocab_total sum_shard z.
  m.def(
      "linear_cross_entropy_shard(Tensor hidden, Tensor classifier, Tensor targets, Tensor? bias, "
      "int ignore_index, float softcap, float label_smoothing, int vocab_start, int vocab_total) "
      "-> (Tensor, Tensor)",
      tags);
  // (d hidden, d classifier, d bias) of linear_cross_entropy from the output gradients and the
  // (whole-vocabulary) lse; output_mask picks the gradients to compute (the others, and d bias
  // without a bias, are empty). For a shard (vocab_total > V), d hidden is this shard's part (the
  // caller sums it over shards). vocab_total = -1: V. deterministic: bitwise-reproducible
  // gradients (the CPU always is; CUDA then avoids its atomic accumulation).
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor hidden, Tensor classifier, "
      "Tensor targets, Tensor? bias, Tensor lse, int ignore_index, float softcap, float label_smoothing, "
      "float z_loss, float filter_eps, bool[3] output_mask, int vocab_start=0, int vocab_total=-1, "
      "bool deterministic=False) -> (Tensor, Tensor, Tensor)",
      tags);
}

namespace py = pybind11;

namespace {

// `_C.<name>(...)`: torch.ops.fastloss.<name> called from C++, without torch.ops's Python
// layer (~2 us per call; python/fastloss/ops/_direct.py says when the wrappers use it). Still
// one dispatcher call: autograd, autocast, dispatch modes and device kernels apply. Errors
// keep the Python types torch.ops gives them (c10::IndexError -> IndexError, ...), TORCH_WARN
// becomes a Python warning, and the GIL is released while the op runs. The schemas are
// registered when the module initializes (static initializers of this library).
template <typename... Args>
void def_direct(pybind11::module_& m, const char* name) {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow((std::string("fastloss::") + name).c_str(), "")
                      .typed<at::Tensor(Args...)>();
  m.def(
      name,
      [op](Args... args) -> at::Tensor {
        HANDLE_TH_ERRORS
        pybind11::gil_scoped_release no_gil;
        return op.call(args...);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "torch.ops.fastloss op without torch.ops's Python layer");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastloss native module: importing it registers torch.ops.fastloss.*";
#if defined(FASTLOSS_CPU_ARCH)
  if (!fastloss::cpu::cpu_runs_build()) {
    throw py::import_error("fastloss's CPU kernels were built for " FASTLOSS_CPU_ARCH
                           " only (FASTLOSS_CPU_ARCH), which this CPU does not support: rebuild without it");
  }
#endif
  m.def("build_info", []() {
    py::dict info;
    info["version"] = FASTLOSS_VERSION;
#ifdef FASTLOSS_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = FASTLOSS_CUDA_ARCHS;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
    info["cpu_isa"] = fastloss::cpu::selected_isa();
    info["log_bessel_cpu"] = fastloss::cpu::log_bessel_cpu_path();
    info["linear_cross_entropy_cpu_bf16"] = fastloss::cpu::bf16_gemm_path();
    info["num_threads"] = at::get_num_threads();
    info["parallel_backend"] = at::get_parallel_info();
    return info;
  }, "How this build of fastloss was configured.");

  def_direct<const at::Tensor&, int64_t, bool>(m, "softmax");
  def_direct<const at::Tensor&, int64_t, bool>(m, "log_softmax");
  def_direct<const at::Tensor&, const at::Tensor&>(m, "log_bessel_iv");
  def_direct<const at::Tensor&, const at::Tensor&>(m, "log_bessel_kv");
}
