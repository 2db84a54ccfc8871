"""Tests for erf.py: erf and erfc against the C library's (math.erf, math.erfc) on a dense grid, far tails
included, at the boundaries between the polynomial pieces, at the special values, and in every dtype.
"""
import math

import numpy as np

import erf

EPS64 = np.finfo(np.float64).eps


def test_erf_matches_math_erf_to_float64_rounding():
    x = np.linspace(-9, 9, 180_001)
    reference = np.array([math.erf(v) for v in x])
    # erf is within [-1, 1]: a few units of float64 rounding at 1 (2.2e-16) is the best one can ask. The fits
    # are below 1e-16; NumPy's exp (its SIMD path differs between CPUs) and the C library's math.erf each
    # round within a couple of ulp, hence 4.
    assert np.abs(erf.erf(x) - reference).max() <= 4 * EPS64
    reference_c = np.array([math.erfc(v) for v in x])
    # erfc keeps its relative accuracy in the tail (erfc(9) = 4e-37), where 1 - erf would be 0. The fits
    # are below 1e-16; exp(-x^2) turns the rounding of x^2 (relative eps) into a relative x^2 eps.
    relative = np.abs(erf.erfc(x) - reference_c) / reference_c
    assert np.all(relative <= (x * x + 32) * EPS64)


def test_erf_at_its_pieces_boundaries_and_special_values():
    for v in (0.0, 1.0 - 1e-12, 1.0, 4.0 - 1e-12, 4.0, -1.0, -4.0, 30.0, -30.0):
        assert abs(float(erf.erf(np.array(v))) - math.erf(v)) <= 4 * EPS64, v
    assert erf.erf(np.array(np.inf)) == 1 and erf.erf(np.array(-np.inf)) == -1


def test_erf_keeps_float32_and_float64():
    for dtype in (np.float32, np.float64):
        x = np.linspace(-5, 5, 11, dtype=dtype)
        assert erf.erf(x).dtype == dtype and erf.erfc(x).dtype == dtype
