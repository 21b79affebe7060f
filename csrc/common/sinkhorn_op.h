// Argument checks and shapes of the Sinkhorn ops, shared by the CPU and CUDA torch glue, so
// both devices accept the same inputs and fail with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/torch_checks.h"

namespace fastloss {

struct SinkhornShape {
  int64_t batch, n, m;
  c10::ScalarType acc_dtype;  // float32 for float32/float16/bfloat16 costs, float64 for float64
  int error_norm;             // MarginalErrorNorm::p: 1, 2, or 0 for infinity
};

inline c10::ScalarType sinkhorn_acc_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// cost (B, n, m); a (B, n); b (B, m); eps > 0; max_iter >= 0; tol >= 0; error_norm 1, 2 or inf.
inline SinkhornShape sinkhorn_args(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b,
                                   double eps, int64_t max_iter, double tol, double error_norm) {
  constexpr const char* op = "sinkhorn";
  check_floating(op, "cost", cost);
  check_floating(op, "a", a);
  check_floating(op, "b", b);
  TORCH_CHECK(cost.dim() == 3, "fastloss.sinkhorn: expected 'cost' to have shape (B, n, m), got ", cost.sizes());
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == n,
              "fastloss.sinkhorn: expected 'a' to have shape (", B, ", ", n, ") to match 'cost' ", cost.sizes(),
              ", got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == B && b.size(1) == m,
              "fastloss.sinkhorn: expected 'b' to have shape (", B, ", ", m, ") to match 'cost' ", cost.sizes(),
              ", got ", b.sizes());
  TORCH_CHECK(a.device() == cost.device() && b.device() == cost.device(),
              "fastloss.sinkhorn: expected 'cost', 'a' and 'b' on the same device, got ", cost.device(), ", ",
              a.device(), " and ", b.device());
  TORCH_CHECK(B == 0 || (n > 0 && m > 0), "fastloss.sinkhorn: expected 'cost' to have n, m >= 1 (an empty side ",
              "has no mass to transport), got ", cost.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastloss.sinkhorn: expected 'eps' > 0, got ", eps);
  TORCH_CHECK(max_iter >= 0, "fastloss.sinkhorn: expected 'max_iter' >= 0, got ", max_iter);
  TORCH_CHECK(tol >= 0, "fastloss.sinkhorn: expected 'tol' >= 0, got ", tol);
  const bool norm_inf = std::isinf(error_norm) && error_norm > 0;
  TORCH_CHECK(error_norm == 1 || error_norm == 2 || norm_inf,
              "fastloss.sinkhorn: expected 'error_norm' to be 1, 2 or inf, got ", error_norm);
  const int norm = norm_inf ? 0 : static_cast<int>(error_norm);
  return {B, n, m, sinkhorn_acc_dtype(cost.scalar_type()), norm};
}

// Relative tolerance on |sum a - sum b| for marginals of this dtype: sqrt of its epsilon, and at
// least kSinkhornMassFloor, so that float64 marginals rounded through float32 on their way (a
// uniform 1/3 held in float32 is 3e-8 off) still pass.
constexpr double kSinkhornMassFloor = 1e-6;

inline double sinkhorn_mass_tolerance(c10::ScalarType a_dtype, c10::ScalarType b_dtype) {
  auto eps_of = [](c10::ScalarType t) {
    switch (t) {
      case c10::kDouble: return 2.220446049250313e-16;
      case c10::kFloat: return 1.1920928955078125e-07;
      case c10::kHalf: return 9.765625e-04;
      default: return 7.8125e-03;  // bfloat16
    }
  };
  return std::max(std::sqrt(std::max(eps_of(a_dtype), eps_of(b_dtype))), kSinkhornMassFloor);
}

struct SinkhornKdShape {
  int64_t batch, classes;
  c10::ScalarType acc_dtype;
};

inline SinkhornKdShape sinkhorn_kd_args(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                        double eps, int64_t n_iter, double scale) {
  constexpr const char* op = "sinkhorn_kd_loss";
  check_floating(op, "student_logits", student);
  check_floating(op, "teacher_logits", teacher);
  TORCH_CHECK(student.dim() == 2, "fastloss.sinkhorn_kd_loss: expected 'student_logits' to have shape (B, classes), got ",
              student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "fastloss.sinkhorn_kd_loss: expected 'teacher_logits' to have the shape of ",
              "'student_logits' ", student.sizes(), ", got ", teacher.sizes());
  check_same_device("sinkhorn_kd_loss", "teacher_logits", teacher, "student_logits", student);
  TORCH_CHECK(student.size(1) > 0 || student.size(0) == 0,
              "fastloss.sinkhorn_kd_loss: expected at least one class, got 'student_logits' of shape ", student.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "fastloss.sinkhorn_kd_loss: expected 'temperature' > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastloss.sinkhorn_kd_loss: expected 'eps' > 0, got ", eps);
  TORCH_CHECK(n_iter >= 0, "fastloss.sinkhorn_kd_loss: expected 'n_iter' >= 0, got ", n_iter);
  // The backward's scalings are (n_iter + 1) x B float64 values: their byte count must be an int64.
  const int64_t max_n_iter = std::numeric_limits<int64_t>::max() / 8 / std::max<int64_t>(student.size(0), 1) - 1;
  TORCH_CHECK(n_iter <= max_n_iter, "fastloss.sinkhorn_kd_loss: expected 'n_iter' <= ", max_n_iter,
              " (the saved scalings are (n_iter + 1) x B float64 values), got ", n_iter);
  TORCH_CHECK(std::isfinite(scale), "fastloss.sinkhorn_kd_loss: expected 'scale' to be finite, got ", scale);
  const bool dbl = student.scalar_type() == c10::kDouble || teacher.scalar_type() == c10::kDouble;
  return {student.size(0), student.size(1), dbl ? c10::kDouble : c10::kFloat};
}

// The loss has the logits' (promoted) dtype, like the eager formulation.
inline c10::ScalarType sinkhorn_kd_loss_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  return c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
}

struct SinkhornKdBackwardShape {
  int64_t batch, classes, n_iter;
};

// The saved tensors of sinkhorn_kd: p_student, p_teacher (B, C), cost (B, B) of the
// accumulation dtype; the scalings x, y (n_iter + 1, B) in float64; grad_loss a scalar.
inline SinkhornKdBackwardShape sinkhorn_kd_backward_args(const at::Tensor& grad_loss, const at::Tensor& ps,
                                                         const at::Tensor& pt, const at::Tensor& W,
                                                         const at::Tensor& xs, const at::Tensor& ys,
                                                         double temperature, double eps, double scale,
                                                         c10::ScalarType student_dtype, c10::ScalarType teacher_dtype) {
  constexpr const char* op = "sinkhorn_kd_backward";
  check_floating(op, "grad_loss", grad_loss);
  TORCH_CHECK(grad_loss.numel() == 1, "fastloss.sinkhorn_kd_backward: expected 'grad_loss' to be a scalar, got shape ",
              grad_loss.sizes());
  const c10::ScalarType acc = ps.scalar_type();
  TORCH_CHECK(acc == c10::kFloat || acc == c10::kDouble,
              "fastloss.sinkhorn_kd_backward: expected 'p_student' to be float32 or float64, got ", acc);
  TORCH_CHECK(ps.dim() == 2, "fastloss.sinkhorn_kd_backward: expected 'p_student' of shape (B, C), got ", ps.sizes());
  const int64_t B = ps.size(0), C = ps.size(1);
  TORCH_CHECK(xs.dim() == 2 && xs.size(0) >= 1 && xs.size(1) == B,
              "fastloss.sinkhorn_kd_backward: expected 'x' of shape (n_iter + 1, ", B, "), got ", xs.sizes());
  const int64_t n_iter = xs.size(0) - 1;
  const std::pair<const char*, const at::Tensor*> saved[] = {
      {"p_teacher", &pt}, {"cost", &W}, {"x", &xs}, {"y", &ys}};
  const std::vector<int64_t> shapes[] = {{B, C}, {B, B}, {n_iter + 1, B}, {n_iter + 1, B}};
  for (int q = 0; q < 4; ++q) {
    const at::Tensor& t = *saved[q].second;
    const c10::ScalarType dtype = q < 2 ? acc : c10::kDouble;
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(shapes[q]), "fastloss.sinkhorn_kd_backward: expected '", saved[q].first,
                "' of shape ", c10::IntArrayRef(shapes[q]), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "fastloss.sinkhorn_kd_backward: expected '", saved[q].first, "' of dtype ",
                dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == ps.device(), "fastloss.sinkhorn_kd_backward: expected every tensor on the same device, got '",
                saved[q].first, "' on ", t.device(), " and 'p_student' on ", ps.device());
  }
  TORCH_CHECK(grad_loss.device() == ps.device(), "fastloss.sinkhorn_kd_backward: expected 'grad_loss' on ", ps.device(),
              ", got ", grad_loss.device());
  TORCH_CHECK(is_supported_float(student_dtype) && is_supported_float(teacher_dtype),
              "fastloss.sinkhorn_kd_backward: expected floating 'student_dtype' and 'teacher_dtype', got ",
              student_dtype, " and ", teacher_dtype);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "fastloss.sinkhorn_kd_backward: expected 'temperature' > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastloss.sinkhorn_kd_backward: expected 'eps' > 0, got ", eps);
  TORCH_CHECK(std::isfinite(scale), "fastloss.sinkhorn_kd_backward: expected 'scale' to be finite, got ", scale);
  return {B, C, n_iter};
}

}  // namespace fastloss
