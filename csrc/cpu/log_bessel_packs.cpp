// The SIMD-pack path of the CPU log-Bessel values and gradients, compiled once per instruction set (CMake
// defines FASTLOSS_ISA_NAMESPACE and FASTLOSS_PACK_LANES: avx512 with packs of 8 doubles,
// avx2 with packs of 4) and called only where that set runs (see cpu/log_bessel_packs.h for
// why these are not target_clones variants). Each block's elements are split into one index
// list per method (K's small-argument list split again at Temme's x = 2; the lists whose
// loops run longer at some arguments ordered by expected length), and each list runs in packs
// (cpu/log_bessel_pack.h) through the methods of common/log_bessel.h.
#if !defined(FASTLOSS_ISA_NAMESPACE) || !defined(FASTLOSS_PACK_LANES)
#error "build this unit with FASTLOSS_ISA_NAMESPACE and FASTLOSS_PACK_LANES defined (see CMakeLists.txt)"
#endif

#include "cpu/log_bessel_packs.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/log_bessel.h"
#include "cpu/log_bessel_pack.h"

namespace fastloss::cpu {
namespace {

namespace lb = fastloss::log_bessel;

// One method on one pack: values (T = Pack) or values with derivatives (T = DualPack).
template <bool kK, lb::Method kMethod, typename T>
FASTLOSS_CPU_INLINE T method_of_pack(const T& v, const T& x) {
  if constexpr (kMethod == lb::Method::Hankel) {
    return lb::hankel_log<!kK>(v, x);
  } else if constexpr (kMethod == lb::Method::Debye) {
    return lb::debye_log<!kK>(v, x);
  } else if constexpr (kK) {
    return lb::recurrence_log_kv(v, x);
  } else {
    return lb::series_log_iv(v, x);
  }
}

// One method for the elements listed in `index`, kLanes at a time; a last partial pack
// repeats its first element in the unused lanes. kGrad: d/dv into `out`, d/dx into `out_dx`
// (K is even in v, so its d/dv is negated for v < 0); else the values into `out`.
template <bool kK, bool kGrad, lb::Method kMethod>
FASTLOSS_CPU_INLINE void method_by_packs(const double* v, const double* x, double* out, double* out_dx,
                                         const int* index, int count) {
  for (int start = 0; start < count; start += lb::kLanes) {
    const int lanes = std::min(lb::kLanes, count - start);
    lb::Pack vp, xp;
    const int first = index[start];
    // A full pack of consecutive elements (the common case, inputs mostly in one region) is
    // two vector loads and a store instead of lane-by-lane copies. Every lane is checked: the
    // CF2 list is reordered, so its first and last index alone do not prove the run.
    int64_t gaps = lanes != lb::kLanes;
    for (int l = 1; l < lb::kLanes; ++l) gaps += index[start + (l < lanes ? l : 0)] != first + l;
    const bool consecutive = gaps == 0;
    if (consecutive) {
      std::memcpy(&vp.a, v + first, sizeof(vp.a));
      std::memcpy(&xp.a, x + first, sizeof(xp.a));
    } else {
      for (int l = 0; l < lb::kLanes; ++l) {
        const int i = index[start + (l < lanes ? l : 0)];
        vp.a[l] = v[i];
        xp.a[l] = x[i];
      }
    }
    lb::Pack r, r_dx;
    if constexpr (kGrad) {
      const lb::DualPack d = method_of_pack<kK, kMethod>(lb::DualPack(kK ? lb::f_abs(vp) : vp, 1.0, 0.0),
                                                         lb::DualPack(xp, 0.0, 1.0));
      r = kK ? lb::select(vp < 0.0, -d.dv, d.dv) : d.dv;
      r_dx = d.dx;
    } else {
      r = method_of_pack<kK, kMethod>(kK ? lb::f_abs(vp) : vp, xp);
    }
    if (consecutive) {
      std::memcpy(out + first, &r.a, sizeof(r.a));
      if constexpr (kGrad) std::memcpy(out_dx + first, &r_dx.a, sizeof(r_dx.a));
    } else {
      for (int l = 0; l < lanes; ++l) {
        out[index[start + l]] = r.a[l];
        if constexpr (kGrad) out_dx[index[start + l]] = r_dx.a[l];
      }
    }
  }
}

constexpr int kBlock = kLogBesselBlock;
constexpr int kCF2List = static_cast<int>(lb::kMethods);  // K's small-argument list beyond x = 2

// A pack runs as long as its slowest lane: a counting sort of a list by a key of the
// expected iteration count (length_key, per element of the block) puts elements of similar
// length in the same packs. Returns the ordered list: `index` itself where every key is the
// same (e.g. all arguments tiny), else `sorted`.
template <int kKeys>
FASTLOSS_CPU_INLINE const int* order_by_length(const int* index, int count, const int32_t* length_key, int* sorted) {
  int start[kKeys + 1] = {};
  for (int j = 0; j < count; ++j) ++start[length_key[index[j]] + 1];
  if (count == 0 || start[length_key[index[0]] + 1] == count) return index;
  for (int k = 0; k < kKeys; ++k) start[k + 1] += start[k];
  for (int j = 0; j < count; ++j) sorted[start[length_key[index[j]]]++] = index[j];
  return sorted;
}

// I's power series needs about 2x + 10 terms: keys floor(x) (x < 29 in its region). K_u at
// 1 or 2 < x < 29 by the trapezoidal rule, whose node count, or CF2, whose iteration count
// (~180 / x), grows at smaller x: keys floor(96 / x) <= 47 (AVX2's crossover at x = 6 is
// a key boundary too). Clamped in double, so that any input converts to a valid key.
template <bool kK>
constexpr int kLengthKeys = kK ? 48 : 29;
template <bool kK>
FASTLOSS_CPU_INLINE int32_t length_key(double x) {
  double key = kK ? 96.0 / x : x;
  key = key < kLengthKeys<kK> - 1 ? key : kLengthKeys<kK> - 1;  // also NaN
  key = key > 0.0 ? key : 0.0;
  return static_cast<int32_t>(key);
}

// The packs of one index list.
template <bool kK, bool kGrad>
FASTLOSS_CPU_INLINE void run_list(int list, const double* v, const double* x, double* out, double* out_dx,
                                  const int* index, int count, const int32_t* length_keys) {
  int sorted[kBlock];
  switch (list) {
    case static_cast<int>(lb::Method::Hankel):
      method_by_packs<kK, kGrad, lb::Method::Hankel>(v, x, out, out_dx, index, count);
      break;
    case static_cast<int>(lb::Method::Debye):
      method_by_packs<kK, kGrad, lb::Method::Debye>(v, x, out, out_dx, index, count);
      break;
    case static_cast<int>(lb::Method::Small):  // I: the series; K: Temme's series (x <= 2)
      if (!kK) index = order_by_length<kLengthKeys<kK>>(index, count, length_keys, sorted);
      method_by_packs<kK, kGrad, lb::Method::Small>(v, x, out, out_dx, index, count);
      break;
    default:  // kCF2List
      index = order_by_length<kLengthKeys<kK>>(index, count, length_keys, sorted);
      method_by_packs<kK, kGrad, lb::Method::Small>(v, x, out, out_dx, index, count);
  }
}

// Elements are grouped by method and each group runs in SIMD packs: the loops of one method
// have the same shape for every element, so lanes stay busy until the slowest has converged.
template <bool kK, bool kGrad>
FASTLOSS_CPU_INLINE void block_by_packs(const double* v, const double* x, double* out, double* out_dx, int n) {
  // One list per method; K's small-argument list is split where Temme's series ends (x = 2,
  // for gradients x = 1) so that no pack runs both Temme's series and CF2. First each
  // element's list, then the lists themselves, unless the whole block is one list (the common
  // case), which runs as is.
  if (n <= 0) return;
  constexpr int kSmall = static_cast<int>(lb::Method::Small);
  constexpr int kLists = lb::kMethods + 1;
  constexpr int kSpecial = kLists;  // x = 0, inf, NaN, ...: the scalar entry points
  // Selects written as arithmetic on 0/1 integers so that the loop vectorizes (a branchy
  // form cost as much as a third of the Debye packs' time).
  int64_t list_of[kBlock];
  for (int i = 0; i < n; ++i) {
    const double order = kK ? fabs(v[i]) : v[i], xi = x[i];
    const int64_t finite_domain = (order >= 0.0) & (order < lb::kInf) & (xi > 0.0) & (xi < lb::kInf);
    const int64_t hankel = (xi >= lb::kHankelMinX) & (4.0 * order * order <= xi);
    const int64_t debye =
        (order >= lb::kDebyeMinOrder) | (order * order + xi * xi >= lb::kDebyeMinHypot * lb::kDebyeMinHypot);
    // As lb::method_for: Hankel, else Debye, else Small (K's beyond Temme's x: the CF2 list).
    const int64_t small = (1 - hankel) * (1 - debye);
    const int64_t cf2_side = int64_t{kK} * small * (xi > lb::temme_max_x<std::conditional_t<kGrad, lb::Dual, double>>());
    const int64_t list = (1 - hankel) * (static_cast<int64_t>(lb::Method::Debye) * debye +
                                         static_cast<int64_t>(kSmall) * small) +
                         (kCF2List - kSmall) * cf2_side;
    list_of[i] = finite_domain * list + (1 - finite_domain) * kSpecial;
  }
  static_assert(static_cast<int>(lb::Method::Hankel) == 0, "the list arithmetic above takes Hankel = 0");
  // The length keys of the list that is ordered (I's series, K's CF2 / trapezoid list), in one
  // vector loop over the block, only where that list has elements.
  constexpr int kOrderedList = kK ? kCF2List : kSmall;
  int32_t length_keys[kBlock];
  const auto fill_length_keys = [&] {
    for (int i = 0; i < n; ++i) length_keys[i] = length_key<kK>(x[i]);
  };
  int index[kLists][kBlock];
  int64_t other_lists = 0;
  for (int i = 0; i < n; ++i) other_lists += list_of[i] != list_of[0];
  const bool one_list = other_lists == 0;
  if (one_list && list_of[0] != kSpecial) {
    if (list_of[0] == kOrderedList) fill_length_keys();
    for (int i = 0; i < n; ++i) index[0][i] = i;
    run_list<kK, kGrad>(list_of[0], v, x, out, out_dx, index[0], n, length_keys);
    return;
  }
  int count[kLists] = {};
  for (int i = 0; i < n; ++i) {
    const int list = list_of[i];
    if (list == kSpecial && kGrad) {
      const lb::LogBesselGrad g = kK ? lb::log_kv_grad(v[i], x[i]) : lb::log_iv_grad(v[i], x[i]);
      out[i] = g.d_dv;
      out_dx[i] = g.d_dx;
    } else if (list == kSpecial) {
      out[i] = kK ? lb::log_kv(v[i], x[i]) : lb::log_iv(v[i], x[i]);
    } else {
      index[list][count[list]++] = i;
    }
  }
  if (count[kOrderedList] > 0) fill_length_keys();
  for (int list = 0; list < kLists; ++list) {
    if (count[list] > 0 && (kK || list != kCF2List)) {
      run_list<kK, kGrad>(list, v, x, out, out_dx, index[list], count[list], length_keys);
    }
  }
}

}  // namespace

namespace packs::FASTLOSS_ISA_NAMESPACE {
void log_iv_packs(const double* v, const double* x, double* out, int n) { block_by_packs<false, false>(v, x, out, nullptr, n); }
void log_kv_packs(const double* v, const double* x, double* out, int n) { block_by_packs<true, false>(v, x, out, nullptr, n); }
void log_iv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n) {
  block_by_packs<false, true>(v, x, d_dv, d_dx, n);
}
void log_kv_grad_packs(const double* v, const double* x, double* d_dv, double* d_dx, int n) {
  block_by_packs<true, true>(v, x, d_dv, d_dx, n);
}
}  // namespace packs::FASTLOSS_ISA_NAMESPACE

}  // namespace fastloss::cpu
