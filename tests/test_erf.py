"""Tests for erf.py: erf and erfc against the C library's (math.erf, math.erfc) on a dense grid, far tails
included, at the boundaries between the polynomial pieces, at the special values, and in every dtype:
float64 to float64's rounding, float32 (its own shorter polynomials) to float32's, on every array module.
"""
import math

import numpy as np

import erf
from helpers import to_numpy

EPS64 = np.finfo(np.float64).eps
EPS32 = float(np.finfo(np.float32).eps)                        # 1.2e-7
TINY32 = float(np.finfo(np.float32).smallest_subnormal)        # 1.4e-45, float32's spacing below 1.2e-38


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


def test_erf_keeps_float16_float32_and_float64():
    for dtype in (np.float16, np.float32, np.float64):
        x = np.linspace(-5, 5, 11, dtype=dtype)
        assert erf.erf(x).dtype == dtype and erf.erfc(x).dtype == dtype


def reference(function, x):
    """math.erf or math.erfc of each float32 value, exactly as given, in float64."""
    return np.array([function(v) for v in x.astype(np.float64).tolist()])


def assert_float32_erf_and_erfc_within_their_bounds(x, erf_x, erfc_x):
    """erf32 and erfc32 (float32 arrays) against float64 references, with the float64 test's bounds in
    float32's eps."""
    assert erf_x.dtype == np.float32 and erfc_x.dtype == np.float32
    a = np.abs(x.astype(np.float64))
    exact, exact_c = reference(math.erf, x), reference(math.erfc, x)
    # The fits are below half an eps (experiments/erf_coefficients.py prints them) and the few roundings of
    # the evaluation each add at most about one: 4 eps, relative here (x A(x^2) keeps erf's relative
    # accuracy near 0), plus float32's spacing where erf itself is subnormal (|x| below 1e-38).
    assert np.all(np.abs(erf_x - exact) <= 4 * EPS32 * np.abs(exact) + TINY32)
    # As the float64 test: exp(-x^2) turns float32's rounding of x^2 (half an eps, relative) into x^2 / 2
    # eps; 32 eps covers erfc = 1 - erf below 1 (erf / erfc <= 5.4 there, times erf's 4 eps) and a few eps
    # elsewhere. Below 1.2e-38 erfc is subnormal and float32 holds it only to its spacing TINY32: the last
    # product rounds to it (half a spacing), and exp's own subnormal rounding arrives times 1/x * C <= 0.15.
    assert np.all(np.abs(erfc_x - exact_c) <= (a * a + 32) * EPS32 * exact_c + TINY32)


def test_float32_erf_and_erfc_match_math_erf_to_float32_rounding():
    # Through the far tail: float32's erfc is subnormal beyond 9.2 and rounds to 0 beyond 10.05.
    x = np.linspace(-11, 11, 400_001, dtype=np.float32)
    tiny = np.geomspace(1e-44, 1, 2_001, dtype=np.float32)   # erf(x) ~ 1.13 x: relative accuracy near 0
    x = np.concatenate([x, tiny, -tiny])
    assert_float32_erf_and_erfc_within_their_bounds(x, erf.erf(x), erf.erfc(x))
    assert erf.erfc(np.float32(10.1)) == 0 and erf.erfc(np.float32(10.0)) > 0    # erfc(10.05) = 2^-150


def test_float32_erf_at_its_pieces_boundaries_and_special_values():
    edges = np.array([1, 4], dtype=np.float32)
    x = np.concatenate([np.nextafter(edges, np.float32(0)), edges, np.nextafter(edges, np.float32(np.inf))])
    x = np.concatenate([x, -x, np.array([0, 30], dtype=np.float32)])
    assert_float32_erf_and_erfc_within_their_bounds(x, erf.erf(x), erf.erfc(x))
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    erf_s, erfc_s = erf.erf(special), erf.erfc(special)
    assert erf_s.dtype == erfc_s.dtype == np.float32
    np.testing.assert_array_equal(erf_s, [0, 0, 1, -1, np.nan])
    np.testing.assert_array_equal(np.signbit(erf_s[:2]), [False, True])      # erf is odd, at 0 too
    np.testing.assert_array_equal(erfc_s, [1, 1, 0, 2, np.nan])


def test_float32_takes_the_float32_polynomials_and_float64_the_float64_ones():
    # float32 and float16 get the short polynomials (fitted to float32's rounding), float64 and Python floats
    # the long ones: the float64 test above would fail with the short ones.
    x = np.linspace(0, 0.9, 91)
    assert erf._pieces(x.astype(np.float32))[0] is erf._ERF_A_32 and erf._pieces(x)[0] is erf._ERF_A
    assert erf._pieces(x.astype(np.float16))[0] is erf._ERF_A_32 and erf._pieces(0.5)[0] is erf._ERF_A


def test_float32_erf_runs_on_every_array_module(xp):
    x = np.linspace(-10.5, 10.5, 2_001, dtype=np.float32)
    on_device = xp.asarray(x)
    erf_x, erfc_x = erf.erf(on_device), erf.erfc(on_device)
    assert isinstance(erf_x, xp.ndarray) and isinstance(erfc_x, xp.ndarray)
    np.testing.assert_array_equal(to_numpy(on_device), x)     # erfc works in place on its own arrays only
    assert_float32_erf_and_erfc_within_their_bounds(x, to_numpy(erf_x), to_numpy(erfc_x))
