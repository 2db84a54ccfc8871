"""Tests for experiments/efficiency_table.py: the --quick run prints the Markdown table with every row and
its own asserts hold (memory exponents, exactness, the recall pattern; time exponents are asserted only in
the full run), and the exponent fit recovers a known power law."""
import os
import sys

import numpy as np
import pytest

from helpers import run_demo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import efficiency_table as experiment  # noqa: E402


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_the_growth_exponent_is_the_log_log_slope(power):
    lengths = [256, 512, 1024, 4096]
    assert experiment.exponent(lengths, [3.0 * T ** power for T in lengths]) == pytest.approx(power, abs=1e-9)


def test_quick_table_runs_prints_every_row_and_checks_itself():
    result = run_demo("experiments/efficiency_table.py", "--quick", timeout=180,
                      env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | time ~ T^a | memory ~ T^b")
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert names == list(experiment.methods(experiment.QUICK["w"]))
    assert "All claims hold" in result.stdout
