// log I_v(x), log K_v(x) and their derivatives in v and x on the CPU, over the shared math in
// common/log_bessel.h (Plesner, Sorensen & Hauberg, ICS 2024; power series, Hankel and Debye
// expansions, Temme / Steed CF2 with the forward recurrence for K).
//
// Values: each block of 256 elements is split into one index list per method (K's small-
// argument list split again at Temme's x = 2, its CF2 side ordered by expected length), and
// each list runs in SIMD packs of 8 (cpu/log_bessel_pack.h): the methods' loops have the same
// shape for every element, so lanes stay busy until the slowest has converged, and the
// transcendentals (log, exp, lgamma) are vector code. Where AVX-512 is missing, packs split
// into narrower registers lose to the scalar code, which runs instead. Derivatives (dual
// numbers) run element by element.
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

#include <cstring>
#include <tuple>

#include "common/log_bessel.h"
#include "common/log_bessel_op.h"
#include "cpu/isa.h"
#include "cpu/log_bessel_pack.h"

namespace fastloss::cpu {
namespace {

namespace lb = fastloss::log_bessel;

// Elements per parallel task: each costs ~0.1-1 us.
constexpr int64_t kGrain = 512;

// Values of one method for the elements listed in `index`, kLanes at a time; a last partial
// pack repeats its first element in the unused lanes.
template <bool kK, lb::Method kMethod>
FASTLOSS_CPU_INLINE void method_by_packs(const double* v, const double* x, double* out,
                                         const int* index, int count) {
  for (int start = 0; start < count; start += lb::kLanes) {
    const int lanes = std::min(lb::kLanes, count - start);
    lb::Pack vp, xp;
    const int first = index[start];
    // Lists are ascending: a full pack of consecutive elements (the common case, inputs
    // mostly in one region) is two vector loads and a store instead of lane-by-lane copies.
    const bool consecutive = lanes == lb::kLanes && index[start + lb::kLanes - 1] - first == lb::kLanes - 1;
    if (consecutive) {
      std::memcpy(&vp.a, v + first, sizeof(vp.a));
      std::memcpy(&xp.a, x + first, sizeof(xp.a));
      if (kK) vp = lb::f_abs(vp);
    } else {
      for (int l = 0; l < lb::kLanes; ++l) {
        const int i = index[start + (l < lanes ? l : 0)];
        vp.a[l] = kK ? fabs(v[i]) : v[i];
        xp.a[l] = x[i];
      }
    }
    lb::Pack r;
    if constexpr (kMethod == lb::Method::Hankel) {
      r = lb::hankel_log<!kK>(vp, xp);
    } else if constexpr (kMethod == lb::Method::Debye) {
      r = lb::debye_log<!kK>(vp, xp);
    } else if constexpr (kK) {
      r = lb::recurrence_log_kv(vp, xp);
    } else {
      r = lb::series_log_iv(vp, xp);
    }
    if (consecutive) {
      std::memcpy(out + first, &r.a, sizeof(r.a));
    } else {
      for (int l = 0; l < lanes; ++l) out[index[start + l]] = r.a[l];
    }
  }
}

constexpr int kBlock = 256;  // elements per block of the CPU loops
constexpr int kCF2List = static_cast<int>(lb::kMethods);  // K's small-argument list beyond x = 2

// CF2 needs about 180 / x iterations (90 at x = 2, 15 at x = 29), and a pack runs as long
// as its slowest lane: a counting sort by floor(24 / x) puts elements of similar length in
// the same packs (the iteration counts within a key differ by at most ~8).
FASTLOSS_CPU_INLINE void order_by_cf2_length(const double* x, int* index, int count) {
  constexpr int kKeys = 12;  // x > 2: floor(24 / x) <= 11
  int start[kKeys + 1] = {};
  int key[kBlock], sorted[kBlock];
  for (int j = 0; j < count; ++j) {
    key[j] = std::min(kKeys - 1, static_cast<int>(24.0 / x[index[j]]));
    ++start[key[j] + 1];
  }
  for (int k = 0; k < kKeys; ++k) start[k + 1] += start[k];
  for (int j = 0; j < count; ++j) sorted[start[key[j]]++] = index[j];
  std::copy(sorted, sorted + count, index);
}

// The packs of one index list (a function, not a lambda: a lambda that is not inlined into
// the clone that calls it would run the baseline instruction set).
template <bool kK>
FASTLOSS_CPU_INLINE void run_list(int list, const double* v, const double* x, double* out, int* index,
                                  int count) {
  switch (list) {
    case static_cast<int>(lb::Method::Hankel): method_by_packs<kK, lb::Method::Hankel>(v, x, out, index, count); break;
    case static_cast<int>(lb::Method::Debye): method_by_packs<kK, lb::Method::Debye>(v, x, out, index, count); break;
    case static_cast<int>(lb::Method::Small): method_by_packs<kK, lb::Method::Small>(v, x, out, index, count); break;
    default:  // kCF2List
      order_by_cf2_length(x, index, count);
      method_by_packs<kK, lb::Method::Small>(v, x, out, index, count);
  }
}

// Entry points compiled once per instruction set; the math (FASTLOSS_HD = always_inline) is
// inlined into each clone. Arrays are contiguous doubles, at most kBlock of them. Elements
// are grouped by method and each group runs in SIMD packs: the loops of one method have the
// same shape for every element, so lanes stay busy until the slowest has converged.
template <bool kK>
FASTLOSS_CPU_INLINE void log_bessel_values(const double* v, const double* x, double* out, int n,
                                           bool use_packs) {
  if (!use_packs) {  // 8-double packs split into AVX2 / SSE halves run slower than scalar code
    for (int i = 0; i < n; ++i) out[i] = kK ? lb::log_kv(v[i], x[i]) : lb::log_iv(v[i], x[i]);
    return;
  }
  // One list per method; K's small-argument list is split at Temme's x = 2 so that no pack
  // runs both Temme's series and CF2. First each element's list, then the lists themselves,
  // unless the whole block is one list (the common case), which runs as is.
  constexpr int kSmall = static_cast<int>(lb::Method::Small);
  constexpr int kLists = lb::kMethods + 1;
  constexpr int kSpecial = kLists;  // x = 0, inf, NaN, ...: the scalar entry points
  uint8_t list_of[kBlock];
  for (int i = 0; i < n; ++i) {
    const double order = kK ? fabs(v[i]) : v[i];
    const bool finite_domain = (order >= 0.0) & (order < lb::kInf) & (x[i] > 0.0) & (x[i] < lb::kInf);
    const int method = static_cast<int>(lb::method_for(order, x[i]));
    const bool cf2_side = kK & (method == kSmall) & (x[i] > lb::kTemmeMaxX);
    const int list = cf2_side ? kCF2List : method;
    list_of[i] = static_cast<uint8_t>(finite_domain ? list : kSpecial);
  }
  int index[kLists][kBlock];
  int other_lists = 0;
  for (int i = 0; i < n; ++i) other_lists += list_of[i] != list_of[0];
  const bool one_list = other_lists == 0;
  if (one_list && list_of[0] != kSpecial) {
    for (int i = 0; i < n; ++i) index[0][i] = i;
    run_list<kK>(list_of[0], v, x, out, index[0], n);
    return;
  }
  int count[kLists] = {};
  for (int i = 0; i < n; ++i) {
    const int list = list_of[i];
    if (list == kSpecial) {
      out[i] = kK ? lb::log_kv(v[i], x[i]) : lb::log_iv(v[i], x[i]);
    } else {
      index[list][count[list]++] = i;
    }
  }
  for (int list = 0; list < kLists; ++list) {
    if (count[list] > 0 && (kK || list != kCF2List)) run_list<kK>(list, v, x, out, index[list], count[list]);
  }
}

FASTLOSS_CPU_CLONES void log_iv_range(const double* v, const double* x, double* out, int64_t n,
                                      bool use_packs) {
  log_bessel_values<false>(v, x, out, static_cast<int>(n), use_packs);
}
FASTLOSS_CPU_CLONES void log_kv_range(const double* v, const double* x, double* out, int64_t n,
                                      bool use_packs) {
  log_bessel_values<true>(v, x, out, static_cast<int>(n), use_packs);
}
FASTLOSS_CPU_CLONES void log_iv_grad_range(const double* v, const double* x, double* d_dv,
                                           double* d_dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const lb::LogBesselGrad g = lb::log_iv_grad(v[i], x[i]);
    d_dv[i] = g.d_dv;
    d_dx[i] = g.d_dx;
  }
}
FASTLOSS_CPU_CLONES void log_kv_grad_range(const double* v, const double* x, double* d_dv,
                                           double* d_dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const lb::LogBesselGrad g = lb::log_kv_grad(v[i], x[i]);
    d_dv[i] = g.d_dv;
    d_dx[i] = g.d_dx;
  }
}

// Runs `fn` on blocks of doubles converted from / to scalar_t (no conversion for double).
template <typename scalar_t, typename Fn>
void for_blocks(const scalar_t* v, const scalar_t* x, scalar_t* out0, scalar_t* out1, int64_t n,
                const Fn& fn) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    double vb[kBlock], xb[kBlock], o0[kBlock], o1[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t m = std::min<int64_t>(kBlock, end - b);
      if constexpr (std::is_same_v<scalar_t, double>) {
        fn(v + b, x + b, out0 + b, out1 ? out1 + b : nullptr, m);
      } else {
        for (int64_t i = 0; i < m; ++i) {
          vb[i] = static_cast<double>(v[b + i]);
          xb[i] = static_cast<double>(x[b + i]);
        }
        fn(vb, xb, o0, o1, m);
        for (int64_t i = 0; i < m; ++i) out0[b + i] = static_cast<scalar_t>(o0[i]);
        if (out1)
          for (int64_t i = 0; i < m; ++i) out1[b + i] = static_cast<scalar_t>(o1[i]);
      }
    }
  });
}

template <bool kK>
at::Tensor forward(const at::Tensor& v, const at::Tensor& x) {
  const char* op = kK ? "log_bessel_kv" : "log_bessel_iv";
  TORCH_CHECK(v.device().is_cpu() && x.device().is_cpu(), "fastloss.", op,
              ": expected CPU tensors, got 'v' on ", v.device(), " and 'x' on ", x.device());
  const LogBesselArgs args = log_bessel_args(op, v, x);
  at::Tensor out = at::empty(args.v.sizes(), args.v.options());
  if (out.numel() == 0) return out;
  static const bool use_packs = has_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "log_bessel", [&] {
    for_blocks(args.v.const_data_ptr<scalar_t>(), args.x.const_data_ptr<scalar_t>(),
               out.mutable_data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr), out.numel(),
               [](const double* vb, const double* xb, double* o, double*, int64_t m) {
                 kK ? log_kv_range(vb, xb, o, m, use_packs) : log_iv_range(vb, xb, o, m, use_packs);
               });
  });
  return out;
}

template <bool kK>
std::tuple<at::Tensor, at::Tensor> grad(const at::Tensor& v, const at::Tensor& x) {
  const char* op = kK ? "log_bessel_kv_grad" : "log_bessel_iv_grad";
  TORCH_CHECK(v.device().is_cpu() && x.device().is_cpu(), "fastloss.", op,
              ": expected CPU tensors, got 'v' on ", v.device(), " and 'x' on ", x.device());
  const LogBesselArgs args = log_bessel_args(op, v, x);
  at::Tensor d_dv = at::empty(args.v.sizes(), args.v.options());
  at::Tensor d_dx = at::empty(args.v.sizes(), args.v.options());
  if (d_dv.numel() == 0) return {d_dv, d_dx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d_dv.scalar_type(), "log_bessel_grad", [&] {
    for_blocks(args.v.const_data_ptr<scalar_t>(), args.x.const_data_ptr<scalar_t>(),
               d_dv.mutable_data_ptr<scalar_t>(), d_dx.mutable_data_ptr<scalar_t>(),
               d_dv.numel(), [](const double* vb, const double* xb, double* o0, double* o1, int64_t m) {
                 kK ? log_kv_grad_range(vb, xb, o0, o1, m) : log_iv_grad_range(vb, xb, o0, o1, m);
               });
  });
  return {d_dv, d_dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("log_bessel_iv", &forward<false>);
  m.impl("log_bessel_kv", &forward<true>);
  m.impl("log_bessel_iv_grad", &grad<false>);
  m.impl("log_bessel_kv_grad", &grad<true>);
}

}  // namespace fastloss::cpu
