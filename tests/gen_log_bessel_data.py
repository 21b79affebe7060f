"""Precompute mpmath reference values (40 digits) for tests/test_log_bessel.py into
tests/data/log_bessel_mpmath.csv and tests/data/log_bessel_hess_mpmath.csv. Run from the
repository root (a few minutes each):

    python tests/gen_log_bessel_data.py          # values and first derivatives
    python tests/gen_log_bessel_data.py --hess   # second derivatives

Columns: v, x, log I_v(x), log K_v(x), d/dv and d/dx of log I, d/dv and d/dx of log K, each
rounded to float64; with --hess: v, x, then d^2/dv^2, d^2/dv dx and d^2/dx^2 of log I and of
log K. Points: log-uniform v in [1e-3, 1e4] (a tenth uniform in [0, 3]) and x in
[1e-10, 1e5], plus the region boundaries of csrc/common/log_bessel.h.
mpmath.besseli needs `maxterms` at large x; besselk does not converge at large v and x (and
hangs when given maxterms), so K and dK/dv come from the integral
K_v(x) = int_0^inf exp(-x cosh t) cosh(v t) dt, split around its peak.
"""

import csv
import os
import sys

import mpmath as mp
import numpy as np

mp.mp.dps = 40
MAXTERMS = 10**6

BOUNDARY_V = [0.0, 0.5, 1.5, 2.5, 10.5, 15.999, 16.0, 16.001, 28.0]
BOUNDARY_X = [1.999, 2.0, 2.001, 20.0, 28.9, 29.0, 1023.0, 1024.0, 4096.0]


def log_i(v, x):
    return mp.log(mp.besseli(v, x, maxterms=MAXTERMS))


def _k_integral(v, x, weight):
    """log of int_0^inf exp(-x cosh t) cosh(v t) * weight(t) dt, with the peak factored out."""
    peak = mp.asinh(v / x) if v > 0 else mp.mpf(0)
    log_peak = -x * mp.cosh(peak) + v * peak
    width = 1 / mp.sqrt(mp.hypot(v, x))
    end = peak + 1
    while -x * mp.cosh(end) + v * end - log_peak > -250:  # the integrand is < e^-250 of its peak
        end = end + (end - peak)
    points = sorted({max(mp.mpf(0), peak + k * width) for k in (-40, -20, -10, -5, -2, 0, 2, 5, 10, 20, 40)} | {mp.mpf(0)})
    points = [p for p in points if p < end] + [end]

    def integrand(t):
        return mp.exp(-x * mp.cosh(t) - log_peak) * weight(t)

    return mp.log(mp.quad(integrand, points)) + log_peak


def log_k(v, x):
    return _k_integral(v, x, lambda t: mp.cosh(v * t))


def dlog_k_dv(v, x, lk):
    if v == 0:
        return mp.mpf(0)
    # dK/dv = int_0^inf t sinh(v t) exp(-x cosh t) dt
    log_dk = _k_integral(v, x, lambda t: t * mp.sinh(v * t))
    return mp.exp(log_dk - lk)


def row(v, x):
    v, x = mp.mpf(v), mp.mpf(x)
    li, lk = log_i(v, x), log_k(v, x)
    li1, lk1 = log_i(v + 1, x), log_k(v + 1, x)
    dli_dx = v / x + mp.exp(li1 - li)
    dlk_dx = v / x - mp.exp(lk1 - lk)
    dli_dv = mp.diff(lambda s: log_i(s, x), v) if v > 0 else mp.diff(lambda s: log_i(s, x), v, direction=1)
    dlk_dv = dlog_k_dv(v, x, lk)
    return [float(v), float(x)] + [float(c) for c in (li, lk, dli_dv, dli_dx, dlk_dv, dlk_dx)]


def hess_row(v, x):
    """Second derivatives of log I (I's by differences in v of 40-digit values and of the exact
    x-derivative v/x + I_(v+1)/I_v; d^2/dx^2 from Bessel's equation, F''/F = 1 + v^2/x^2 - (F'/F)/x)
    and of log K (every derivative of K as an integral of the same kind as K's)."""
    v, x = mp.mpf(v), mp.mpf(x)
    side = {} if v > 0 else {"direction": 1}  # I is defined for v >= 0 only

    def dli_dx(s):
        return s / x + mp.exp(log_i(s + 1, x) - log_i(s, x))

    g = dli_dx(v)
    i_vv = mp.diff(lambda s: log_i(s, x), v, 2, **side)
    i_vx = mp.diff(dli_dx, v, **side)
    i_xx = 1 + (v / x) ** 2 - g / x - g**2
    lk = log_k(v, x)

    def ratio(weight):  # (int weight(t) exp(-x cosh t) dt) / K
        return mp.exp(_k_integral(v, x, weight) - lk)

    k_x = -ratio(lambda t: mp.cosh(t) * mp.cosh(v * t))
    k_xx = ratio(lambda t: mp.cosh(t) ** 2 * mp.cosh(v * t)) - k_x**2
    k_vv = ratio(lambda t: t**2 * mp.cosh(v * t))
    if v > 0:
        k_v = ratio(lambda t: t * mp.sinh(v * t))
        k_vv -= k_v**2
        k_vx = -ratio(lambda t: t * mp.cosh(t) * mp.sinh(v * t)) - k_v * k_x
    else:
        k_vx = mp.mpf(0)  # K is even in v
    return [float(v), float(x)] + [float(c) for c in (i_vv, i_vx, i_xx, k_vv, k_vx, k_xx)]


def points(seed=2024, count=240):
    rng = np.random.default_rng(seed)
    v = np.exp(rng.uniform(np.log(1e-3), np.log(1e4), count))
    v[: count // 10] = rng.uniform(0.0, 3.0, count // 10)
    x = np.exp(rng.uniform(np.log(1e-10), np.log(1e5), count))
    pts = list(zip(v.tolist(), x.tolist()))
    pts += [(bv, bx) for bv in BOUNDARY_V for bx in BOUNDARY_X]
    return pts


def main():
    hess = "--hess" in sys.argv[1:]
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "data", "log_bessel_hess_mpmath.csv" if hess else "log_bessel_mpmath.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if hess:
        # Fewer random points (six integrals per K), and the boundaries of the methods.
        rows = [hess_row(v, x) for v, x in points(seed=2026, count=120)]
        header = ["v", "x", "d2log_i_dv2", "d2log_i_dvdx", "d2log_i_dx2", "d2log_k_dv2", "d2log_k_dvdx", "d2log_k_dx2"]
    else:
        rows = [row(v, x) for v, x in points()]
        header = ["v", "x", "log_i", "log_k", "dlog_i_dv", "dlog_i_dx", "dlog_k_dv", "dlog_k_dx"]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([repr(c) for c in r])
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
