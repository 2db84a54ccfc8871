"""erf and erfc for NumPy and CuPy arrays, to the rounding of their dtype: what the exact GELU needs.

NumPy has no erf (SciPy has, but this project needs only NumPy), so this file writes one. It is an
appendix to the book, not a chapter: read it if you want to know how a special function is evaluated.

    erf(x)  = 2/sqrt(pi) * integral_0^x exp(-t^2) dt          erfc(x) = 1 - erf(x)

Three polynomials (Horner's rule, highest power first), fitted by Chebyshev's method at 50 digits by
experiments/erf_coefficients.py, which explains them:

    |x| < 1:       erf(x)  = x A(x^2)
    1 <= |x| < 4:  erfc(x) = exp(-x^2) / x * B(1/x - 0.625)
    |x| >= 4:      erfc(x) = exp(-x^2) / x * C(1/x - 0.125)

Each comes in two degrees, chosen by the input's dtype: float64 (degrees 12, 20, 16) and float32 (5, 8, 5,
used for float16 too). Every fit error is below its format's rounding, so a float32 erf is as accurate,
relative to float32's eps, as a float64 one is to float64's, at about half the arithmetic.
erfc is evaluated directly in the tail, so it keeps its relative accuracy where 1 - erf(x) would be 0.
Imports no project file. Runs on NumPy or CuPy arrays unchanged; float32 in, float32 out.
"""
import sys

import numpy as np


def get_xp(*arrays):
    """The array module of the inputs: cupy for CuPy arrays, numpy otherwise.

    attention.py, positional.py, training.py and erf.py each define this helper: they import no project file.
    """
    cupy = sys.modules.get("cupy")  # no CuPy array exists unless cupy was imported; a failed import costs ~50 us
    return np if cupy is None else cupy.get_array_module(*arrays)


_ERF_A = (5.957176147748911e-11, -1.1372848856791674e-09, 1.4659775274047436e-08, -1.6350312701054695e-07,
          1.6461000484121368e-06, -1.4925595266831182e-05, 0.0001205533111164271, -0.000854832698083379,
          0.0052239776248180145, -0.026866170645076792, 0.11283791670954879, -0.3761263890318375,
          1.1283791670955126)
_ERF_B = (0.12050113120058671, -0.12871431670697847, 0.017568706879146103, 0.031034174157651077,
          -0.03681029130279484, 0.049038892160920236, -0.05280094749762976, 0.03947112191931315,
          -0.015619984910962892, -0.011508836147783176, 0.03492354423360488, -0.047720360762110725,
          0.044782314091917415, -0.024447471731568877, -0.010086180527948928, 0.0496003206157116,
          -0.07803847380014706, 0.07210217056614285, -0.0012945387364120967, -0.17158565208406368,
          0.4895247876335057)
_ERF_C = (423.2367383190292, -359.7565479121779, 26.789885485840593, 72.7610555468333,
          -32.09596264423345, -3.718730597973516, 8.808752741450622, -2.499428073154463,
          -1.4157073154752249, 1.31509418841499, -0.05036414328903669, -0.4890364113283093,
          0.22738055056492232, 0.17575154004550925, -0.24594346562626765, -0.06739860157050254,
          0.5598813296070474)
_ERF_A_32 = (-0.000564806, 0.004921762, -0.026715055, 0.11280317, -0.37612343, 1.1283791)
_ERF_B_32 = (0.05410313, -0.03974848, -0.011000749, 0.051211204, -0.078003995, 0.07203938, -0.0012948974,
             -0.171585, 0.48952478)
_ERF_C_32 = (-0.45926127, 0.22567149, 0.17557883, -0.24593261, -0.06739845, 0.5598813)


def _pieces(x):
    """The polynomials (A, B, C) for x's dtype: float64's for float64, the shorter float32 ones otherwise."""
    if getattr(x, "dtype", None) in (np.float32, np.float16):   # a Python float computes in float64
        return _ERF_A_32, _ERF_B_32, _ERF_C_32
    return _ERF_A, _ERF_B, _ERF_C


def _horner(coefficients, z):
    """c[0] z^n + c[1] z^(n-1) + ... + c[n], in z's dtype (updated in place: one temporary, not n)."""
    result = get_xp(z).full_like(z, coefficients[0])
    for c in coefficients[1:]:
        result *= z
        result += c
    return result


def erfc(x):
    """1 - erf(x), accurate relative to its own size even far in the tail (where 1 - erf(x) would be 0).

    erfc(-a) = 2 - erfc(a), so only a = |x| is evaluated. The relative error is a few eps of x's dtype
    plus x^2 / 2 eps, the rounding of x^2 amplified by exp(-x^2); where erfc is below the dtype's smallest
    normal number (x > 9.3 in float32), the result is as close as that dtype's subnormal spacing allows.
    NumPy has no erf; this one runs on CuPy too.
    """
    xp = get_xp(x)
    A, B, C = _pieces(x)
    a = xp.abs(x)                                              # (...)
    u = 1 / xp.maximum(a, 1)                                   # (...) 1/a in (0, 1]
    scaled = _horner(B, u - 0.625)                             # a e^(a^2) erfc(a), 1 <= a < 4
    if bool((a >= 4).any()):                                   # rare for activations: skip it when unused
        scaled = xp.where(a < 4, scaled, _horner(C, u - 0.125))    # a >= 4
    # From here on, steps update arrays in place and drop those no longer needed before making new ones:
    # a new array of x's size can cost fresh memory pages from the OS, on a CPU half of erfc's time.
    scaled *= u                                                # (...) scaled / a
    tail = xp.exp(-a * a)                                      # (...)
    tail *= scaled                                             # erfc(a) = exp(-a^2) / a * scaled, a >= 1; the
    del u, scaled                                              # tiny factor last: one rounding if subnormal
    a_small = xp.minimum(a, 1)                                 # each piece sees only inputs it was fitted on
    small = _horner(A, a_small * a_small)                      # (...) A(a^2)
    small *= a_small                                           # erf(a) = a A(a^2), a < 1
    xp.subtract(1, small, out=small)                           # erfc(a) = 1 - erf(a)
    positive = xp.where(a < 1, small, tail)
    del a, a_small, small, tail
    return xp.where(x < 0, 2 - positive, positive)


def erf(x):
    """erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, to a few eps of x's dtype (tested against math.erf)."""
    xp = get_xp(x)
    x_small = xp.clip(x, -1, 1)                                # A was fitted on |x| < 1
    return xp.where(xp.abs(x) < 1, x_small * _horner(_pieces(x)[0], x_small * x_small), 1 - erfc(x))
