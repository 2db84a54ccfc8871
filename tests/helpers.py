"""Small tools that many test files need, written once.

- `ROOT`: the repository root (a pathlib.Path), where the concept files and their demos live.
- `to_numpy(x)`: a NumPy copy of a NumPy or CuPy array (CuPy's `.get()`), for comparing results.
- `random_array(rng, shape, dtype, xp)`: a standard-normal array built on the host by a
  numpy.random.Generator and moved to `xp`, so NumPy and CuPy runs of a test see the same numbers.
- `run_demo(path, *args, timeout=60)`: run a file as `python path args...` from ROOT, assert it exits 0
  (its own asserts hold), and return the CompletedProcess for checking what it printed.
- `with_examples(argument, values, **others)`: one hypothesis @example per value, to pin the edges a
  property test must always try (T < S, T > S, one token, ...) whatever hypothesis draws.
- `imported_project_modules(tree)`: the project files (top-level *.py) an ast tree imports by name.
- `spoiled(good)`: a hypothesis strategy giving a good NumPy array or a mistake made with it (another
  dtype, an axis added, dropped, resized or swapped, not an array at all), for "any input gives a clear
  error or a result whose backward works" tests.

Test files import from here (and from gradcheck.py), never from each other.
"""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import example, strategies as st

ROOT = Path(__file__).resolve().parent.parent


def imported_project_modules(tree):
    """The names of the project files (the top-level *.py of ROOT) that an ast tree imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & {path.stem for path in ROOT.glob("*.py")}


def to_numpy(x):
    """A NumPy array holding x's values: CuPy arrays (and the CuPy-on-a-CPU stand-in) copy to the host."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


def random_array(rng, shape, dtype=np.float64, xp=np):
    """A standard-normal array of `shape` and `dtype`, drawn by `rng` on the host and moved to `xp`."""
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def run_demo(path, *args, timeout=60, cwd=None, env=None):
    """Run `python path *args` (path relative to ROOT, or absolute) and assert that it exits 0.

    cwd: where it runs (ROOT by default; a temporary folder for demos that write files).
    Returns the subprocess.CompletedProcess, with stdout and stderr as text.
    """
    command = [sys.executable, str(ROOT / path), *map(str, args)]
    result = subprocess.run(command, cwd=ROOT if cwd is None else cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(command)} exited with {result.returncode}\n"
                                    f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


def with_examples(argument, values, **others):
    """Decorate a @given test with one @example per value of `argument`, the other arguments set to `others`.

    Hypothesis runs explicit examples on every run, before what it draws, so the edges listed here are
    always tried.
    """
    def decorate(test):
        for value in values:
            test = example(**{argument: value}, **others)(test)
        return test
    return decorate


_odd_dtypes = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int8, bool, np.complex64])


@st.composite
def spoiled(draw, good):
    """`good` (an array), or a mistake a user might make with it: another dtype, an axis added, dropped,
    resized or swapped, or no array at all."""
    mistake = draw(st.sampled_from(["none", "none", "none", "dtype", "add axis", "drop axis", "resize",
                                    "swap", "not an array"]))
    shape = list(good.shape)
    if mistake == "dtype":
        return good.astype(draw(_odd_dtypes))
    if mistake == "add axis":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
    elif mistake == "drop axis" and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif mistake == "resize" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 4))
    elif mistake == "swap" and len(shape) >= 2:
        shape[-1], shape[-2] = shape[-2], shape[-1]
    elif mistake == "not an array":
        return draw(st.sampled_from([None, 0.0, 1, True, float("nan"), "x", [[0.0, 1.0]], good.tolist()]))
    return np.zeros(shape, dtype=good.dtype) if mistake != "none" else good
