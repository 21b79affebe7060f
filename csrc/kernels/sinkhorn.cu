// Batched log-domain Sinkhorn on CUDA (Cuturi 2013; log-domain stabilization as in
// Schmitzer 2019, arXiv 1610.06519). The arithmetic is common/sinkhorn_math.h, shared with
// the CPU: scaled potentials u, v, warm-shifted log-sum-exp sums with an exact redo, and the
// row-marginal error read off the row pass for free, so convergence is checked every
// iteration and each problem stops on its own, with no host synchronization.
//
// Two shapes:
//   block  one thread block per problem (many small problems: SinKD batches, per-sample
//          problems). The cost lives in shared memory when it fits (one read from DRAM per
//          solve), otherwise it is re-read from global memory, where the working set of a
//          wave of problems stays in L2. Row pass: one warp per row; column pass: one thread
//          per column (coalesced across the warp).
//   grid   few large problems (n = m = 4096 to 16384): one cooperative launch per problem,
//          the whole iteration loop inside the kernel with grid-wide barriers. Each pass
//          streams the cost once from DRAM (memory-bound): the row pass has one warp per row,
//          the column pass splits rows into chunks whose per-column partial sums (and maxima,
//          for the exact redo) merge after a barrier. 2 reads of the cost per iteration.
//          Where cooperative launches are unavailable or too large for the device's share of
//          SMs, these problems take the block path if its vectors fit in shared memory.
// Marginals are validated on the device (finite, >= 0, equal positive mass); an invalid
// problem returns NaN results, as a check would otherwise need a host synchronization.
#include "kernels/sinkhorn.cuh"

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/sinkhorn_math.h"
#include "kernels/device_utils.cuh"

namespace fastloss::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Two resident blocks per SM cap registers at 128 per thread: without a minimum, ptxas
// picked caps that spilled the double kernels on sm_80.
constexpr int kMinBlocksPerSm = 2;
// Largest shared-memory request (opt-in above 48 KB, capped by the device's opt-in limit);
// larger costs stay in global memory.
constexpr size_t kMaxSmemBytes = 160 * 1024;
// Problems of at most this many entries always take the block path.
constexpr int64_t kBlockPathMaxEntries = 1 << 16;

// The maximum as the CPU takes it (fl_max, common/exp_pair.h). Unlike MaxOp's fmax it does not
// ignore NaN in every position, so lanes may disagree where a NaN took part: the callers'
// sums over the same values turn NaN in every lane, or exclude NaN before.
struct FlMaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return fl_max(a, b);
  }
};
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_allreduce(v, SumOp{}, 32);
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  return warp_allreduce(v, FlMaxOp{}, 32);
}

// Sum over the block; every thread gets the same bits (device_utils' block_allreduce, whose
// leading barrier makes back-to-back calls safe). `scratch` holds >= kWarps values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  return block_allreduce<kThreads>(v, SumOp{}, scratch);
}

// A warp's LSE_j(log b_j + v_j - C_ij / eps) over one row, warm-shifted by -u_i: returns
// the new u_i = -LSE and the row-marginal ratio r_i / a_i under the previous iterate.
// `load_v(j)` gives v_j; zero-mass columns take no part (masked_exponent).
template <typename T, typename LoadV>
__device__ __forceinline__ void warp_row_update(const T* c, const T* lb, int64_t m, T inv_eps, T u_old, LoadV load_v,
                                                T& u_new, T& ratio) {
  const int lane = threadIdx.x & 31;
  T s = 0;
  for (int64_t j = lane; j < m; j += 32) s += sinkhorn_exp(masked_exponent(lb[j], c[j], inv_eps, lb[j] + load_v(j) + u_old));
  s = warp_sum(s);
  if (warm_sum_ok(s)) {
    u_new = u_old - dev_log(s);
    ratio = s;
    return;
  }
  // From -inf as on the CPU: a row with no finite term gets u = NaN (-inf - -inf), not +inf.
  T mx = -dev_inf<T>();
  for (int64_t j = lane; j < m; j += 32) mx = fl_max(mx, masked_exponent(lb[j], c[j], inv_eps, lb[j] + load_v(j)));
  mx = warp_max(mx);
  s = 0;
  for (int64_t j = lane; j < m; j += 32) s += sinkhorn_exp(masked_exponent(lb[j], c[j], inv_eps, lb[j] + load_v(j) - mx));
  s = warp_sum(s);
  const T lse = mx + dev_log(s);
  u_new = -lse;
  ratio = dev_exp(lse + u_old);  // unclamped, as the CPU: an overflowing ratio reports error inf
}

// zero_mass_potential of a zero-mass row, by a warp: -LSE_j exponent(j) over j < m. The
// warp's decisions (any NaN, finite maximum) are uniform after the reductions.
template <typename T, typename Exponent>
__device__ T warp_zero_mass_potential(int64_t m, Exponent exponent) {
  const int lane = threadIdx.x & 31;
  T top = -dev_inf<T>();
  bool any_nan = false;
  for (int64_t j = lane; j < m; j += 32) {
    const T x = exponent(j);
    any_nan |= x != x;
    if (x == x) top = fl_max(top, x);
  }
  top = warp_max(top);
  any_nan = __any_sync(kFullMask, any_nan);
  T s = 0;
  if (!any_nan && top - top == T(0))
    for (int64_t j = lane; j < m; j += 32) s += sinkhorn_exp(exponent(j) - top);
  return zero_mass_potential(top, warp_sum(s), any_nan);
}

// Writes the potentials of problem k and returns this thread's share of its value: massed
// rows and columns from the measured (u, v) (load_u, load_v), zero-mass ones as c-transforms
// of the other side's (zero_mass_potential), as on the CPU. Threads take rows and columns
// first, first + stride, ...; warps take zero-mass rows warp, warp + warps, ...
template <typename T, typename LoadU, typename LoadV>
__device__ T write_potentials(const SinkhornArgs<T>& p, int64_t k, const T* C, const T* la, const T* lb, LoadU load_u,
                              LoadV load_v, int64_t first, int64_t stride, int64_t warp, int64_t warps) {
  const int64_t n = p.n, m = p.m;
  const T* a = p.a + k * n;
  const T* b = p.b + k * m;
  const T inv_eps = p.inv_eps, eps = T(1) / inv_eps;
  T val = 0;
  for (int64_t i = first; i < n; i += stride) {
    if (!(a[i] > 0)) continue;
    const T al = eps * load_u(i);
    p.alpha[k * n + i] = al;
    val += a[i] * al;
  }
  for (int64_t j = first; j < m; j += stride) {
    if (b[j] > 0) {
      const T be = eps * load_v(j);
      p.beta[k * m + j] = be;
      val += b[j] * be;
    } else {
      p.beta[k * m + j] = eps * zero_mass_c_transform<T>(n, [&](int64_t i) {
        return masked_exponent(la[i], C[i * m + j], inv_eps, la[i] + load_u(i));
      });
    }
  }
  for (int64_t i = warp; i < n; i += warps) {  // warp-uniform
    if (a[i] > 0) continue;
    const T* c = C + i * m;
    const T pot = warp_zero_mass_potential<T>(m, [&](int64_t j) { return masked_exponent(lb[j], c[j], inv_eps, lb[j] + load_v(j)); });
    if ((threadIdx.x & 31) == 0) p.alpha[k * n + i] = eps * pot;
  }
  return val;
}

// Marginal validity of problem k, computed by the whole block. The masses are summed in double,
// as the CPU does: float32 sums of float64 marginals are off by more than their tolerance (1e-6).
// `scratch` is 8-byte aligned and holds >= kWarps doubles.
template <typename T>
__device__ bool block_marginals_valid(const SinkhornArgs<T>& p, int64_t k, void* scratch) {
  double sa = 0, sb = 0, bad = 0;
  for (int64_t i = threadIdx.x; i < p.n; i += kThreads) {
    const T x = p.a[k * p.n + i];
    bad += (x >= 0 && x - x == T(0)) ? 0.0 : 1.0;  // nonnegative and finite, like the CPU
    sa += static_cast<double>(x);
  }
  for (int64_t j = threadIdx.x; j < p.m; j += kThreads) {
    const T x = p.b[k * p.m + j];
    bad += (x >= 0 && x - x == T(0)) ? 0.0 : 1.0;  // nonnegative and finite, like the CPU
    sb += static_cast<double>(x);
  }
  sa = block_allreduce<kThreads>(sa, SumOp{}, scratch);
  sb = block_allreduce<kThreads>(sb, SumOp{}, scratch);
  bad = block_allreduce<kThreads>(bad, SumOp{}, scratch);
  const double diff = sa > sb ? sa - sb : sb - sa;
  return bad == 0 && sa > 0 && sb > 0 && diff <= p.mass_tol * (sa > sb ? sa : sb);
}

template <typename T>
__device__ void write_invalid(const SinkhornArgs<T>& p, int64_t k, int64_t first, int64_t stride) {
  const T nan = dev_nan<T>();
  for (int64_t q = first; q < p.n * p.m; q += stride) p.plan[k * p.n * p.m + q] = nan;
  for (int64_t i = first; i < p.n; i += stride) p.alpha[k * p.n + i] = nan;
  for (int64_t j = first; j < p.m; j += stride) p.beta[k * p.m + j] = nan;
  if (first == 0) {
    p.value[k] = nan;
    p.error[k] = nan;
    p.n_iter[k] = 0;
  }
}

// -------------------------------------------------------------------------------------------
// Block path: one problem per block.

template <typename T>
size_t block_smem_bytes(int64_t n, int64_t m, bool cost_in_smem) {
  // Reduction scratch (first: 8-byte aligned for block_marginals_valid's doubles); u, u_new,
  // log a (n each); v, log b (m each); the cost.
  const size_t vectors = static_cast<size_t>(3 * n + 2 * m + 2 * (kWarps + 1)) * sizeof(T);
  return vectors + (cost_in_smem ? static_cast<size_t>(n * m) * sizeof(T) : 0);
}

template <typename T, bool kCostInSmem>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) sinkhorn_block_kernel(SinkhornArgs<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t n = p.n, m = p.m, k = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T* red = reinterpret_cast<T*>(smem_raw);
  T* u = red + 2 * (kWarps + 1);
  T* u_new = u + n;
  T* la = u_new + n;
  T* v = la + n;
  T* lb = v + m;
  T* cost_sm = lb + m;
  const T* gcost = p.cost + k * n * m;
  const T* C = kCostInSmem ? cost_sm : gcost;

  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    u[i] = 0;
    u_new[i] = 0;  // a zero-mass row's u is never updated
    la[i] = p.log_a[k * n + i];
  }
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    v[j] = 0;
    lb[j] = p.log_b[k * m + j];
  }
  if constexpr (kCostInSmem) {
    for (int64_t q = threadIdx.x; q < n * m; q += kThreads) cost_sm[q] = gcost[q];
  }
  if (!block_marginals_valid(p, k, red)) {  // block_sum's barriers also publish the loads above
    write_invalid(p, k, threadIdx.x, kThreads);
    return;
  }
  const T inv_eps = p.inv_eps;
  const T* a = p.a + k * n;
  const MarginalErrorNorm norm{p.error_norm};
  T err = 0;
  int64_t it = 0;
  for (;; ++it) {
    // Row pass: u_new from v, and the error of the current (u, v).
    T err_part = 0;
    for (int64_t i = warp; i < n; i += kWarps) {
      const T ai = a[i];
      if (!(ai > 0)) continue;  // a zero-mass row takes no part (its potential is set at the end)
      T un, ratio;
      warp_row_update(C + i * m, lb, m, inv_eps, u[i], [&](int64_t j) { return v[j]; }, un, ratio);
      if (lane == 0) {
        u_new[i] = un;
        err_part = norm(err_part, norm.term(ai * fabs(ratio - T(1))));
      }
    }
    err = norm.finish(block_allreduce<kThreads>(err_part, norm, red));  // uniform across the block
    if (it == p.max_iter || (it > 0 && err <= p.tol) || err != err) break;  // as on the CPU: never the start
    T* t = u;
    u = u_new;
    u_new = t;
    // Column pass: one thread per column, warm-shifted by -v_j. A zero-mass column's v is never
    // used (the row passes mask it): its potential is set at the end.
    for (int64_t j = threadIdx.x; j < m; j += kThreads) {
      if (!has_mass(lb[j])) continue;
      const T vj = v[j];
      T s = 0;
      for (int64_t i = 0; i < n; ++i) s += sinkhorn_exp(masked_exponent(la[i], C[i * m + j], inv_eps, la[i] + u[i] + vj));
      if (warm_sum_ok(s)) {
        v[j] = vj - dev_log(s);
        continue;
      }
      T mx = -dev_inf<T>();  // as on the CPU: no finite term gives v = NaN, not +inf
      for (int64_t i = 0; i < n; ++i) mx = fl_max(mx, masked_exponent(la[i], C[i * m + j], inv_eps, la[i] + u[i]));
      s = 0;
      for (int64_t i = 0; i < n; ++i) s += sinkhorn_exp(masked_exponent(la[i], C[i * m + j], inv_eps, la[i] + u[i] - mx));
      v[j] = -(mx + dev_log(s));
    }
    __syncthreads();
  }
  const T val = block_sum(write_potentials(p, k, C, la, lb, [&](int64_t i) { return u[i]; },
                                           [&](int64_t j) { return v[j]; }, threadIdx.x, kThreads, warp, kWarps),
                          red);
  if (threadIdx.x == 0) {
    p.value[k] = err == err ? val : dev_nan<T>();  // NaN error: NaN value (as on the CPU)
    p.error[k] = err;
    p.n_iter[k] = it;
  }
  T* plan = p.plan + k * n * m;
  for (int64_t q = threadIdx.x; q < n * m; q += kThreads) {
    const int64_t i = q / m, j = q - i * m;
    plan[q] = plan_entry(C[q], inv_eps, la[i], la[i] + u[i], lb[j], v[j]);
  }
}

// The block path needs its vectors in shared memory; then it takes small problems, and any
// batch large enough to fill the GPU with one block per problem.
template <typename T>
bool use_block_path(int64_t batch, int64_t n, int64_t m, int sms, size_t smem_cap) {
  if (block_smem_bytes<T>(n, m, false) > smem_cap) return false;
  return n * m <= kBlockPathMaxEntries || batch >= 2 * static_cast<int64_t>(sms);
}

// -------------------------------------------------------------------------------------------
// Grid path: one cooperative launch per problem.

// Workspace layout (offsets in elements of T, then the stamps).
template <typename T>
struct GridWorkspace {
  T* u;          // n
  T* u_new;      // n
  T* v;          // m
  T* shift;      // m: column maxima, the shifts of the exact redo
  T* part_sum;   // chunks x m
  T* part_max;   // chunks x m
  T* block_part; // blocks
  unsigned long long* exact_stamp;  // 1: iteration + 1 of the last exact redo
  // m: 1 where a column's warm sum left the safe range. A flag of its own: every value of a
  // shift (+-inf, NaN included) is a real one whose redo gives that column's v (NaN, say).
  unsigned char* redo;
  int64_t chunks, chunk_rows;
};

struct GridPlan {
  int blocks = 0;
  int64_t chunks = 0, chunk_rows = 0;
};

template <typename T>
size_t grid_workspace_bytes(int64_t n, int64_t m, const GridPlan& g) {
  const size_t elems = static_cast<size_t>(2 * n + 2 * m + 2 * g.chunks * m + g.blocks);
  return elems * sizeof(T) + 2 * sizeof(unsigned long long) + 64 + static_cast<size_t>(m);
}

template <typename T>
GridWorkspace<T> carve(void* ws, int64_t n, int64_t m, const GridPlan& g) {
  GridWorkspace<T> w;
  T* p = static_cast<T*>(ws);
  w.u = p;
  p += n;
  w.u_new = p;
  p += n;
  w.v = p;
  p += m;
  w.shift = p;
  p += m;
  w.part_sum = p;
  p += g.chunks * m;
  w.part_max = p;
  p += g.chunks * m;
  w.block_part = p;
  p += g.blocks;
  uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  addr = (addr + 15) & ~uintptr_t(15);
  w.exact_stamp = reinterpret_cast<unsigned long long*>(addr);
  w.redo = reinterpret_cast<unsigned char*>(w.exact_stamp + 2);
  w.chunks = g.chunks;
  w.chunk_rows = g.chunk_rows;
  return w;
}

// Values written by other blocks are read past L1 (which is not coherent across SMs).
template <typename T>
__device__ __forceinline__ T ld_shared_global(const T* p) {
  return __ldcg(p);
}

// The block_part values combined by `op` over blocks, in the same order in every block (so
// every block takes the same decisions). Result in every thread.
template <typename T, typename Op>
__device__ T grid_total(const T* block_part, int blocks, Op op, T* scratch) {
  T s = 0;
  if (threadIdx.x < 32) {
    for (int b = threadIdx.x; b < blocks; b += 32) s = op(s, ld_shared_global(block_part + b));
    s = warp_allreduce(s, op, 32);
    if (threadIdx.x == 0) scratch[0] = s;
  }
  __syncthreads();
  const T total = scratch[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) sinkhorn_grid_kernel(SinkhornArgs<T> p, GridWorkspace<T> w, int64_t k) {
  cg::grid_group grid = cg::this_grid();
  __shared__ __align__(8) T red[2 * (kWarps + 1)];  // 8-byte aligned: see block_marginals_valid
  const int64_t n = p.n, m = p.m;
  const int lane = threadIdx.x & 31;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t gwarp = tid >> 5, nwarps = nthreads >> 5;
  const T* C = p.cost + k * n * m;
  const T* la = p.log_a + k * n;
  const T* lb = p.log_b + k * m;
  const T* a = p.a + k * n;
  const T inv_eps = p.inv_eps;

  for (int64_t i = tid; i < n; i += nthreads) {
    w.u[i] = 0;
    w.u_new[i] = 0;  // a zero-mass row's u is never updated
  }
  for (int64_t j = tid; j < m; j += nthreads) w.v[j] = 0;
  if (tid == 0) *w.exact_stamp = 0;
  // Every block checks the marginals itself (they are small); the answer is uniform.
  const bool valid = block_marginals_valid(p, k, red);
  grid.sync();
  if (!valid) {
    write_invalid(p, k, tid, nthreads);
    return;
  }
  T* u = w.u;
  T* u_new = w.u_new;
  const MarginalErrorNorm norm{p.error_norm};
  T err = 0;
  int64_t it = 0;
  const int64_t col_tiles = (m + kThreads - 1) / kThreads;
  for (;; ++it) {
    // Row pass: one warp per row.
    T err_part = 0;
    for (int64_t i = gwarp; i < n; i += nwarps) {
      if (!(a[i] > 0)) continue;  // a zero-mass row takes no part (its potential is set at the end)
      T un, ratio;
      warp_row_update(C + i * m, lb, m, inv_eps, ld_shared_global(u + i),
                      [&](int64_t j) { return ld_shared_global(w.v + j); }, un, ratio);
      if (lane == 0) {
        u_new[i] = un;
        err_part = norm(err_part, norm.term(a[i] * fabs(ratio - T(1))));
      }
    }
    err_part = block_allreduce<kThreads>(err_part, norm, red);
    if (threadIdx.x == 0) w.block_part[blockIdx.x] = err_part;
    grid.sync();
    err = norm.finish(grid_total(w.block_part, gridDim.x, norm, red + kWarps + 1));
    if (it == p.max_iter || (it > 0 && err <= p.tol) || err != err) break;  // uniform across the grid
    T* t = u;
    u = u_new;
    u_new = t;
    // Column pass, 1: per (row chunk, column) partial warm sums and maxima.
    for (int64_t task = blockIdx.x; task < w.chunks * col_tiles; task += gridDim.x) {
      const int64_t chunk = task / col_tiles;
      const int64_t j = (task - chunk * col_tiles) * kThreads + threadIdx.x;
      if (j >= m || !has_mass(lb[j])) continue;  // a zero-mass column's v is set at the end
      const int64_t i0 = chunk * w.chunk_rows;
      const int64_t i1 = i0 + w.chunk_rows < n ? i0 + w.chunk_rows : n;
      const T vj = ld_shared_global(w.v + j);
      T s = 0;
      T mx = -dev_inf<T>();  // as on the CPU: no finite term gives v = NaN, not +inf
      for (int64_t i = i0; i < i1; ++i) {
        const T x = masked_exponent(la[i], C[i * m + j], inv_eps, la[i] + ld_shared_global(u + i));
        mx = fl_max(mx, x);
        s += sinkhorn_exp(x + vj);
      }
      w.part_sum[chunk * m + j] = s;
      w.part_max[chunk * m + j] = mx;
    }
    grid.sync();
    // Column pass, 2: merge; columns whose warm sum left the safe range are flagged for an
    // exact redo, with their maximum as the shift. A NaN term that fl_max dropped from the
    // maximum is still in the redo's sum (the same exponent), so v comes out NaN, as on the CPU.
    bool any_exact = false;
    for (int64_t j = tid; j < m; j += nthreads) {
      if (!has_mass(lb[j])) {
        w.redo[j] = false;
        continue;
      }
      T s = 0, mx = -dev_inf<T>();
      for (int64_t c = 0; c < w.chunks; ++c) {
        s += ld_shared_global(w.part_sum + c * m + j);
        mx = fl_max(mx, ld_shared_global(w.part_max + c * m + j));
      }
      const bool redo = !warm_sum_ok(s);  // also for NaN
      w.redo[j] = redo;
      if (redo) {
        w.shift[j] = mx;
        any_exact = true;
      } else {
        w.v[j] = ld_shared_global(w.v + j) - dev_log(s);
      }
    }
    if (any_exact) atomicMax(w.exact_stamp, static_cast<unsigned long long>(it + 1));
    grid.sync();
    if (ld_shared_global(w.exact_stamp) == static_cast<unsigned long long>(it + 1)) {
      for (int64_t task = blockIdx.x; task < w.chunks * col_tiles; task += gridDim.x) {
        const int64_t chunk = task / col_tiles;
        const int64_t j = (task - chunk * col_tiles) * kThreads + threadIdx.x;
        if (j >= m) continue;
        if (!ld_shared_global(w.redo + j)) continue;
        const T sh = ld_shared_global(w.shift + j);
        const int64_t i0 = chunk * w.chunk_rows;
        const int64_t i1 = i0 + w.chunk_rows < n ? i0 + w.chunk_rows : n;
        T s = 0;
        for (int64_t i = i0; i < i1; ++i)
          s += sinkhorn_exp(masked_exponent(la[i], C[i * m + j], inv_eps, la[i] + ld_shared_global(u + i) - sh));
        w.part_sum[chunk * m + j] = s;
      }
      grid.sync();
      for (int64_t j = tid; j < m; j += nthreads) {
        if (!ld_shared_global(w.redo + j)) continue;
        const T sh = ld_shared_global(w.shift + j);
        T s = 0;
        for (int64_t c = 0; c < w.chunks; ++c) s += ld_shared_global(w.part_sum + c * m + j);
        w.v[j] = -(sh + dev_log(s));
      }
      grid.sync();
    }
  }
  // Results: potentials, value, plan.
  const T val = block_sum(
      write_potentials(p, k, C, la, lb, [&](int64_t i) { return ld_shared_global(u + i); },
                       [&](int64_t j) { return ld_shared_global(w.v + j); }, tid, nthreads, gwarp, nwarps),
      red);
  // block_part was last read (for err) before the barrier that ends the final row pass:
  // every block has read it, since all blocks passed that barrier and read it right after.
  grid.sync();
  if (threadIdx.x == 0) w.block_part[blockIdx.x] = val;
  grid.sync();
  if (blockIdx.x == 0) {
    const T total = grid_total(w.block_part, gridDim.x, SumOp{}, red + kWarps + 1);
    if (threadIdx.x == 0) {
      p.value[k] = err == err ? total : dev_nan<T>();  // NaN error: NaN value (as on the CPU)
      p.error[k] = err;
      p.n_iter[k] = it;
    }
  }
  T* plan = p.plan + k * n * m;
  for (int64_t i = gwarp; i < n; i += nwarps) {
    const T lai = la[i];
    const T zi = lai + ld_shared_global(u + i);
    for (int64_t j = lane; j < m; j += 32)
      plan[i * m + j] = plan_entry(C[i * m + j], inv_eps, lai, zi, lb[j], ld_shared_global(w.v + j));
  }
}

// -------------------------------------------------------------------------------------------
// Path choice and launch

template <typename T>
cudaError_t grid_plan(int64_t n, int64_t m, const DeviceInfo& dev, GridPlan& g) {
  int per_sm = 0, coop = 0;
  cudaError_t e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev.device);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sinkhorn_grid_kernel<T>, kThreads, 0);
  if (e != cudaSuccess) return e;
  if (!coop || per_sm < 1) return cudaErrorNotSupported;
  g.blocks = dev.sms * (per_sm < 4 ? per_sm : 4);
  const int64_t col_tiles = (m + kThreads - 1) / kThreads;
  int64_t chunks = (2 * static_cast<int64_t>(g.blocks) + col_tiles - 1) / col_tiles;
  chunks = chunks < 1 ? 1 : (chunks > n ? n : chunks);
  g.chunk_rows = (n + chunks - 1) / chunks;
  g.chunks = (n + g.chunk_rows - 1) / g.chunk_rows;
  return cudaSuccess;
}

// kMaxSmemBytes, or less on devices whose per-block opt-in limit is lower (e.g. ~99 KB on sm_86/89).
size_t block_smem_cap(const DeviceInfo& dev) {
  const size_t optin = static_cast<size_t>(dev.smem_optin);
  return optin < kMaxSmemBytes ? optin : kMaxSmemBytes;
}

// Problems [k0, k0 + count) of p as a batch of their own.
template <typename T>
SinkhornArgs<T> sub_batch(const SinkhornArgs<T>& p, int64_t k0, int64_t count) {
  SinkhornArgs<T> q = p;
  const int64_t nm = p.n * p.m;
  q.cost += k0 * nm;
  q.plan += k0 * nm;
  q.a += k0 * p.n;
  q.log_a += k0 * p.n;
  q.alpha += k0 * p.n;
  q.b += k0 * p.m;
  q.log_b += k0 * p.m;
  q.beta += k0 * p.m;
  q.value += k0;
  q.n_iter += k0;
  q.error += k0;
  q.batch = count;
  return q;
}

// gridDim.x is at most 2^31 - 1: the block path launches larger batches in parts.
constexpr int64_t kMaxGridX = 0x7fffffff;

template <typename T>
cudaError_t launch_block_path(const SinkhornArgs<T>& p, size_t smem_cap, cudaStream_t stream) {
  const bool in_smem = block_smem_bytes<T>(p.n, p.m, true) <= smem_cap;
  const size_t smem = block_smem_bytes<T>(p.n, p.m, in_smem);
  const void* kernel = in_smem ? reinterpret_cast<const void*>(sinkhorn_block_kernel<T, true>)
                               : reinterpret_cast<const void*>(sinkhorn_block_kernel<T, false>);
  if (smem > 48 * 1024) {
    // Always the device's cap, never this call's size: host threads launching different
    // sizes concurrently cannot shrink the limit under each other's launches.
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem_cap));
    if (e != cudaSuccess) return e;
  }
  for (int64_t k0 = 0; k0 < p.batch; k0 += kMaxGridX) {
    const SinkhornArgs<T> q = sub_batch(p, k0, p.batch - k0 < kMaxGridX ? p.batch - k0 : kMaxGridX);
    if (in_smem) {
      sinkhorn_block_kernel<T, true><<<static_cast<unsigned>(q.batch), kThreads, smem, stream>>>(q);
    } else {
      sinkhorn_block_kernel<T, false><<<static_cast<unsigned>(q.batch), kThreads, smem, stream>>>(q);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// The path for a shape: the block path where use_block_path picks it, and also where the
// device cannot launch the grid path (no cooperative launch, e.g. under some virtualization
// layers) but the block path's vectors fit in shared memory; slower there (one block per
// problem), but it runs. Otherwise the grid path with plan g, or the error that stops it.
template <typename T>
cudaError_t choose_path(int64_t batch, int64_t n, int64_t m, const DeviceInfo& dev, bool& block, GridPlan& g) {
  block = use_block_path<T>(batch, n, m, dev.sms, block_smem_cap(dev));
  if (block) return cudaSuccess;
  const cudaError_t e = grid_plan<T>(n, m, dev, g);
  if (e == cudaErrorNotSupported && block_smem_bytes<T>(n, m, false) <= block_smem_cap(dev)) {
    block = true;
    return cudaSuccess;
  }
  return e;
}

template <typename T>
cudaError_t launch(const SinkhornArgs<T>& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (p.batch == 0 || p.n == 0 || p.m == 0) return cudaSuccess;
  DeviceInfo dev;
  cudaError_t e = device_info(&dev);
  if (e != cudaSuccess) return e;
  bool block = false;
  GridPlan g;
  e = choose_path<T>(p.batch, p.n, p.m, dev, block, g);
  if (e != cudaSuccess) return e;
  if (block) return launch_block_path(p, block_smem_cap(dev), stream);
  if (workspace == nullptr || workspace_bytes < grid_workspace_bytes<T>(p.n, p.m, g)) return cudaErrorInvalidValue;
  GridWorkspace<T> w = carve<T>(workspace, p.n, p.m, g);
  for (int64_t k = 0; k < p.batch; ++k) {
    SinkhornArgs<T> args = p;
    void* params[] = {&args, &w, &k};
    e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(sinkhorn_grid_kernel<T>), dim3(g.blocks),
                                    dim3(kThreads), params, 0, stream);
    if (e == cudaErrorCooperativeLaunchTooLarge && block_smem_bytes<T>(p.n, p.m, false) <= block_smem_cap(dev)) {
      // Fewer blocks co-resident than the occupancy query promised (an SM share limited by
      // MPS, say): this problem and the rest go to the block path. The error is not sticky.
      (void)cudaGetLastError();
      return launch_block_path(sub_batch(p, k, p.batch - k), block_smem_cap(dev), stream);
    }
    if (e != cudaSuccess) return e;
  }
  return cudaGetLastError();
}

template <typename T>
size_t workspace_bytes(int64_t batch, int64_t n, int64_t m) {
  if (batch == 0 || n == 0 || m == 0) return 0;
  bool block = false;
  GridPlan g;
  DeviceInfo dev;
  // An error here is reported by the launch.
  if (device_info(&dev) != cudaSuccess || choose_path<T>(batch, n, m, dev, block, g) != cudaSuccess || block) return 0;
  return grid_workspace_bytes<T>(n, m, g);
}

}  // namespace

size_t sinkhorn_workspace_bytes(int64_t batch, int64_t n, int64_t m, size_t elem_size) {
  return elem_size == sizeof(double) ? workspace_bytes<double>(batch, n, m) : workspace_bytes<float>(batch, n, m);
}

cudaError_t launch_sinkhorn(const SinkhornArgs<float>& args, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  return launch(args, workspace, workspace_bytes, stream);
}

cudaError_t launch_sinkhorn(const SinkhornArgs<double>& args, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  return launch(args, workspace, workspace_bytes, stream);
}

}  // namespace fastloss::kernels
