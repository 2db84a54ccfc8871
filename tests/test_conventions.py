"""Conventions that hold across files (the README's "Conventions" section), checked on the files themselves.

The array-module helper get_xp: a copy in each file that imports no project file (attention.py,
positional.py, training.py, erf.py), all copies the same source, none anywhere else (a file that imports a project
file imports get_xp from it, tests/gradcheck.py included), and none of them pays for `import cupy`.
"""
import ast
import importlib
import inspect
import sys

import numpy as np
import pytest

from helpers import ROOT, imported_project_modules

COPIES = ["attention", "positional", "training", "erf"]                  # the files that import no project file


def python_files():
    """Every Python file of the project, the test tools in tests/cuda included."""
    for folder in (ROOT, ROOT / "experiments", ROOT / "benchmarks", ROOT / "figures", ROOT / "tests",
                   ROOT / "tests" / "cuda"):
        yield from sorted(folder.glob("*.py"))


def get_xp_definitions(source, tree):
    return [ast.get_source_segment(source, node) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == "get_xp"]


def copies():
    """The modules holding a copy of get_xp; training.py is skipped while it does not exist yet."""
    modules = []
    for name in COPIES:
        if not (ROOT / f"{name}.py").exists():
            continue
        modules.append(importlib.import_module(name))
    return modules


def test_every_copy_of_get_xp_is_the_same_source():
    sources = {module.__name__: inspect.getsource(module.get_xp) for module in copies()}
    assert len(set(sources.values())) == 1, f"get_xp differs between {sorted(sources)}"


@pytest.mark.parametrize("path", list(python_files()), ids=lambda path: str(path.relative_to(ROOT)))
def test_a_file_defines_get_xp_only_if_it_imports_no_project_file_and_then_as_attention_does(path):
    source = path.read_text()
    tree = ast.parse(source)
    definitions = get_xp_definitions(source, tree)
    if not definitions:
        return
    imports = imported_project_modules(tree) - {path.stem}
    assert not imports, f"{path.name} imports {sorted(imports)}: it must import get_xp from there, not define it"
    attention = importlib.import_module("attention")
    assert definitions == [inspect.getsource(attention.get_xp).rstrip("\n")], (
        f"{path.name}'s get_xp is not a copy of attention.py's")


def test_gradcheck_uses_attentions_get_xp():
    import gradcheck
    attention = importlib.import_module("attention")
    assert gradcheck.get_xp is attention.get_xp


class _RefuseCupy:
    """A meta-path finder that records and refuses every attempt to import cupy."""

    def __init__(self):
        self.attempts = 0

    def find_spec(self, name, path=None, target=None):
        if name == "cupy" or name.startswith("cupy."):
            self.attempts += 1
            raise ImportError("refused by the test")
        return None


def test_get_xp_never_imports_cupy_so_it_costs_nothing_without_it(monkeypatch):
    # A CuPy array cannot exist unless cupy is already imported, so get_xp only looks in sys.modules.
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    finder = _RefuseCupy()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for module in copies():
        assert module.get_xp(np.ones(2), np.zeros(1)) is np
    assert finder.attempts == 0


def test_get_xp_picks_cupy_on_a_cpu_while_it_stands_in_for_cupy():
    import cupy_on_cpu
    with cupy_on_cpu.installed() as cp:
        device, host = cp.asarray(np.ones(3)), np.ones(3)
        for module in copies():
            assert module.get_xp(device) is cp and module.get_xp(host, device) is cp
            assert module.get_xp(host) is np
    for module in copies():                                        # and NumPy again once it is gone
        assert module.get_xp(np.ones(3)) is np
