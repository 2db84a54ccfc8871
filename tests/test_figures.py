"""figures/make_figures.py: every figure it draws still runs against the current code, no concept file
draws (matplotlib lives in figures/ alone), and every figure in figures/ is made by it, small, and shown in
the README."""
import importlib.util

import pytest
from helpers import ROOT

FIGURES_DIR = ROOT / "figures"


def load_make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", FIGURES_DIR / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_figures = load_make_figures()
NAMES = list(make_figures.FIGURES)


@pytest.mark.parametrize("name", list(make_figures.FIGURES))
def test_figure_function_writes_a_png(name, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"{name}.png"
    make_figures.FIGURES[name](str(path), quick=True)          # tiny sizes: seconds for all of them
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} did not write a PNG"


@pytest.mark.parametrize("name", NAMES)
def test_every_figure_is_committed_small_and_shown_in_the_readme(name):
    path = FIGURES_DIR / f"{name}.png"
    assert path.is_file(), f"{path} is missing: run python figures/make_figures.py {name}"
    assert path.stat().st_size < 100 * 1024, f"{path} is {path.stat().st_size / 1024:.0f} KB; keep it < 100 KB"
    assert f"figures/{name}.png" in (ROOT / "README.md").read_text(), f"README.md does not show {path.name}"


def test_every_png_in_figures_is_made_by_the_command():
    made = {f"{name}.png" for name in NAMES}
    strays = sorted(path.name for path in FIGURES_DIR.glob("*.png") if path.name not in made)
    assert not strays, f"figures/ holds {strays}, which python figures/make_figures.py does not make"


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda path: path.name)
def test_no_concept_file_draws_figures_are_drawn_here_from_its_public_functions(path):
    assert "matplotlib" not in path.read_text(), f"{path.name} mentions matplotlib: its figures belong in figures/"
