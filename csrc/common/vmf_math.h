// von Mises-Fisher helpers in double precision, written once for the host and the device,
// for the sphere S^(p-1) in R^p with nu = p/2 - 1:
//   A_p(x) = I_(nu+1)(x) / I_nu(x), the mean resultant length, and its first two derivatives;
//   1 - A_p(x) to full relative precision (1 - A itself loses it as A -> 1);
//   log C_p(x), the log normalizing constant of the density;
//   the entropy -log C_p(x) - x A_p(x), which keeps its precision where both terms are ~x;
//   the maximum-likelihood concentration, the root of A_p(x) = rbar.
//
// Methods (accuracy measured against mpmath in tests/test_vmf.py):
//   Gauss's continued fraction A = x / (2(nu+1) + x^2 / (2(nu+2) + ...)), 40 terms bottom up:
//     every term positive; A to full precision while x <= nu + 20 or x < 30, and A', A'' to
//     ~3e-16 (nu >= 5) ... 1e-14 (nu near 0, x near 30) there.
//   Debye's uniform expansion (20 terms) where nu >= 16 or x >= 30, in the form
//     1 - A = (nu + r - x) / (r + nu) + x / (2 r^2) - d/dx log Q,  r = hypot(nu, x),
//     Q = 1 + sum_k Q_k(t^2) / r^k,  t = nu / r  (Q_k from common/log_bessel_tables.h),
//   whose terms do not cancel one another, nor do their derivatives. For one p (one nu), Q is
//   a polynomial in 1 / r: its coefficients are formed once per call (`Order`), and each
//   element sums one polynomial instead of twenty. It gives A beyond the fraction's range
//   (there A > 0.4, so 1 - (1 - A) keeps A's precision), A' wherever it serves (no division
//   per term), A'' beyond the fraction's range, and 1 - A and the entropy's log I - x.
//   log C and the entropy at small x (x^2 <= 4 (nu + 1)) from the power series of I_nu.
// Derivatives in x are carried through the same arithmetic as truncated Taylor series
// (`Jet`), so each has the accuracy of its method's value.
#pragma once

#include "common/log_bessel.h"
#include "common/macros.h"

namespace fastloss::vmf {
inline namespace FASTLOSS_ISA_NAMESPACE {

namespace lb = fastloss::log_bessel;

constexpr double kFractionMaxExcess = 20.0;  // the fraction's value serves x <= nu + 20
constexpr int kFractionTerms = 40;
constexpr double kDebyeMinOrder = 16.0;
constexpr double kDebyeMinX = 30.0;
constexpr int kDebyeTerms = 20;
constexpr double kDebyeLogIMinX = 20.0;  // log C and the entropy: Debye's log I from here too
// Below it, Newton's A was evaluated where A(x) = x / p to the last bit: kappa = p rbar.
constexpr double kTinyRbar = 1e-100;
constexpr int kDebyeDegree = 3 * kDebyeTerms;  // Q_k(t^2) / r^k has powers of 1 / r up to 3k

// What depends on p alone. Debye's Q = sum_n b_n z^n in z = sigma / r: each term
// c_kj t^(2j) / r^k of Q_k(t^2) / r^k is c_kj (nu / sigma)^(2j) sigma^-k z^(k + 2j), and
// sigma = max(nu, 1) keeps every b_n and z (r >= nu and r >= 30 where Debye serves) <= 1, so
// that nothing overflows at any p. The terms are only regrouped: the sum's rounding error
// stays that of the terms themselves.
struct Order {
  double p;
  double nu;
  double sigma;
  double log_sphere_area;    // log |S^(p-1)| = log(2) + (p/2) log(pi) - lgamma(p/2)
  double half_p_log_two_pi;  // (p/2) log(2 pi)
  double debye[kDebyeDegree + 1];
};

// On the host (the kernels receive it as an argument).
inline Order make_order(double p) {
  Order o{};
  o.p = p;
  o.nu = 0.5 * p - 1.0;
  o.sigma = o.nu > 1.0 ? o.nu : 1.0;
  o.log_sphere_area = lb::kLn2 + 0.5 * p * lb::kLnPi - ::lgamma(0.5 * p);
  o.half_p_log_two_pi = 0.5 * p * (lb::kLn2 + lb::kLnPi);
  const double ratio2 = (o.nu / o.sigma) * (o.nu / o.sigma);
  double inv_sigma_k = 1.0;  // sigma^-k
  for (int k = 0; k <= kDebyeTerms; ++k) {
    double ratio_2j = 1.0;  // (nu / sigma)^(2j)
    for (int j = 0; j <= k; ++j) {
      o.debye[k + 2 * j] += lb::kDebyeQ[k][j] * ratio_2j * inv_sigma_k;
      ratio_2j *= ratio2;
    }
    inv_sigma_k /= o.sigma;
  }
  return o;
}

// ---- truncated Taylor series in x: c[k] = f^(k)(x0) / k! --------------------------------

template <int N>
struct Jet {
  double c[N + 1];
  Jet() = default;
  // A constant (also what the Debye polynomials' `T(0)` builds).
  FASTLOSS_HD explicit Jet(double a) {
FASTLOSS_UNROLL
    for (int k = 0; k <= N; ++k) c[k] = k == 0 ? a : 0.0;
  }
};

// The independent variable at x0.
template <int N>
FASTLOSS_HD Jet<N> variable(double x0) {
  Jet<N> r(x0);
  if constexpr (N >= 1) r.c[1] = 1.0;
  return r;
}
template <int N>
FASTLOSS_HD Jet<N> operator+(const Jet<N>& a, const Jet<N>& b) {
  Jet<N> r;
FASTLOSS_UNROLL
  for (int k = 0; k <= N; ++k) r.c[k] = a.c[k] + b.c[k];
  return r;
}
template <int N>
FASTLOSS_HD Jet<N> operator-(const Jet<N>& a, const Jet<N>& b) {
  Jet<N> r;
FASTLOSS_UNROLL
  for (int k = 0; k <= N; ++k) r.c[k] = a.c[k] - b.c[k];
  return r;
}
template <int N>
FASTLOSS_HD Jet<N> operator+(double a, Jet<N> b) {
  b.c[0] += a;
  return b;
}
template <int N>
FASTLOSS_HD Jet<N> operator+(Jet<N> a, double b) {
  a.c[0] += b;
  return a;
}
template <int N>
FASTLOSS_HD Jet<N> operator-(double a, const Jet<N>& b) {
  Jet<N> r;
FASTLOSS_UNROLL
  for (int k = 0; k <= N; ++k) r.c[k] = k == 0 ? a - b.c[0] : -b.c[k];
  return r;
}
template <int N>
FASTLOSS_HD Jet<N> operator*(Jet<N> a, double s) {
FASTLOSS_UNROLL
  for (int k = 0; k <= N; ++k) a.c[k] *= s;
  return a;
}
template <int N>
FASTLOSS_HD Jet<N> operator*(double s, const Jet<N>& a) { return a * s; }
template <int N>
FASTLOSS_HD Jet<N> operator*(const Jet<N>& a, const Jet<N>& b) {
  Jet<N> r;
FASTLOSS_UNROLL
  for (int k = 0; k <= N; ++k) {
    double s = 0.0;
FASTLOSS_UNROLL
    for (int i = 0; i <= k; ++i) s += a.c[i] * b.c[k - i];
    r.c[k] = s;
  }
  return r;
}
template <int N>
FASTLOSS_HD Jet<N> operator/(const Jet<N>& a, const Jet<N>& b) {
  Jet<N> q;
  const double inv = 1.0 / b.c[0];
FASTLOSS_UNROLL
  for (int k = 0; k <= N; ++k) {
    double s = a.c[k];
FASTLOSS_UNROLL
    for (int i = 1; i <= k; ++i) s -= b.c[i] * q.c[k - i];
    q.c[k] = s * inv;
  }
  return q;
}
template <int N>
FASTLOSS_HD Jet<N> operator/(double a, const Jet<N>& b) { return Jet<N>(a) / b; }
// f' as a series one order shorter.
template <int N>
FASTLOSS_HD Jet<N - 1> derivative(const Jet<N>& a) {
  Jet<N - 1> r;
FASTLOSS_UNROLL
  for (int k = 0; k < N; ++k) r.c[k] = (k + 1) * a.c[k + 1];
  return r;
}
template <int M, int N>
FASTLOSS_HD Jet<M> truncate(const Jet<N>& a) {
  static_assert(M <= N, "truncate to a shorter series");
  Jet<M> r;
FASTLOSS_UNROLL
  for (int k = 0; k <= M; ++k) r.c[k] = a.c[k];
  return r;
}

// r = hypot(nu, x) as a series in x, from r r' = x (no square that overflows at large x):
// r_1 = x / r, r_(k+1) = (x_k - sum_(i=1..k) (k+1-i) r_i r_(k+1-i)) / ((k + 1) r).
template <int N>
FASTLOSS_HD Jet<N> hypot_jet(double nu, double x) {
  Jet<N> r(::hypot(nu, x));
FASTLOSS_UNROLL
  for (int k = 0; k < N; ++k) {
    double s = k == 0 ? x : k == 1 ? 1.0 : 0.0;
FASTLOSS_UNROLL
    for (int i = 1; i <= k; ++i) s -= (k + 1 - i) * r.c[i] * r.c[k + 1 - i];
    r.c[k + 1] = s / ((k + 1) * r.c[0]);
  }
  return r;
}

// ---- methods (0 < x < inf) ----------------------------------------------------------

// Gauss's continued fraction for A, bottom up (each step damps the error below it):
// tail_j = 2 (nu + j) + x^2 / tail_(j+1), A = x / tail_1.
// The value alone is carried as tail_j = n_j / n_(j+1), n_j = 2 (nu + j) n_(j+1) + x^2 n_(j+2):
// multiply-adds, where the plain form puts a division on the chain from each term to the next
// (5x slower); the terms are positive (no cancellation), rescaled by powers of two (exact)
// before they can overflow. Derivatives keep the plain form: those of n_2 / n_1 are a
// difference of two large logarithmic derivatives (2e-13 off at nu = 0, x = 18).
template <int N>
FASTLOSS_HD Jet<N> fraction(double nu, double x) {
  const Jet<N> xj = variable<N>(x);
  const Jet<N> x2 = xj * xj;  // underflows to 0 at tiny x, leaving the exact x / (2(nu + 1))
  if constexpr (N == 0) {
    double n_above = 1.0;                          // n_(K+1)
    double n = 2.0 * (nu + kFractionTerms);        // n_K: tail_K = 2 (nu + K)
    for (int j = kFractionTerms - 1; j >= 1; --j) {
      const double n_below = 2.0 * (nu + j) * n + x2.c[0] * n_above;
      n_above = n;
      n = n_below;
      if (j % 8 == 0) {  // each step grows n by < 2 (nu + j) + x: 8 steps stay finite
        const double scale = ::ldexp(1.0, -::ilogb(n));
        n *= scale;
        n_above *= scale;
      }
    }
    return Jet<N>(x * (n_above / n));
  } else {
    Jet<N> tail(2.0 * (nu + kFractionTerms));
    for (int j = kFractionTerms - 1; j >= 1; --j) tail = 2.0 * (nu + j) + x2 / tail;
    return xj / tail;
  }
}

FASTLOSS_HD bool debye_serves(double nu, double x) { return nu >= kDebyeMinOrder || x >= kDebyeMinX; }

// The polynomial sum_n b[n] z^n and its first M derivatives at z0, as series coefficients
// (Horner's scheme carried to the Taylor coefficients: M + 1 multiply-adds per degree).
template <int M, int kDegree>
FASTLOSS_HD Jet<M> polynomial_taylor(const double (&b)[kDegree + 1], double z0) {
  Jet<M> d(0.0);
  for (int n = kDegree; n >= 0; --n) {
FASTLOSS_UNROLL
    for (int i = M; i >= 1; --i) d.c[i] = d.c[i] * z0 + d.c[i - 1];
    d.c[0] = d.c[0] * z0 + b[n];
  }
  return d;
}

// f(g(x)) from f's series at g(x0) and g's series at x0 (Horner in g - g(x0)).
template <int M>
FASTLOSS_HD Jet<M> compose(const Jet<M>& f, Jet<M> g) {
  g.c[0] = 0.0;
  Jet<M> r(f.c[M]);
FASTLOSS_UNROLL
  for (int i = M - 1; i >= 0; --i) r = r * g + f.c[i];
  return r;
}

// 1 - A from Debye's expansion, with N derivatives; also log I_nu(x) - x into *log_i_scaled
// when given. The series runs one order longer, as d/dx log Q uses one more derivative of Q.
template <int N>
FASTLOSS_HD Jet<N> debye_complement(const Order& o, double x, double* log_i_scaled) {
  constexpr int M = N + 1;
  const double nu = o.nu;
  const Jet<M> xj = variable<M>(x);
  const Jet<M> r = hypot_jet<M>(nu, x);
  const Jet<M> w = 1.0 / r;
  const Jet<M> z = o.sigma * w;
  const Jet<M> q = compose(polynomial_taylor<M, kDebyeDegree>(o.debye, z.c[0]), z);
  const Jet<M> excess = nu + nu * (nu / (r + xj));  // nu + r - x, every part positive
  const Jet<N> dlog_q = derivative(q) / truncate<N>(q);
  const Jet<N> complement = truncate<N>(excess / (r + nu) + 0.5 * (xj * w * w)) - dlog_q;
  if (log_i_scaled != nullptr) {
    // log I - x = (r - x) - nu asinh(nu / x) - log(2 pi r) / 2 + log Q, asinh(nu / x) =
    // log1p((nu + r - x) / x); log(2 pi) + log r, as 2 pi r overflows beyond r ~ 2.9e307.
    *log_i_scaled = nu * (nu / (r.c[0] + x)) - nu * ::log1p(excess.c[0] / x) -
                    0.5 * (::log(2.0 * lb::kPi) + ::log(r.c[0])) + ::log(q.c[0]);
  }
  return complement;
}

// Where the continued fraction gives A's value: within 20 of nu, and below Debye's region
// altogether (x < 30, nu < 16: 40 terms reach 3.5e-16 there too, measured against mpmath).
FASTLOSS_HD bool fraction_serves(double nu, double x) {
  return x <= nu + kFractionMaxExcess || !debye_serves(nu, x);
}

// A and its first N derivatives (as series coefficients), 0 < x < inf: the fraction where it
// serves, except for A' where Debye's expansion also serves (its sum needs no division per
// term); Debye's beyond. Not A'' from Debye where the fraction serves: Debye's terms are O(1)
// there and their sum is accurate to ~1e-16 absolute, while A'' -> 0 with x (wrong sign at
// x = 1e-20, p = 40).
template <int N>
FASTLOSS_HD Jet<N> mean_resultant_jet(const Order& o, double x) {
  const double nu = o.nu;
  const bool fraction_value = fraction_serves(nu, x);
  if (!debye_serves(nu, x) || (fraction_value && N != 1)) return fraction<N>(nu, x);
  Jet<N> a = 1.0 - debye_complement<N>(o, x, nullptr);  // A > 0.4 where the fraction does not serve
  if (fraction_value) a.c[0] = fraction<0>(nu, x).c[0];  // A may be small: not from 1 - (1 - A)
  return a;
}

// A and, for Newton's steps, A': Debye's where it serves; elsewhere (x < 30, nu < 16, where
// A' > 5e-4) the identity A' = 1 - A^2 - (2 nu + 1) A / x, whose terms cancel to at most 2 of
// their 16 digits there (a step's error then shrinks the next by that factor), instead of the
// fraction's derivative (a division per term).
FASTLOSS_HD Jet<1> mean_resultant_for_newton(const Order& o, double x) {
  if (debye_serves(o.nu, x)) return mean_resultant_jet<1>(o, x);
  Jet<1> a(fraction<0>(o.nu, x).c[0]);
  a.c[1] = (1.0 - a.c[0]) * (1.0 + a.c[0]) - (2.0 * o.nu + 1.0) * (a.c[0] / x);
  return a;
}

// ---- public entry points (double in and out; the edges of the domain handled) --------------

constexpr double kNaN = lb::kNaN;
constexpr double kInf = lb::kInf;

// The n-th derivative of A_p at x >= 0 (n = 0, 1, 2; x < 0 or NaN gives NaN).
template <int kOrder>
FASTLOSS_HD double mean_resultant_derivative(const Order& o, double x) {
  static_assert(kOrder >= 0 && kOrder <= 2, "A, A' or A''");
  if (!(x >= 0.0)) return kNaN;
  // A is odd in x: A(0) = 0, A'(0) = 1 / (2 nu + 2) = 1 / p, A''(0) = 0; at infinity A -> 1.
  if (x == 0.0) return kOrder == 1 ? 1.0 / o.p : 0.0;
  if (x == kInf) return kOrder == 0 ? 1.0 : 0.0;
  const Jet<kOrder> a = mean_resultant_jet<kOrder>(o, x);
  return kOrder == 2 ? 2.0 * a.c[kOrder] : a.c[kOrder];
}

// 1 - A_p(x), x >= 0: to full relative precision where A -> 1 (Debye's region); below it
// (x < 30, nu < 16) 1 - A > 0.016, formed from A (~1e-16 absolute).
FASTLOSS_HD double mean_resultant_complement(const Order& o, double x) {
  if (!(x >= 0.0)) return kNaN;
  if (x == kInf) return 0.0;
  if (x > 0.0 && debye_serves(o.nu, x)) return debye_complement<0>(o, x, nullptr).c[0];
  return 1.0 - mean_resultant_derivative<0>(o, x);
}

// I_nu(x) / ((x/2)^nu / Gamma(nu + 1)) - 1, the power series' tail sum_(k>=1) (x^2/4)^k /
// (k! (nu + 1)_k), for x^2 <= 4 (nu + 1), where each term is below 1 / k! of the first.
FASTLOSS_HD double series_tail(double nu, double x) {
  const double q = 0.25 * x * x;
  double term = 1.0, tail = 0.0;
  for (int k = 1; k <= 40; ++k) {
    term *= q / (k * (nu + k));
    tail += term;
    if (term <= lb::kTol * tail) break;
  }
  return tail;
}

// Where log C and the entropy take the power series (no log of x: the plain form's nu log x
// terms cancelled to ~nu |log x| ulps, and overflowed to -inf once 2 nu / x did) and where
// Debye's series (from x = 20 too, r >= 20: its truncation is < 2e-16 there; 2.3x closer to
// mpmath than log I's own methods between 20 and 30 at small nu, measured).
FASTLOSS_HD bool small_x_series(double nu, double x) { return x * x <= 4.0 * (nu + 1.0); }
FASTLOSS_HD bool debye_log_i(double nu, double x) { return debye_serves(nu, x) || x >= kDebyeLogIMinX; }

// log C_p(x), the log normalizing constant of the density on S^(p-1), x >= 0 (x = 0: minus
// the log area of the sphere; x = inf: -inf, the density concentrates at its mean).
FASTLOSS_HD double log_normalizer(const Order& o, double x) {
  if (!(x >= 0.0)) return kNaN;
  if (x == kInf) return -kInf;
  const double nu = o.nu;
  // -log C = log |S^(p-1)| + log(series) there.
  if (small_x_series(nu, x)) return -(o.log_sphere_area + ::log1p(series_tail(nu, x)));
  double log_i;
  if (debye_log_i(nu, x)) {
    debye_complement<0>(o, x, &log_i);  // log I - x
    log_i += x;
  } else {
    log_i = lb::log_iv_finite(nu, x);
  }
  return nu * ::log(x) - o.half_p_log_two_pi - log_i;
}

// The differential entropy -log C_p(x) - x A_p(x), x >= 0 (x = inf: -inf, a point mass).
FASTLOSS_HD double entropy(const Order& o, double x) {
  if (!(x >= 0.0)) return kNaN;
  if (x == kInf) return -kInf;
  const double nu = o.nu;
  if (!small_x_series(nu, x) && debye_log_i(nu, x)) {
    // (log I - x) - nu log x + (p/2) log(2 pi) + x (1 - A): the ~x parts cancelled exactly.
    double log_i_scaled;
    const double complement = debye_complement<0>(o, x, &log_i_scaled).c[0];
    return log_i_scaled - nu * ::log(x) + o.half_p_log_two_pi + x * complement;
  }
  return -log_normalizer(o, x) - x * mean_resultant_derivative<0>(o, x);
}

// The root of A_p(kappa) = rbar, 0 <= rbar < 1 (else NaN): Newton's method from Banerjee et
// al.'s start rbar (p - rbar^2) / (1 - rbar^2), kept inside Sra's bracket
// [rbar (p - 2), rbar p] / (1 - rbar^2) (a step that leaves the bracket bisects it); at most
// `iterations` steps, fewer once A_p(kappa) is within rounding of rbar. A_p is increasing and
// concave, so the steps converge from either side; from this start they reach the root
// within 6 steps over p = 2 ... 32768 and rbar from 1e-300 to 1 - 1e-16 (4-5 typically).
FASTLOSS_HD double kappa_mle(const Order& o, double rbar, int iterations) {
  if (!(rbar >= 0.0 && rbar < 1.0)) return kNaN;
  const double p = o.p;
  // rbar = 0: the uniform distribution. Tiny rbar: A_p(kappa) = kappa / p (1 - O(kappa^2)).
  if (rbar < kTinyRbar) return p * rbar;
  const double one_minus = (1.0 - rbar) * (1.0 + rbar);
  double lo = rbar * (p - 2.0) / one_minus;
  double hi = rbar * p / one_minus;
  double kappa = rbar * (p - rbar * rbar) / one_minus;
  for (int i = 0; i < iterations; ++i) {
    const Jet<1> a = mean_resultant_for_newton(o, kappa > 0.0 ? kappa : 1e-300);
    // A_p is increasing: shrink the bracket around the root.
    if (a.c[0] < rbar) lo = kappa > lo ? kappa : lo;
    if (a.c[0] > rbar) hi = kappa < hi ? kappa : hi;
    const double step = kappa - (a.c[0] - rbar) / a.c[1];
    // Inclusive: at tiny rbar Sra's upper end rounds to the root itself.
    const bool inside = step >= lo && step <= hi;  // false for NaN
    kappa = inside ? step : 0.5 * (lo + hi);
    // A within 2 ulps of rbar: the step was at the level of A's rounding carried through the
    // root's conditioning, and a further one would only move kappa by that noise again.
    if (inside && fabs(a.c[0] - rbar) <= 0x1p-51 * rbar) break;
  }
  return kappa;
}

// ---- sampling: the reparameterization derivative of w = mu . x ---------------------------

// A 16-node Gauss-Legendre rule on [-1, 1], used in 16 panels over [0, 1]: 256 nodes.
constexpr int kRuleNodes = 16;
constexpr int kRulePanels = 16;
struct GaussLegendre {
  double node[kRuleNodes];  // ascending
  double weight[kRuleNodes];
};

// On the host (the kernels receive it as an argument): the roots of P_16 by Newton's method
// from Tricomi's estimates, and the weights 2 / ((1 - x^2) P_16'(x)^2).
inline GaussLegendre make_gauss_legendre() {
  GaussLegendre rule{};
  constexpr int n = kRuleNodes;
  for (int i = 0; i < n / 2; ++i) {
    double x = ::cos(lb::kPi * (i + 0.75) / (n + 0.5));  // the (i+1)-th largest root
    double slope = 0.0;
    for (int step = 0; step < 100; ++step) {
      double p_prev = 1.0, p = x;  // P_0, P_1, then up to P_(n-1), P_n
      for (int k = 2; k <= n; ++k) {
        const double p_next = ((2 * k - 1) * x * p - (k - 1) * p_prev) / k;
        p_prev = p;
        p = p_next;
      }
      slope = n * (x * p - p_prev) / (x * x - 1.0);
      const double dx = p / slope;
      x -= dx;
      if (::fabs(dx) <= 0x1p-53 * ::fabs(x)) break;  // then one more step has nothing to add
    }
    rule.node[n - 1 - i] = x;
    rule.node[i] = -x;
    rule.weight[n - 1 - i] = rule.weight[i] = 2.0 / ((1.0 - x * x) * slope * slope);
  }
  return rule;
}

// dw/dkappa at a fixed CDF value of w = mu . x of a sample on S^(p-1): w has the density
// f(t) oc exp(kappa t) (1 - t^2)^(nu - 1/2) on [-1, 1], nu = p/2 - 1, and
//   dF/dkappa(w) = int_(-1)^w (t - A) f(t) dt = -int_w^1 (t - A) f(t) dt,   A = A_p(kappa).
// The side of w away from the mean has an integrand of one sign (no cancellation), and
// dividing by f(w) inside the integral removes the normalizer:
//   dw/dkappa = int over the tail beyond w of |t - A| f(t) / f(w) dt.
// The tail is cut at 50 local scales (the std of w, or the density's decay length at w) and
// integrated in u = sqrt(1 -+ t), which makes the endpoint factor (1 - t^2)^(nu - 1/2) smooth
// (p = 2 has an integrable singularity there). Every distance is formed from quantities
// exact or accurate to their own size: forming t = +-(1 - u^2), or rounding 1 + w, lost
// ~1e-16 absolute where w, t and A are all near 1 (large kappa), i.e. ~1e-16 kappa relative.
FASTLOSS_HD double sample_w_derivative_sphere(double w, double kappa);

FASTLOSS_HD double sample_w_derivative(const Order& o, const GaussLegendre& rule, double w, double kappa) {
  if (!(kappa >= 0.0) || !(w >= -1.0 && w <= 1.0)) return kNaN;
  if (o.p == 3.0) return sample_w_derivative_sphere(w, kappa);
  const double nu = o.nu;
  const double complement = mean_resultant_complement(o, kappa);  // 1 - A
  const double sd = ::sqrt(mean_resultant_derivative<1>(o, kappa));  // Var(w) = A_p'(kappa)
  const double one_minus_w2 = fmax((1.0 - w) * (1.0 + w), 2.2250738585072014e-308);
  const double log_slope = kappa - (2.0 * nu - 1.0) * w / one_minus_w2;  // d log f / dt at w
  const double sign = 1.0 - w <= complement ? 1.0 : -1.0;  // w >= A: integrate up to 1
  const double decay = -sign * log_slope;  // > 0 when f falls off away from w on that side
  const double scale = decay > 0.0 ? fmin(sd, 1.0 / fmax(decay, 1e-300)) : sd;
  const double gap_w = fmax(1.0 - sign * w, 0.0);         // 1 -+ w, the distance to the endpoint
  const double gap_error = (-sign * w) - (gap_w - 1.0);     // (1 -+ w) - gap_w exactly (Fast2Sum)
  const double other_gap = 1.0 + sign * w;                  // 1 +- w (exact near w = 1: Sterbenz)
  const double u_w = ::sqrt(gap_w);
  if (!(u_w > 0.0)) return 0.0;  // w at the endpoint: the CDF is 1 (or 0) whatever kappa
  const double u_far = ::sqrt(fmax(gap_w - 50.0 * scale, 0.0));
  const double span = u_w - u_far;
  // u_w^2 misses 1 -+ w by `residual` (fma: u_w^2 - gap_w with one rounding).
  const double residual = fma(u_w, u_w, -gap_w) - gap_error;
  const double w_to_mean = ::fabs(complement - (1.0 - w));
  const double signed_kappa = sign * kappa;
  const double u_power = 2.0 * nu - 1.0, side_power = nu - 0.5;
  double sum = 0.0;
  for (int panel = 0; panel < kRulePanels; ++panel) {
    for (int j = 0; j < kRuleNodes; ++j) {
      const double t = (panel + 0.5 * (rule.node[j] + 1.0)) * (1.0 / kRulePanels);  // in (0, 1)
      const double below_w = span * (1.0 - t);  // u_w - u
      const double u = u_w - below_w;
      const double d = below_w * (u + u_w) - residual;  // |t - w|
      // kappa (t - w) + log of u^(2 nu - 1) and (1 +- t)^(nu - 1/2) relative to their values at w
      const double log_ratio = signed_kappa * d + u_power * ::log1p(-below_w / u_w) +
                               side_power * ::log1p(d / other_gap);
      sum += rule.weight[j] * (d + w_to_mean) * u * ::exp(log_ratio);  // |t - A| f(t) / f(w) du/dt
    }
  }
  // 2 u du = dt, and the rule's weights sum to 2 per panel of width 1/16 of [0, 1]; the
  // rule's interval overshoots w by `residual` in t, where the integrand is |w - A|.
  return sum * span * (1.0 / kRulePanels) - residual * w_to_mean;
}

// p = 3 (the sphere S^2) in closed form: f(t) oc exp(kappa t), F(w) = expm1(kappa r) / expm1(2 kappa)
// with r = 1 + w, s = 1 - w, and
//   dw/dkappa = (s - 2 expm1(kappa s) / expm1(2 kappa)) / kappa
//             = ((1 + coth kappa) (-expm1(-kappa r)) - r) / kappa.
// Both forms cancel at small kappa (their terms are O(1/kappa), the result O(1)); there
//   dw/dkappa = s r sum_(n>=1) q_n / (n+1)! / g(2 kappa),  g(x) = expm1(x) / x,
//   q_n = (b^n - a^n) / (b - a) = b q_(n-1) + a^(n-1), a = kappa s, b = 2 kappa,
// from g(b) - g(a) = (b - a) sum q_n / (n+1)!: terms of one sign, 25 of them reach 2^-56 for
// kappa <= 1. Above 1, each side of the mean uses the form whose terms do not cancel (at most
// ~2.5 bits, at kappa = 1).
FASTLOSS_HD double sample_w_derivative_sphere(double w, double kappa) {
  const double s = 1.0 - w, r = 1.0 + w;  // exact where they are small (Sterbenz)
  if (s == 0.0 || r == 0.0 || kappa == kInf) return 0.0;
  if (kappa <= 1.0) {
    const double a = kappa * s, b = 2.0 * kappa;
    double q = 1.0, a_power = 1.0, factorial = 2.0, sum = 0.5;  // n = 1: q_1 / 2!
    for (int n = 2; n <= 25; ++n) {
      a_power *= a;
      q = b * q + a_power;
      factorial *= n + 1;
      sum += q / factorial;
    }
    const double g = b > 0.0 ? ::expm1(b) / b : 1.0;
    return s * r * sum / g;
  }
  const double complement = 1.0 / kappa - 2.0 / ::expm1(2.0 * kappa);  // 1 - A_3(kappa)
  if (s <= complement) {
    // expm1(kappa s) / expm1(2 kappa) without overflow: exp(-kappa r) expm1(-kappa s) / expm1(-2 kappa).
    const double ratio = ::exp(-kappa * r) * ::expm1(-kappa * s) / ::expm1(-2.0 * kappa);
    return (s - 2.0 * ratio) / kappa;
  }
  const double coth_minus_one = 2.0 / ::expm1(2.0 * kappa);
  const double one_plus_coth = 2.0 + coth_minus_one;
  // r = 1 + w rounds where w > 0 (large kappa puts w and A near 1): there the lower form is
  // rewritten in the exact s, with r left only in exp(-kappa r).
  if (w < 0.0) return (-one_plus_coth * ::expm1(-kappa * r) - r) / kappa;
  return (s + coth_minus_one - one_plus_coth * ::exp(-kappa * r)) / kappa;
}

// What an elementwise vMF kernel evaluates (the CUDA launcher takes it as an int).
enum class Fn : int {
  MeanResultant = 0,
  MeanResultantSlope = 1,
  MeanResultantCurvature = 2,
  Complement = 3,
  Entropy = 4,
  KappaMle = 5,
  LogNormalizer = 6,
};

template <Fn kFn>
FASTLOSS_HD double evaluate(const Order& o, int iterations, double x) {
  if constexpr (kFn == Fn::MeanResultant) return mean_resultant_derivative<0>(o, x);
  if constexpr (kFn == Fn::MeanResultantSlope) return mean_resultant_derivative<1>(o, x);
  if constexpr (kFn == Fn::MeanResultantCurvature) return mean_resultant_derivative<2>(o, x);
  if constexpr (kFn == Fn::Complement) return mean_resultant_complement(o, x);
  if constexpr (kFn == Fn::Entropy) return entropy(o, x);
  if constexpr (kFn == Fn::KappaMle) return kappa_mle(o, x, iterations);
  if constexpr (kFn == Fn::LogNormalizer) return log_normalizer(o, x);
  return kNaN;
}

}  // namespace FASTLOSS_ISA_NAMESPACE
}  // namespace fastloss::vmf
