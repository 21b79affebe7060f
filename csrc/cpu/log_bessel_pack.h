// A SIMD pack of doubles for the CPU log-Bessel kernels: the methods of common/log_bessel.h
// are templates on the scalar type, and instantiated with `Pack` they evaluate kLanes
// elements of one region in lockstep (a loop runs until every lane has converged). This
// header supplies the pack forms of the elementary operations those templates use; where a
// scalar method branches per element, a pack overload here computes both sides and selects.
// `DualPack` (a pack of dual numbers: value, d/dv, d/dx) runs the same methods for the
// gradients.
//
// GCC / Clang vector extensions, kLanes doubles: one register of the unit's instruction set
// (8 for AVX-512, 4 for AVX2: on an AVX2 EPYC, 4-double packs run 1.1-2.8x faster than the
// scalar code, while 8-double packs split into AVX2 halves spill and run 0.7-1.3x its speed).
// log is written out (libm has no vector form that every build can call): the reduction
// x = 2^k m, m in [sqrt(1/2), sqrt(2)), and log m = 2 atanh(s), s = (m - 1) / (m + 1), whose
// Taylor series in s^2 <= 0.0295 reaches 2^-60 in ten terms; about 1 ulp, like libm's.
// Also here, the CPU's own pieces of method: K_u at 2 < x <= kTrapezoidMaxX by the
// trapezoidal rule (in place of CF2's division-bound iterations), and Debye's v eta with the
// near-root form only on the lanes that need it.
#pragma once

#include <stdint.h>

#include "common/exp_pair.h"
#include "common/log_bessel.h"
#include "cpu/isa.h"

namespace fastloss::log_bessel {
inline namespace FASTLOSS_ISA_NAMESPACE {

// Lanes per pack: one vector register of the unit's instruction set (defined by CMake for
// each build of cpu/log_bessel_packs.cpp, which checks it).
constexpr int kLanes = FASTLOSS_PACK_LANES;
static_assert(kLanes == 4 || kLanes == 8, "packs are one AVX2 or one AVX-512 register of doubles");
typedef double PackVec __attribute__((vector_size(kLanes * sizeof(double))));
typedef int64_t PackMask __attribute__((vector_size(kLanes * sizeof(double))));  // -1 / 0 per lane
typedef uint64_t PackBits __attribute__((vector_size(kLanes * sizeof(double))));

struct Pack {
  PackVec a;
  FASTLOSS_CPU_INLINE Pack() : a{} {}
  FASTLOSS_CPU_INLINE Pack(double s) : a(PackVec{} + s) {}  // NOLINT: constants broadcast
  FASTLOSS_CPU_INLINE Pack(PackVec p) : a(p) {}             // NOLINT
};

#define FASTLOSS_PACK_OP(op)                                                                  \
  FASTLOSS_CPU_INLINE Pack operator op(const Pack& p, const Pack& q) { return p.a op q.a; }   \
  FASTLOSS_CPU_INLINE Pack operator op(const Pack& p, double s) { return p.a op s; }          \
  FASTLOSS_CPU_INLINE Pack operator op(double s, const Pack& p) { return s op p.a; }
FASTLOSS_PACK_OP(+)
FASTLOSS_PACK_OP(-)
FASTLOSS_PACK_OP(*)
FASTLOSS_PACK_OP(/)
#undef FASTLOSS_PACK_OP
FASTLOSS_CPU_INLINE Pack operator-(const Pack& p) { return -p.a; }

#define FASTLOSS_PACK_CMP(op)                                                                   \
  FASTLOSS_CPU_INLINE PackMask operator op(const Pack& p, const Pack& q) { return p.a op q.a; } \
  FASTLOSS_CPU_INLINE PackMask operator op(const Pack& p, double s) { return p.a op s; }
FASTLOSS_PACK_CMP(<)
FASTLOSS_PACK_CMP(<=)
FASTLOSS_PACK_CMP(>)
FASTLOSS_PACK_CMP(>=)
FASTLOSS_PACK_CMP(==)
#undef FASTLOSS_PACK_CMP

FASTLOSS_CPU_INLINE Pack select(PackMask m, const Pack& p, const Pack& q) { return m ? p.a : q.a; }
// Halving steps (a lane-by-lane loop compiles to one extraction per lane; it remains for
// compilers without __builtin_shufflevector, GCC before 12).
FASTLOSS_CPU_INLINE bool all_lanes(PackMask m) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#if FASTLOSS_PACK_LANES == 8
  m &= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m &= __builtin_shufflevector(m, m, 2, 3, 0, 1, 2, 3, 0, 1);
  m &= __builtin_shufflevector(m, m, 1, 0, 1, 0, 1, 0, 1, 0);
#else
  m &= __builtin_shufflevector(m, m, 2, 3, 0, 1);
  m &= __builtin_shufflevector(m, m, 1, 0, 1, 0);
#endif
  return m[0] != 0;
#else
  int64_t all = -1;
  for (int l = 0; l < kLanes; ++l) all &= m[l];
  return all != 0;
#endif
}

FASTLOSS_CPU_INLINE Pack val(const Pack& p) { return p; }
FASTLOSS_CPU_INLINE Pack f_abs(const Pack& p) {
  return (PackVec)((PackMask)p.a & INT64_MAX);
}
FASTLOSS_CPU_INLINE bool all_below(const Pack& p, double limit) { return all_lanes(p <= limit); }
FASTLOSS_CPU_INLINE bool negligible(const Pack& term, const Pack& sum) {
  return all_lanes(f_abs(term) <= kTol * f_abs(sum));
}

// Lane by lane: compiled to the vector square root (the file is built with -fno-math-errno).
FASTLOSS_CPU_INLINE Pack f_sqrt(const Pack& p) {
  PackVec r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_sqrt(p.a[i]);
  return r;
}
FASTLOSS_CPU_INLINE Pack debye_scale(const Pack& v, const Pack& x) {
  return select((v > kDebyeScaleAbove) | (x > kDebyeScaleAbove), Pack(0x1p-64), Pack(1.0));
}
FASTLOSS_CPU_INLINE Pack f_hypot(const Pack& p, const Pack& q) {
  const PackMask huge = (p.a >= 1e150) | (q.a >= 1e150);
  if (!all_lanes(huge == 0)) {
    PackVec r;
    for (int i = 0; i < kLanes; ++i) r[i] = fast_hypot(p.a[i], q.a[i]);
    return r;
  }
  return f_sqrt(p * p + q * q);
}

constexpr double kLn2Hi = 0x1.62e42feep-1;  // 29 bits: k * kLn2Hi is exact
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;

// x = 2^k (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), f exact, for positive finite lanes
// (subnormals included).
struct LogReduced {
  PackVec k;
  PackVec f;
};
FASTLOSS_CPU_INLINE LogReduced log_reduce(const Pack& p) {
  constexpr uint64_t kSqrtHalfBits = 0x3fe6a09e667f3bcd;
  const PackMask subnormal = p.a < 0x1p-1022;
  const PackVec x = subnormal ? p.a * 0x1p54 : p.a;
  // k biased by 1023 to be >= 0: only unsigned shifts and bit tricks, which AVX2 has for
  // 64-bit lanes (it has neither the arithmetic shift nor the int64 -> double conversion).
  const PackBits bits = (PackBits)x;
  const PackBits k_biased = (bits - kSqrtHalfBits + (uint64_t{1023} << 52)) >> 52;
  const PackVec m = (PackVec)(bits - ((k_biased - 1023) << 52));
  constexpr uint64_t kTwo52Bits = uint64_t{0x433} << 52;  // 2^52: its low bits hold an integer
  const PackVec k_plus_2_52 = (PackVec)(k_biased | kTwo52Bits);
  const PackVec k = (k_plus_2_52 - (0x1p52 + 1023.0)) - (subnormal ? PackVec{} + 54.0 : PackVec{});
  return {k, m - 1.0};
}

// (2 atanh(s) - 2 s) / s for s^2 = z <= 0.0295: the Taylor series, ten terms (to 2^-60), by
// Estrin's scheme (depth 4 instead of a chain of 10 fma).
FASTLOSS_CPU_INLINE PackVec log_series_tail(const PackVec& z) {
  const PackVec z2 = z * z, z4 = z2 * z2, z8 = z4 * z4;
  const PackVec p01 = 2.0 / 3 + z * (2.0 / 5), p23 = 2.0 / 7 + z * (2.0 / 9), p45 = 2.0 / 11 + z * (2.0 / 13);
  const PackVec p67 = 2.0 / 15 + z * (2.0 / 17), p89 = 2.0 / 19 + z * (2.0 / 21);
  const PackVec p03 = p01 + z2 * p23, p47 = p45 + z2 * p67;
  return z * ((p03 + z4 * p47) + z8 * p89);
}

// log for positive finite lanes (subnormals included), about 1 ulp.
FASTLOSS_CPU_INLINE Pack f_log(const Pack& p) {
  const LogReduced r = log_reduce(p);
  const PackVec f = r.f, kd = r.k;
  const PackVec s = f / (2.0 + f);
  const PackVec tail = log_series_tail(s * s);
  const PackVec half_f2 = 0.5 * f * f;
  // log(1 + f) = 2 atanh(s) = f - (f^2/2 - s (f^2/2 + tail)), added smallest first.
  return kd * kLn2Hi + (f - (half_f2 - (s * (half_f2 + tail) + kd * kLn2Lo)));
}

// log(1 + p) for p >= 0: the rounding of 1 + p corrected to first order.
FASTLOSS_CPU_INLINE Pack f_log1p(const Pack& p) {
  const Pack u = 1.0 + p;
  return f_log(u) - ((u - 1.0) - p) / u;
}

// asinh(p) for p >= 0 as log1p(p + p^2 / (1 + sqrt(1 + p^2))): no cancellation at small p;
// p^2 overflows beyond 1e154, where callers select their large-argument form instead.
FASTLOSS_CPU_INLINE Pack f_asinh(const Pack& p) {
  const Pack p2 = p * p;
  return f_log1p(p + p2 / (1.0 + f_sqrt(1.0 + p2)));
}

FASTLOSS_CPU_INLINE Pack f_fma(const Pack& p, const Pack& q, const Pack& r) {
  PackVec out;
  for (int i = 0; i < kLanes; ++i) out[i] = __builtin_fma(p.a[i], q.a[i], r.a[i]);
  return out;
}

// Packs of values carry no derivatives (common/log_bessel.h).
template <>
struct DerivativeOrder<Pack> { static constexpr int value = 0; };

// asinh(v / x), and log(2 v / x) where v > 1e8 x (v / x may overflow there; the pack
// asinh's v^2 / x^2 does beyond 1e154).
FASTLOSS_CPU_INLINE Pack asinh_v_over_x(const Pack& v, const Pack& x) {
  const PackMask large = v > 1e8 * x;
  const Pack plain = f_asinh(select(large, Pack(0.0), v / x));
  if (all_lanes(large == 0)) return plain;
  return select(large, kLn2 + f_log(v) - f_log(x), plain);
}

// x - p0 v for common/log_bessel.h's v_eta_near_root, lane by lane as the scalar form.
FASTLOSS_CPU_INLINE Pack x_minus_eta_root_v(const Pack& v, const Pack& x) {
  PackVec out;
  for (int i = 0; i < kLanes; ++i) out[i] = x_minus_eta_root_v(v.a[i], x.a[i]);
  return out;
}

// Debye's v eta = h - v asinh(v / x), and near x / v = 0.66, where eta = 0 and that difference
// cancels (debye_eta_cancels' band), v_eta_near_root (common/log_bessel.h) on the lanes that
// need it. Lanes outside run it on values it does not use (inf or NaN at worst).
FASTLOSS_CPU_INLINE Pack debye_v_eta(const Pack& v, const Pack& x, const Pack& h, const Pack& asinh_z) {
  const Pack plain = h - v * asinh_z;
  const PackMask cancelling = debye_eta_cancels(v, x);
  if (all_lanes(cancelling == 0)) return plain;
  return select(cancelling, v_eta_near_root(v, x), plain);
}
FASTLOSS_CPU_INLINE Pack debye_v_eta(const Pack& v, const Pack& x, const Pack& h) {
  return debye_v_eta(v, x, h, asinh_v_over_x(v, x));
}

// The series' v log(x/2) for values (the DualPack overload below handles v = 0's tangent).
FASTLOSS_CPU_INLINE Pack v_log_half_x(const Pack& v, const Pack& x) { return v * (f_log(x) - kLn2); }

// log(s) - log Gamma(p) for the series' p = v + 1 in [1, 17): Gamma(1 + u + n) = Gamma(1 + u)
// (u + 1) ... (u + n) with n = round(p - 1), |u| <= 1/2, and 1 / Gamma(1 + u) from Temme's
// polynomials, so one log of s / Gamma(p) and at most 16 products (libm's lgamma is scalar
// and several times slower). Lanes outside [1/2, 35/2) (none from the series region) take
// libm's lgamma.
FASTLOSS_CPU_INLINE Pack log_over_gamma(const Pack& s, const Pack& p) {
  constexpr int kMaxShift = 16;
  if (!all_lanes((p >= 0.5) & (p < kMaxShift + 1.5))) {
    PackVec r;
    for (int i = 0; i < kLanes; ++i) r[i] = ::log(s.a[i]) - ::lgamma(p.a[i]);
    return r;
  }
  constexpr double kRoundToInteger = 0x1.8p52;  // adding and subtracting it rounds to nearest
  const Pack n = ((p - 1.0) + kRoundToInteger) - kRoundToInteger;
  const Pack u = (p - 1.0) - n;
  // The factors multiplied pairwise (a tree, not a chain of 16 dependent products).
  Pack factors[kMaxShift];
  for (int k = 1; k <= kMaxShift; ++k) factors[k - 1] = select(n >= double(k), u + double(k), Pack(1.0));
  for (int width = kMaxShift / 2; width >= 1; width /= 2)
    for (int k = 0; k < width; ++k) factors[k] = factors[2 * k] * factors[2 * k + 1];
  const Pack product = factors[0];
  const Pack w = u * u;
  const Pack reciprocal_gamma_1pu = temme_gamma2(w) - u * temme_gamma1(w);
  return f_log(s * reciprocal_gamma_1pu / product);
}

// exp for |p| <= 708 (Temme's sigma = u log(2/x) stays below 400 for x >= 1e-300): the
// shared exp pair's Cody-Waite reduction and degree-13 Taylor polynomial by Estrin's scheme
// (common/exp_pair.h; the trapezoidal rule's nodes wait on it: 15% faster there on an AVX2
// EPYC than the fma chain). 2^n from the integer n's bits: n + 1.5 * 2^52 holds n in its low
// mantissa bits (AVX2 has no double -> int64 conversion).
FASTLOSS_CPU_INLINE Pack f_exp(const Pack& p) {
  using C = ExpConstants<double>;
  const PackVec n = (p.a * C::kLog2e + C::kRoundMagic) - C::kRoundMagic;
  // Cody-Waite with fma: kLn2Hi has all 53 bits, so n * kLn2Hi must not be rounded apart
  // (GCC fuses the plain form only from -O2).
  const PackVec t = f_fma(n, Pack(-C::kLn2Lo), f_fma(n, Pack(-C::kLn2Hi), p)).a;
  const PackVec mantissa = exp_reduced_estrin(t);
  constexpr double kIntegerBias = 0x1.8p52;
  constexpr uint64_t kIntegerBiasBits = uint64_t{0x4338} << 48;
  const PackBits scale = ((PackBits)(n + kIntegerBias) - kIntegerBiasBits + 1023) << 52;
  return mantissa * (PackVec)scale;
}
FASTLOSS_CPU_INLINE Pack f_cosh(const Pack& p) {
  const Pack e = f_exp(p);
  return 0.5 * (e + 1.0 / e);
}

// ---- DualPack: the derivatives d/dv and d/dx in packs --------------------------------------
// The pack form of common/log_bessel.h's Dual (value and tangents in v and in x), so that the
// gradients run the methods in SIMD packs as the values do. The arithmetic and the elementary
// functions follow Dual's rules; where a Pack overload below computes its value by a pack-only
// route (Debye's v eta by lanes, log Gamma in product form), the DualPack overload
// takes that value and adds the tangents from the closed-form partial derivatives.
struct DualPack {
  Pack a, dv, dx;
  FASTLOSS_CPU_INLINE DualPack() {}
  FASTLOSS_CPU_INLINE DualPack(double s) : a(s) {}  // NOLINT: constants promote implicitly
  FASTLOSS_CPU_INLINE DualPack(const Pack& value, const Pack& d_v, const Pack& d_x) : a(value), dv(d_v), dx(d_x) {}
};

FASTLOSS_CPU_INLINE DualPack operator+(const DualPack& p, const DualPack& q) { return {p.a + q.a, p.dv + q.dv, p.dx + q.dx}; }
FASTLOSS_CPU_INLINE DualPack operator-(const DualPack& p, const DualPack& q) { return {p.a - q.a, p.dv - q.dv, p.dx - q.dx}; }
FASTLOSS_CPU_INLINE DualPack operator-(const DualPack& p) { return {-p.a, -p.dv, -p.dx}; }
FASTLOSS_CPU_INLINE DualPack operator*(const DualPack& p, const DualPack& q) {
  return {p.a * q.a, p.dv * q.a + p.a * q.dv, p.dx * q.a + p.a * q.dx};
}
// One division for the value and one reciprocal for the tangents (the divider bounds CF2's
// packs: three divisions ran 1.1x slower). Every divisor in the methods is a normal number
// (1 / q would be inf at a subnormal q); the values that can be subnormal (x, and c_step at
// tiny x) are only divided into, and f_log divides its tangents by the value itself.
FASTLOSS_CPU_INLINE DualPack operator/(const DualPack& p, const DualPack& q) {
  const Pack r = p.a / q.a, inv = 1.0 / q.a;
  return {r, (p.dv - r * q.dv) * inv, (p.dx - r * q.dx) * inv};
}
// With a constant (a double, or a Pack that carries no derivative).
#define FASTLOSS_DUAL_PACK_CONSTANT_OPS(S)                                                                       \
  FASTLOSS_CPU_INLINE DualPack operator+(const DualPack& p, S s) { return {p.a + s, p.dv, p.dx}; }               \
  FASTLOSS_CPU_INLINE DualPack operator+(S s, const DualPack& p) { return {s + p.a, p.dv, p.dx}; }               \
  FASTLOSS_CPU_INLINE DualPack operator-(const DualPack& p, S s) { return {p.a - s, p.dv, p.dx}; }               \
  FASTLOSS_CPU_INLINE DualPack operator-(S s, const DualPack& p) { return {s - p.a, -p.dv, -p.dx}; }             \
  FASTLOSS_CPU_INLINE DualPack operator*(const DualPack& p, S s) { return {p.a * s, p.dv * s, p.dx * s}; }       \
  FASTLOSS_CPU_INLINE DualPack operator*(S s, const DualPack& p) { return {s * p.a, s * p.dv, s * p.dx}; }       \
  FASTLOSS_CPU_INLINE DualPack operator/(const DualPack& p, S s) { return {p.a / s, p.dv / s, p.dx / s}; }       \
  FASTLOSS_CPU_INLINE DualPack operator/(S s, const DualPack& q) {                                               \
    const Pack r = s / q.a, inv = 1.0 / q.a; /* r * q' first: r / q alone can overflow */                         \
    return {r, -(r * q.dv) * inv, -(r * q.dx) * inv};                                                             \
  }
FASTLOSS_DUAL_PACK_CONSTANT_OPS(double)
FASTLOSS_DUAL_PACK_CONSTANT_OPS(const Pack&)
#undef FASTLOSS_DUAL_PACK_CONSTANT_OPS

FASTLOSS_CPU_INLINE Pack val(const DualPack& p) { return p.a; }
FASTLOSS_CPU_INLINE DualPack select(PackMask m, const DualPack& p, const DualPack& q) {
  return {select(m, p.a, q.a), select(m, p.dv, q.dv), select(m, p.dx, q.dx)};
}
// As Dual's: every lane's value and both tangents (measured against the value).
FASTLOSS_CPU_INLINE bool negligible(const DualPack& term, const DualPack& sum) {
  const Pack scale = f_abs(sum.a);
  return all_lanes((f_abs(term.a) <= kTol * scale) & (f_abs(term.dv) <= kTol * (scale + f_abs(sum.dv))) &
                   (f_abs(term.dx) <= kTol * (scale + f_abs(sum.dx))));
}
// tangent * factor, 0 where the tangent is 0 (factor may be inf there: v / x at subnormal x).
FASTLOSS_CPU_INLINE Pack tangent_times(const Pack& tangent, const Pack& factor) {
  return select(tangent == 0.0, Pack(0.0), tangent * factor);
}

// Tangents divided by the value (not times 1/value, which overflows for subnormal values).
FASTLOSS_CPU_INLINE DualPack f_log(const DualPack& p) { return {f_log(p.a), p.dv / p.a, p.dx / p.a}; }
FASTLOSS_CPU_INLINE DualPack f_exp(const DualPack& p) {
  const Pack e = f_exp(p.a);
  return {e, e * p.dv, e * p.dx};
}
FASTLOSS_CPU_INLINE DualPack f_sqrt(const DualPack& p) {
  const Pack r = f_sqrt(p.a), half_inv = 0.5 / r;
  return {r, half_inv * p.dv, half_inv * p.dx};
}
FASTLOSS_CPU_INLINE DualPack f_hypot(const DualPack& p, const DualPack& q) {
  const Pack h = f_hypot(p.a, q.a), inv_h = 1.0 / h;
  const Pack cp = p.a * inv_h, cq = q.a * inv_h;
  return {h, cp * p.dv + cq * q.dv, cp * p.dx + cq * q.dx};
}
FASTLOSS_CPU_INLINE DualPack to_log_x_tangent(const DualPack& x) { return {x.a, x.dv, x.dx * x.a}; }
FASTLOSS_CPU_INLINE DualPack from_log_x_tangent(const DualPack& r, const Pack& x) { return {r.a, r.dv, r.dx / x}; }

// sinh(s) / s (common/log_bessel.h's series below 1/2) with a select instead of a branch.
template <typename T>
FASTLOSS_CPU_INLINE T pack_sinh_over(const T& s) {
  const T e = f_exp(s);
  return select(f_abs(val(s)) < 0.5, sinh_over_series(s), (e - 1.0 / e) / (2.0 * s));
}
FASTLOSS_CPU_INLINE Pack sinh_over(const Pack& s) { return pack_sinh_over(s); }
FASTLOSS_CPU_INLINE DualPack sinh_over(const DualPack& s) { return pack_sinh_over(s); }

FASTLOSS_CPU_INLINE Pack to_log_x_tangent(const Pack& x) { return x; }
FASTLOSS_CPU_INLINE Pack from_log_x_tangent(const Pack& r, const Pack&) { return r; }

// cosh with its derivative sinh = s sinh(s)/s (no cancellation of exponentials at small s).
FASTLOSS_CPU_INLINE DualPack f_cosh(const DualPack& p) {
  const Pack sinh = p.a * sinh_over(p.a);
  return {f_cosh(p.a), sinh * p.dv, sinh * p.dx};
}

// digamma for lanes in [1/2, 35/2) (the series' v + 1): psi(p) = psi(p + 10) - sum_(k<10)
// 1 / (p + k), the sum as one fraction (one division; its terms are < 27^10), psi(p + 10) by
// the asymptotic series of the scalar digamma. Other lanes: the scalar digamma.
FASTLOSS_CPU_INLINE Pack pack_digamma(const Pack& p) {
  if (!all_lanes((p >= 0.5) & (p < 17.5))) {
    PackVec r;
    for (int i = 0; i < kLanes; ++i) r[i] = digamma(p.a[i]);
    return r;
  }
  Pack numerator = 0.0, denominator = 1.0;
  for (int k = 0; k < 10; ++k) {
    const Pack a = p + double(k);
    numerator = numerator * a + denominator;
    denominator = denominator * a;
  }
  const Pack y = p + 10.0;
  return f_log(y) - 0.5 / y - digamma_tail(1.0 / (y * y)) - numerator / denominator;
}

// log(s) - log Gamma(p): the value in product form (above); tangents s'/s - psi(p) p'.
FASTLOSS_CPU_INLINE DualPack log_over_gamma(const DualPack& s, const DualPack& p) {
  const Pack psi = pack_digamma(p.a);
  return {log_over_gamma(s.a, p.a), s.dv / s.a - psi * p.dv, s.dx / s.a - psi * p.dx};
}

// v log(x/2) with the scalar Dual form's tangents: v / x first, a zero tangent adds 0.
FASTLOSS_CPU_INLINE DualPack v_log_half_x(const DualPack& v, const DualPack& x) {
  const Pack log_half = f_log(x.a) - kLn2, ratio = v.a / x.a;
  return {v.a * log_half, v.dv * log_half + tangent_times(x.dv, ratio), v.dx * log_half + tangent_times(x.dx, ratio)};
}

// Debye's v eta = h - v asinh(v / x): the value as the Pack form computes it; the partial
// derivatives -asinh(v / x) (in v) and h / x (in x), with no cancellation.
FASTLOSS_CPU_INLINE DualPack debye_v_eta(const DualPack& v, const DualPack& x, const DualPack& h) {
  const Pack asinh_z = asinh_v_over_x(v.a, x.a);
  const Pack h_over_x = h.a / x.a;
  return {debye_v_eta(v.a, x.a, h.a, asinh_z), tangent_times(v.dv, -asinh_z) + tangent_times(x.dv, h_over_x),
          tangent_times(v.dx, -asinh_z) + tangent_times(x.dx, h_over_x)};
}

// K_u(x) and K_(u+1)(x), |u| <= 1/2, temme_max_x < x <= kTrapezoidMaxX (lanes where the scalar
// method runs Steed's CF2), by the trapezoidal rule on
// K_nu(x) = int_0^inf exp(-x cosh t) cosh(nu t) dt.
// For this entire, even integrand the rule's error is ~ exp(x - pi^2 / h) relative (the
// integrand's Fourier transform, K_(nu + i omega)(x), decays like exp(-pi omega / 2)):
// h = pi^2 / (kTrapezoidMaxX + 41) gives < 1e-18 up to kTrapezoidMaxX. Every lane uses the
// same nodes t_j = j h, so cosh t_j - 1 and exp(t_j) are one table, and each node costs a
// lane one exp. The sum stops when every lane's next node is negligible (t <= 4.6 covers
// x = 1, where the gradients start, with nu = 3/2). Against CF2's 180 / x iterations, each
// with a division, the rule wins where the divider is slow or x small: measured, it was about
// twice as fast over all of 2 < x < 29 with AVX-512 on a Xeon, but only below x ~ 6 with AVX2
// on an EPYC (Zen), where CF2 is up to 1.45x faster above. Each unit takes the rule up to its crossover.
#if FASTLOSS_PACK_LANES == 8
constexpr double kTrapezoidMaxX = 29.0;  // all of CF2's range
#else
constexpr double kTrapezoidMaxX = 6.0;
#endif
struct TrapezoidNodes {
  static constexpr double kStep = kPi * kPi / (kTrapezoidMaxX + 41.0);
  static constexpr int kCount = static_cast<int>(4.6 / kStep) + 1;
  double cosh_minus_1[kCount + 1];  // 2 sinh^2(t_j / 2): no cancellation near t = 0
  double cosh_t[kCount + 1];
  double sinh_t[kCount + 1];
  double exp_t[kCount + 1];
  double exp_minus_t[kCount + 1];
  TrapezoidNodes() {
    for (int j = 0; j <= kCount; ++j) {
      const double half_sinh = ::sinh(0.5 * j * kStep);
      cosh_minus_1[j] = 2.0 * half_sinh * half_sinh;
      cosh_t[j] = ::cosh(j * kStep);
      sinh_t[j] = ::sinh(j * kStep);
      exp_t[j] = ::exp(j * kStep);
      exp_minus_t[j] = ::exp(-j * kStep);
    }
  }
};

// K_u's integrand carries cosh(u t) and K_(u+1)'s cosh((u + 1) t) = cosh(u t) cosh t +
// sinh(u t) sinh t. With derivatives, 2 cosh(u t_j) and 2 sinh(u t_j) advance node by node by
// the addition formulas with cosh(u h) and sinh(u h) = u h sinh(u h) / (u h), even and odd in
// u: as e^(u t) + e^(-u t), d/du cancelled two O(1) derivatives (d/dv log K_v at v = 1e-12,
// x = 3: 2e-4 relative, an absolute error ~1e-16).
template <typename T>
FASTLOSS_CPU_INLINE KStart<T> trapezoid_k(const T& u, const T& x) {
  static const TrapezoidNodes nodes;
  constexpr double kStep = TrapezoidNodes::kStep;
  // exp(-x cosh t) = exp(-x) exp(-x (cosh t - 1)): the first factor leaves the sums (and
  // goes into the log); the second underflows harmlessly, clamped above exp's range.
  // Values (T = Pack) take e^(u t_j) and e^(-u t_j) as powers instead: two products per
  // node rather than the rotation's four (x in (2, 29): 7% less time per element), and the
  // value of their sum does not cancel.
  constexpr bool kValues = DerivativeOrder<T>::value == 0;
  const T step_arg = kStep * u;
  const T step_cosh = kValues ? f_exp(step_arg) : f_cosh(step_arg);  // values: e^(u h)
  const T step_sinh = kValues ? 1.0 / step_cosh : step_arg * sinh_over(step_arg);  // values: e^(-u h)
  T cosh2 = kValues ? 1.0 : 2.0, sinh2 = kValues ? 1.0 : 0.0;  // values: e^(u t_j), e^(-u t_j)
  T sum = 1.0, sum1 = 1.0;  // twice the sums: the j = 0 node has half weight
  for (int j = 1; j <= TrapezoidNodes::kCount; ++j) {
    const T exponent = -x * nodes.cosh_minus_1[j];
    const T weight = f_exp(select(val(exponent) > -700.0, exponent, T(-700.0)));
    T term, term1;
    if constexpr (kValues) {
      cosh2 = cosh2 * step_cosh;
      sinh2 = sinh2 * step_sinh;
      term = weight * (cosh2 + sinh2);
      term1 = weight * (cosh2 * nodes.exp_t[j] + sinh2 * nodes.exp_minus_t[j]);
    } else {
      const T cosh2_next = cosh2 * step_cosh + sinh2 * step_sinh;
      sinh2 = sinh2 * step_cosh + cosh2 * step_sinh;
      cosh2 = cosh2_next;
      term = weight * cosh2;
      term1 = weight * (cosh2 * nodes.cosh_t[j] + sinh2 * nodes.sinh_t[j]);
    }
    sum = sum + term;
    sum1 = sum1 + term1;
    // term1 >= term, and both decrease from here on; tested every other node (a test of
    // all lanes costs about as much as a node's sums).
    if ((j & 1) == 0 && negligible(term1, sum1)) break;
  }
  return {-x, (0.5 * kStep) * sum, (0.25 * kStep) * x * sum1};
}

// The pack form of recurrence_log_kv (for values, T = Pack, and derivatives, T = DualPack):
// per lane n = round(v), K_u from Temme's series (x <= temme_max_x), the trapezoidal rule
// (x <= kTrapezoidMaxX) or CF2, then the forward recurrence up to the largest n of the pack,
// each lane keeping its own y_n. A pack that straddles a method boundary (the kernels order
// lists so that few do) runs each method it needs, with x clamped to that method's range, so
// that no lane iterates outside it.
template <typename T>
FASTLOSS_CPU_INLINE T pack_recurrence_log_kv(const T& v, const T& x_in) {
  const T x = to_log_x_tangent(x_in);
  constexpr double kRoundToInteger = 0x1.8p52;
  const Pack n = (val(v) + kRoundToInteger) - kRoundToInteger;
  const T u = v - n;
  constexpr double kTemmeX = temme_max_x<T>();
  const PackMask temme = val(x) <= kTemmeX;
  const PackMask cf2 = val(x) > kTrapezoidMaxX;
  const PackMask trapezoid = (temme | cf2) == 0;
  KStart<T> start;
  if (all_lanes(temme)) {
    start = temme_k(u, x);
  } else if (all_lanes(trapezoid)) {
    start = trapezoid_k(u, x);
  } else if (all_lanes(cf2)) {
    start = cf2_k(u, x);
  } else {
    start = {T(0.0), T(1.0), T(1.0)};
    const auto take = [&start](PackMask lanes, const KStart<T>& k) {
      start = {select(lanes, k.log_k_part, start.log_k_part), select(lanes, k.k_factor, start.k_factor),
               select(lanes, k.k1_factor, start.k1_factor)};
    };
    if (!all_lanes(temme == 0)) take(temme, temme_k(u, select(temme, x, T(kTemmeX))));
    if (!all_lanes(trapezoid == 0)) {
      take(trapezoid, trapezoid_k(u, select(temme, T(kTemmeX), select(cf2, T(kTrapezoidMaxX), x))));
    }
    if (!all_lanes(cf2 == 0)) take(cf2, cf2_k(u, select(cf2, x, T(kTrapezoidMaxX))));
  }
  // The forward recurrence of common/log_bessel.h, y_(k+1) = (x/2)^2 y_(k-1) + (u + k) y_k
  // from the start's factors, each lane keeping its own y_n.
  const T half_x = 0.5 * x;
  const T half_x2 = half_x * half_x;
  T y_prev = start.k_factor, y = start.k1_factor;
  T y_n = select(n >= 1.0, y, y_prev);
  double n_max = 0.0;  // the pack's largest n (n <= 16 in this method's region): one reduction
  for (int l = 0; l < kLanes; ++l) n_max = n.a[l] > n_max ? n.a[l] : n_max;
  for (int k = 1; k + 1 <= n_max; ++k) {
    const T y_next = half_x2 * y_prev + (u + double(k)) * y;
    y_prev = y;
    y = y_next;
    y_n = select(n == double(k + 1), y, y_n);
  }
  return from_log_x_tangent(start.log_k_part + n * (kLn2 - f_log(x)) + f_log(y_n), val(x));
}
FASTLOSS_CPU_INLINE Pack recurrence_log_kv(const Pack& v, const Pack& x) { return pack_recurrence_log_kv(v, x); }
FASTLOSS_CPU_INLINE DualPack recurrence_log_kv(const DualPack& v, const DualPack& x) {
  return pack_recurrence_log_kv(v, x);
}

}  // namespace FASTLOSS_ISA_NAMESPACE
}  // namespace fastloss::log_bessel
