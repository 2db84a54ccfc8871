"""figures/make_figures.py: every figure function still runs against the current code, and every figure
it registers is committed, small, and shown in the README."""
import importlib.util

import pytest
from helpers import ROOT

FIGURES_DIR = ROOT / "figures"


def load_make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", FIGURES_DIR / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIGURES = load_make_figures().FIGURES


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_function_writes_a_png(name, tmp_path):
    # quick=True: tiny sizes, seconds in all (rnn_gradient_norms runs `python rnn.py --figure`, about 6 s).
    pytest.importorskip("matplotlib")
    path = tmp_path / f"{name}.png"
    FIGURES[name](str(path), quick=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} did not write a PNG"


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_is_committed_small_and_shown_in_the_readme(name):
    path = FIGURES_DIR / f"{name}.png"
    assert path.is_file(), f"{path} is missing: run python figures/make_figures.py {name}"
    assert path.stat().st_size < 100 * 1024, f"{path} is {path.stat().st_size / 1024:.0f} KB; keep it < 100 KB"
    assert f"figures/{name}.png" in (ROOT / "README.md").read_text(), f"README.md does not show {path.name}"
