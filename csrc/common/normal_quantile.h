// PhiInv(p), the standard normal quantile, to double precision for every p in (0, 1).
//
// A rough start (Abramowitz & Stegun 26.2.23, |error| < 4.5e-4) polished by Halley steps on
// an equation whose residual has no cancellation:
//   |p - 1/2| < 0.4:  erf(z / sqrt2) / 2 = p - 1/2   (relative accuracy near z = 0)
//   tails:            log Phi(z) = log q, q = min(p, 1 - p), z <= 0, mirrored for p > 1/2
// log Phi(z) comes from erfc while erfc is a normal number, and from the continued fraction
// of the Mills ratio beyond (z < -20), so q can go down to the smallest subnormal double.
// Host code: the kernels take z as an argument; this runs once per call.
#pragma once

#include <cmath>

namespace fastloss {

namespace normal_quantile_detail {

constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // log(sqrt(2 pi))

inline double log_pdf(double z) { return -0.5 * z * z - kLogSqrt2Pi; }

// log Phi(z) for z <= 0.
inline double log_cdf_lower(double z) {
  if (z > -20.0) return std::log(0.5 * std::erfc(-z / kSqrt2));
  // Phi(z) = pdf(z) * R(-z), Mills ratio R(x) = 1 / (x + 1 / (x + 2 / (x + 3 / (x + ...)))),
  // evaluated bottom-up; 40 levels are far past convergence for x >= 20.
  const double x = -z;
  double tail = x;
  for (int k = 40; k >= 1; --k) tail = x + k / tail;
  return log_pdf(z) - std::log(tail);
}

}  // namespace normal_quantile_detail

// Returns NaN outside (0, 1), -inf at 0 and +inf at 1.
inline double normal_quantile(double p) {
  namespace d = normal_quantile_detail;
  if (!(p >= 0.0 && p <= 1.0)) return std::nan("");
  if (p == 0.0) return -INFINITY;
  if (p == 1.0) return INFINITY;
  // q = min(p, 1 - p) is exact: 1 - p is exact for p >= 1/2 (Sterbenz).
  const bool upper = p > 0.5;
  const double q = upper ? 1.0 - p : p;
  const double t = std::sqrt(-2.0 * std::log(q));
  double z = -(t - (2.515517 + t * (0.802853 + t * 0.010328)) /
                       (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308))));
  if (q > 0.1) {
    const double r = q - 0.5;  // in (-0.4, 0]
    for (int it = 0; it < 6; ++it) {
      // f(z) = erf(z / sqrt2) / 2 - r, f' = pdf(z), f'' = -z pdf(z): Halley step.
      const double f = 0.5 * std::erf(z / d::kSqrt2) - r;
      const double u = f / std::exp(d::log_pdf(z));
      const double step = u / (1.0 + 0.5 * z * u);
      z -= step;
      if (std::fabs(step) <= 1e-17 * std::fabs(z)) break;
    }
  } else {
    const double log_q = std::log(q);
    for (int it = 0; it < 8; ++it) {
      // f(z) = log Phi(z) - log q, f' = h = pdf / Phi, f'' = -h (z + h): Halley step.
      const double log_phi = d::log_cdf_lower(z);
      const double f = log_phi - log_q;
      const double h = std::exp(d::log_pdf(z) - log_phi);
      const double u = f / h;
      const double step = u / (1.0 + 0.5 * u * (z + h));
      z -= step;
      if (std::fabs(step) <= 1e-17 * std::fabs(z)) break;
    }
  }
  return upper ? -z : z;
}

}  // namespace fastloss
