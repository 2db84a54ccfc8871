"""Finite-difference gradient checks used by every test file.

Every backward in the project is checked the same way: pick a *random* upstream gradient `dout`
(an all-ones `dout` hides broken softmax backwards, since softmax rows sum to a constant), define the
scalar loss L = sum(forward(inputs) * dout), and compare the analytic gradients that backward returns
with central differences (L(x + eps) - L(x - eps)) / (2 eps), in float64.

- `check_gradients` perturbs every entry of every input: exact, for small shapes.
- `check_directional_derivative` perturbs all inputs at once along one random direction u and compares
  the slope of L with <grad, u>: one number, cheap enough for whole blocks and models.

Inputs and gradients are "trees": an array, or nested dicts / lists / tuples of arrays (the params
dicts of every file). training.tree_leaves flattens both trees in the same order.
"""
import numpy as np

from attention import get_xp
from helpers import to_numpy
from training import tree_leaves as leaves   # the arrays of a tree, dict keys sorted: params and grads line up


def random_like(x, rng):
    """A standard-normal array with x's shape, dtype and array module (an upstream gradient)."""
    return get_xp(x).asarray(rng.standard_normal(x.shape)).astype(x.dtype)


def _check_float64(arrays):
    for a in arrays:
        assert a.dtype == np.float64, f"gradient checks run in float64, got {a.dtype}"


def check_gradients(loss, inputs, grads, eps=1e-6, rtol=1e-6, atol=1e-9):
    """Assert that `grads` are the gradients of the scalar `loss()` with respect to `inputs`.

    loss:   a function of no arguments that reads the arrays of `inputs` (it is called after each
            entry is nudged in place, and every entry is restored afterwards).
    inputs: tree of float64 arrays; grads: the same tree of analytic gradients.
    Tolerance: central differences in float64 with eps=1e-6 have a truncation error of about eps^2 and a
    rounding error of about 1e-16 * |L| / eps; rtol=1e-6 with an atol that grows with |L| (below) sits
    well above both, so a failure means a wrong formula, not rounding.
    """
    xs, gs = leaves(inputs), leaves(grads)
    assert len(xs) == len(gs), f"{len(xs)} inputs but {len(gs)} gradients"
    _check_float64(xs)
    # Each loss() is itself rounded, by about 1e-16 * |L| times a few for its sums, and the difference
    # quotient divides that by 2 eps: the floor of what finite differences can resolve grows with |L|.
    atol = atol + 16 * np.finfo(np.float64).eps * max(1.0, abs(loss())) / eps
    for n, (x, g) in enumerate(zip(xs, gs)):
        assert g.shape == x.shape, f"gradient {n} has shape {g.shape}, its input has {x.shape}"
        numeric = np.zeros(x.shape)
        assert x.flags.c_contiguous, "input must be C-contiguous, so that x.reshape(-1) is a view of it"
        flat = x.reshape(-1)  # a view: writing into it nudges x itself
        for i in range(x.size):
            old = float(flat[i])
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            numeric.reshape(-1)[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(to_numpy(g), numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient {n} (shape {x.shape}) disagrees with finite differences")


def check_directional_derivative(loss, inputs, grads, rng, eps=1e-5, rtol=1e-6):
    """Assert <grads, u> equals the slope of loss() along a random direction u (all inputs at once).

    For blocks and models with too many parameters to nudge one by one. Central differences of a
    smooth function are accurate to O(eps^2) ~ 1e-10 here, so rtol=1e-6 still catches any wrong term.
    """
    xs, gs = leaves(inputs), leaves(grads)
    assert len(xs) == len(gs), f"{len(xs)} inputs but {len(gs)} gradients"
    _check_float64(xs)
    directions = [random_like(x, rng) for x in xs]
    originals = [x.copy() for x in xs]
    for sign_eps, store in ((eps, "up"), (-eps, "down")):
        for x, x0, u in zip(xs, originals, directions):
            x[...] = x0 + sign_eps * u
        if store == "up":
            up = loss()
        else:
            down = loss()
    for x, x0 in zip(xs, originals):
        x[...] = x0
    numeric = (up - down) / (2 * eps)
    analytic = sum(float((g * u).sum()) for g, u in zip(gs, directions))
    assert abs(numeric - analytic) <= rtol * max(1.0, abs(numeric)), (
        f"directional derivative: finite differences {numeric!r}, backward {analytic!r}")
