"""Test harness shared by every test file.

- Hypothesis profiles: "fast" (default) and "thorough" (HYPOTHESIS_PROFILE=thorough python -m pytest).
- The `gpu` marker: such tests are skipped unless CuPy is installed *and* sees a CUDA device
  (importing cupy succeeds without a GPU, so importorskip would not be enough).
- The `xp` fixture: runs a test with NumPy arrays, with "CuPy on a CPU" (tests/cuda/cupy_on_cpu.py: a
  `cupy` whose arrays live in host memory and whose RawKernels run on the CPU), and with CuPy arrays on
  a GPU (marked `gpu`). So the CuPy path of every file runs in every test session, and on a GPU too.
- `--student DIR`: run the tests against the project files in DIR (an exercise made by tools/exercise.py)
  instead of the reference ones, and end with one line per failed test naming the property it checks.
"""
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

# Tests import the concept files from the repository root, as a student running `python -m pytest` would;
# tests/cuda holds the tools that run CUDA kernels on a CPU (not a package: found through the path).
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(TESTS, "cuda"))

settings.register_profile("fast", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# "fail-fast": the first failing example ends a test, unshrunk and unexplained (tests/test_exercise.py grades
# dozens of stubs and only asks whether a test fails).
settings.register_profile("fail-fast", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def cuda_available():
    """True when CuPy is installed and can use a CUDA device."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # a broken CUDA install is the same as no GPU for our purposes
        return False


def pytest_collection_modifyitems(config, items):
    if STUDENT in config.stash:
        tests_of_the_exercise_first(config.stash[STUDENT], items)
    import cpu_cuda
    skips = {"gpu": (not cuda_available(), "needs CuPy with a CUDA device (cupy.is_available() is False)"),
             "cupy_on_cpu": (shutil.which(cpu_cuda.CXX) is None,
                             f"CuPy on a CPU needs a C++ compiler ({cpu_cuda.CXX}) to run CUDA kernels")}
    for marker, (skip, reason) in skips.items():
        if skip:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


# The array modules a test taking `xp` runs on. "cupy-on-cpu" carries the marker `cupy_on_cpu`: while such
# a test runs (and only then), `import cupy` gives the stand-in, so get_xp and flash.py's dispatch see a
# CuPy array.
CUPY_ON_CPU = pytest.param("cupy-on-cpu", marks=pytest.mark.cupy_on_cpu)
CUPY_ON_GPU = pytest.param("cupy", marks=pytest.mark.gpu)
ARRAY_MODULES = ["numpy", CUPY_ON_CPU, CUPY_ON_GPU]


def array_module(name):
    if name == "numpy":
        return np
    if name == "cupy-on-cpu":
        import cupy_on_cpu
        return cupy_on_cpu
    import cupy
    return cupy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a `cupy_on_cpu` test, its fixtures' set-up and tear-down included, with the stand-in installed
    as `cupy` (a hook, not a fixture: hypothesis refuses function-scoped fixtures, and the swap must not
    outlive the test)."""
    if item.get_closest_marker("cupy_on_cpu") is None:
        yield
        return
    import cupy_on_cpu
    with cupy_on_cpu.installed():
        yield


@pytest.fixture(scope="session", params=ARRAY_MODULES)
def xp(request):
    """The array module a test runs on: numpy, CuPy on a CPU, and cupy where a GPU is present."""
    return array_module(request.param)


# ----------------------------------------------------------------------------------------------------
# Exercises: `python -m pytest tests/test_attention.py --student DIR` runs the same tests on the student's
# copy in DIR. Every project module (a top-level *.py of the repository) then comes from DIR or not at all:
# a reference file silently standing in for a missing copy would grade the reference, not the student.

PROJECT_MODULES = frozenset(name[:-3] for name in os.listdir(REPO) if name.endswith(".py"))


def pytest_addoption(parser):
    parser.addoption("--student", metavar="DIR", default=None,
                     help="run the tests against the project files in DIR (made by tools/exercise.py) "
                          "instead of the repository's; failed tests are summarised by the property they check")


class StudentFinder(importlib.abc.MetaPathFinder):
    """Finds project modules in the student folder only; anything else is left to the usual finders."""

    def __init__(self, folder):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name not in PROJECT_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [self.folder])
        if spec is None:
            raise ModuleNotFoundError(f"--student {self.folder}: {name}.py is not in the student folder, and the "
                                      f"reference {name}.py may not stand in for it; make the folder with "
                                      f"`python tools/exercise.py MODULE.FUNCTION --out {self.folder}`", name=name)
        return spec


def pytest_configure(config):
    folder = config.getoption("student")
    if folder is None:
        return
    folder = os.path.realpath(folder)
    if not os.path.isdir(folder):
        raise pytest.UsageError(f"--student needs a folder made by tools/exercise.py, got {folder!r} (no such folder)")
    if folder == os.path.realpath(REPO):
        raise pytest.UsageError("--student needs a copy of the project files, got the repository root itself")
    loaded = sorted(name for name in PROJECT_MODULES if name in sys.modules)
    if loaded:      # imported before this hook (by a plugin): the tests would see the reference
        raise pytest.UsageError(f"--student: {', '.join(loaded)} were imported from the reference before the "
                                "tests started; run pytest without plugins that import project files")
    sys.path.insert(0, folder)                      # before any test module imports a project module
    sys.meta_path.insert(0, StudentFinder(folder))
    import helpers                                  # demos run as `python ROOT/file.py`: the student's file
    from pathlib import Path
    helpers.ROOT = Path(folder)
    # Failing examples are remembered in the student folder, not in the repository's .hypothesis/.
    from hypothesis.database import DirectoryBasedExampleDatabase
    settings.register_profile("student", settings(settings.default,
                                                  database=DirectoryBasedExampleDatabase(
                                                      os.path.join(folder, ".hypothesis"))))
    settings.load_profile("student")
    config.stash[STUDENT] = folder


STUDENT = pytest.StashKey[str]()


def tests_of_the_exercise_first(folder, items):
    """Run first the tests whose code names the exercise's function (read from the folder's .exercise.json),
    then those naming a function of its file that calls it (generate, for a step of generation), keeping
    the file's order otherwise: with -x, the first failure is about the exercise."""
    try:
        with open(os.path.join(folder, ".exercise.json"), encoding="utf-8") as f:
            module_name, _, function = json.load(f)["exercise"].rpartition(".")
    except (OSError, ValueError, KeyError, AttributeError):
        return                                      # a folder made by hand: the file's own order

    def names(code):                                # globals and attributes the code (and its lambdas) uses
        return set(code.co_names).union(*(names(c) for c in code.co_consts if inspect.iscode(c)))

    module = sys.modules.get(module_name)
    uses = {name: names(f.__code__) for name, f in vars(module).items()
            if inspect.isfunction(f) and f.__module__ == module_name} if module else {}
    callers, grown = {function}, True
    while grown:                                    # every function of the file that reaches the exercise
        grown = False
        for name, used in uses.items():
            if name not in callers and used & callers:
                callers.add(name)
                grown = True

    def rank(item):
        test = getattr(item, "obj", None)
        test = getattr(getattr(test, "hypothesis", None), "inner_test", test)   # @given wraps the test
        code = getattr(inspect.unwrap(test), "__code__", None) if callable(test) else None
        used = names(code) if code is not None else set()
        return 0 if function in used else 1 if used & callers else 2

    items.sort(key=rank)                            # stable: the file's order within each rank


def property_of(item):
    """What a test proves, in words: its docstring's first paragraph, or else its name read as a sentence
    (the names are written as properties: test_future_tokens_cannot_change_past_outputs)."""
    doc = inspect.getdoc(getattr(item, "function", None))
    if doc:
        return " ".join(doc.split("\n\n")[0].split())
    return item.originalname.removeprefix("test_").replace("_", " ") if hasattr(item, "originalname") \
        else item.name


def why_it_failed(report):
    """One line: the stub still in place, or the start of the assertion or error message."""
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["failed"]
    if lines[0].startswith("NotImplementedError"):
        return "not written yet (" + lines[0] + ")"
    return " / ".join(lines[:3])[:200]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and STUDENT in item.config.stash:
        report.user_properties.append(("property", property_of(item)))
        report.sections.append(("property this test checks", property_of(item)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if STUDENT not in config.stash:
        return
    failed = [r for kind in ("failed", "error") for r in terminalreporter.stats.get(kind, [])]
    passed = len(terminalreporter.stats.get("passed", []))
    terminalreporter.section(f"exercise graded on {config.stash[STUDENT]}")
    by_property = {}                                # one entry per property, however many cases failed it
    for report in failed:
        name = report.nodeid.split("::")[-1]
        by_property.setdefault(dict(report.user_properties).get("property", name), []).append((name, report))
    for prop, cases in by_property.items():
        name, report = cases[0]
        more = f"  (and {len(cases) - 1} more failed cases)" if len(cases) > 1 else ""
        terminalreporter.line(f"BROKEN  {prop}")
        terminalreporter.line(f"        {name}: {why_it_failed(report)}{more}")
    imported = sorted(module.__file__ for name, module in sys.modules.items()
                      if name in PROJECT_MODULES and getattr(module, "__file__", None))
    terminalreporter.line("project files imported: " + ", ".join(imported))
    terminalreporter.line("every property holds" if not failed and passed else
                          f"{len(by_property)} properties broken ({len(failed)} failed tests), {passed} tests passed")


# One BLAS thread for the whole session: the tests' matrices are small, and on a machine with other work a
# second OpenBLAS thread spins while it waits (the suite took 213 s with two threads under load, 111 s with one).
@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        yield
