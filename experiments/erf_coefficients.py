"""Regenerate the polynomial coefficients of erf.py (needs mpmath, which PyTorch installs).

erf.py evaluates erf with three polynomials (Horner's rule, highest power first):

    |x| < 1:       erf(x)  = x * A(x^2)                          A fits erf(x)/x on x^2 in [0, 1]
    1 <= |x| < 4:  erfc(x) = exp(-x^2) / x * B(1/x - 0.625)      B fits x e^(x^2) erfc(x) on 1/x in [0.25, 1]
    |x| >= 4:      erfc(x) = exp(-x^2) / x * C(1/x - 0.125)      C fits the same on 1/x in [0, 0.25]

x e^(x^2) erfc(x) tends to 1/sqrt(pi) as x grows and is smooth in u = 1/x, so a polynomial in u fits it
over the whole tail. Each is a Chebyshev fit (mpmath.chebyfit, 50 significant digits) of the stated
degree, centred on its interval so that the coefficients stay small.

Each polynomial comes in two degrees, one per dtype, whose fit errors are below that format's rounding
(half its eps, the spacing of numbers at 1: eps = 2.2e-16 for float64, 1.2e-7 for float32), so evaluating
the polynomial costs no more accuracy than the arithmetic that evaluates it must lose anyway:

    float64: A 12, B 20, C 16        float32: A 5, B 8, C 5

The float32 degrees are the lowest that pass (the script checks that one degree less would not): float32
needs 18 Horner steps where float64 needs 48.

The float32 coefficients are used as float32 numbers (NumPy rounds a Python float to the array's dtype),
so the script also prints the error of the polynomial with its coefficients rounded to float32: about
half an eps, the rounding of the constant term, which is the function's value (about 0.56 or 1.13) rounded.
Printed beside them: the largest value of sum |c_i z^i| / |p(z)| on the interval, the factor by which
Horner's rule can amplify the rounding of each step (at most 2: every term is small beside the constant).
tests/test_erf.py checks both dtypes against math.erf on a dense grid.

    python experiments/erf_coefficients.py
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 50
EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23}


def scaled_erfc(u):
    """x e^(x^2) erfc(x) as a function of u = 1/x (its limit 1/sqrt(pi) at u = 0)."""
    if u == 0:
        return 1 / mp.sqrt(mp.pi)
    x = 1 / u
    return x * mp.exp(x * x) * mp.erfc(x)


def erf_over_x(t):
    """erf(x) / x as a function of t = x^2 (its limit 2/sqrt(pi) at t = 0)."""
    return mp.erf(mp.sqrt(t)) / mp.sqrt(t) if t > 0 else 2 / mp.sqrt(mp.pi)


# name: (function, centre, interval of z = variable - centre, {dtype: degree})
FITS = {
    "A": (erf_over_x, mp.mpf(0), (0, 1), {"float64": 12, "float32": 5}),
    "B": (scaled_erfc, mp.mpf("0.625"), (-0.375, 0.375), {"float64": 20, "float32": 8}),
    "C": (scaled_erfc, mp.mpf("0.125"), (-0.125, 0.125), {"float64": 16, "float32": 5}),
}


def horner(coefficients, z):
    result = mp.mpf(0)
    for c in coefficients:
        result = result * z + c
    return result


def worst_on_grid(f, coefficients, interval, n=2001):
    """Largest relative error of the polynomial against f, and largest Horner amplification, on n points."""
    worst_error, worst_amplification = 0, 0
    for z in mp.linspace(*interval, n):
        exact, p = f(z), horner(coefficients, z)
        terms = sum(abs(c) * abs(z) ** i for i, c in enumerate(reversed(coefficients)))
        worst_error = max(worst_error, abs(p - exact) / abs(exact))
        worst_amplification = max(worst_amplification, terms / abs(p))
    return float(worst_error), float(worst_amplification)


if __name__ == "__main__":
    for dtype in ("float64", "float32"):
        suffix = "" if dtype == "float64" else "_32"
        for name, (f, centre, interval, degrees) in FITS.items():
            shifted = lambda z, f=f, centre=centre: f(z + centre)   # noqa: E731
            poly, error = mp.chebyfit(shifted, list(interval), degrees[dtype] + 1, error=True)
            assert error < EPS[dtype] / 2, f"{name} {dtype}: fit error {float(error):.1e}"
            if dtype == "float32":                                  # the lowest degree that passes
                _, lower = mp.chebyfit(shifted, list(interval), degrees[dtype], error=True)
                assert lower >= EPS[dtype] / 2, f"{name} {dtype}: degree {degrees[dtype] - 1} would do"
            coefficients = [float(c) for c in poly]
            if dtype == "float32":
                coefficients = [float(np.float32(c)) for c in coefficients]
            rounded, amplification = worst_on_grid(shifted, [mp.mpf(c) for c in coefficients], interval)
            print(f"_ERF_{name}{suffix} = (  # degree {degrees[dtype]}, fit error {float(error):.1e} "
                  f"({float(error) / EPS[dtype]:.3f} eps); relative error with the coefficients as {dtype}: "
                  f"{rounded / EPS[dtype]:.2f} eps; Horner amplification {amplification:.2f}")
            text = [repr(c) if dtype == "float64" else str(np.float32(c)) for c in coefficients]
            assert [float(np.float32(float(t))) for t in text] == coefficients or dtype == "float64"
            for i in range(0, len(text), 4):
                print("    " + ", ".join(text[i:i + 4]) + ",")
            print(")")
