// Batched Sinkhorn and the SinKD loss on the CPU.
//
// Sinkhorn (Cuturi 2013), stabilized scaling with absorption (Schmitzer 2019, "Stabilized
// sparse scaling algorithms for entropy regularized transport problems"; common/
// sinkhorn_math.h): the kernel K = exp((f + g - C) / eps) at the last absorbed potentials is
// kept in the plan's buffer, and each iteration is one pass over it with two fused
// multiply-adds per entry and no exp: the row's dot product with b o y gives its scaling
// update (and, as a by-product, its marginal error), and the same row, still in L1, is added
// to the column sums of the column update. Only the first iteration, and any iteration after
// the scalings leave [2^-16, 2^16] (float; the potentials are then folded back in), is a
// log-domain pass over the cost (one exp per entry, warm-shifted log-sum-exp with an exact
// max-shifted fallback) that rebuilds the kernel. Traffic per iteration: one read of the
// kernel (n m values) and O(n + m); one read of the cost per rebuild; the plan is the kernel
// rescaled in place at the end. Every iteration measures the row-marginal error for free,
// so each problem stops on its own. Many problems: parallel over the batch, one thread per
// problem (its kernel stays in L1/L2). Few large ones: rows split into a fixed number of
// ranges (not one per thread, so the results do not depend on the thread count), each with
// its own column accumulators, run in parallel.
//
// SinKD (Cui et al. 2024, "SinKD: Sinkhorn distance minimization for knowledge distillation"):
// softmax with temperature, the B x B L1 cost (cdist p=1, B^2 C work) tiled so the teacher
// block stays in L2 (SIMD across rows when there are few classes), n_iter row/column
// normalizations in scaling-vector form (two B x B mat-vecs each, the vectors kept for the
// backward), loss = scale * sum(P * W). The backward is the exact reverse sweep of those
// normalizations (sinkhorn_kd_sweep): two mat-vecs per step, the cost gradient as one
// rank-2n product, then the cdist and softmax backward (B^2 C again). Memory: the logits
// and probabilities (B x C) are read a few times; everything else is O(B^2 + n_iter B).
// Accumulation in float (double for double inputs); the normalizations move to double where
// float would take subnormals or leave its range (kd_kernel_fits_float).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/sinkhorn_math.h"
#include "common/sinkhorn_op.h"
#include "cpu/flush_subnormals.h"
#include "cpu/isa.h"

#if defined(FASTLOSS_X86_CLONES)
#include <immintrin.h>
#endif

namespace fastloss::cpu {
namespace {

// Lanes of the explicit SIMD reductions (one 512-bit vector).
template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);
// Below this many cost entries a problem runs on one thread (a pass then takes well under a
// millisecond, less than waking and joining threads costs on a busy machine).
constexpr int64_t kParallelProblemMin = 1 << 22;
// Row ranges of a problem that large: enough to balance the threads of a big machine, each
// at least kMinRowsPerPart rows (its column accumulators cost O(m) per iteration).
constexpr int64_t kMaxRowParts = 32;
constexpr int64_t kMinRowsPerPart = 8;
inline int64_t row_parts(int64_t n, int64_t m) {
  if (n * m < kParallelProblemMin) return 1;
  return std::clamp<int64_t>(n / kMinRowsPerPart, 1, kMaxRowParts);
}
// Up to this many bytes a problem keeps a transposed copy of its kernel (scaling_transposed):
// both copies stay in L1. Larger rows amortize their horizontal sums, and a second copy
// would only add traffic (measured: 1.5x faster at 64 x 64, 1.2x slower at 256 x 256).
constexpr int64_t kTransposedKernelMaxBytes = 16 << 10;
// Work (elements touched) per parallel task below which a loop runs on the calling thread.
constexpr int64_t kMinTaskWork = 1 << 16;

// A grain (in items of `work_per_item` elements) that gives every task at least kMinTaskWork.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

template <int L, typename acc_t>
FASTLOSS_CPU_INLINE acc_t sum_lanes(acc_t* a) {
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
}
// sum_j a_j b_j over n entries, in kLanes partial sums.
template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  constexpr int L = kLanes<acc_t>;
  acc_t part[L];
  for (int l = 0; l < L; ++l) part[l] = 0;
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) part[l] += a[j + l] * b[j + l];
  for (int l = 0; j + l < n; ++l) part[l] += a[j + l] * b[j + l];
  return sum_lanes<L>(part);
}

template <int L, typename acc_t>
FASTLOSS_CPU_INLINE acc_t max_lanes(acc_t* a) {
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) a[l] = fl_max(a[l], a[l + w]);
  return a[0];
}

// ------------------------------------------------------------------------------------------
// Sinkhorn
//
// State of a problem: log potentials (u, v) (scaled by 1/eps, without log a, log b), the
// kernel K_ij = exp(u_i + v_j - C_ij / eps) they define, held in the plan's buffer, and
// scaling vectors (x, y): the current iterate is P_ij = a_i x_i K_ij y_j b_j, i.e. the
// potentials u + log x, v + log y. Two kinds of iteration produce the same Sinkhorn iterates:
//
// * log pass (exp per entry; the first iteration, and whenever the kernel is stale): with the
//   previous u_i as the shift, e_ij = exp(v_j + u_i - C_ij / eps), s_i = sum_j b_j e_ij gives
//   the row update u_i <- u_i - log s_i and, as e_ij / s_i, the kernel row at the new u_i,
//   written while the row is in L1 and added (times a_i) to every column sum. A row whose s_i
//   leaves the safe range is redone with its exact maximum as the shift; a column whose sum
//   does is recomputed exactly in a separate (rare) strided pass.
// * scaling pass (two fused multiply-adds per entry, no exp): s_i = sum_j K_ij b_j y_j,
//   x_i <- 1 / s_i, and a_i x_i K_ij added to the column sums from the same row, so
//   y_j <- 1 / (column sum).
// Either way s_i is the row marginal of the current iterate divided by a_i x_i, so the error
// terms a_i |x_i s_i - 1| come with the row pass (their norm: MarginalErrorNorm). Absorption (Schmitzer 2019): a
// scaling pass is used only while every s_i and every column sum stays in
// [1/kMaxScaling, kMaxScaling]; otherwise that pass is discarded, (x, y) are folded into
// (u, v), and a log pass rebuilds the kernel. Kernel entries below kMinKernel are stored as
// 0: with x, y bounded they carry less than kMinKernel * kMaxScaling^2 of any row's mass.

template <typename acc_t>
struct Problem {
  const acc_t* cost;   // n x m
  const acc_t* a;      // n
  const acc_t* b;      // m
  const acc_t* log_a;  // n
  const acc_t* log_b;  // m
  int64_t n, m;
  acc_t inv_eps;
  MarginalErrorNorm norm;  // of the row-marginal error that the stopping rule measures
};

// Log pass over rows [r0, r1): writes u_new and the kernel rows at (u_new, v), adds a_i K_ij
// to col_acc (m). Returns the accumulated terms a_i |s_i - 1| of the row-marginal error of (u, v).
// Zero-mass rows and columns get kernel entries 0 (so a column sum of 0) whatever their costs;
// a zero-mass row keeps its u.
template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t log_rows(const Problem<acc_t>& p, const acc_t* u, const acc_t* v, acc_t* u_new,
                                   acc_t* kernel, acc_t* col_acc, int64_t r0, int64_t r1) {
  const MarginalErrorNorm norm = p.norm;
  constexpr int L = kLanes<acc_t>;
  const int64_t m = p.m;
  const acc_t k = p.inv_eps;
  const acc_t* b = p.b;
  const acc_t* lb = p.log_b;
  acc_t err = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const acc_t* c = p.cost + i * m;
    acc_t* e = kernel + i * m;
    const acc_t ui = u[i];
    const acc_t ai = p.a[i];
    if (!(ai > 0)) {  // a zero-mass row takes no part (its potential is set after the solve)
      u_new[i] = ui;
      for (int64_t j = 0; j < m; ++j) e[j] = 0;
      continue;
    }
    acc_t part[L];
    for (int l = 0; l < L; ++l) part[l] = 0;
    int64_t j = 0;
    for (; j + L <= m; j += L)
      for (int l = 0; l < L; ++l) {
        const acc_t x = sinkhorn_exp(masked_exponent(lb[j + l], c[j + l], k, v[j + l] + ui));
        e[j + l] = x;
        part[l] += b[j + l] * x;
      }
    for (int l = 0; j + l < m; ++l) {
      const acc_t x = sinkhorn_exp(masked_exponent(lb[j + l], c[j + l], k, v[j + l] + ui));
      e[j + l] = x;
      part[l] += b[j + l] * x;
    }
    acc_t s = sum_lanes<L>(part);
    acc_t ratio = s;
    if (warm_sum_ok(s)) {
      u_new[i] = ui - std::log(s);
    } else {
      // Exact: shift by the row maximum of log b_j + v_j - C_ij / eps.
      acc_t mx[L];
      for (int l = 0; l < L; ++l) mx[l] = -std::numeric_limits<acc_t>::infinity();
      j = 0;
      for (; j + L <= m; j += L)
        for (int l = 0; l < L; ++l) mx[l] = fl_max(mx[l], masked_exponent(lb[j + l], c[j + l], k, lb[j + l] + v[j + l]));
      for (int l = 0; j + l < m; ++l) mx[l] = fl_max(mx[l], masked_exponent(lb[j + l], c[j + l], k, lb[j + l] + v[j + l]));
      const acc_t top = max_lanes<L>(mx);
      for (int l = 0; l < L; ++l) part[l] = 0;
      j = 0;
      for (; j + L <= m; j += L)
        for (int l = 0; l < L; ++l) {
          const acc_t x = sinkhorn_exp(masked_exponent(lb[j + l], c[j + l], k, v[j + l] - top));
          e[j + l] = x;
          part[l] += b[j + l] * x;
        }
      for (int l = 0; j + l < m; ++l) {
        const acc_t x = sinkhorn_exp(masked_exponent(lb[j + l], c[j + l], k, v[j + l] - top));
        e[j + l] = x;
        part[l] += b[j + l] * x;
      }
      s = sum_lanes<L>(part);
      const acc_t lse = top + std::log(s);
      u_new[i] = -lse;
      ratio = std::exp(lse + ui);
    }
    err = norm(err, norm.term(ai * std::abs(ratio - acc_t(1))));
    const acc_t inv_s = acc_t(1) / s;
    for (j = 0; j < m; ++j) {
      const acc_t kij = e[j] * inv_s;
      // Negligible entries as exact zeros: no subnormal arithmetic in the scaling passes.
      e[j] = keep_or_zero(kij >= SinkhornConstants<acc_t>::kMinKernel, kij);
      col_acc[j] += ai * e[j];
    }
  }
  return err;
}

// Scaling pass over rows [r0, r1) of the kernel, with w = b o y: writes x_new = 1 / (K w) and
// adds a_i x_new_i K_ij to col_acc (m). Returns the accumulated row-marginal error terms of
// (x, y), or NaN as soon as some K w leaves the scaling range (the pass is then discarded).
template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t scaling_rows(const acc_t* kernel, const acc_t* a, const acc_t* x, const acc_t* w,
                                       acc_t* x_new, acc_t* col_acc, int64_t m, int64_t r0, int64_t r1,
                                       MarginalErrorNorm norm) {
  acc_t err = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const acc_t ai = a[i];
    if (!(ai > 0)) {  // a zero-mass row (its kernel row is 0)
      x_new[i] = 1;
      continue;
    }
    const acc_t* k = kernel + i * m;
    const acc_t s = dot(k, w, m);
    if (!scaling_in_range(s)) return std::numeric_limits<acc_t>::quiet_NaN();
    err = norm(err, norm.term(ai * std::abs(fl_fma(x[i], s, acc_t(-1)))));
    const acc_t xi = acc_t(1) / s;
    x_new[i] = xi;
    const acc_t weight = ai * xi;
    for (int64_t j = 0; j < m; ++j) col_acc[j] += weight * k[j];
  }
  return err;
}

// The scaling pass of a problem small enough to keep a transposed copy of its kernel in
// cache: K w as a sum of kernel columns (rows of kernel_t) and the column sums as a sum of
// kernel rows, so both are SIMD multiply-adds across whole vectors, with no horizontal sum per
// row (which dominates rows of a few dozen entries). Same results and contract as
// scaling_rows over all rows.
template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t scaling_transposed(const acc_t* kernel, const acc_t* kernel_t, const acc_t* a,
                                             const acc_t* x, const acc_t* w, acc_t* x_new, acc_t* col_acc,
                                             int64_t n, int64_t m, MarginalErrorNorm norm) {
  constexpr int L = kLanes<acc_t>;
  acc_t* s = x_new;  // K w, inverted in place
  for (int64_t i = 0; i < n; ++i) s[i] = 0;
  for (int64_t j = 0; j < m; ++j) {
    const acc_t wj = w[j];
    const acc_t* kt = kernel_t + j * n;
    for (int64_t i = 0; i < n; ++i) s[i] += wj * kt[i];
  }
  acc_t part[L];
  for (int l = 0; l < L; ++l) part[l] = 0;
  int out_of_range = 0;
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) {
      const acc_t si = s[i + l];
      const bool massed = a[i + l] > 0;  // a zero-mass row's kernel row is 0: it keeps x = 1
      out_of_range |= massed && !scaling_in_range(si);
      part[l] = norm(part[l], norm.term(a[i + l] * std::abs(fl_fma(x[i + l], si, acc_t(-1)))));
      s[i + l] = massed ? acc_t(1) / si : acc_t(1);
    }
  for (int l = 0; i + l < n; ++l) {
    const acc_t si = s[i + l];
    const bool massed = a[i + l] > 0;
    out_of_range |= massed && !scaling_in_range(si);
    part[l] = norm(part[l], norm.term(a[i + l] * std::abs(fl_fma(x[i + l], si, acc_t(-1)))));
    s[i + l] = massed ? acc_t(1) / si : acc_t(1);
  }
  if (out_of_range) return std::numeric_limits<acc_t>::quiet_NaN();
  for (i = 0; i < n; ++i) {
    const acc_t weight = a[i] * x_new[i];
    const acc_t* k = kernel + i * m;
    for (int64_t j = 0; j < m; ++j) col_acc[j] += weight * k[j];
  }
  acc_t err = part[0];
  for (int l = 1; l < L; ++l) err = norm(err, part[l]);
  return err;
}

// v_j <- -LSE_i(log a_i + u_i - C_ij / eps) exactly, for the columns [c0, c1) whose warm sum
// left the safe range (marked by a non-finite-or-out-of-range col_acc); strided, rare.
// Zero-mass rows take no part, as in the warm sums; zero-mass columns are skipped (their
// potential is never used: their kernel entries are 0).
template <typename acc_t>
FASTLOSS_CPU_INLINE void exact_columns(const Problem<acc_t>& p, const acc_t* u, const acc_t* col_acc, acc_t* v,
                                       int64_t c0, int64_t c1) {
  const acc_t k = p.inv_eps;
  for (int64_t j = c0; j < c1; ++j) {
    if (warm_sum_ok(col_acc[j]) || !(p.b[j] > 0)) continue;
    acc_t top = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < p.n; ++i) top = fl_max(top, masked_exponent(p.log_a[i], p.cost[i * p.m + j], k, p.log_a[i] + u[i]));
    acc_t s = 0;
    for (int64_t i = 0; i < p.n; ++i)
      s += sinkhorn_exp(masked_exponent(p.log_a[i], p.cost[i * p.m + j], k, p.log_a[i] + u[i] - top));
    v[j] = -(top + std::log(s));
  }
}

// P_ij = a_i b_j exp(u_i + v_j - C_ij / eps) for rows [r0, r1) (0 for zero-mass entries).
template <typename acc_t>
FASTLOSS_CPU_INLINE void plan_rows(const Problem<acc_t>& p, const acc_t* u, const acc_t* v, acc_t* plan, int64_t r0,
                                   int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    acc_t* row = plan + i * p.m;
    const acc_t* c = p.cost + i * p.m;
    const acc_t zi = p.log_a[i] + u[i];
    for (int64_t j = 0; j < p.m; ++j) row[j] = plan_entry(c[j], p.inv_eps, p.log_a[i], zi, p.log_b[j], v[j]);
  }
}

// P_ij = a_i x_i K_ij w_j in place of the kernel rows [r0, r1) (w = b o y).
template <typename acc_t>
FASTLOSS_CPU_INLINE void scale_kernel_rows(acc_t* kernel, const acc_t* a, const acc_t* x, const acc_t* w, int64_t m,
                                           int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    acc_t* row = kernel + i * m;
    const acc_t ri = a[i] * x[i];
    for (int64_t j = 0; j < m; ++j) row[j] *= ri * w[j];
  }
}

// The potentials of the zero-mass rows and columns, which take no part in the passes: exact
// c-transforms of the other side's returned potentials (massed entries only), with
// zero_mass_potential's conventions. One pass over those rows and columns, after the solve.
template <typename acc_t>
void set_zero_mass_potentials(const Problem<acc_t>& p, acc_t* alpha, acc_t* beta) {
  const acc_t k = p.inv_eps, eps = acc_t(1) / p.inv_eps;
  for (int64_t i = 0; i < p.n; ++i) {
    if (p.a[i] > 0) continue;
    const acc_t* c = p.cost + i * p.m;
    alpha[i] = eps * zero_mass_c_transform<acc_t>(
                         p.m, [&](int64_t j) { return masked_exponent(p.log_b[j], c[j], k, p.log_b[j] + beta[j] * k); });
  }
  for (int64_t j = 0; j < p.m; ++j) {
    if (p.b[j] > 0) continue;
    beta[j] = eps * zero_mass_c_transform<acc_t>(p.n, [&](int64_t i) {
      return masked_exponent(p.log_a[i], p.cost[i * p.m + j], k, p.log_a[i] + alpha[i] * k);
    });
  }
}

template <typename acc_t>
struct Outputs {
  acc_t* plan;   // n x m; the kernel while iterating
  acc_t* alpha;  // n
  acc_t* beta;   // m
  acc_t* value;
  int64_t* n_iter;
  acc_t* error;
};

// The instruction-set clones (cpu/isa.h) of the passes, one per accumulation type. Code in
// at::parallel_for lambdas is not cloned, so the lambdas call these.
#define FASTLOSS_SINKHORN_ENTRIES(T)                                                                          \
  FASTLOSS_CPU_CLONES T log_rows_entry(const Problem<T>& p, const T* u, const T* v, T* u_new, T* kernel,     \
                                       T* col_acc, int64_t r0, int64_t r1) {                                 \
    return log_rows(p, u, v, u_new, kernel, col_acc, r0, r1);                                                \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES T scaling_rows_entry(const T* kernel, const T* a, const T* x, const T* w, T* x_new,    \
                                           T* col_acc, int64_t m, int64_t r0, int64_t r1,                    \
                                           MarginalErrorNorm norm) {                                         \
    return scaling_rows(kernel, a, x, w, x_new, col_acc, m, r0, r1, norm);                                   \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES T scaling_transposed_entry(const T* kernel, const T* kernel_t, const T* a, const T* x,  \
                                                 const T* w, T* x_new, T* col_acc, int64_t n, int64_t m,     \
                                                 MarginalErrorNorm norm) {                                   \
    return scaling_transposed(kernel, kernel_t, a, x, w, x_new, col_acc, n, m, norm);                        \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void exact_columns_entry(const Problem<T>& p, const T* u, const T* col_acc, T* v,      \
                                               int64_t c0, int64_t c1) {                                     \
    exact_columns(p, u, col_acc, v, c0, c1);                                                                 \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void plan_rows_entry(const Problem<T>& p, const T* u, const T* v, T* plan, int64_t r0, \
                                           int64_t r1) {                                                     \
    plan_rows(p, u, v, plan, r0, r1);                                                                        \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void scale_kernel_rows_entry(T* kernel, const T* a, const T* x, const T* w, int64_t m, \
                                                   int64_t r0, int64_t r1) {                                 \
    scale_kernel_rows(kernel, a, x, w, m, r0, r1);                                                           \
  }
FASTLOSS_SINKHORN_ENTRIES(float)
FASTLOSS_SINKHORN_ENTRIES(double)
#undef FASTLOSS_SINKHORN_ENTRIES

// Folds scaling vectors into log potentials: pot += log s, s = 1.
template <typename acc_t>
void absorb(acc_t* pot, acc_t* s, int64_t count) {
  for (int64_t q = 0; q < count; ++q) {
    pot[q] += std::log(s[q]);
    s[q] = 1;
  }
}

// Solves one problem. The rows of each pass are split into row_parts(n, m) ranges, each with
// its own column accumulators, summed afterwards in a fixed order; `parallel` runs the ranges
// (and the final plan pass) on the threads, with the same arithmetic as running them in turn.
// The loop ends when the error of the current iterate is <= tol (or NaN), or after max_iter
// iterations; the returned potentials are those whose error was measured. The starting
// iterate (u = v = 0) is returned only for max_iter = 0, never for meeting tol: its columns
// are not normalized, and the row error alone said nothing of them (a large eps met a loose
// tol there and returned a value of 0).
//
// The passes run with subnormals flushed (ScopedFlushSubnormals): the kernel and scaling
// bounds keep their own products normal, but marginals below ~2^-38 made products a_i x_i K_ij
// subnormal (softmax marginals of std 12-30: 4-13x the time of uniform ones); what is flushed
// lies below 1.2e-38 (float32) in the plan and below the marginals' rounding. The flag is set
// in each task and in serial runs only, never around an at::parallel_for: a thread the
// runtime starts there would inherit it for good.
template <typename acc_t>
void solve(const Problem<acc_t>& p, int64_t max_iter, acc_t tol, bool parallel, const Outputs<acc_t>& out) {
  std::optional<ScopedFlushSubnormals> flush;
  if (!parallel) flush.emplace();
  const int64_t n = p.n, m = p.m;
  const int64_t parts = row_parts(n, m);
  std::vector<acc_t> u_buf(n, 0), u_new_buf(n), v(m, 0), x_buf(n, 1), x_new_buf(n), y(m, 1), w(p.b, p.b + m);
  std::vector<acc_t> col_acc(parts * m), part_err(parts);
  acc_t* u = u_buf.data();
  acc_t* u_new = u_new_buf.data();
  acc_t* x = x_buf.data();
  acc_t* x_new = x_new_buf.data();
  acc_t* kernel = out.plan;
  const bool transposed = parts == 1 && n * m * int64_t(sizeof(acc_t)) <= kTransposedKernelMaxBytes;
  std::vector<acc_t> kernel_t(transposed ? n * m : 0);
  // Runs one row pass (split into `parts` ranges) and returns its combined error terms.
  auto row_pass = [&](auto&& rows) {
    std::fill(col_acc.begin(), col_acc.end(), acc_t(0));
    if (parts == 1) {
      const ScopedFlushSubnormals serial_flush;  // (solve's flag is off when `parallel`)
      return rows(col_acc.data(), int64_t(0), n);
    }
    auto run_parts = [&](int64_t b, int64_t e) {
      const ScopedFlushSubnormals task_flush;
      for (int64_t t = b; t < e; ++t) part_err[t] = rows(col_acc.data() + t * m, n * t / parts, n * (t + 1) / parts);
    };
    if (parallel) {
      at::parallel_for(0, parts, 1, run_parts);
    } else {
      run_parts(0, parts);
    }
    acc_t err = part_err[0];
    for (int64_t t = 1; t < parts; ++t) err = p.norm(err, part_err[t]);
    for (int64_t t = 1; t < parts; ++t)
      for (int64_t j = 0; j < m; ++j) col_acc[j] += col_acc[t * m + j];
    return err;
  };
  bool kernel_fresh = false;  // the kernel matches (u, v), and (x, y) are in the scaling range
  bool scaled = false;        // the last pass was a scaling pass
  acc_t err = std::numeric_limits<acc_t>::infinity();
  int64_t it = 0;
  for (;; ++it) {
    scaled = false;
    if (kernel_fresh && transposed) {  // (small: serial, under solve's flag)
      std::fill(col_acc.begin(), col_acc.end(), acc_t(0));
      err = scaling_transposed_entry(kernel, kernel_t.data(), p.a, x, w.data(), x_new, col_acc.data(), n, m, p.norm);
      scaled = err == err;
    } else if (kernel_fresh) {
      err = row_pass([&](acc_t* acc, int64_t r0, int64_t r1) {
        return scaling_rows_entry(kernel, p.a, x, w.data(), x_new, acc, m, r0, r1, p.norm);
      });
      scaled = err == err;
    }
    if (!scaled) {
      absorb(u, x, n);
      absorb(v.data(), y.data(), m);
      err = row_pass([&](acc_t* acc, int64_t r0, int64_t r1) {
        return log_rows_entry(p, u, v.data(), u_new, kernel, acc, r0, r1);
      });
    }
    err = p.norm.finish(err);
    if (it == max_iter || (it > 0 && err <= tol) || err != err) break;
    if (scaled) {
      std::swap(x, x_new);
    } else {
      std::swap(u, u_new);
    }
    // Column update: y_j = 1 / col_acc_j while the sums stay in the scaling range; otherwise
    // every column update goes into v and the next iteration rebuilds the kernel.
    // Zero-mass columns (column sum 0) keep y_j = 1 and w_j = 0.
    int out_of_range = 0;
    for (int64_t j = 0; j < m; ++j) out_of_range |= p.b[j] > 0 && !scaling_in_range(col_acc[j]);
    kernel_fresh = !out_of_range;
    if (kernel_fresh) {
      for (int64_t j = 0; j < m; ++j) {
        y[j] = p.b[j] > 0 ? acc_t(1) / col_acc[j] : acc_t(1);
        w[j] = p.b[j] * y[j];
      }
      if (transposed && !scaled) {  // a new kernel
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < m; ++j) kernel_t[j * n + i] = kernel[i * m + j];
      }
    } else {
      absorb(u, x, n);  // the exact columns need the row potentials in log form
      bool all_ok = true;
      for (int64_t j = 0; j < m; ++j) {
        y[j] = 1;
        if (!(p.b[j] > 0)) continue;
        if (warm_sum_ok(col_acc[j])) {
          v[j] -= std::log(col_acc[j]);
        } else {
          all_ok = false;
        }
      }
      if (!all_ok) exact_columns_entry(p, u, col_acc.data(), v.data(), 0, m);
    }
  }
  // The measured iterate: (u + log x, v + log y) after a scaling pass, (u, v) after a log pass.
  const acc_t eps = acc_t(1) / p.inv_eps;
  // The dual value summed in double: a running float sum of the n + m terms was the float32
  // value's largest error (up to 3.5e-6 relative from 500 x 400 to 4000 x 3000, where the
  // same potentials summed in double are within 1e-7).
  double value = 0;
  for (int64_t i = 0; i < n; ++i) {
    out.alpha[i] = eps * (scaled ? u[i] + std::log(x[i]) : u[i]);
    if (p.a[i] > 0) value += double(p.a[i]) * double(out.alpha[i]);
  }
  for (int64_t j = 0; j < m; ++j) {
    out.beta[j] = eps * (scaled ? v[j] + std::log(y[j]) : v[j]);
    if (p.b[j] > 0) value += double(p.b[j]) * double(out.beta[j]);
  }
  set_zero_mass_potentials(p, out.alpha, out.beta);
  // A NaN error (a NaN or -inf cost: the potentials are meaningless) makes the value NaN
  // rather than that of the last finite potentials (0 when it stopped at the first pass).
  *out.value = err == err ? static_cast<acc_t>(value) : std::numeric_limits<acc_t>::quiet_NaN();
  *out.n_iter = it;
  *out.error = err;
  auto plan_pass = [&](int64_t r0, int64_t r1) {
    const ScopedFlushSubnormals task_flush;
    if (scaled) {
      scale_kernel_rows_entry(kernel, p.a, x, w.data(), m, r0, r1);
    } else {
      plan_rows_entry(p, u, v.data(), out.plan, r0, r1);
    }
  };
  if (parallel) {
    at::parallel_for(0, n, grain_for(m), plan_pass);
  } else {
    plan_pass(0, n);
  }
}

template <typename acc_t>
void solve_batch(const acc_t* cost, const acc_t* a, const acc_t* b, const acc_t* log_a, const acc_t* log_b,
                 int64_t B, int64_t n, int64_t m, acc_t inv_eps, int64_t max_iter, acc_t tol, MarginalErrorNorm norm,
                 acc_t* plan, acc_t* alpha, acc_t* beta, acc_t* value, int64_t* n_iter, acc_t* error) {
  auto problem = [&](int64_t k) {
    return Problem<acc_t>{cost + k * n * m, a + k * n, b + k * m, log_a + k * n, log_b + k * m, n, m, inv_eps, norm};
  };
  auto outputs = [&](int64_t k) {
    return Outputs<acc_t>{plan + k * n * m, alpha + k * n, beta + k * m, value + k, n_iter + k, error + k};
  };
  const bool inner_parallel = B < at::get_num_threads() && n * m >= kParallelProblemMin;
  if (inner_parallel) {
    for (int64_t k = 0; k < B; ++k) solve(problem(k), max_iter, tol, true, outputs(k));
  } else {
    // A small problem runs tens of iterations: ~16 problems of 64 x 64 already make a task.
    at::parallel_for(0, B, grain_for(16 * n * m), [&](int64_t b0, int64_t b1) {
      for (int64_t k = b0; k < b1; ++k) solve(problem(k), max_iter, tol, false, outputs(k));
    });
  }
}

// A mass in a message: every digit, as masses a tolerance apart print alike with six.
std::string all_digits(double x) {
  std::ostringstream s;
  s << std::setprecision(17) << x;
  return s.str();
}

// Checks the marginals' values (the CUDA path cannot without a host sync; there an invalid
// problem comes back as NaN instead).
void check_marginals(const at::Tensor& a, const at::Tensor& b, double mass_tol) {
  const auto A = a.accessor<double, 2>();
  const auto Bm = b.accessor<double, 2>();
  for (int64_t k = 0; k < a.size(0); ++k) {
    double sa = 0, sb = 0;
    for (int64_t i = 0; i < a.size(1); ++i) {
      TORCH_CHECK(std::isfinite(A[k][i]) && A[k][i] >= 0, "fastloss.sinkhorn: expected 'a' to be finite and >= 0, ",
                  "got a[", k, ", ", i, "] = ", A[k][i]);
      sa += A[k][i];
    }
    for (int64_t j = 0; j < b.size(1); ++j) {
      TORCH_CHECK(std::isfinite(Bm[k][j]) && Bm[k][j] >= 0, "fastloss.sinkhorn: expected 'b' to be finite and >= 0, ",
                  "got b[", k, ", ", j, "] = ", Bm[k][j]);
      sb += Bm[k][j];
    }
    TORCH_CHECK(sa > 0 && sb > 0, "fastloss.sinkhorn: expected 'a' and 'b' to have positive total mass, got ", sa,
                " and ", sb, " in problem ", k);
    TORCH_CHECK(std::abs(sa - sb) <= mass_tol * std::max(sa, sb), "fastloss.sinkhorn: expected 'a' and 'b' to have ",
                "the same total mass (balanced OT), got ", all_digits(sa), " and ", all_digits(sb), " in problem ", k,
                " (relative difference ", std::abs(sa - sb) / std::max(sa, sb), ", tolerance ", mass_tol, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps, int64_t max_iter, double tol,
    double error_norm) {
  const SinkhornShape s = sinkhorn_args(cost, a, b, eps, max_iter, tol, error_norm);
  const MarginalErrorNorm norm{s.error_norm};
  const auto opts = cost.options().dtype(s.acc_dtype);
  at::Tensor plan = at::empty({s.batch, s.n, s.m}, opts);
  at::Tensor alpha = at::empty({s.batch, s.n}, opts);
  at::Tensor beta = at::empty({s.batch, s.m}, opts);
  at::Tensor value = at::zeros({s.batch}, opts);
  at::Tensor n_iter = at::zeros({s.batch}, opts.dtype(at::kLong));
  at::Tensor error = at::zeros({s.batch}, opts);
  if (s.batch == 0 || s.n == 0 || s.m == 0) return {plan, alpha, beta, value, n_iter, error};
  check_marginals(a.to(at::kDouble), b.to(at::kDouble), sinkhorn_mass_tolerance(a.scalar_type(), b.scalar_type()));
  const at::Tensor c = cost.to(s.acc_dtype).contiguous();
  const at::Tensor av = a.to(s.acc_dtype).contiguous();
  const at::Tensor bv = b.to(s.acc_dtype).contiguous();
  const at::Tensor log_a = av.log();
  const at::Tensor log_b = bv.log();
  if (s.acc_dtype == at::kDouble) {
    solve_batch<double>(c.const_data_ptr<double>(), av.const_data_ptr<double>(), bv.const_data_ptr<double>(),
                        log_a.const_data_ptr<double>(),
                        log_b.const_data_ptr<double>(), s.batch, s.n, s.m, 1.0 / eps, max_iter, tol, norm,
                        plan.mutable_data_ptr<double>(), alpha.mutable_data_ptr<double>(),
                        beta.mutable_data_ptr<double>(), value.mutable_data_ptr<double>(),
                        n_iter.mutable_data_ptr<int64_t>(), error.mutable_data_ptr<double>());
  } else {
    solve_batch<float>(c.const_data_ptr<float>(), av.const_data_ptr<float>(), bv.const_data_ptr<float>(),
                       log_a.const_data_ptr<float>(),
                       log_b.const_data_ptr<float>(), s.batch, s.n, s.m, static_cast<float>(1.0 / eps), max_iter,
                       static_cast<float>(tol), norm, plan.mutable_data_ptr<float>(), alpha.mutable_data_ptr<float>(),
                       beta.mutable_data_ptr<float>(), value.mutable_data_ptr<float>(),
                       n_iter.mutable_data_ptr<int64_t>(), error.mutable_data_ptr<float>());
  }
  return {plan, alpha, beta, value, n_iter, error};
}

// ------------------------------------------------------------------------------------------
// SinKD

// 512-bit generic vectors (GCC/Clang vector extensions; split into narrower registers in the
// clones without AVX-512) and the integer vectors of the same width, for |v| as a bit mask.
template <typename acc_t>
struct Vec512 {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
  typedef acc_t type __attribute__((vector_size(64)));
  typedef bits_t bits __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(acc_t);
  static constexpr bits_t kAbsMask = std::numeric_limits<bits_t>::max();
};

// Rows [r0, r1) of softmax(z / T) (C columns) into p.
template <typename acc_t>
FASTLOSS_CPU_INLINE void softmax_rows(const acc_t* z, acc_t* p, int64_t C, acc_t inv_t, int64_t r0, int64_t r1) {
  using V = Vec512<acc_t>;
  constexpr int L = kLanes<acc_t>;
  static_assert(V::kLanes == L, "the maxima's lanes are the sums' lanes");
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* x = z + r * C;
    acc_t* y = p + r * C;
    acc_t mx[L], part[L];
    for (int l = 0; l < L; ++l) {
      mx[l] = -std::numeric_limits<acc_t>::infinity();
      part[l] = 0;
    }
    // The maxima in an explicit vector, lane for lane fl_max (the lane-array loop ran as L
    // scalar chains: 41% of this function's time, SinKD 32 x 32000 on a 2-core Xeon).
    typename V::type mv;
    std::memcpy(&mv, mx, sizeof(mv));
    int64_t k = 0;
    for (; k + L <= C; k += L) {
      typename V::type xv;
      std::memcpy(&xv, x + k, sizeof(xv));
      mv = mv > xv ? mv : xv;
    }
    std::memcpy(mx, &mv, sizeof(mv));
    for (int l = 0; k + l < C; ++l) mx[l] = fl_max(mx[l], x[k + l]);
    const acc_t top = max_lanes<L>(mx) * inv_t;
    for (k = 0; k < C; ++k) y[k] = sinkhorn_exp(fl_fma(x[k], inv_t, -top));
    k = 0;
    for (; k + L <= C; k += L)
      for (int l = 0; l < L; ++l) part[l] += y[k + l];
    for (int l = 0; k + l < C; ++l) part[l] += y[k + l];
    const acc_t inv_sum = acc_t(1) / sum_lanes<L>(part);
    for (k = 0; k < C; ++k) y[k] *= inv_sum;
  }
}

// dz = p o (dz - sum(dz o p)) / T for rows [r0, r1), in place.
template <typename acc_t>
FASTLOSS_CPU_INLINE void softmax_rows_backward(const acc_t* p, acc_t* dz, int64_t C, acc_t inv_t, int64_t r0,
                                               int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* y = p + r * C;
    acc_t* d = dz + r * C;
    const acc_t dy = dot(d, y, C);
    for (int64_t k = 0; k < C; ++k) d[k] = y[k] * (d[k] - dy) * inv_t;
  }
}

// Tiles of the L1 cdist: kRowTile rows of X against all rows of Y, kClassTile classes at a
// time, so the Y tile (S x kClassTile) stays in L2 while a thread walks its X rows.
constexpr int64_t kClassTile = 512;
constexpr int64_t kRowTile = 4;
// The forward's register block (l1_block): kRowTile rows of X by kColBlock rows of Y, 16
// vector accumulators (of the 32 AVX-512 registers).
constexpr int kColBlock = 4;
// The backward adds kGradBlock rows of Y per read-modify-write of the gradient row.
constexpr int kGradBlock = 8;

// Few classes (C <= kFewClasses): SIMD across the rows of Y instead, with Yt = Y^T (C x S).
constexpr int64_t kFewClasses = 32;

// W_ij += sum_k |X_ik - Y_jk| over classes [k0, k0 + kc) for the RI x RJ block at (i0, j0),
// one vector accumulator per pair, so each loaded vector serves RJ (or RI) pairs. Explicit
// vectors keep the accumulators in registers (with plain arrays GCC kept them in memory).
template <int RI, int RJ, typename acc_t>
FASTLOSS_CPU_INLINE void l1_block(const acc_t* X, const acc_t* Y, acc_t* W, int64_t S, int64_t C, int64_t i0,
                                  int64_t j0, int64_t k0, int64_t kc) {
  using V = Vec512<acc_t>;
  constexpr int N = V::kLanes;
  typename V::type acc[RI][RJ];
  for (int r = 0; r < RI; ++r)
    for (int s = 0; s < RJ; ++s) acc[r][s] = typename V::type{};
  const acc_t* x = X + i0 * C + k0;
  const acc_t* y = Y + j0 * C + k0;
  int64_t k = 0;
  for (; k + N <= kc; k += N) {
    typename V::type xv[RI], yv[RJ];
    for (int r = 0; r < RI; ++r) std::memcpy(&xv[r], x + r * C + k, sizeof(xv[r]));
    for (int s = 0; s < RJ; ++s) std::memcpy(&yv[s], y + s * C + k, sizeof(yv[s]));
    for (int r = 0; r < RI; ++r)
      for (int s = 0; s < RJ; ++s) {
        const typename V::type d = xv[r] - yv[s];
        acc[r][s] += (typename V::type)((typename V::bits)d & V::kAbsMask);
      }
  }
  for (int r = 0; r < RI; ++r)
    for (int s = 0; s < RJ; ++s) {
      acc_t t = 0;
      for (int l = 0; l < N; ++l) t += acc[r][s][l];
      for (int64_t q = k; q < kc; ++q) t += std::abs(x[r * C + q] - y[s * C + q]);
      W[(i0 + r) * S + j0 + s] += t;
    }
}

// Rows [r0, r1) of W_ij = sum_k |X_ik - Y_jk| for X (R x C), Y (S x C), Yt = Y^T.
template <typename acc_t>
FASTLOSS_CPU_INLINE void l1_cdist_rows(const acc_t* X, const acc_t* Y, const acc_t* Yt, acc_t* W, int64_t S,
                                       int64_t C, int64_t r0, int64_t r1) {
  constexpr int L = kLanes<acc_t>;
  if (C <= kFewClasses) {
    for (int64_t i = r0; i < r1; ++i) {
      acc_t* w = W + i * S;
      for (int64_t j = 0; j < S; ++j) w[j] = 0;
      for (int64_t k = 0; k < C; ++k) {
        const acc_t x = X[i * C + k];
        const acc_t* y = Yt + k * S;
        for (int64_t j = 0; j < S; ++j) w[j] += std::abs(x - y[j]);
      }
    }
    return;
  }
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t j = 0; j < S; ++j) W[i * S + j] = 0;
  if (!has_avx512()) {  // 16 vector accumulators would spill the 16 AVX2 registers
    for (int64_t k0 = 0; k0 < C; k0 += kClassTile) {
      const int64_t kc = std::min(kClassTile, C - k0);
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = 0; j < S; ++j) {
          const acc_t* x = X + i * C + k0;
          const acc_t* y = Y + j * C + k0;
          acc_t part[L];
          for (int l = 0; l < L; ++l) part[l] = 0;
          int64_t k = 0;
          for (; k + L <= kc; k += L)
            for (int l = 0; l < L; ++l) part[l] += std::abs(x[k + l] - y[k + l]);
          for (int l = 0; k + l < kc; ++l) part[l] += std::abs(x[k + l] - y[k + l]);
          W[i * S + j] += sum_lanes<L>(part);
        }
    }
    return;
  }
  for (int64_t k0 = 0; k0 < C; k0 += kClassTile) {
    const int64_t kc = std::min(kClassTile, C - k0);
    int64_t i0 = r0;
    for (; i0 + kRowTile <= r1; i0 += kRowTile) {
      int64_t j0 = 0;
      for (; j0 + kColBlock <= S; j0 += kColBlock) l1_block<kRowTile, kColBlock>(X, Y, W, S, C, i0, j0, k0, kc);
      for (; j0 < S; ++j0) l1_block<kRowTile, 1>(X, Y, W, S, C, i0, j0, k0, kc);
    }
    for (; i0 < r1; ++i0)
      for (int64_t j0 = 0; j0 < S; ++j0) l1_block<1, 1>(X, Y, W, S, C, i0, j0, k0, kc);
  }
}

// sign(d) with sign(0) = 0 (torch's), branch-free so the loops below vectorize.
template <typename acc_t>
FASTLOSS_CPU_INLINE acc_t sign_or_zero(acc_t d) {
  return acc_t(d > 0) - acc_t(d < 0);
}

#if defined(FASTLOSS_X86_CLONES)
// The cdist p=1 backward for float with AVX-512 (called when that clone runs): RI rows of dX
// by 32 classes in 2 RI vector accumulators over all S rows of Y; sign(x - y) g as a masked
// add of g where x > y and subtract where x < y, the additions of the portable loop below in
// the same order (the same bits for finite gradients G). `kmask` masks the classes past C in
// the last block.
template <int RI>
__attribute__((target("arch=x86-64-v4"))) inline void l1_grad_tile_avx512(const float* X, const float* Y,
                                                                           const float* G, float* dX, int64_t S,
                                                                           int64_t C, int64_t i0, int64_t k0,
                                                                           __mmask16 m0, __mmask16 m1) {
  __m512 acc[RI][2], x[RI][2];
  for (int r = 0; r < RI; ++r) {
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    x[r][0] = _mm512_maskz_loadu_ps(m0, X + (i0 + r) * C + k0);
    x[r][1] = _mm512_maskz_loadu_ps(m1, X + (i0 + r) * C + k0 + 16);
  }
  for (int64_t j = 0; j < S; ++j) {
    const __m512 y0 = _mm512_maskz_loadu_ps(m0, Y + j * C + k0);
    const __m512 y1 = _mm512_maskz_loadu_ps(m1, Y + j * C + k0 + 16);
    for (int r = 0; r < RI; ++r) {
      const __m512 g = _mm512_set1_ps(G[(i0 + r) * S + j]);
      acc[r][0] = _mm512_mask_add_ps(acc[r][0], _mm512_cmp_ps_mask(x[r][0], y0, _CMP_GT_OQ), acc[r][0], g);
      acc[r][0] = _mm512_mask_sub_ps(acc[r][0], _mm512_cmp_ps_mask(x[r][0], y0, _CMP_LT_OQ), acc[r][0], g);
      acc[r][1] = _mm512_mask_add_ps(acc[r][1], _mm512_cmp_ps_mask(x[r][1], y1, _CMP_GT_OQ), acc[r][1], g);
      acc[r][1] = _mm512_mask_sub_ps(acc[r][1], _mm512_cmp_ps_mask(x[r][1], y1, _CMP_LT_OQ), acc[r][1], g);
    }
  }
  for (int r = 0; r < RI; ++r) {
    _mm512_mask_storeu_ps(dX + (i0 + r) * C + k0, m0, acc[r][0]);
    _mm512_mask_storeu_ps(dX + (i0 + r) * C + k0 + 16, m1, acc[r][1]);
  }
}

// Rows [r0, r1) of dX_ik = sum_j G_ij sign(X_ik - Y_jk) for float, AVX-512: class blocks of 32
// outermost, so a block of Y (S x 32) stays in cache across the row tiles.
__attribute__((target("arch=x86-64-v4"))) inline void l1_grad_rows_avx512(const float* X, const float* Y,
                                                                          const float* G, float* dX, int64_t S,
                                                                          int64_t C, int64_t r0, int64_t r1) {
  for (int64_t k0 = 0; k0 < C; k0 += 32) {
    const int64_t rem = std::min<int64_t>(32, C - k0);
    const __mmask16 m0 = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
    const __mmask16 m1 = rem >= 32 ? __mmask16(0xffff) : (rem > 16 ? __mmask16((1u << (rem - 16)) - 1) : __mmask16(0));
    int64_t i0 = r0;
    for (; i0 + 4 <= r1; i0 += 4) l1_grad_tile_avx512<4>(X, Y, G, dX, S, C, i0, k0, m0, m1);
    for (; i0 < r1; ++i0) l1_grad_tile_avx512<1>(X, Y, G, dX, S, C, i0, k0, m0, m1);
  }
}
#endif

// Rows [r0, r1) of dX_ik = sum_j G_ij sign(X_ik - Y_jk), the cdist p=1 backward (sign(0) = 0
// as in torch), followed by the softmax backward through X = softmax(z / T) in place.
template <typename acc_t>
FASTLOSS_CPU_INLINE void l1_cdist_softmax_grad_rows(const acc_t* X, const acc_t* Y, const acc_t* Yt, const acc_t* G,
                                                    acc_t* dX, int64_t S, int64_t C, acc_t inv_t, int64_t r0,
                                                    int64_t r1) {
  constexpr int L = kLanes<acc_t>;
  if (C <= kFewClasses) {
    for (int64_t i = r0; i < r1; ++i) {
      const acc_t* g = G + i * S;
      for (int64_t k = 0; k < C; ++k) {
        const acc_t x = X[i * C + k];
        const acc_t* y = Yt + k * S;
        acc_t part[L];
        for (int l = 0; l < L; ++l) part[l] = 0;
        int64_t j = 0;
        for (; j + L <= S; j += L)
          for (int l = 0; l < L; ++l) {
            part[l] += g[j + l] * sign_or_zero(x - y[j + l]);
          }
        for (int l = 0; j + l < S; ++l) {
          part[l] += g[j + l] * sign_or_zero(x - y[j + l]);
        }
        dX[i * C + k] = sum_lanes<L>(part);
      }
    }
    softmax_rows_backward(X, dX, C, inv_t, r0, r1);
    return;
  }
#if defined(FASTLOSS_X86_CLONES)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx512()) {
      l1_grad_rows_avx512(X, Y, G, dX, S, C, r0, r1);
      softmax_rows_backward(X, dX, C, inv_t, r0, r1);
      return;
    }
  }
#endif
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t k = 0; k < C; ++k) dX[i * C + k] = 0;
  for (int64_t k0 = 0; k0 < C; k0 += kClassTile) {
    const int64_t kc = std::min(kClassTile, C - k0);
    for (int64_t i0 = r0; i0 < r1; i0 += kRowTile) {
      const int64_t ri = std::min(kRowTile, r1 - i0);
      int64_t j = 0;
      for (; j + kGradBlock <= S; j += kGradBlock) {
        for (int64_t r = 0; r < ri; ++r) {
          const acc_t* x = X + (i0 + r) * C + k0;
          acc_t* d = dX + (i0 + r) * C + k0;
          acc_t g[kGradBlock];
          for (int b = 0; b < kGradBlock; ++b) g[b] = G[(i0 + r) * S + j + b];
          const acc_t* y = Y + j * C + k0;
          for (int64_t k = 0; k < kc; ++k) {
            acc_t t = d[k];  // the same additions, in the same order, as one j at a time
            for (int b = 0; b < kGradBlock; ++b) t += g[b] * sign_or_zero(x[k] - y[b * C + k]);
            d[k] = t;
          }
        }
      }
      for (; j < S; ++j) {
        const acc_t* y = Y + j * C + k0;
        for (int64_t r = 0; r < ri; ++r) {
          const acc_t* x = X + (i0 + r) * C + k0;
          acc_t* d = dX + (i0 + r) * C + k0;
          const acc_t g = G[(i0 + r) * S + j];
          for (int64_t k = 0; k < kc; ++k) d[k] += g * sign_or_zero(x[k] - y[k]);
        }
      }
    }
  }
  softmax_rows_backward(X, dX, C, inv_t, r0, r1);
}

// Rows [r0, r1) of K v (B x B).
template <typename acc_t>
FASTLOSS_CPU_INLINE void matvec_rows(const acc_t* K, const acc_t* v, acc_t* out, int64_t B, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) out[i] = dot(K + i * B, v, B);
}

// Entries [c0, c1) of K^T v (B x B): K streamed row by row, one accumulator per column.
template <typename acc_t>
FASTLOSS_CPU_INLINE void matvec_t_cols(const acc_t* K, const acc_t* v, acc_t* out, int64_t B, int64_t c0, int64_t c1) {
  for (int64_t j = c0; j < c1; ++j) out[j] = 0;
  for (int64_t i = 0; i < B; ++i) {
    const acc_t* k = K + i * B;
    const acc_t vi = v[i];
    for (int64_t j = c0; j < c1; ++j) out[j] += k[j] * vi;
  }
}

// One normalization (or its adjoint) as one pass over K: row i's dot product d_i = K_i . v
// gives a_i = step(i, d_i), and a_i K_i is added to the column sums `col` while the row is
// in L1 (the two mat-vecs K v and K^T a would read K twice). Rows [r0, r1).
template <typename acc_t, typename Step>
FASTLOSS_CPU_INLINE void fused_rows(const acc_t* K, const acc_t* v, acc_t* col, int64_t B, int64_t r0, int64_t r1,
                                    Step step) {
  for (int64_t i = r0; i < r1; ++i) {
    const acc_t* k = K + i * B;
    const acc_t a = step(i, dot(k, v, B));
    for (int64_t j = 0; j < B; ++j) col[j] += k[j] * a;
  }
}

// SinKD's kernel, shifted when there are normalizations (n_iter > 0): K_ij =
// exp(-((W_ij - r_i) - c_j) / eps), r_i = min_k W_ik and c_j = min_i (W_ij - r_i), with the
// first column scaling y_0 = exp(-c / eps) instead of 1. Sinkhorn's iterates, the plan and
// their gradients do not depend on the shifts (the first row normalization cancels r, and
// K diag(y_0) is the unshifted kernel for any c), but every row and every column of K now
// holds a 1: a row or a column whose every exp(-W / eps) underflows stays finite, where a
// reciprocal of its subnormal sum made the loss NaN (float64 rows, float32 columns) while
// the eager formulation's subnormals gave a finite value. n_iter = 0: the plain exp(-W / eps).

// One pass over rows [r0, r1): r_i = min_k W_ik, and c_j = min(c_j, W_ij - r_i) while the row
// is in L1 (the caller starts c at +inf; minima merge exactly, in any order).
template <typename acc_t>
FASTLOSS_CPU_INLINE void shift_minima(const acc_t* W, acc_t* r, acc_t* c, int64_t B, int64_t r0, int64_t r1) {
  constexpr int L = kLanes<acc_t>;
  for (int64_t i = r0; i < r1; ++i) {
    const acc_t* w = W + i * B;
    acc_t neg[L];  // the row's largest -W: its smallest W
    for (int l = 0; l < L; ++l) neg[l] = -std::numeric_limits<acc_t>::infinity();
    int64_t j = 0;
    for (; j + L <= B; j += L)
      for (int l = 0; l < L; ++l) neg[l] = fl_max(neg[l], -w[j + l]);
    for (int l = 0; j + l < B; ++l) neg[l] = fl_max(neg[l], -w[j + l]);
    const acc_t ri = -max_lanes<L>(neg);
    r[i] = ri;
    for (j = 0; j < B; ++j) c[j] = fl_min(c[j], w[j] - ri);
  }
}

// Rows [r0, r1) of K; r and c null for the unshifted kernel.
template <typename acc_t>
FASTLOSS_CPU_INLINE void kernel_rows(const acc_t* W, const acc_t* r, const acc_t* c, acc_t* K, acc_t inv_eps,
                                     int64_t B, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const acc_t* w = W + i * B;
    acc_t* k = K + i * B;
    if (r == nullptr) {
      for (int64_t j = 0; j < B; ++j) k[j] = exp_with_subnormals(-w[j] * inv_eps);
    } else {
      // (W - r) - c rounds as in shift_minima, so it is >= 0 and K <= 1.
      const acc_t ri = r[i];
      for (int64_t j = 0; j < B; ++j) k[j] = exp_with_subnormals(-((w[j] - ri) - c[j]) * inv_eps);
    }
  }
}

#define FASTLOSS_SINKHORN_KD_ENTRIES(T)                                                                       \
  FASTLOSS_CPU_CLONES void softmax_rows_entry(const T* z, T* p, int64_t C, T inv_t, int64_t r0, int64_t r1) { \
    softmax_rows(z, p, C, inv_t, r0, r1);                                                                    \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void l1_cdist_entry(const T* X, const T* Y, const T* Yt, T* W, int64_t S, int64_t C,  \
                                          int64_t r0, int64_t r1) {                                          \
    l1_cdist_rows(X, Y, Yt, W, S, C, r0, r1);                                                                \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void l1_cdist_softmax_grad_entry(const T* X, const T* Y, const T* Yt, const T* G,      \
                                                       T* dX, int64_t S, int64_t C, T inv_t, int64_t r0,     \
                                                       int64_t r1) {                                         \
    l1_cdist_softmax_grad_rows(X, Y, Yt, G, dX, S, C, inv_t, r0, r1);                                        \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void matvec_entry(const T* K, const T* v, T* out, int64_t B, int64_t r0, int64_t r1) { \
    matvec_rows(K, v, out, B, r0, r1);                                                                       \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void matvec_t_entry(const T* K, const T* v, T* out, int64_t B, int64_t c0,             \
                                          int64_t c1) {                                                      \
    matvec_t_cols(K, v, out, B, c0, c1);                                                                     \
  }                                                                                                          \
  /* x_i = 1 / (K y)_i; col += K^T x */                                                                     \
  FASTLOSS_CPU_CLONES void kd_step_entry(const T* K, const T* y, T* x, T* col, int64_t B, int64_t r0,       \
                                         int64_t r1) {                                                       \
    fused_rows(K, y, col, B, r0, r1, [&](int64_t i, T d) { return x[i] = T(1) / d; });                       \
  }                                                                                                          \
  /* w_i = -(x_bar_i + (K u)_i) x_i^2; col += K^T w */                                                       \
  FASTLOSS_CPU_CLONES void kd_adjoint_step_entry(const T* K, const T* u, const T* x_bar, const T* x, T* w,  \
                                                 T* col, int64_t B, int64_t r0, int64_t r1) {                \
    fused_rows(K, u, col, B, r0, r1, [&](int64_t i, T d) { return w[i] = -(x_bar[i] + d) * x[i] * x[i]; });  \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void shift_minima_entry(const T* W, T* r, T* c, int64_t B, int64_t r0, int64_t r1) {  \
    shift_minima(W, r, c, B, r0, r1);                                                                        \
  }                                                                                                          \
  FASTLOSS_CPU_CLONES void kernel_entry(const T* W, const T* r, const T* c, T* K, T inv_eps, int64_t B,      \
                                        int64_t r0, int64_t r1) {                                            \
    kernel_rows(W, r, c, K, inv_eps, B, r0, r1);                                                             \
  }
FASTLOSS_SINKHORN_KD_ENTRIES(float)
FASTLOSS_SINKHORN_KD_ENTRIES(double)
#undef FASTLOSS_SINKHORN_KD_ENTRIES

// The n_iter passes of the normalizations run back to back: up to this many entries (B = 512,
// 1 MiB of float kernel) one thread does a pass faster than two after a fork/join; at
// B = 1024 two threads take ~0.75x the time of one (measured, 2-core Xeon).
constexpr int64_t kSerialMatvecMax = 1 << 18;

template <typename acc_t>
void matvec(const acc_t* K, const acc_t* v, acc_t* out, int64_t B) {
  if (B * B <= kSerialMatvecMax) return matvec_entry(K, v, out, B, int64_t(0), B);
  at::parallel_for(0, B, grain_for(B), [&](int64_t b, int64_t e) { matvec_entry(K, v, out, B, b, e); });
}
template <typename acc_t>
void matvec_t(const acc_t* K, const acc_t* v, acc_t* out, int64_t B) {
  if (B * B <= kSerialMatvecMax) return matvec_t_entry(K, v, out, B, int64_t(0), B);
  at::parallel_for(0, B, std::max<int64_t>(256, grain_for(B)), [&](int64_t b, int64_t e) {
    matvec_t_entry(K, v, out, B, b, e);
  });
}
// How many row ranges a pass over a B x B matrix takes: 1 (serial) for small B (as matvec),
// else ranges of ~64 rows (fine enough to balance the threads), at most 64.
inline int64_t row_parts(int64_t B) {
  return B * B <= kSerialMatvecMax ? 1 : std::min<int64_t>((B + 63) / 64, 64);
}
// col = the column sums of a fused_rows pass, `rows(col, r0, r1)`: row_parts(B) ranges, each
// with its own column sums, run in parallel and added in a fixed order (so the results do not
// depend on the thread count).
template <typename acc_t, typename Rows>
void fused_pass(int64_t B, acc_t* col, const Rows& rows) {
  const int64_t parts = row_parts(B);
  if (parts == 1) {
    std::fill(col, col + B, acc_t(0));
    rows(col, int64_t(0), B);
    return;
  }
  std::vector<acc_t> acc(parts * B, acc_t(0));
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rows(acc.data() + t * B, B * t / parts, B * (t + 1) / parts);
  });
  std::copy(acc.begin(), acc.begin() + B, col);
  for (int64_t t = 1; t < parts; ++t)
    for (int64_t j = 0; j < B; ++j) col[j] += acc[t * B + j];
}
// K (kernel_rows) and, if y0 is not null, the first column scaling y_0 (B entries).
template <typename acc_t>
void kernel_matrix(const acc_t* W, acc_t* K, acc_t inv_eps, int64_t B, int64_t n_iter, acc_t* y0) {
  if (n_iter == 0) {
    at::parallel_for(0, B, grain_for(B), [&](int64_t r0, int64_t r1) {
      kernel_entry(W, static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr), K, inv_eps, B, r0, r1);
    });
    if (y0 != nullptr) std::fill(y0, y0 + B, acc_t(1));
    return;
  }
  // The minima in one pass over W: row ranges as fused_pass's, each with its own column
  // minima, merged after.
  const int64_t parts = row_parts(B);
  std::vector<acc_t> r(B), partial(parts * B, std::numeric_limits<acc_t>::infinity());
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      shift_minima_entry(W, r.data(), partial.data() + t * B, B, B * t / parts, B * (t + 1) / parts);
    }
  });
  for (int64_t t = 1; t < parts; ++t)
    for (int64_t j = 0; j < B; ++j) partial[j] = fl_min(partial[j], partial[t * B + j]);
  const acc_t* c = partial.data();
  at::parallel_for(0, B, grain_for(B), [&](int64_t r0, int64_t r1) {
    kernel_entry(W, static_cast<const acc_t*>(r.data()), c, K, inv_eps, B, r0, r1);
  });
  if (y0 != nullptr) {
    for (int64_t j = 0; j < B; ++j) y0[j] = exp_with_subnormals(-c[j] * inv_eps);
  }
}

// Row tiles of kRowTile rows per task (the cdist kernels work on whole tiles); a tile
// touches kRowTile x S x C elements.
template <typename F>
void for_row_tiles(int64_t R, int64_t S, int64_t C, const F& f) {
  at::parallel_for(0, (R + kRowTile - 1) / kRowTile, grain_for(kRowTile * S * C), [&](int64_t t0, int64_t t1) {
    f(t0 * kRowTile, std::min(R, t1 * kRowTile));
  });
}

// Forward, first part: p_s, p_t (B x C) and the cost W (B x B).
template <typename acc_t>
void sinkhorn_kd_cost_kernel(const acc_t* zs, const acc_t* zt, int64_t B, int64_t C, acc_t inv_t, acc_t* ps,
                             acc_t* pt, acc_t* W) {
  at::parallel_for(0, B, grain_for(2 * C), [&](int64_t b, int64_t e) {
    softmax_rows_entry(zs, ps, C, inv_t, b, e);
    softmax_rows_entry(zt, pt, C, inv_t, b, e);
  });
  std::vector<acc_t> pt_t(C <= kFewClasses ? B * C : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(pt_t.size()) / std::max<int64_t>(C, 1); ++j)
    for (int64_t k = 0; k < C; ++k) pt_t[k * B + j] = pt[j * C + k];
  for_row_tiles(B, B, C, [&](int64_t r0, int64_t r1) { l1_cdist_entry(ps, pt, pt_t.data(), W, B, C, r0, r1); });
}

// For float32 logits the normalizations, and the backward's reverse sweep, run in float32 only
// where they keep clear of subnormal numbers and of float32's range, else in float64 (over the
// float64 kernel of the float32 costs: entries below float32's range count once the scalings
// grow large). In float32:
// * every nonzero kernel entry >= 2^-kKdFloatKernelExponent. Smaller entries made products
//   with the scalings subnormal, which the processor handles on a slow path: at eps =
//   0.005-0.01 a 256 x 3 or 1024 x 3 forward+backward took 10-16x its time at eps = 0.1 (and
//   dropping them shifted the plan once the scalings grew);
// * every scaling within 2^+-kKdFloatScalingExponent, so the products and the backward's
//   squares stay normal. At small eps (T <= 1, eps <= 0.01) the scalings spread by hundreds of
//   powers of two over the iterations (x from 2^-142 to 2^100 after 87 steps: float32 went to
//   inf and NaN, or lost bits in subnormals).
// The forward stops its float32 pass at the first step out of range and starts over in
// float64; the backward decides from the saved scalings (float64 copies), the same way.
constexpr int kKdFloatKernelExponent = 60;
constexpr int kKdFloatScalingExponent = 63;
// Batches this small run in float64 whatever their range: they cost next to nothing, and their
// gradients come out closer to float64's (2 x 3 logits at eps = 0.01: within 1.4e-7, relative,
// where float32 normalizations gave up to 4e-7).
constexpr int64_t kKdFloatMinBatch = 16;

// Whether the float32 normalizations may run at all (the forward and backward both ask): float32
// logits and a batch of kKdFloatMinBatch or more; their range is checked as they go.
bool kd_float_candidate(at::ScalarType acc_dtype, int64_t B) {
  return acc_dtype == at::kFloat && B >= kKdFloatMinBatch;
}

bool kd_kernel_fits_float(const float* K, int64_t B) {
  const float lo = std::ldexp(1.0f, -kKdFloatKernelExponent);
  std::atomic<bool> fits{true};
  at::parallel_for(0, B, grain_for(B), [&](int64_t r0, int64_t r1) {
    int tiny_entries = 0;  // branch-free, so the loop vectorizes
    for (int64_t q = r0 * B; q < r1 * B; ++q) tiny_entries |= int(K[q] < lo) & int(K[q] != 0.0f);
    if (tiny_entries) fits.store(false, std::memory_order_relaxed);
  });
  return fits.load();
}
template <typename T>
bool kd_scalings_fit_float(const T* v, int64_t n) {
  const T lo = std::ldexp(T(1), -kKdFloatScalingExponent), hi = std::ldexp(T(1), kKdFloatScalingExponent);
  for (int64_t i = 0; i < n; ++i)
    if (!(v[i] >= lo && v[i] <= hi)) return false;  // NaN fails too
  return true;
}

// Forward, second part: from the kernel K (B x B), the scaling vectors xs, ys ((n_iter + 1) x B:
// row t is x_t / y_t; x_0 = 1 is written here, y_0 is ys's first row on entry) and the loss,
// in it_t. serves(t) is asked after each step; false stops the pass (and returns false).
template <typename it_t, typename Serves>
bool sinkhorn_kd_normalize_kernel(const it_t* W, const it_t* K, int64_t B, int64_t n_iter, it_t scale, it_t* xs,
                                  it_t* ys, it_t* loss, const Serves& serves) {
  std::vector<it_t> tmp(B);
  for (int64_t i = 0; i < B; ++i) xs[i] = 1;
  for (int64_t t = 1; t <= n_iter; ++t) {
    it_t* x = xs + t * B;
    it_t* y = ys + t * B;
    const it_t* y_prev = ys + (t - 1) * B;
    fused_pass(B, tmp.data(), [&](it_t* col, int64_t r0, int64_t r1) { kd_step_entry(K, y_prev, x, col, B, r0, r1); });
    for (int64_t j = 0; j < B; ++j) y[j] = it_t(1) / tmp[j];
    if (!serves(t)) return false;
  }
  // loss = scale * sum_ij x_i K_ij y_j W_ij = scale * x . ((K o W) y)
  const it_t* x = xs + n_iter * B;
  const it_t* y = ys + n_iter * B;
  std::vector<it_t> kw(B * B);
  at::parallel_for(0, B * B, kMinTaskWork, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) kw[q] = K[q] * W[q];
  });
  matvec(kw.data(), y, tmp.data(), B);
  it_t total = 0;
  for (int64_t i = 0; i < B; ++i) total += x[i] * tmp[i];
  *loss = scale * total;
  return true;
}

// Reverse sweep through the normalizations. With s = grad_loss * scale and M = K o W, the
// adjoints of the final scaling vectors are x_bar = s M y_n and y_bar = s M^T x_n; then for
// t = n..1 (y_t = 1 / K^T x_t, x_t = 1 / K y_{t-1}):
//   u_t = -y_bar o y_t^2,   x_bar += K u_t,   w_t = -x_bar o x_t^2,   y_bar = K^T w_t,
// and x_bar restarts at 0 (x_{t-1} feeds only y_{t-1}). dL/dK is then
//   s (x_n y_n^T) o W + sum_t (x_t u_t^T + w_t y_{t-1}^T) = s (x_n y_n^T) o W + Lf Rf^T,
// a rank-2n product. Fills Lf, Rf (B x 2n).
// cmin holds one constant per column, subtracted from W in M (the column minima of W): the last
// normalization makes every column of P sum to 1 whatever K is, so sum(P o W) and
// sum(P o (W - 1 cmin^T)) have the same derivative through K. The shift keeps the two terms
// of the cost gradient that cancel (s P o W / eps and K o Lf Rf^T / eps) near the size of the
// result; unshifted, that cancellation amplified float32's rounding several-fold.
template <typename acc_t>
void sinkhorn_kd_sweep(const acc_t* W, const acc_t* K, const acc_t* xs, const acc_t* ys, const acc_t* cmin, int64_t B,
                       int64_t n_iter, acc_t s, acc_t* Lf, acc_t* Rf) {
  const int64_t r = 2 * n_iter;
  const acc_t* xn = xs + n_iter * B;
  const acc_t* yn = ys + n_iter * B;
  std::vector<acc_t> kw(B * B), x_bar(B), y_bar(B), tmp(B), w(B);
  at::parallel_for(0, B, grain_for(B), [&](int64_t r0, int64_t r1) {
    for (int64_t q = r0 * B; q < r1 * B; q += B)
      for (int64_t j = 0; j < B; ++j) kw[q + j] = K[q + j] * (W[q + j] - cmin[j]);
  });
  matvec(kw.data(), yn, x_bar.data(), B);
  matvec_t(kw.data(), xn, y_bar.data(), B);
  for (int64_t i = 0; i < B; ++i) {
    x_bar[i] *= s;
    y_bar[i] *= s;
  }
  for (int64_t t = n_iter; t >= 1; --t) {
    const acc_t* x = xs + t * B;
    const acc_t* y = ys + t * B;
    const acc_t* y_prev = ys + (t - 1) * B;
    const int64_t cu = 2 * (t - 1), cw = cu + 1;
    for (int64_t j = 0; j < B; ++j) {
      tmp[j] = -y_bar[j] * y[j] * y[j];
      Lf[j * r + cu] = x[j];
      Rf[j * r + cu] = tmp[j];
    }
    fused_pass(B, y_bar.data(), [&](acc_t* col, int64_t r0, int64_t r1) {
      kd_adjoint_step_entry(K, tmp.data(), x_bar.data(), x, w.data(), col, B, r0, r1);
    });
    for (int64_t i = 0; i < B; ++i) {
      Lf[i * r + cw] = w[i];
      Rf[i * r + cw] = y_prev[i];
      x_bar[i] = 0;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_kd(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double eps, int64_t n_iter,
    double scale) {
  const SinkhornKdShape s = sinkhorn_kd_args(student, teacher, temperature, eps, n_iter, scale);
  const int64_t B = s.batch, C = s.classes;
  const auto opts = student.options().dtype(s.acc_dtype);
  at::Tensor ps = at::empty({B, C}, opts), pt = at::empty({B, C}, opts);
  at::Tensor W = at::empty({B, B}, opts);
  // The scalings are saved in float64 whatever the accumulation dtype (see kd_kernel_fits_float).
  const auto wide = opts.dtype(at::kDouble);
  at::Tensor xs = at::empty({n_iter + 1, B}, wide), ys = at::empty({n_iter + 1, B}, wide);
  at::Tensor loss = at::zeros({}, opts);
  if (B > 0) {
    const at::Tensor zs = student.to(s.acc_dtype).contiguous();
    const at::Tensor zt = teacher.to(s.acc_dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES(s.acc_dtype, "sinkhorn_kd", [&] {
      sinkhorn_kd_cost_kernel<scalar_t>(zs.const_data_ptr<scalar_t>(), zt.const_data_ptr<scalar_t>(), B, C,
                                        scalar_t(1.0 / temperature), ps.mutable_data_ptr<scalar_t>(),
                                        pt.mutable_data_ptr<scalar_t>(), W.mutable_data_ptr<scalar_t>());
    });
    const auto always = [](int64_t) { return true; };
    bool narrow = false;
    if (kd_float_candidate(s.acc_dtype, B)) {
      std::vector<float> K(B * B), xf((n_iter + 1) * B), yf((n_iter + 1) * B);
      float* xp = xf.data();
      float* yp = yf.data();
      kernel_matrix<float>(W.const_data_ptr<float>(), K.data(), float(1.0 / eps), B, n_iter, yp);
      narrow = kd_kernel_fits_float(K.data(), B) && kd_scalings_fit_float(yp, B) &&
               sinkhorn_kd_normalize_kernel<float>(
                   W.const_data_ptr<float>(), K.data(), B, n_iter, float(scale), xp, yp, loss.mutable_data_ptr<float>(),
                   [&](int64_t t) { return kd_scalings_fit_float(xp + t * B, B) && kd_scalings_fit_float(yp + t * B, B); });
      if (narrow) {
        std::copy(xf.begin(), xf.end(), xs.mutable_data_ptr<double>());
        std::copy(yf.begin(), yf.end(), ys.mutable_data_ptr<double>());
      }
    }
    if (!narrow) {
      const at::Tensor W64 = W.to(at::kDouble).contiguous();
      at::Tensor K = at::empty({B, B}, wide), loss64 = at::zeros({}, wide);
      double* k = K.mutable_data_ptr<double>();
      kernel_matrix<double>(W64.const_data_ptr<double>(), k, 1.0 / eps, B, n_iter, ys.mutable_data_ptr<double>());
      sinkhorn_kd_normalize_kernel<double>(W64.const_data_ptr<double>(), k, B, n_iter, scale,
                                           xs.mutable_data_ptr<double>(), ys.mutable_data_ptr<double>(),
                                           loss64.mutable_data_ptr<double>(), always);
      loss = loss64;
    }
  }
  return {loss.to(sinkhorn_kd_loss_dtype(student, teacher)), ps, pt, W, xs, ys};
}

// dL/dW through the normalizations and the loss's sum, in it_t: W, the kernel K (B x B) and
// the saved scalings xs, ys ((n_iter + 1) x B) in it_t; g = grad_loss * scale. For a float32
// gradient (float_output), entries below float32's normal range come out as 0 rather than as
// subnormals, whose products in the cdist backward take the processor's slow path (each
// moves the logits' gradient by less than B x 1.2e-38).
template <typename it_t>
at::Tensor sinkhorn_kd_cost_grad(const at::Tensor& W, const at::Tensor& K, const at::Tensor& xs, const at::Tensor& ys,
                                 int64_t n_iter, double eps, double g_loss, bool float_output) {
  const int64_t B = W.size(0);
  const auto opts = W.options();
  const it_t inv_eps = it_t(1.0 / eps), g = static_cast<it_t>(g_loss);
  const it_t* w = W.const_data_ptr<it_t>();
  const it_t* k = K.const_data_ptr<it_t>();
  // x_n and y_n as m x 2^e, e from frexp clamped to half the exponent range (so 2^e and
  // 2^-e are normal and finite; 0 for 0, inf and NaN). Rows i of Lf and j of Rf are scaled
  // by 2^-e_i, 2^-f_j and K_ij by 2^(e_i + f_j): the product and the bracket below round as
  // unscaled wherever no intermediate leaves the normal range, while neither
  // x_i y_j (1 - W_ij / eps) nor the product overflows where the scalings spread widely.
  const int kMaxShift = std::numeric_limits<it_t>::max_exponent / 2;
  auto split = [kMaxShift](it_t value, it_t* mantissa, it_t* power, it_t* inverse) {
    int e = 0;
    if (std::isfinite(value)) std::frexp(value, &e);
    e = std::min(std::max(e, -kMaxShift), kMaxShift);
    *power = std::ldexp(it_t(1), e);
    *inverse = std::ldexp(it_t(1), -e);
    *mantissa = value * *inverse;  // exact: a power of two within range
  };
  const it_t* xn = xs.const_data_ptr<it_t>() + n_iter * B;
  const it_t* yn = ys.const_data_ptr<it_t>() + n_iter * B;
  std::vector<it_t> mx(B), my(B), px(B), py(B), sx(B), sy(B);
  for (int64_t i = 0; i < B; ++i) {
    split(xn[i], &mx[i], &px[i], &sx[i]);
    split(yn[i], &my[i], &py[i], &sy[i]);
  }
  // The column minima of W (see sinkhorn_kd_sweep); 0 without normalizations, whose P has no
  // column sums to lean on.
  std::vector<it_t> cmin(B, it_t(0));
  if (n_iter > 0) {
    std::fill(cmin.begin(), cmin.end(), std::numeric_limits<it_t>::infinity());
    for (int64_t i = 0; i < B; ++i)
      for (int64_t j = 0; j < B; ++j) cmin[j] = fl_min(cmin[j], w[i * B + j]);
  }
  at::Tensor G = at::zeros({B, B}, opts);
  if (n_iter > 0) {
    at::Tensor Lf = at::empty({B, 2 * n_iter}, opts), Rf = at::empty({B, 2 * n_iter}, opts);
    it_t* lf = Lf.mutable_data_ptr<it_t>();
    it_t* rf = Rf.mutable_data_ptr<it_t>();
    sinkhorn_kd_sweep<it_t>(w, k, xs.const_data_ptr<it_t>(), ys.const_data_ptr<it_t>(), cmin.data(), B, n_iter, g, lf,
                            rf);
    const int64_t r = 2 * n_iter;
    for (int64_t i = 0; i < B; ++i) {
      for (int64_t c = 0; c < r; ++c) {
        lf[i * r + c] *= sx[i];
        rf[i * r + c] *= sy[i];
      }
    }
    at::mm_out(G, Lf, Rf.t());
  }
  // dL/dW = K o (s x y^T (1 - (W - cmin) / eps) - (Lf Rf^T) / eps), in the scaled factors.
  it_t* gw = G.mutable_data_ptr<it_t>();
  const it_t lo = float_output ? it_t(std::numeric_limits<float>::min()) : it_t(0);
  at::parallel_for(0, B, grain_for(B), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t j = 0; j < B; ++j) {
        const int64_t q = i * B + j;
        const it_t v =
            k[q] * px[i] * py[j] * (g * mx[i] * my[j] * (it_t(1) - (w[q] - cmin[j]) * inv_eps) - gw[q] * inv_eps);
        gw[q] = std::abs(v) < lo ? it_t(0) : v;
      }
  });
  return G;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_kd_backward(const at::Tensor& grad_loss, const at::Tensor& ps,
                                                        const at::Tensor& pt, const at::Tensor& W,
                                                        const at::Tensor& xs, const at::Tensor& ys,
                                                        double temperature, double eps, double scale,
                                                        bool student_grad, bool teacher_grad,
                                                        c10::ScalarType student_dtype, c10::ScalarType teacher_dtype) {
  const SinkhornKdBackwardShape s =
      sinkhorn_kd_backward_args(grad_loss, ps, pt, W, xs, ys, temperature, eps, scale, student_dtype,
                                teacher_dtype);
  const int64_t B = s.batch, C = s.classes, n_iter = s.n_iter;
  const auto opts = ps.options();
  if (B == 0 || C == 0 || !(student_grad || teacher_grad)) {
    return {at::zeros({student_grad ? B : 0, student_grad ? C : 0}, opts.dtype(student_dtype)),
            at::zeros({teacher_grad ? B : 0, teacher_grad ? C : 0}, opts.dtype(teacher_dtype))};
  }
  // The cost gradient in float64 where the forward's normalizations ran in it.
  const double g_loss = grad_loss.to(at::kDouble).item<double>() * scale;
  const at::Tensor Wc = W.contiguous();
  at::Tensor G;
  if (kd_float_candidate(ps.scalar_type(), B)) {
    const at::Tensor xc = xs.contiguous(), yc = ys.contiguous();
    at::Tensor K;
    if (kd_scalings_fit_float(xc.const_data_ptr<double>(), xc.numel()) &&
        kd_scalings_fit_float(yc.const_data_ptr<double>(), yc.numel())) {
      K = at::empty({B, B}, opts);
      kernel_matrix<float>(Wc.const_data_ptr<float>(), K.mutable_data_ptr<float>(), float(1.0 / eps), B, n_iter,
                           nullptr);
    }
    if (K.defined() && kd_kernel_fits_float(K.const_data_ptr<float>(), B)) {
      G = sinkhorn_kd_cost_grad<float>(Wc, K, xs.to(at::kFloat).contiguous(), ys.to(at::kFloat).contiguous(), n_iter,
                                       eps, g_loss, /*float_output=*/true);
    }
  }
  if (!G.defined()) {
    const at::Tensor W64 = Wc.to(at::kDouble);
    at::Tensor K = at::empty({B, B}, W64.options());
    kernel_matrix<double>(W64.const_data_ptr<double>(), K.mutable_data_ptr<double>(), 1.0 / eps, B, n_iter, nullptr);
    const bool float_output = ps.scalar_type() == at::kFloat;
    G = sinkhorn_kd_cost_grad<double>(W64, K, xs.contiguous(), ys.contiguous(), n_iter, eps, g_loss, float_output)
            .to(ps.scalar_type());
  }
  at::Tensor d_student, d_teacher;
  AT_DISPATCH_FLOATING_TYPES(ps.scalar_type(), "sinkhorn_kd_backward", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1.0 / temperature);
    const at::Tensor psc = ps.contiguous(), ptc = pt.contiguous();
    // Transposed copies for the few-classes kernels (SIMD across rows).
    const bool few = C <= kFewClasses;
    const at::Tensor ptc_t = few && student_grad ? ptc.t().contiguous() : ptc;
    const at::Tensor psc_t = few && teacher_grad ? psc.t().contiguous() : psc;
    const acc_t* gw = G.const_data_ptr<acc_t>();
    if (student_grad) {
      at::Tensor d = at::empty({B, C}, opts);
      acc_t* dp = d.mutable_data_ptr<acc_t>();
      for_row_tiles(B, B, C, [&](int64_t r0, int64_t r1) {
        l1_cdist_softmax_grad_entry(psc.const_data_ptr<acc_t>(), ptc.const_data_ptr<acc_t>(),
                                    ptc_t.const_data_ptr<acc_t>(), gw, dp, B, C, inv_t, r0, r1);
      });
      d_student = d.to(student_dtype);
    }
    if (teacher_grad) {
      // dW/dp_t = -sign(p_s - p_t) = sign(p_t - p_s): the same kernel with the roles swapped.
      const at::Tensor Gt = G.t().contiguous();
      at::Tensor d = at::empty({B, C}, opts);
      acc_t* dp = d.mutable_data_ptr<acc_t>();
      for_row_tiles(B, B, C, [&](int64_t r0, int64_t r1) {
        l1_cdist_softmax_grad_entry(ptc.const_data_ptr<acc_t>(), psc.const_data_ptr<acc_t>(),
                                    psc_t.const_data_ptr<acc_t>(), Gt.const_data_ptr<acc_t>(), dp, B, C, inv_t, r0,
                                    r1);
      });
      d_teacher = d.to(teacher_dtype);
    }
  });
  if (!d_student.defined()) d_student = at::zeros({0, 0}, opts.dtype(student_dtype));
  if (!d_teacher.defined()) d_teacher = at::zeros({0, 0}, opts.dtype(teacher_dtype));
  return {d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("sinkhorn", &sinkhorn);
  m.impl("sinkhorn_kd", &sinkhorn_kd);
  m.impl("sinkhorn_kd_backward", &sinkhorn_kd_backward);
}

}  // namespace fastloss::cpu
