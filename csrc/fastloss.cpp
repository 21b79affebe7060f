// Every fastloss op schema, and the thin `fastloss._C` Python module. Importing `_C`
// registers the ops (static initializers below and in cpu/ and cuda/); the module itself
// only reports how the library was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/isa.h"

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
  // log I_v(x), elementwise with v broadcast against x (v >= 0); any float dtype.
  m.def("log_bessel_iv(Tensor v, Tensor x) -> Tensor", tags);
  // log K_v(x), elementwise with v broadcast against x (any real v).
  m.def("log_bessel_kv(Tensor v, Tensor x) -> Tensor", tags);
  // (d/dv, d/dx) of log I_v(x), in the broadcast shape.
  m.def("log_bessel_iv_grad(Tensor v, Tensor x) -> (Tensor, Tensor)", tags);
  // (d/dv, d/dx) of log K_v(x), in the broadcast shape.
  m.def("log_bessel_kv_grad(Tensor v, Tensor x) -> (Tensor, Tensor)", tags);
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastloss native module: importing it registers torch.ops.fastloss.*";
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
    info["num_threads"] = at::get_num_threads();
    info["parallel_backend"] = at::get_parallel_info();
    return info;
  }, "How this build of fastloss was configured.");
}
