"""Regenerate the polynomial coefficients of erf.py (needs mpmath, which PyTorch installs).

erf.py evaluates erf with three polynomials (Horner's rule, highest power first):

    |x| < 1:       erf(x)  = x * A(x^2)                          A fits erf(x)/x on x^2 in [0, 1]
    1 <= |x| < 4:  erfc(x) = exp(-x^2) / x * B(1/x - 0.625)      B fits x e^(x^2) erfc(x) on 1/x in [0.25, 1]
    |x| >= 4:      erfc(x) = exp(-x^2) / x * C(1/x - 0.125)      C fits the same on 1/x in [0, 0.25]

x e^(x^2) erfc(x) tends to 1/sqrt(pi) as x grows and is smooth in u = 1/x, so a polynomial in u fits it
over the whole tail. Each is a Chebyshev fit (mpmath.chebyfit, 50 significant digits) of the stated
degree, centred on its interval so that the coefficients stay small. The fit errors (printed) are below
float64 rounding; tests/test_erf.py checks the float64 result against math.erf on a dense grid.

    python experiments/erf_coefficients.py
"""
import mpmath as mp

mp.mp.dps = 50


def scaled_erfc(u):
    """x e^(x^2) erfc(x) as a function of u = 1/x (its limit 1/sqrt(pi) at u = 0)."""
    if u == 0:
        return 1 / mp.sqrt(mp.pi)
    x = 1 / u
    return x * mp.exp(x * x) * mp.erfc(x)


FITS = {
    "A": (lambda t: mp.erf(mp.sqrt(t)) / mp.sqrt(t) if t > 0 else 2 / mp.sqrt(mp.pi), 0, 0, 1, 12),
    "B": (scaled_erfc, mp.mpf("0.625"), -0.375, 0.375, 20),
    "C": (scaled_erfc, mp.mpf("0.125"), -0.125, 0.125, 16),
}

if __name__ == "__main__":
    for name, (f, centre, low, high, degree) in FITS.items():
        poly, error = mp.chebyfit(lambda s: f(s + centre), [low, high], degree + 1, error=True)
        print(f"_ERF_{name} = (  # degree {degree}, fit error {float(error):.1e}")
        coefficients = [repr(float(c)) for c in poly]
        for i in range(0, len(coefficients), 4):
            print("    " + ", ".join(coefficients[i:i + 4]) + ",")
        print(")")
