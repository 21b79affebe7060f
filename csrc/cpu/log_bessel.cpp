// log I_v(x), log K_v(x) and their derivatives in v and x on the CPU, over the shared math in
// common/log_bessel.h (Plesner, Sorensen & Hauberg, ICS 2024; power series, Hankel and Debye
// expansions, Temme / Steed CF2 with the forward recurrence for K).
//
// Values: where AVX-512 or AVX2 runs, blocks of 256 elements go to that instruction set's
// SIMD-pack unit (cpu/log_bessel_packs.cpp: elements grouped by method, packs of 8 or 4
// doubles, vector transcendentals); elsewhere the scalar methods run element by element.
// Derivatives (dual numbers) take the same route: packs of dual numbers, or the scalar ones.
// Second derivatives (second-order dual numbers) run the scalar methods element by element.
//
// Memory traffic: v and x are broadcast to a common shape (a copy only when they differ),
// read once; one output (values) or two (d/dv, d/dx) written once. The work is compute
// bound (tens to hundreds of flops and a few transcendentals per element), evaluated in
// double for every dtype. Parallel over elements (at::parallel_for, torch's thread count);
// the loop is compiled per instruction set (FASTLOSS_CPU_CLONES) for FMA in the polynomials.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "common/log_bessel.h"
#include "common/log_bessel_op.h"
#include "cpu/isa.h"
#include "cpu/log_bessel_packs.h"

namespace fastloss::cpu {
namespace {

namespace lb = fastloss::log_bessel;

// Elements per parallel task: each costs ~0.1-1 us.
constexpr int64_t kGrain = 512;

constexpr int kBlock = kLogBesselBlock;  // elements per block of the CPU loops

// The pack unit of the instruction set that runs here (null: none, the scalar loop runs).
struct PackUnit {
  void (*log_iv)(const double*, const double*, double*, int) = nullptr;
  void (*log_kv)(const double*, const double*, double*, int) = nullptr;
  void (*log_iv_grad)(const double*, const double*, double*, double*, int) = nullptr;
  void (*log_kv_grad)(const double*, const double*, double*, double*, int) = nullptr;
  const char* name = "scalar";
};

// The widest pack unit this CPU runs. FASTLOSS_LOG_BESSEL_LANES selects another: 1 for the
// scalar methods (the code the CUDA kernels compile), 4 for packs of 4, 8 for packs of 8 (on
// an AVX2 CPU, the AVX-512 unit's lanes compiled for AVX2), 8-avx2 for that AVX2 build on any
// AVX2 CPU, so that the tests reach each of them on any x86-64 machine.
PackUnit select_pack_unit() {
  PackUnit unit;
#if defined(FASTLOSS_LOG_BESSEL_PACKS)
  const char* lanes_env = std::getenv("FASTLOSS_LOG_BESSEL_LANES");
  const std::string choice = lanes_env != nullptr ? lanes_env : "";
  if (choice == "1") return unit;
  const bool eight_on_avx2 = choice == "8-avx2";
  const int lanes = choice == "4" ? 4 : choice == "8" || eight_on_avx2 ? 8 : 0;  // 0: the widest
  const bool avx512 = has_avx512() && !eight_on_avx2, avx2 = has_avx2();
  if (avx512 && (lanes == 0 || lanes == 8)) {
    unit = {packs::avx512::log_iv_packs, packs::avx512::log_kv_packs, packs::avx512::log_iv_grad_packs,
            packs::avx512::log_kv_grad_packs, "packs of 8 (AVX-512)"};
  } else if (avx2 && (lanes == 0 || lanes == 4)) {
    unit = {packs::avx2::log_iv_packs, packs::avx2::log_kv_packs, packs::avx2::log_iv_grad_packs,
            packs::avx2::log_kv_grad_packs, "packs of 4 (AVX2)"};
  } else if (avx2 && lanes == 8) {
    unit = {packs::avx2_lanes8::log_iv_packs, packs::avx2_lanes8::log_kv_packs, packs::avx2_lanes8::log_iv_grad_packs,
            packs::avx2_lanes8::log_kv_grad_packs, "packs of 8 (AVX2)"};
  }
#endif
  return unit;
}

const PackUnit& pack_unit() {
  static const PackUnit unit = select_pack_unit();
  return unit;
}

// Values of n <= kBlock contiguous elements: the pack unit where one runs, else the scalar
// methods element by element, compiled per instruction set.
template <bool kK>
FASTLOSS_CPU_INLINE void log_bessel_values(const double* v, const double* x, double* out, int n,
                                           const PackUnit& unit) {
  const auto packs = kK ? unit.log_kv : unit.log_iv;
  if (packs != nullptr) {
    packs(v, x, out, n);
    return;
  }
  for (int i = 0; i < n; ++i) out[i] = kK ? lb::log_kv(v[i], x[i]) : lb::log_iv(v[i], x[i]);
}

FASTLOSS_CPU_CLONES void log_iv_range(const double* v, const double* x, double* out, int64_t n,
                                      const PackUnit& unit) {
  log_bessel_values<false>(v, x, out, static_cast<int>(n), unit);
}
FASTLOSS_CPU_CLONES void log_kv_range(const double* v, const double* x, double* out, int64_t n,
                                      const PackUnit& unit) {
  log_bessel_values<true>(v, x, out, static_cast<int>(n), unit);
}
// Derivatives of n <= kBlock contiguous elements: the pack unit where one runs, else the
// scalar methods (dual numbers) element by element.
template <bool kK>
FASTLOSS_CPU_INLINE void log_bessel_grads(const double* v, const double* x, double* d_dv, double* d_dx,
                                          int64_t n, const PackUnit& unit) {
  const auto packs = kK ? unit.log_kv_grad : unit.log_iv_grad;
  if (packs != nullptr) {
    packs(v, x, d_dv, d_dx, static_cast<int>(n));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const lb::LogBesselGrad g = kK ? lb::log_kv_grad(v[i], x[i]) : lb::log_iv_grad(v[i], x[i]);
    d_dv[i] = g.d_dv;
    d_dx[i] = g.d_dx;
  }
}
FASTLOSS_CPU_CLONES void log_iv_grad_range(const double* v, const double* x, double* d_dv,
                                           double* d_dx, int64_t n, const PackUnit& unit) {
  log_bessel_grads<false>(v, x, d_dv, d_dx, n, unit);
}
FASTLOSS_CPU_CLONES void log_kv_grad_range(const double* v, const double* x, double* d_dv,
                                           double* d_dx, int64_t n, const PackUnit& unit) {
  log_bessel_grads<true>(v, x, d_dv, d_dx, n, unit);
}

// Second derivatives of n contiguous elements: the scalar methods (second-order dual numbers).
template <bool kK>
FASTLOSS_CPU_INLINE void log_bessel_hessians(const double* v, const double* x, double* d_vv, double* d_vx,
                                             double* d_xx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const lb::LogBesselHess h = kK ? lb::log_kv_hess(v[i], x[i]) : lb::log_iv_hess(v[i], x[i]);
    d_vv[i] = h.d_vv;
    d_vx[i] = h.d_vx;
    d_xx[i] = h.d_xx;
  }
}
FASTLOSS_CPU_CLONES void log_iv_hess_range(const double* v, const double* x, double* d_vv, double* d_vx,
                                           double* d_xx, int64_t n) {
  log_bessel_hessians<false>(v, x, d_vv, d_vx, d_xx, n);
}
FASTLOSS_CPU_CLONES void log_kv_hess_range(const double* v, const double* x, double* d_vv, double* d_vx,
                                           double* d_xx, int64_t n) {
  log_bessel_hessians<true>(v, x, d_vv, d_vx, d_xx, n);
}

// Runs `fn(v, x, outs, m)` on blocks of doubles converted from / to scalar_t (no conversion
// for double); kOuts outputs. v_single / x_single: that operand is one element, for every entry.
template <int kOuts, typename scalar_t, typename Fn>
void for_blocks(const scalar_t* v, bool v_single, const scalar_t* x, bool x_single,
                const std::array<scalar_t*, kOuts>& outs, int64_t n, const Fn& fn) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    double vb[kBlock], xb[kBlock], ob[kOuts][kBlock];
    if (v_single) std::fill(vb, vb + kBlock, static_cast<double>(v[0]));
    if (x_single) std::fill(xb, xb + kBlock, static_cast<double>(x[0]));
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t m = std::min<int64_t>(kBlock, end - b);
      std::array<double*, kOuts> block_outs;
      if constexpr (std::is_same_v<scalar_t, double>) {
        for (int k = 0; k < kOuts; ++k) block_outs[k] = outs[k] + b;
        fn(v_single ? vb : v + b, x_single ? xb : x + b, block_outs, m);
      } else {
        for (int64_t i = 0; i < m; ++i) {
          if (!v_single) vb[i] = static_cast<double>(v[b + i]);
          if (!x_single) xb[i] = static_cast<double>(x[b + i]);
        }
        for (int k = 0; k < kOuts; ++k) block_outs[k] = ob[k];
        fn(vb, xb, block_outs, m);
        for (int k = 0; k < kOuts; ++k)
          for (int64_t i = 0; i < m; ++i) outs[k][b + i] = static_cast<scalar_t>(ob[k][i]);
      }
    }
  });
}

// The checks shared with CUDA, on CPU tensors.
LogBesselArgs cpu_args(const char* op, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.device().is_cpu() && x.device().is_cpu(), "fastloss.", op,
              ": expected CPU tensors, got 'v' on ", v.device(), " and 'x' on ", x.device());
  return log_bessel_args(op, v, x, /*keep_single=*/true);
}

// kOuts outputs in the broadcast shape of (v, x), filled block by block by `range(v, x, outs,
// m)` on doubles: the values (1), the first derivatives (2) or the second derivatives (3).
template <int kOuts, typename Range>
std::array<at::Tensor, kOuts> evaluate(const char* op, const at::Tensor& v, const at::Tensor& x, const Range& range) {
  const LogBesselArgs args = cpu_args(op, v, x);
  std::array<at::Tensor, kOuts> outs;
  for (at::Tensor& out : outs) out = at::empty(args.shape, args.v.options());
  if (outs[0].numel() == 0) return outs;
  const int64_t n = outs[0].numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outs[0].scalar_type(), "log_bessel", [&] {
    std::array<scalar_t*, kOuts> ptrs;
    for (int k = 0; k < kOuts; ++k) ptrs[k] = outs[k].template mutable_data_ptr<scalar_t>();
    for_blocks<kOuts>(args.v.const_data_ptr<scalar_t>(), args.v.numel() < n, args.x.const_data_ptr<scalar_t>(),
                      args.x.numel() < n, ptrs, n, range);
  });
  return outs;
}

template <bool kK>
at::Tensor forward(const at::Tensor& v, const at::Tensor& x) {
  static const PackUnit& unit = pack_unit();
  return evaluate<1>(kK ? "log_bessel_kv" : "log_bessel_iv", v, x,
                     [](const double* vb, const double* xb, const std::array<double*, 1>& o, int64_t m) {
                       kK ? log_kv_range(vb, xb, o[0], m, unit) : log_iv_range(vb, xb, o[0], m, unit);
                     })[0];
}

template <bool kK>
std::tuple<at::Tensor, at::Tensor> grad(const at::Tensor& v, const at::Tensor& x) {
  static const PackUnit& unit = pack_unit();
  const auto [d_dv, d_dx] = evaluate<2>(
      kK ? "log_bessel_kv_grad" : "log_bessel_iv_grad", v, x,
      [](const double* vb, const double* xb, const std::array<double*, 2>& o, int64_t m) {
        kK ? log_kv_grad_range(vb, xb, o[0], o[1], m, unit) : log_iv_grad_range(vb, xb, o[0], o[1], m, unit);
      });
  return {d_dv, d_dx};
}

template <bool kK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> hess(const at::Tensor& v, const at::Tensor& x) {
  const auto [d_vv, d_vx, d_xx] = evaluate<3>(
      kK ? "log_bessel_kv_hess" : "log_bessel_iv_hess", v, x,
      [](const double* vb, const double* xb, const std::array<double*, 3>& o, int64_t m) {
        kK ? log_kv_hess_range(vb, xb, o[0], o[1], o[2], m) : log_iv_hess_range(vb, xb, o[0], o[1], o[2], m);
      });
  return {d_vv, d_vx, d_xx};
}

}  // namespace

const char* log_bessel_cpu_path() { return pack_unit().name; }

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("log_bessel_iv", &forward<false>);
  m.impl("log_bessel_kv", &forward<true>);
  m.impl("log_bessel_iv_grad", &grad<false>);
  m.impl("log_bessel_kv_grad", &grad<true>);
  m.impl("log_bessel_iv_hess", &hess<false>);
  m.impl("log_bessel_kv_hess", &hess<true>);
}

}  // namespace fastloss::cpu
