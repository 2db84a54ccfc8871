"""A pytest plugin for benchmarks/gpu_check.py: stop a test session cleanly once its time budget is spent.

    GPU_CHECK_TEST_BUDGET=120 PYTHONPATH=benchmarks python -m pytest -p pytest_time_budget -m gpu ...

After each test, once the budget (seconds from the session's start) is spent, it asks pytest to stop
(session.shouldstop): the tests not yet run are not run, and pytest still prints its summary and writes its
JUnit XML, both of which killing the process would lose. The line "time budget: N of M tests run" says how
far it got. It also runs the files in FIRST before the others (the kernels' own tests first), so a budget
that runs out cuts the least telling tests. Without GPU_CHECK_TEST_BUDGET it only reorders.
"""
import os
import time

import pytest

FIRST = ("test_flash_gpu.py", "test_flash.py")
BUDGET = "GPU_CHECK_TEST_BUDGET"
deadline_key = pytest.StashKey()


def pytest_configure(config):
    budget = os.environ.get(BUDGET)
    config.stash[deadline_key] = (float(budget), time.monotonic() + float(budget)) if budget else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return FIRST.index(name) if name in FIRST else len(FIRST)
    items.sort(key=rank)                                     # stable: the order inside a file is kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    budget = item.config.stash[deadline_key]
    if budget is None or nextitem is None or time.monotonic() <= budget[1]:
        return
    items = item.session.items
    ran = items.index(item) + 1
    item.session.shouldstop = f"time budget: {ran} of {len(items)} tests run in the budget of {budget[0]:g} s"
