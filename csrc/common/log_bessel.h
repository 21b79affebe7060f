// log I_v(x) and log K_v(x) in double precision, written once for the host and the device
// (Plesner, Sorensen & Hauberg, "Accurate Computation of the Logarithm of Modified Bessel
// Functions on GPUs", ICS 2024; DLMF 10.25, 10.40, 10.41; Temme 1975; Steed's CF2).
//
// Everything is carried in log space: sums are of O(1) normalized terms, and only their logs
// are taken, so no finite input overflows or underflows. Methods (regions measured against
// mpmath, see tests/test_log_bessel.py):
//   Debye uniform expansion (16 terms)   v >= 16 or hypot(v, x) >= 29, I and K
//   Hankel expansion                     x >= 1024 and 4 v^2 <= x (cheaper there), I and K
//   power series                         the rest, I
//   Temme's series (x <= 2; derivatives x <= 1) / Steed's CF2 for K_u, |u| <= 1/2,
//   then the forward recurrence of K_(u+k+1) / K_(u+k) up to v        the rest, K
// The loops are arranged so that no division sits on a chain from one iteration to the next
// (Temme's and CF2's recurrences multiplied through by their denominators).
//
// Gradients: every method is a template on the scalar type; `Dual` carries d/dv and d/dx
// through the same arithmetic (forward-mode differentiation), so d/dx is the accurate Bessel
// ratio of each method (never a difference of two large logs) and d/dv is exact for the
// truncated expansion. Loops are bounded; convergence tests cover the derivative parts too.
// `Dual2` carries the second derivatives (d^2/dv^2, d^2/dv dx, d^2/dx^2) the same way.
//
// The CPU kernels also instantiate the methods with a SIMD pack of elements of one method,
// and with a pack of dual numbers for the gradients (cpu/log_bessel_pack.h: the pack forms of
// the elementary functions, lgamma in product form, and, for K_u beyond x = 2, the
// trapezoidal rule on K's integral in place of CF2: up to x = 29 with AVX-512, x = 6 with AVX2).
#pragma once

#include <math.h>

#include "common/log_bessel_tables.h"
#include "common/macros.h"

namespace fastloss::log_bessel {
inline namespace FASTLOSS_ISA_NAMESPACE {

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLnPi = 1.1447298858494001741;
constexpr double kPi = 3.14159265358979323846;
constexpr double kTol = 1e-17;  // relative size at which a term no longer matters
constexpr double kInf = __builtin_huge_val();
constexpr double kNaN = __builtin_nan("");

// Region boundaries (see the header comment).
constexpr double kDebyeMinOrder = 16.0;
constexpr double kDebyeMinHypot = 29.0;
constexpr double kHankelMinX = 1024.0;
constexpr double kTemmeMaxX = 2.0;  // beyond, Temme's terms cancel (1e-14 at x = 3)
// Derivatives leave Temme's series from x = 1: they lose digits as x nears 2 (first ones up
// to 7e-15 relative in [1.5, 2), where CF2's stay within 9e-16; second ones up to 2.4e-14,
// CF2's 7e-15, as at x > 2).
constexpr double kTemmeMaxXGradient = 1.0;
constexpr int kSeriesMaxTerms = 200;   // x < 29 needs < 90
constexpr int kTemmeMaxTerms = 100;    // x <= 2 needs < 25
constexpr int kCF2MaxTerms = 400;      // x > 1 needs < 200 (values < 170)
constexpr int kHankelMaxTerms = 40;    // x >= 1024, 4 v^2 <= x needs < 12
constexpr int kDebyeTerms = 16;

// ---- forward-mode dual numbers: value and derivatives in v and in x --------------------

struct Dual {
  double a = 0, dv = 0, dx = 0;
  FASTLOSS_HD Dual() {}
  FASTLOSS_HD Dual(double value) : a(value) {}  // NOLINT: constants promote implicitly
  FASTLOSS_HD Dual(double value, double d_v, double d_x) : a(value), dv(d_v), dx(d_x) {}
};

FASTLOSS_HD Dual operator+(const Dual& p, const Dual& q) { return {p.a + q.a, p.dv + q.dv, p.dx + q.dx}; }
FASTLOSS_HD Dual operator-(const Dual& p, const Dual& q) { return {p.a - q.a, p.dv - q.dv, p.dx - q.dx}; }
FASTLOSS_HD Dual operator-(const Dual& p) { return {-p.a, -p.dv, -p.dx}; }
FASTLOSS_HD Dual operator*(const Dual& p, const Dual& q) {
  return {p.a * q.a, p.dv * q.a + p.a * q.dv, p.dx * q.a + p.a * q.dx};
}
FASTLOSS_HD Dual operator/(const Dual& p, const Dual& q) {
  const double r = p.a / q.a;
  return {r, (p.dv - r * q.dv) / q.a, (p.dx - r * q.dx) / q.a};
}
FASTLOSS_HD Dual operator*(const Dual& p, double s) { return {p.a * s, p.dv * s, p.dx * s}; }
FASTLOSS_HD Dual operator*(double s, const Dual& p) { return {p.a * s, p.dv * s, p.dx * s}; }
FASTLOSS_HD Dual operator+(const Dual& p, double s) { return {p.a + s, p.dv, p.dx}; }
FASTLOSS_HD Dual operator+(double s, const Dual& p) { return {p.a + s, p.dv, p.dx}; }
FASTLOSS_HD Dual operator-(const Dual& p, double s) { return {p.a - s, p.dv, p.dx}; }
FASTLOSS_HD Dual operator-(double s, const Dual& p) { return {s - p.a, -p.dv, -p.dx}; }
FASTLOSS_HD Dual operator/(const Dual& p, double s) { return {p.a / s, p.dv / s, p.dx / s}; }

// Scalar functions for double and Dual (chain rule: f(a), f'(a) * tangent).
FASTLOSS_HD double val(double p) { return p; }
FASTLOSS_HD double val(const Dual& p) { return p.a; }
FASTLOSS_HD double f_abs(double p) { return fabs(p); }
// A loop exit; a SIMD pack of elements (the CPU kernels' `Pack`) overloads it to mean all lanes.
FASTLOSS_HD bool all_below(double p, double limit) { return p <= limit; }
FASTLOSS_HD Dual chain(const Dual& p, double f, double df) { return {f, df * p.dv, df * p.dx}; }

FASTLOSS_HD double f_log(double p) { return ::log(p); }
// Tangents divided by the value (not times 1/value, which overflows for subnormal values).
FASTLOSS_HD Dual f_log(const Dual& p) { return {::log(p.a), p.dv / p.a, p.dx / p.a}; }
FASTLOSS_HD double f_exp(double p) { return ::exp(p); }
FASTLOSS_HD Dual f_exp(const Dual& p) {
  const double e = ::exp(p.a);
  return chain(p, e, e);
}
FASTLOSS_HD double f_sqrt(double p) { return ::sqrt(p); }
FASTLOSS_HD Dual f_sqrt(const Dual& p) {
  const double r = ::sqrt(p.a);
  return chain(p, r, 0.5 / r);
}
FASTLOSS_HD double f_sin(double p) { return ::sin(p); }
FASTLOSS_HD Dual f_sin(const Dual& p) { return chain(p, ::sin(p.a), ::cos(p.a)); }
FASTLOSS_HD double f_sinh(double p) { return ::sinh(p); }
FASTLOSS_HD Dual f_sinh(const Dual& p) { return chain(p, ::sinh(p.a), ::cosh(p.a)); }
FASTLOSS_HD double f_cosh(double p) { return ::cosh(p); }
FASTLOSS_HD Dual f_cosh(const Dual& p) { return chain(p, ::cosh(p.a), ::sinh(p.a)); }
FASTLOSS_HD double f_asinh(double p) { return ::asinh(p); }
FASTLOSS_HD Dual f_asinh(const Dual& p) {
  return chain(p, ::asinh(p.a), 1.0 / ::sqrt(1.0 + p.a * p.a));
}
// sqrt(p^2 + q^2) where the squares cannot overflow (libm's hypot is several times slower).
FASTLOSS_HD double fast_hypot(double p, double q) {
  return (p < 1e150 && q < 1e150) ? ::sqrt(p * p + q * q) : ::hypot(p, q);
}
FASTLOSS_HD double f_hypot(double p, double q) { return fast_hypot(p, q); }
FASTLOSS_HD Dual f_hypot(const Dual& p, const Dual& q) {
  const double h = fast_hypot(p.a, q.a);
  return {h, (p.a / h) * p.dv + (q.a / h) * q.dv, (p.a / h) * p.dx + (q.a / h) * q.dx};
}

// The tail of digamma's asymptotic series, log(x) - 1/(2x) - psi(x), in f = 1/x^2 (error
// < 1e-16 for x >= 10); shared with the CPU packs' digamma.
template <typename T>
FASTLOSS_HD T digamma_tail(const T& f) {
  return f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f * (1.0 / 132 -
         f * (691.0 / 32760 - f * (1.0 / 12)))))));
}
// digamma for x > 0: shift to x >= 10, then the asymptotic series.
FASTLOSS_HD double digamma(double x) {
  double shift = 0;
  for (int i = 0; i < 10 && x < 10.0; ++i, x += 1.0) shift -= 1.0 / x;
  return shift + ::log(x) - 0.5 / x - digamma_tail(1.0 / (x * x));
}
FASTLOSS_HD double f_lgamma(double p) { return ::lgamma(p); }
FASTLOSS_HD Dual f_lgamma(const Dual& p) { return chain(p, ::lgamma(p.a), digamma(p.a)); }
// log(s) - log Gamma(p) (the CPU's SIMD packs take it as one log of s / Gamma(p)).
template <typename T>
FASTLOSS_HD T log_over_gamma(const T& s, const T& p) { return f_log(s) - f_lgamma(p); }

// A term no longer changes the sum (value and both derivative parts, the latter measured
// against the value so that a zero derivative sum does not keep the loop going).
FASTLOSS_HD bool negligible(double term, double sum) { return fabs(term) <= kTol * fabs(sum); }
FASTLOSS_HD bool negligible(const Dual& term, const Dual& sum) {
  const double scale = fabs(sum.a);
  return fabs(term.a) <= kTol * scale && fabs(term.dv) <= kTol * (scale + fabs(sum.dv)) &&
         fabs(term.dx) <= kTol * (scale + fabs(sum.dx));
}

// ---- second-order dual numbers: value, gradient and Hessian in (v, x) ------------------
// The methods run on them for the second derivatives, as on Dual for the first: each part is
// the exact derivative of the truncated method, with no difference of large terms that the
// method itself avoids. A product of a derivative factor with a zero tangent is taken as 0
// (not inf * 0) where the factor can overflow.

// p * q where a zero factor wins (a zero tangent times an overflowed one: no dependence).
FASTLOSS_HD double mul0(double p, double q) { return (p == 0.0 || q == 0.0) ? 0.0 : p * q; }

struct Dual2 {
  double a = 0, dv = 0, dx = 0, dvv = 0, dvx = 0, dxx = 0;
  FASTLOSS_HD Dual2() {}
  FASTLOSS_HD Dual2(double value) : a(value) {}  // NOLINT: constants promote implicitly
  FASTLOSS_HD Dual2(double value, double d_v, double d_x, double d_vv = 0, double d_vx = 0, double d_xx = 0)
      : a(value), dv(d_v), dx(d_x), dvv(d_vv), dvx(d_vx), dxx(d_xx) {}
};

FASTLOSS_HD Dual2 operator+(const Dual2& p, const Dual2& q) {
  return {p.a + q.a, p.dv + q.dv, p.dx + q.dx, p.dvv + q.dvv, p.dvx + q.dvx, p.dxx + q.dxx};
}
FASTLOSS_HD Dual2 operator-(const Dual2& p, const Dual2& q) {
  return {p.a - q.a, p.dv - q.dv, p.dx - q.dx, p.dvv - q.dvv, p.dvx - q.dvx, p.dxx - q.dxx};
}
FASTLOSS_HD Dual2 operator-(const Dual2& p) { return {-p.a, -p.dv, -p.dx, -p.dvv, -p.dvx, -p.dxx}; }
FASTLOSS_HD Dual2 operator*(const Dual2& p, const Dual2& q) {
  return {p.a * q.a,
          mul0(p.dv, q.a) + mul0(p.a, q.dv),
          mul0(p.dx, q.a) + mul0(p.a, q.dx),
          mul0(p.dvv, q.a) + 2.0 * mul0(p.dv, q.dv) + mul0(p.a, q.dvv),
          mul0(p.dvx, q.a) + mul0(p.dv, q.dx) + mul0(p.dx, q.dv) + mul0(p.a, q.dvx),
          mul0(p.dxx, q.a) + 2.0 * mul0(p.dx, q.dx) + mul0(p.a, q.dxx)};
}
// r = p / q from p = r q: r' = (p' - r q') / q, r'' = (p'' - 2 r' q' - r q'') / q.
FASTLOSS_HD Dual2 operator/(const Dual2& p, const Dual2& q) {
  const double r = p.a / q.a;
  const double rv = (p.dv - r * q.dv) / q.a, rx = (p.dx - r * q.dx) / q.a;
  return {r, rv, rx, (p.dvv - 2.0 * mul0(rv, q.dv) - mul0(r, q.dvv)) / q.a,
          (p.dvx - mul0(rv, q.dx) - mul0(rx, q.dv) - mul0(r, q.dvx)) / q.a,
          (p.dxx - 2.0 * mul0(rx, q.dx) - mul0(r, q.dxx)) / q.a};
}
FASTLOSS_HD Dual2 operator*(const Dual2& p, double s) {
  return {p.a * s, p.dv * s, p.dx * s, p.dvv * s, p.dvx * s, p.dxx * s};
}
FASTLOSS_HD Dual2 operator*(double s, const Dual2& p) { return p * s; }
FASTLOSS_HD Dual2 operator/(const Dual2& p, double s) {
  return {p.a / s, p.dv / s, p.dx / s, p.dvv / s, p.dvx / s, p.dxx / s};
}
FASTLOSS_HD Dual2 operator+(Dual2 p, double s) { p.a += s; return p; }
FASTLOSS_HD Dual2 operator+(double s, Dual2 p) { p.a += s; return p; }
FASTLOSS_HD Dual2 operator-(Dual2 p, double s) { p.a -= s; return p; }
FASTLOSS_HD Dual2 operator-(double s, const Dual2& p) { return s + (-p); }

FASTLOSS_HD double val(const Dual2& p) { return p.a; }
// f(p) from f(a), f'(a) and f''(a).
FASTLOSS_HD Dual2 chain2(const Dual2& p, double f, double df, double d2f) {
  return {f, mul0(df, p.dv), mul0(df, p.dx), mul0(df, p.dvv) + mul0(d2f, p.dv * p.dv),
          mul0(df, p.dvx) + mul0(d2f, p.dv * p.dx), mul0(df, p.dxx) + mul0(d2f, p.dx * p.dx)};
}
// Tangents divided by the value (as Dual's): (log p)'' = p'' / p - (p' / p)^2.
FASTLOSS_HD Dual2 f_log(const Dual2& p) {
  const double gv = p.dv / p.a, gx = p.dx / p.a;
  return {::log(p.a), gv, gx, p.dvv / p.a - gv * gv, p.dvx / p.a - mul0(gv, gx), p.dxx / p.a - gx * gx};
}
FASTLOSS_HD Dual2 f_exp(const Dual2& p) {
  const double e = ::exp(p.a);
  return chain2(p, e, e, e);
}
// r = sqrt(p): r' = r (p' / p) / 2, r'' = r (p'' / p / 2 - (p' / p)^2 / 4), in ratios to p
// (f'' = -1 / (4 p^(3/2)) overflows where p is tiny, its tangents tinier).
FASTLOSS_HD Dual2 f_sqrt(const Dual2& p) {
  const double r = ::sqrt(p.a);
  const double gv = p.dv / p.a, gx = p.dx / p.a;
  return {r, 0.5 * r * gv, 0.5 * r * gx, r * (0.5 * (p.dvv / p.a) - 0.25 * (gv * gv)),
          r * (0.5 * (p.dvx / p.a) - 0.25 * mul0(gv, gx)), r * (0.5 * (p.dxx / p.a) - 0.25 * (gx * gx))};
}
FASTLOSS_HD Dual2 f_sin(const Dual2& p) { return chain2(p, ::sin(p.a), ::cos(p.a), -::sin(p.a)); }
FASTLOSS_HD Dual2 f_sinh(const Dual2& p) { return chain2(p, ::sinh(p.a), ::cosh(p.a), ::sinh(p.a)); }
FASTLOSS_HD Dual2 f_cosh(const Dual2& p) { return chain2(p, ::cosh(p.a), ::sinh(p.a), ::cosh(p.a)); }
FASTLOSS_HD Dual2 f_asinh(const Dual2& p) {
  const double s = 1.0 / ::sqrt(1.0 + p.a * p.a);
  return chain2(p, ::asinh(p.a), s, -p.a * (s * s * s));
}
// h = hypot(p, q): h_p = p / h, h_q = q / h, and the second partials (q^2, -p q, p^2) / h^3
// make h_ij = h_p p_ij + h_q q_ij + n_i n_j / h with n = h_q p' - h_p q' (the tangents' part
// across (p, q)): no difference, and no product of two large tangents.
FASTLOSS_HD Dual2 f_hypot(const Dual2& p, const Dual2& q) {
  const double h = fast_hypot(p.a, q.a);
  const double cp = p.a / h, cq = q.a / h;
  const double nv = cq * p.dv - cp * q.dv, nx = cq * p.dx - cp * q.dx;
  const double nv_h = nv / h, nx_h = nx / h;
  return {h, cp * p.dv + cq * q.dv, cp * p.dx + cq * q.dx, cp * p.dvv + cq * q.dvv + mul0(nv, nv_h),
          cp * p.dvx + cq * q.dvx + mul0(nv_h, nx), cp * p.dxx + cq * q.dxx + mul0(nx, nx_h)};
}
// trigamma for x > 0: shift to x >= 10, then psi'(x) = 1/x + 1/(2x^2) + sum_k B_2k / x^(2k+1)
// (to B_16: the next term is < 1e-17 of the sum at x = 10).
FASTLOSS_HD double trigamma(double x) {
  double shift = 0;
  for (int i = 0; i < 10 && x < 10.0; ++i, x += 1.0) shift += 1.0 / (x * x);
  const double f = 1.0 / (x * x);
  const double tail = f * (1.0 / 6 - f * (1.0 / 30 - f * (1.0 / 42 - f * (1.0 / 30 - f * (5.0 / 66 -
                      f * (691.0 / 2730 - f * (7.0 / 6 - f * (3617.0 / 510))))))));
  return shift + (1.0 + 0.5 / x + tail) / x;
}
FASTLOSS_HD Dual2 f_lgamma(const Dual2& p) { return chain2(p, ::lgamma(p.a), digamma(p.a), trigamma(p.a)); }
FASTLOSS_HD bool negligible(const Dual2& term, const Dual2& sum) {
  const double scale = fabs(sum.a);
  return fabs(term.a) <= kTol * scale && fabs(term.dv) <= kTol * (scale + fabs(sum.dv)) &&
         fabs(term.dx) <= kTol * (scale + fabs(sum.dx)) && fabs(term.dvv) <= kTol * (scale + fabs(sum.dvv)) &&
         fabs(term.dvx) <= kTol * (scale + fabs(sum.dvx)) && fabs(term.dxx) <= kTol * (scale + fabs(sum.dxx));
}
// a or b by a scalar condition (cpu/log_bessel_pack.h overloads it for packs, lane by lane).
template <typename T>
FASTLOSS_HD T select(bool m, const T& a, const T& b) { return m ? a : b; }

// The order of the derivatives a number type carries (series stop with room for them): 0 for
// values (double, and cpu/log_bessel_pack.h's Pack), 1 for Dual, 2 for Dual2.
template <typename T>
struct DerivativeOrder { static constexpr int value = 1; };
template <>
struct DerivativeOrder<double> { static constexpr int value = 0; };
template <>
struct DerivativeOrder<Dual2> { static constexpr int value = 2; };

// Where K_u leaves Temme's series for CF2 (or the CPU's trapezoidal rule), by number type.
template <typename T>
constexpr double temme_max_x() {
  return DerivativeOrder<T>::value >= 1 ? kTemmeMaxXGradient : kTemmeMaxX;
}

// ---- methods (v >= 0, 0 < x < inf) ---------------------------------------------------

// log(x/2) without underflow of x/2.
template <typename T>
FASTLOSS_HD T log_half(const T& x) { return f_log(x) - kLn2; }

// v log(x/2).
FASTLOSS_HD double v_log_half_x(double v, double x) { return v * (::log(x) - kLn2); }
// Its tangents: log(x/2) v' + (v / x) x'. v / x taken first (v times 1 / x overflows at
// subnormal x where v / x does not), and a zero tangent contributes 0 (not 0 * inf).
FASTLOSS_HD Dual v_log_half_x(const Dual& v, const Dual& x) {
  const double log_half = ::log(x.a) - kLn2, ratio = v.a / x.a;
  return {v.a * log_half, v.dv * log_half + (x.dv == 0.0 ? 0.0 : ratio * x.dv),
          v.dx * log_half + (x.dx == 0.0 ? 0.0 : ratio * x.dx)};
}
// With f = v log(x/2): f_v = log(x/2), f_x = v / x, f_vv = 0, f_vx = 1 / x, f_xx = -v / x^2
// (which overflows at tiny x; a zero tangent contributes 0).
FASTLOSS_HD Dual2 v_log_half_x(const Dual2& v, const Dual2& x) {
  const double log_half = ::log(x.a) - kLn2, ratio = v.a / x.a, inv_x = 1.0 / x.a;
  const auto second = [&](double vi, double vj, double xi, double xj, double vij, double xij) {
    return vij * log_half + mul0(ratio, xij) + mul0(inv_x, vi * xj + vj * xi) -
           mul0(ratio / x.a, xi * xj);
  };
  return {v.a * log_half, v.dv * log_half + mul0(ratio, x.dv), v.dx * log_half + mul0(ratio, x.dx),
          second(v.dv, v.dv, x.dv, x.dv, v.dvv, x.dvv), second(v.dv, v.dx, x.dv, x.dx, v.dvx, x.dvx),
          second(v.dx, v.dx, x.dx, x.dx, v.dxx, x.dxx)};
}

// Power series: I_v(x) = (x/2)^v / Gamma(v+1) * sum_k (x^2/4)^k / (k! (v+1)_k).
template <typename T>
FASTLOSS_HD T series_log_iv(const T& v, const T& x) {
  const T half_x = x * 0.5;
  const T q = half_x * half_x;
  T term = 1.0, sum = 1.0;
  // Two terms per test: the test of a SIMD pack (all lanes) costs as much as a term.
  static_assert(kSeriesMaxTerms % 2 == 0, "terms come in pairs");
  for (int k = 1; k <= kSeriesMaxTerms; k += 2) {
    term = term * (q / (double(k) * (v + double(k))));  // the division is off the term chain
    sum = sum + term;
    term = term * (q / (double(k + 1) * (v + double(k + 1))));
    sum = sum + term;
    if (negligible(term, sum)) break;
  }
  return v_log_half_x(v, x) + log_over_gamma(sum, v + 1.0);
}

// log(sum) - log(x)/2 for sum = O(1). Values: one log (sqrt(x) is finite for every finite x).
// Derivatives: two, since sum's d/dv ~ v / x divided by sqrt(x) underflows from x ~ 1e205
// (Hankel's d/dv log I was 0 there).
template <typename T>
FASTLOSS_HD T log_over_sqrt(const T& sum, const T& x) {
  if constexpr (DerivativeOrder<T>::value == 0) {
    return f_log(sum / f_sqrt(x));
  } else {
    return f_log(sum) - 0.5 * f_log(x);
  }
}

// Hankel expansion for large x (DLMF 10.40.1-2), mu = 4 v^2:
// log I = x - log(2 pi x)/2 + log sum (-1)^k a_k;  log K = log(pi/(2x))/2 - x + log sum a_k.
template <bool kI, typename T>
FASTLOSS_HD T hankel_log(const T& v, const T& x) {
  const T mu = 4.0 * v * v;
  const T inv_8x = 0.125 / x;
  T a = 1.0, sum = 1.0;
  for (int k = 1; k <= kHankelMaxTerms; ++k) {
    const double odd = 2.0 * k - 1.0;
    a = a * ((mu - odd * odd) * (inv_8x * (1.0 / double(k))));  // 1/k: one scalar division
    sum = (kI && (k & 1)) ? sum - a : sum + a;
    if (negligible(a, sum)) break;
  }
  const T log_sum_over_sqrt_x = log_over_sqrt(sum, x);
  if (kI) return x - 0.5 * (kLn2 + kLnPi) + log_sum_over_sqrt_x;
  return 0.5 * (kLnPi - kLn2) - x + log_sum_over_sqrt_x;
}

// v * asinh(v / x) without overflow of v / x.
template <typename T>
FASTLOSS_HD T v_asinh_v_over_x(const T& v, const T& x) {
  // At v = 0 the value and first derivatives vanish, but not d^2/dv^2 (2 / x).
  if (val(v) == 0.0 && DerivativeOrder<T>::value < 2) return T(0.0) * v;
  if (val(v) > 1e8 * val(x)) return v * (kLn2 + f_log(v) - f_log(x));  // asinh z = log 2z + O(z^-2)
  return v * f_asinh(v / x);
}

// eta(p) = sqrt(1 + p^2) - asinh(1 / p), p = x / v, vanishes at Laplace's limit constant
// p0 (to double-double here); x - p0 v carried from the exact inputs (fma, and p0's low part).
constexpr double kEtaRootHi = 0.6627434193491816;
constexpr double kEtaRootLo = 8.155323790501267e-18;
FASTLOSS_HD double x_minus_eta_root_v(double v, double x) { return ::fma(-kEtaRootHi, v, x) - kEtaRootLo * v; }
FASTLOSS_HD Dual x_minus_eta_root_v(const Dual& v, const Dual& x) {
  return {x_minus_eta_root_v(v.a, x.a), x.dv - kEtaRootHi * v.dv, x.dx - kEtaRootHi * v.dx};
}
FASTLOSS_HD Dual2 x_minus_eta_root_v(const Dual2& v, const Dual2& x) {
  return {x_minus_eta_root_v(v.a, x.a), x.dv - kEtaRootHi * v.dv, x.dx - kEtaRootHi * v.dx,
          x.dvv - kEtaRootHi * v.dvv, x.dvx - kEtaRootHi * v.dvx, x.dxx - kEtaRootHi * v.dxx};
}

// v eta = h - v asinh(v / x), h = hypot(v, x). Near p = x / v = p0 the difference cancels: one
// ulp of its parts is v * 1e-16 absolute (1e-12 at v = 1e4). There (p in [0.45, 0.95], v > 32:
// debye_eta_cancels) it is v eta = (x - p0 v) * eta(p) / (p - p0), a product of factors with
// their own relative accuracy. Values take the ratio from eta_ratio's polynomial (no sqrt or
// division: the SIMD packs run it on their cancelling lanes, where a double-double form of
// the plain expression was still v * 2^-60 off, 1.6e-13 at v = 9e5). Derivatives take it as
// the mean of eta'(s) = sqrt(1 + s^2) / s over s in [p0, p] by 12-point Gauss-Legendre (eta'
// is analytic well beyond the interval: ~1e-17 relative), whose derivatives are as accurate:
// the polynomial's second derivative is ~4e-13 off.
// On doubles a bool (as an int); on the CPU packs a lane mask.
template <typename T>
FASTLOSS_HD auto debye_eta_cancels(const T& v, const T& x) {
  return (v > 32.0) & (x > 0.45 * v) & (x < 0.95 * v);
}

template <typename T>
FASTLOSS_HD T v_eta_near_root(const T& v, const T& x) {
  const T offset = x_minus_eta_root_v(v, x);  // v (p - p0)
  if constexpr (DerivativeOrder<T>::value == 0) {
    return offset * eta_ratio((x / v - 0.7) * 4.0);
  } else {
    // Nodes t and 1 - t on [0, 1] share a weight (the rule is symmetric).
    constexpr double kNode[6] = {0.009219682876640378, 0.0479413718147626, 0.11504866290284765,
                                 0.20634102285669126, 0.31608425050090994, 0.43738329574426554};
    constexpr double kWeight[6] = {0.023587668193255706, 0.05346966299765953, 0.08003916427167321,
                                   0.10158371336153287, 0.1167462682691773, 0.12457352290670134};
    const T delta = offset / v;
    T mean = 0.0;
FASTLOSS_UNROLL
    for (int i = 0; i < 6; ++i) {
      const T s_low = kEtaRootHi + kNode[i] * delta, s_high = (kEtaRootHi + delta) - kNode[i] * delta;
      mean = mean + kWeight[i] * (f_sqrt(1.0 + s_low * s_low) / s_low + f_sqrt(1.0 + s_high * s_high) / s_high);
    }
    return offset * mean;
  }
}

template <typename T>
FASTLOSS_HD T debye_v_eta(const T& v, const T& x, const T& h) {
  if (!debye_eta_cancels(val(v), val(x))) return h - v_asinh_v_over_x(v, x);
  return v_eta_near_root(v, x);
}

// 1, or 2^-64 where hypot(v, x) could overflow (the CPU packs overload it lane by lane).
constexpr double kDebyeScaleAbove = 0x1p1020;
FASTLOSS_HD double debye_scale(double v, double x) {
  return (v > kDebyeScaleAbove || x > kDebyeScaleAbove) ? 0x1p-64 : 1.0;
}

// Debye's uniform expansion (DLMF 10.41.3-4) with h = hypot(v, x), t = v / h, written so that
// v = 0 is allowed: v eta = h - v asinh(v/x), 1/2 log(2 pi v) + 1/4 log(1 + (x/v)^2) =
// 1/2 log(2 pi h), and u_k(t) / v^k = Q_k(t^2) / h^k.
template <bool kI, typename T>
FASTLOSS_HD T debye_log(const T& v, const T& x) {
  // hypot(v, x) overflows once v or x nears DBL_MAX, while log I and log K can still be finite
  // (v eta is about 0.01 v at v = 1.5e308, x = 1e308). There the expansion runs on (v, x)
  // scaled by 2^-64 (exact): v eta is homogeneous of degree 1 in (v, x), and 1 / h is only
  // needed unscaled (its power series is negligible at such h).
  const auto scale = debye_scale(val(v), val(x));
  const T v_s = v * scale, x_s = x * scale;
  const T h_s = f_hypot(v_s, x_s);
  const T inv_h = scale / h_s;
  const T t = v_s / h_s;
  const T w = t * t;
  T power = 1.0, sum = 1.0;
  // Unrolled, so that the polynomial and bound of each k are constants (no table lookups):
  // GCC does not unroll it by itself inside the CPU kernels' target_clones.
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 16
#endif
  for (int k = 1; k <= kDebyeTerms; ++k) {
    power = power * inv_h;
    const T term = power * debye_q(k, w);
    sum = (kI || !(k & 1)) ? sum + term : sum - term;
    // Stop when the bound of the next term (with room for its derivatives) is negligible.
    // (Each derivative in x or v multiplies a term by up to ~k / h.)
    constexpr bool kSecond = DerivativeOrder<T>::value == 2;
    if (all_below(val(power) * val(inv_h), kTol / (debye_q_bound(k + 1) * (k + 2) * (kSecond ? k + 3 : 1)))) break;
  }
  const T v_eta = debye_v_eta(v_s, x_s, h_s) / scale;
  const T log_sum_over_sqrt_h = f_log(sum * f_sqrt(inv_h));  // one log for log(sum) - log(h)/2
  if (kI) return v_eta - 0.5 * (kLn2 + kLnPi) + log_sum_over_sqrt_h;
  return 0.5 * (kLnPi - kLn2) - v_eta + log_sum_over_sqrt_h;
}

// u pi / sin(u pi) for |u| <= 1/2: the Taylor series of sin(z) / z in z^2 <= pi^2 / 4 (terms
// to z^24, the next < 1e-19), with no branch: the quotient z / sin(z) and its derivative's
// (sin z - z cos z) / sin^2 z cancel at small z (4e-13 absolute in d/dv log K at v ~ 0.004).
template <typename T>
FASTLOSS_HD T pi_u_over_sin(const T& u) {
  const T z2 = (kPi * kPi) * (u * u);
  T sinc = 1.0;
  for (int k = 12; k >= 1; --k) sinc = 1.0 - z2 * sinc * (1.0 / ((2.0 * k) * (2.0 * k + 1.0)));
  return 1.0 / sinc;
}
// sinh(s) / s: its Taylor series (to s^16, the next < 1e-19) for |s| < 1/2, where the
// exponentials (and the derivative's s cosh s - sinh s) would cancel.
template <typename T>
FASTLOSS_HD T sinh_over_series(const T& s) {
  const T s2 = s * s;
  T series = 1.0;
  for (int k = 8; k >= 1; --k) series = 1.0 + s2 * series * (1.0 / ((2.0 * k) * (2.0 * k + 1.0)));
  return series;
}
template <typename T>
FASTLOSS_HD T sinh_over(const T& s) {
  return fabs(val(s)) < 0.5 ? sinh_over_series(s) : f_sinh(s) / s;
}

template <typename T>
struct KStart {
  // K_u(x) = exp(log_k_part) k_factor and (x/2) K_(u+1)(x) = exp(log_k_part) k1_factor: the
  // factors start the forward recurrence, whose last term's log is the only other log. Kept
  // apart rather than as a ratio, which is subnormal at subnormal x for u near -1/2 ((x/2)
  // K_(1/2) / K_(-1/2) = x/2) while the factors stay normal.
  T log_k_part;
  T k_factor;
  T k1_factor;
};

// Temme's p + q and p - q (p_0 = e^sigma Gamma(1 + u) / 2, q_0 = e^-sigma Gamma(1 - u) / 2), for
// the series' f, which takes p and q through their sum only. `from_parts` gives them as even
// and odd functions of u: with 1 / Gamma(1 -+ u) = g2 +- u g1 and s = sinh(sigma) / u,
// p + q = (g2 cosh(sigma) + u^2 g1 s) Gamma(1 + u) Gamma(1 - u) and
// p - q = u (g2 s + g1 cosh(sigma)) Gamma(1 + u) Gamma(1 - u). `next` is the step i of the
// recurrences p_i = p_(i-1) (i + u), q_i = q_(i-1) (i - u) (multiplied through by D_i).
template <typename T>
struct TemmeEvenOdd {
  T even, odd;
  FASTLOSS_HD static TemmeEvenOdd from_parts(const T& u, const T& w, const T& g1, const T& g2, const T& pi_u_sin,
                                             const T& cosh_sigma, const T& sinh_over_u) {
    return {pi_u_sin * (g2 * cosh_sigma + w * g1 * sinh_over_u), u * (pi_u_sin * (g2 * sinh_over_u + g1 * cosh_sigma))};
  }
  FASTLOSS_HD TemmeEvenOdd next(double i, const T& u) const { return {i * even + u * odd, i * odd + u * even}; }
};

// Temme's series for K_u and K_(u+1), |u| <= 1/2, 0 < x <= 2 (Temme 1975; the form of
// Numerical Recipes' bessik). K_u = sum and (x/2) K_(u+1) = sum1: no overflow at tiny x.
// The recurrences f_i = (i f_(i-1) + p_(i-1) + q_(i-1)) / (i^2 - u^2), p_i = p_(i-1) / (i - u),
// q_i = q_(i-1) / (i + u) run multiplied through by D_i = prod_(k <= i) (k^2 - u^2), and the
// term factor c_i divided by it: one division per term instead of three (the divider's
// throughput bounds a pack of elements). D_i < (i!)^2 stays finite over the ~25 terms x <= 2 needs.
// K_u is even in u, and f takes p and q through their sum only: it runs on the even and odd
// parts p + q and p - q (p's own recurrence stays for K_(u+1)). With derivatives and |u| <
// 1/4 they start from even and odd functions of u: from p and q, d/du of p + q cancelled two
// O(1) derivatives, so d/dv log K_v at tiny v had an absolute error ~1e-16 (relative 4e-5 at
// v = 1e-12, x = 1). Nearer |u| = 1/2 those forms lose an order of magnitude in d/du against
// p and q (6.9e-14 against 9e-15 relative at v = 1/2, x = 2), so p and q start them there.
template <typename T>
FASTLOSS_HD KStart<T> temme_k(const T& u, const T& x) {
  const T half_x = 0.5 * x;
  const T log_2_over_x = kLn2 - f_log(x);
  const T sigma = u * log_2_over_x;
  const T w = u * u;
  const T g1 = temme_gamma1(w), g2 = temme_gamma2(w);
  const T rgamma_plus = g2 - u * g1;   // 1 / Gamma(1 + u)
  const T rgamma_minus = g2 + u * g1;  // 1 / Gamma(1 - u)
  const T pi_u_sin = pi_u_over_sin(u);  // Gamma(1 + u) Gamma(1 - u)
  const T cosh_sigma = f_cosh(sigma);
  const T sinh_over_sigma_l = sinh_over(sigma) * log_2_over_x;  // sinh(sigma) / u
  T f = pi_u_sin * (g1 * cosh_sigma + g2 * sinh_over_sigma_l);
  const T e = f_exp(sigma);
  T p = 0.5 * e / rgamma_plus;
  const T q = 0.5 / (e * rgamma_minus);
  TemmeEvenOdd<T> pq{p + q, p - q};
  if constexpr (DerivativeOrder<T>::value > 0) {
    const auto tiny = val(w) < 0.0625;
    const auto parts = TemmeEvenOdd<T>::from_parts(u, w, g1, g2, pi_u_sin, cosh_sigma, sinh_over_sigma_l);
    pq = {select(tiny, parts.even, pq.even), select(tiny, parts.odd, pq.odd)};
  }
  const T c_step = half_x * half_x;
  T c = 1.0;  // c_i / D_i
  T sum = f, sum1 = p;
  for (int i = 1; i <= kTemmeMaxTerms; ++i) {
    const double di = i;
    c = c * (c_step / (di * (di * di - w)));
    f = di * f + pq.even;
    pq = pq.next(di, u);
    p = p * (di + u);
    const T term = c * f;
    const T term1 = c * (p - di * f);
    sum = sum + term;
    sum1 = sum1 + term1;
    // Tested every other term (a SIMD pack's test of all lanes is not cheap).
    if ((i & 1) == 0 && negligible(term, sum) && negligible(term1, sum1)) break;
  }
  return {T(0.0), sum, sum1};
}

// Steed's continued fraction CF2 for K_u and K_(u+1), |u| <= 1/2, x >= 2 (Thompson & Barnett
// 1986; the form of Numerical Recipes' bessik), rearranged so that no division sits on a
// chain from one iteration to the next (a pack of elements then runs at the divider's
// throughput instead of its latency):
// * the fraction's increments delh_i = h_i - h_(i-1) = -a_i (B_(i-2) / B_i) delh_(i-1) from
//   its denominators B_i = b_i B_(i-1) + a_i B_(i-2) (rescaled now and then), instead of
//   Steed's d_i = 1 / (b_i + a_i d_(i-1)) (this also avoids the cancellation in b_i d_i - 1);
// * the normalization series sum_i c_i q_i as its terms t_i = c_i q_i, whose recurrence
//   t_i = ((a_(i-1) / (i - 1)) t_(i-2) + b_i t_(i-1)) / i (from q_i = (q_(i-2) - b_i q_(i-1)) / a_i
//   and c_i = -c_(i-1) a_i / i) divides only by the iteration number.
// 1 / i for CF2's iteration numbers: a table on the host (two scalar divisions per iteration
// shared the divider with the SIMD packs' one and cost 15% of CF2's time on an AVX2 EPYC);
// the device divides.
struct Reciprocals {
  double of[kCF2MaxTerms + 1];
  constexpr Reciprocals() : of{} {
    for (int i = 1; i <= kCF2MaxTerms; ++i) of[i] = 1.0 / i;
  }
};
inline constexpr Reciprocals kReciprocals{};
FASTLOSS_HD double reciprocal(int i) {
#if defined(__CUDA_ARCH__)
  return 1.0 / double(i);
#else
  return kReciprocals.of[i];
#endif
}

template <typename T>
FASTLOSS_HD KStart<T> cf2_k(const T& u, const T& x) {
  constexpr int kRescaleEvery = 16;  // B_i grows by < 1000 per iteration: no overflow between
  T b = 2.0 * (1.0 + x);
  T denominator_prev = 1.0, denominator = b;  // B_(i-2), B_(i-1)
  T h = 1.0 / b, delh = h;
  const T a1 = 0.25 - u * u;
  T t_prev = 0.0, t = a1;  // t_0 (q_0 = 0) and t_1 = c_1 q_1 = a1
  T q = a1;                // a1 + sum_i t_i
  T a = -a1;
  T s = 1.0 + q * delh;
  double two_i_minus_2 = 0.0;
  for (int i = 2; i <= kCF2MaxTerms; ++i) {
    const T a_prev = a;
    two_i_minus_2 += 2.0;
    a = a - two_i_minus_2;
    const T t_next = ((a_prev * reciprocal(i - 1)) * t_prev + b * t) * reciprocal(i);
    t_prev = t;
    t = t_next;
    q = q + t_next;
    b = b + 2.0;
    const T denominator_next = b * denominator + a * denominator_prev;
    delh = delh * (-a * denominator_prev / denominator_next);
    denominator_prev = denominator;
    denominator = denominator_next;
    if (i % kRescaleEvery == 0) {
      const T scale = 1.0 / denominator;
      denominator_prev = denominator_prev * scale;
      denominator = 1.0;
    }
    h = h + delh;
    const T dels = q * delh;
    s = s + dels;
    // Tested every other iteration (a SIMD pack's test of all lanes is not cheap).
    if ((i & 1) == 0 && negligible(dels, s) && negligible(delh, h)) break;
  }
  h = a1 * h;
  const T inverse_s = 1.0 / s;
  return {0.5 * (kLnPi - kLn2 - f_log(x)) - x, inverse_s, (0.5 * (u + x + 0.5 - h)) * inverse_s};
}

// K_v for v < 16 and hypot(v, x) < 29: K_u (u = v - round(v)), then n = round(v) steps of
// the forward recurrence (stable upwards) on y_k = (x/2)^k K_(u+k) / K_u times the start's
// factor: y_(k+1) = (x/2)^2 y_(k-1) + (u + k) y_k, all terms positive, and
// log K_(u+n) = log_k_part + n log(2/x) + log y_n.
// The x-tangent of a Dual rescaled to d/d(log x) and back: Temme's terms have x-derivatives
// ~ u / x that overflow at tiny x, while their log-x derivatives stay O(1).
FASTLOSS_HD double to_log_x_tangent(double x) { return x; }
FASTLOSS_HD Dual to_log_x_tangent(const Dual& x) { return {x.a, x.dv, x.dx * x.a}; }
FASTLOSS_HD double from_log_x_tangent(double r, double) { return r; }
FASTLOSS_HD Dual from_log_x_tangent(const Dual& r, double x) { return {r.a, r.dv, r.dx / x}; }
// For Dual2, x is the variable x itself (seeded with tangent 1: the recurrence serves
// hypot(v, x) < 29 only): with x = e^t, x_t = x_tt = x; back, r_x = r_t / x,
// r_vx = r_vt / x and r_xx = (r_tt - r_t) / x^2 (divided twice: x^2 underflows at tiny x).
FASTLOSS_HD Dual2 to_log_x_tangent(const Dual2& x) { return {x.a, 0.0, x.a, 0.0, 0.0, x.a}; }
FASTLOSS_HD Dual2 from_log_x_tangent(const Dual2& r, double x) {
  return {r.a, r.dv, r.dx / x, r.dvv, r.dvx / x, (r.dxx - r.dx) / x / x};
}

// log K_(u+n)(x) by Temme's series and the recurrence for second derivatives (x in log-x
// tangent form). Temme's K_u = sum carries e^sigma = (2/x)^u inside its terms, and d^2/du^2 of
// the log of such a sum cancels terms of size log(2/x)^2 (K's d^2/dv^2 was 6e-12 relative at
// x = 1e-10, 1e-9 at 1e-300). Here e^|sigma| is factored out of every term and carried as
// its log: K_u = e^a S and (x/2) K_(u+1) = e^(a - b) S1 with a = |sigma|, e2 = e^(-2a), and
// b = 2a where sigma <= -1/2 (there (x/2) K_(u+1) ~ e^sigma is the smaller one by e2: the sum S1
// is taken divided by e2, its term coefficients c / e2 from their log at the first term).
// The recurrence runs on S1's scale: its first step takes (x/2)^2 e^b K_u-scaled from one exp.
FASTLOSS_HD Dual2 temme_recurrence_log_kv(const Dual2& u, const Dual2& x, int n) {
  const Dual2 half_x = 0.5 * x;
  const Dual2 log_2_over_x = kLn2 - f_log(x);
  const Dual2 sigma = u * log_2_over_x;
  const Dual2 w = u * u;
  const Dual2 g1 = temme_gamma1(w), g2 = temme_gamma2(w);
  const Dual2 half_gamma_plus = 0.5 / (g2 - u * g1);   // Gamma(1 + u) / 2
  const Dual2 half_gamma_minus = 0.5 / (g2 + u * g1);  // Gamma(1 - u) / 2
  // For n = 0 and |sigma| < 1/2 nothing is factored out (a = 0: Temme's own terms, whose
  // curvature in u is then that of log K_u itself): a = |sigma| would leave d/dv of the log
  // at v = 0 a rounding of log(2/x) instead of 0, divided by x in d^2/dv dx. For n >= 1 the
  // factor always goes: (x/2) K_(u+1) ~ e^sigma starts the recurrence, whose log has a small
  // curvature (psi'(v) at tiny x) next to e^sigma's log(2/x)^2 however small sigma is.
  const bool scaled = n >= 1 || fabs(sigma.a) >= 0.5;
  const bool negative = scaled && sigma.a < 0.0;
  const Dual2 a = scaled ? (negative ? -sigma : sigma) : Dual2(0.0);
  const Dual2 e2 = f_exp(-2.0 * a);
  // cosh(sigma) e^-a and sinh(sigma) / sigma e^-a; p e^-a and q e^-a.
  const Dual2 cosh_scaled = scaled ? 0.5 * (1.0 + e2) : f_cosh(sigma);
  const Dual2 sinh_over_scaled = a.a >= 0.5 ? (1.0 - e2) / (2.0 * a) : sinh_over_series(sigma) * f_exp(-a);
  const Dual2 pi_u_sin = pi_u_over_sin(u);
  Dual2 f = pi_u_sin * (g1 * cosh_scaled + g2 * sinh_over_scaled * log_2_over_x);
  const Dual2 e_sigma = scaled ? Dual2(1.0) : f_exp(sigma);
  Dual2 p = negative ? e2 * half_gamma_plus : e_sigma * half_gamma_plus;
  // f takes p and q through p + q and p - q (as temme_k). Unscaled and for |u| < 1/4, they
  // start from their even and odd forms: with p and q apart, d^2/du dx cancelled O(1) parts at
  // tiny u (5e-4 relative at v = 1e-12, x = 1). Otherwise from p and q.
  TemmeEvenOdd<Dual2> pq;
  if (scaled || w.a >= 0.0625) {
    const Dual2 q = scaled ? (negative ? half_gamma_minus : e2 * half_gamma_minus) : half_gamma_minus / e_sigma;
    pq = {p + q, p - q};
  } else {  // a = 0: cosh_scaled and sinh_over_scaled are cosh(sigma) and sinh(sigma) / sigma
    pq = TemmeEvenOdd<Dual2>::from_parts(u, w, g1, g2, pi_u_sin, cosh_scaled, sinh_over_scaled * log_2_over_x);
  }
  Dual2 p1 = half_gamma_plus;  // p e^-a / e2 where sigma < 0 (S1's scale)
  const Dual2 c_step = half_x * half_x;
  Dual2 c = 1.0, c1 = 0.0;  // c_i / D_i, and c_i / D_i / e2 where sigma < 0
  Dual2 sum = f, sum1 = negative ? p1 : p;
  for (int i = 1; i <= kTemmeMaxTerms; ++i) {
    const double di = i;
    const Dual2 step = c_step / (di * (di * di - w));
    c = c * step;
    // (x/2)^2 / e2 = exp(2 (a + log(x/2))) <= x/2: no overflow where 1 / e2 would.
    if (negative) c1 = i == 1 ? f_exp(2.0 * (a - log_2_over_x)) / (1.0 - w) : c1 * step;
    f = di * f + pq.even;
    pq = pq.next(di, u);
    p = p * (di + u);
    p1 = p1 * (di + u);
    const Dual2 term = c * f;
    const Dual2 term1 = negative ? c * p1 - di * (c1 * f) : c * (p - di * f);
    sum = sum + term;
    sum1 = sum1 + term1;
    if ((i & 1) == 0 && negligible(term, sum) && negligible(term1, sum1)) break;
  }
  if (n == 0) return a + f_log(sum);  // u = v >= 0
  const Dual2 log_scale1 = negative ? -a : a;  // the log of S1's scale, a - b
  // y_k = (x/2)^k K_(u+k) / e^(a - b): y_0 = e^b S (only in the first step), y_1 = S1.
  const Dual2 first_factor = negative ? f_exp(2.0 * (a - log_2_over_x)) : c_step;  // (x/2)^2 e^b
  Dual2 y_prev = sum1, y = sum1;
  if (n >= 2) y = first_factor * sum + (u + 1.0) * sum1;
  for (int k = 2; k < n; ++k) {
    const Dual2 y_next = c_step * y_prev + (u + double(k)) * y;
    y_prev = y;
    y = y_next;
  }
  return log_scale1 + double(n) * log_2_over_x + f_log(y);
}

template <typename T>
FASTLOSS_HD T recurrence_log_kv(const T& v, const T& x_in) {
  const T x = to_log_x_tangent(x_in);
  const double n = floor(val(v) + 0.5);
  const T u = v - n;
  if constexpr (DerivativeOrder<T>::value == 2) {
    if (val(x) <= temme_max_x<T>()) return from_log_x_tangent(temme_recurrence_log_kv(u, x, int(n)), val(x));
  }
  const KStart<T> start = val(x) <= temme_max_x<T>() ? temme_k(u, x) : cf2_k(u, x);
  const T half_x = 0.5 * x;
  const T half_x2 = half_x * half_x;
  T y_prev = start.k_factor, y = start.k1_factor;
  for (int k = 1; k < int(n); ++k) {
    const T y_next = half_x2 * y_prev + (u + double(k)) * y;
    y_prev = y;
    y = y_next;
  }
  const T y_n = n >= 1.0 ? y : y_prev;
  return from_log_x_tangent(start.log_k_part + n * (kLn2 - f_log(x)) + f_log(y_n), val(x));
}

// ---- region choice -----------------------------------------------------------------

// Which method serves (v, x), v >= 0, 0 < x < inf (the CPU kernels group elements by it).
enum class Method : int { Hankel = 0, Debye = 1, Small = 2 };  // Small: series (I), Temme / CF2 (K)
constexpr int kMethods = 3;

// hypot(v, x) >= kDebyeMinHypot without the root: x^2 = inf (x > 1e154) compares true.
FASTLOSS_HD Method method_for(double v, double x) {
  const bool hankel = (x >= kHankelMinX) & (4.0 * v * v <= x);
  const bool debye = (v >= kDebyeMinOrder) | (v * v + x * x >= kDebyeMinHypot * kDebyeMinHypot);
  return hankel ? Method::Hankel : debye ? Method::Debye : Method::Small;
}

template <typename T>
FASTLOSS_HD T log_iv_finite(const T& v, const T& x) {
  switch (method_for(val(v), val(x))) {
    case Method::Hankel: return hankel_log<true>(v, x);
    case Method::Debye: return debye_log<true>(v, x);
    default: return series_log_iv(v, x);
  }
}

template <typename T>
FASTLOSS_HD T log_kv_finite(const T& v, const T& x) {
  switch (method_for(val(v), val(x))) {
    case Method::Hankel: return hankel_log<false>(v, x);
    case Method::Debye: return debye_log<false>(v, x);
    default: return recurrence_log_kv(v, x);
  }
}

// ---- public entry points -----------------------------------------------------------

// log I_v(x): v >= 0 (else NaN), x >= 0 (else NaN); exact limits at x = 0, x = inf, v = inf.
FASTLOSS_HD double log_iv(double v, double x) {
  if (!(v >= 0.0) || !(x >= 0.0)) return kNaN;  // also NaN inputs
  if (x == 0.0) return v == 0.0 ? 0.0 : -kInf;
  if (x == kInf) return v == kInf ? kNaN : kInf;
  if (v == kInf) return -kInf;
  return log_iv_finite(v, x);
}

// log K_v(x) for any real v (K_-v = K_v), x >= 0 (else NaN).
FASTLOSS_HD double log_kv(double v, double x) {
  v = fabs(v);
  if (v != v || !(x >= 0.0)) return kNaN;
  if (x == 0.0) return kInf;
  if (x == kInf) return v == kInf ? kNaN : -kInf;
  if (v == kInf) return kInf;
  return log_kv_finite(v, x);
}

struct LogBesselGrad {
  double d_dv;  // d/dv log F_v(x)
  double d_dx;  // d/dx log F_v(x)
};

// Derivatives of log I_v(x). At x = 0 and at infinite inputs: the one-sided limits.
FASTLOSS_HD LogBesselGrad log_iv_grad(double v, double x) {
  if (!(v >= 0.0) || !(x >= 0.0)) return {kNaN, kNaN};
  if (x == 0.0) return {-kInf, v == 0.0 ? 0.0 : kInf};
  if (x == kInf) return {v == kInf ? kNaN : 0.0, v == kInf ? kNaN : 1.0};
  if (v == kInf) return {-kInf, kInf};
  const Dual r = log_iv_finite(Dual(v, 1.0, 0.0), Dual(x, 0.0, 1.0));
  return {r.dv, r.dx};
}

// Derivatives of log K_v(x) in v (odd: K is even in v) and x.
FASTLOSS_HD LogBesselGrad log_kv_grad(double v, double x) {
  const double sign = v < 0.0 ? -1.0 : 1.0;
  v = fabs(v);
  if (v != v || !(x >= 0.0)) return {kNaN, kNaN};
  if (x == 0.0) return {v == 0.0 ? 0.0 : sign * kInf, -kInf};
  if (x == kInf) return {v == kInf ? kNaN : 0.0, v == kInf ? kNaN : -1.0};
  if (v == kInf) return {sign * kInf, -kInf};
  const Dual r = log_kv_finite(Dual(v, 1.0, 0.0), Dual(x, 0.0, 1.0));
  return {sign * r.dv, r.dx};
}

struct LogBesselHess {
  double d_vv;  // d^2/dv^2 log F_v(x)
  double d_vx;  // d^2/dv dx
  double d_xx;  // d^2/dx^2
};

// The tangents of v and x for the second derivatives, and the entries divided back by them.
// Seeds of 1, except where v or x exceeds 2^400: there second-order parts such as -1 / x^2
// underflow while the entries (~1 / hypot(v, x)) do not, so the seeds are the powers of two
// nearest max(v, 1) and x (exact scalings): every part is then that of a function of v / sv
// and x / sx, of moderate size.
struct HessSeeds {
  double sv = 1.0, sx = 1.0;
  FASTLOSS_HD HessSeeds(double v, double x) {
    if (v > 0x1p400 || x > 0x1p400) {
      sv = ::ldexp(1.0, ::ilogb(v > 1.0 ? v : 1.0));
      sx = ::ldexp(1.0, ::ilogb(x));
    }
  }
  FASTLOSS_HD LogBesselHess unscale(const Dual2& r) const { return {r.dvv / sv / sv, r.dvx / sv / sx, r.dxx / sx / sx}; }
};

// Second derivatives of log I_v(x). At x = 0, x = inf and v = inf, the limits: as x -> 0,
// log I = v log(x/2) - lgamma(v + 1) + O(x^2), and log I_0 = x^2 / 4 + O(x^4); as v -> inf
// at fixed x the same leading terms.
FASTLOSS_HD LogBesselHess log_iv_hess(double v, double x) {
  if (!(v >= 0.0) || !(x >= 0.0)) return {kNaN, kNaN, kNaN};
  if (x == 0.0) return {-trigamma(v + 1.0), kInf, v == 0.0 ? 0.5 : -kInf};
  if (x == kInf) return v == kInf ? LogBesselHess{kNaN, kNaN, kNaN} : LogBesselHess{0.0, 0.0, 0.0};
  if (v == kInf) return {0.0, 1.0 / x, -kInf};
  const HessSeeds seeds(v, x);
  return seeds.unscale(log_iv_finite(Dual2(v, seeds.sv, 0.0), Dual2(x, 0.0, seeds.sx)));
}

// Second derivatives of log K_v(x): d_vv and d_xx even in v, d_vx odd. As x -> 0, log K_v =
// lgamma(v) + v log(2/x) - log 2 + o(1) for v > 0, and log K_0 = log(log(2/x) - gamma) + o(1),
// whose d_vv (log(2/x)^2 at v = 0) grows without bound.
FASTLOSS_HD LogBesselHess log_kv_hess(double v, double x) {
  const double sign = v < 0.0 ? -1.0 : 1.0;
  v = fabs(v);
  if (v != v || !(x >= 0.0)) return {kNaN, kNaN, kNaN};
  if (x == 0.0) return {v == 0.0 ? kInf : trigamma(v), v == 0.0 ? 0.0 : -sign * kInf, kInf};
  if (x == kInf) return v == kInf ? LogBesselHess{kNaN, kNaN, kNaN} : LogBesselHess{0.0, 0.0, 0.0};
  if (v == kInf) return {0.0, -sign / x, kInf};
  const HessSeeds seeds(v, x);
  const LogBesselHess h = seeds.unscale(log_kv_finite(Dual2(v, seeds.sv, 0.0), Dual2(x, 0.0, seeds.sx)));
  return {h.d_vv, sign * h.d_vx, h.d_xx};
}

}  // namespace FASTLOSS_ISA_NAMESPACE
}  // namespace fastloss::log_bessel
