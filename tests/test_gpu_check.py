"""benchmarks/gpu_check.py and bench_flash_gpu.py, checked without a GPU.

A GPU is at hand only now and then, for minutes, so everything about the one-command GPU check that a CPU
can run is proven here: the no-GPU path of both scripts, the time limits (a step past its limit is killed
with its children and reported; the steps' limits never add up past the budget; pytest stops between two
tests once its budget is spent and still writes its JUnit XML), the reading of pytest's, compute-
sanitizer's and the benchmark's output into the summary line and summary.json, and the benchmark's
bookkeeping (order, budgets, out of memory, JSON and text written after every row), with a fake clock.
On CuPy on a CPU (tests/cuda/cupy_on_cpu.py) the benchmark measures the real kernels and full attention,
the kernel report reads flash.py's launch plans, and the sanitizer's target checks its own results.
No test here asserts anything about speed.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import cuda_available

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import bench_flash_gpu as bench  # noqa: E402  (benchmarks/ is not a package: found through the path above)
import gpu_check  # noqa: E402

no_gpu_only = pytest.mark.skipif(cuda_available(), reason="the no-GPU path: this machine has a GPU")


# ----------------------------------------------------------------------------------------------------
# Without a GPU


@no_gpu_only
def test_the_benchmark_without_a_gpu_says_so_and_exits_0(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--json", str(path)]) == 0
    assert "No CUDA GPU is visible to CuPy" in capsys.readouterr().out
    assert json.loads(path.read_text()) == {"error": bench.NO_GPU_MESSAGE}


@no_gpu_only
def test_gpu_check_sh_without_a_gpu_exits_3_with_a_clear_message_and_a_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", os.path.join(BENCHMARKS, "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == gpu_check.NO_GPU, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("GPU CHECK: No CUDA GPU") and "Nothing was checked" in last
    assert json.loads((tmp_path / "summary.json").read_text())["no_gpu"].startswith("No CUDA GPU")
    assert set(os.listdir(tmp_path)) <= set(gpu_check.OUTPUT_FILES)   # the device tool fetches 8 files at most
    assert "No CUDA GPU" in (tmp_path / "gpu_check.log").read_text()


# ----------------------------------------------------------------------------------------------------
# Time limits


def running(pid):
    """Is process pid alive? (A killed orphan may stay a zombie where nothing reaps it, as in a container.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_past_its_limit_is_killed_with_its_children_and_reported(tmp_path):
    # The step starts a grandchild (as pytest or compute-sanitizer would) and then hangs.
    code = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
            "print(child.pid, flush=True); time.sleep(60)")
    with open(tmp_path / "log", "w") as log:
        start = time.monotonic()
        result = gpu_check.run_step([sys.executable, "-c", code], 1.0, [log], echo=False)
        elapsed = time.monotonic() - start
    assert result["status"] == "timed out" and result["rc"] is None
    assert elapsed < 30       # 1 s limit + two 3 s grace periods, far below the step's 60 s (slack for a loaded CPU)
    grandchild = int(result["tail"][0])
    time.sleep(0.2)
    assert not running(grandchild)                             # the whole process group is gone
    assert "killed after its limit of 1 s" in (tmp_path / "log").read_text()


def test_a_step_s_output_goes_to_its_logs_and_its_exit_status_to_its_status(tmp_path, capsys):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        failed = gpu_check.run_step([sys.executable, "-c", "print('one'); import sys; sys.exit(2)"], 30, [a, b])
        ok = gpu_check.run_step([sys.executable, "-c", "print('two')"], 30, [a], echo=False)
    assert (failed["status"], failed["rc"], failed["tail"]) == ("failed", 2, ["one"])
    assert (ok["status"], ok["rc"]) == ("ok", 0)
    assert (tmp_path / "a").read_text() == "one\ntwo\n" and (tmp_path / "b").read_text() == "one\n"
    assert capsys.readouterr().out == "one\n"                 # echo=False kept "two" off the console
    missing = gpu_check.run_step([str(tmp_path / "no-such-program")], 30, [], echo=False)
    assert missing["status"] == "could not start"


@given(used=st.lists(st.floats(0, 1), min_size=len(gpu_check.STEPS), max_size=len(gpu_check.STEPS)),
       budget=st.floats(60, 600))
def test_the_steps_limits_never_add_up_past_the_budget(used, budget):
    # Each step uses a drawn fraction of its limit (1 = runs until killed); the total stays in the budget.
    steps, elapsed = gpu_check.STEPS, 0.0
    for index, (step, fraction) in enumerate(zip(steps, used)):
        limit = gpu_check.step_limit(index, steps, budget - elapsed)
        assert 0 <= limit <= step.max_seconds
        elapsed += fraction * limit
    assert elapsed <= budget + 1e-9


def test_a_step_gets_the_time_earlier_steps_left_but_never_its_successors_reserves():
    steps = gpu_check.STEPS
    assert gpu_check.step_limit(0, steps, gpu_check.DEFAULT_BUDGET) == steps[0].max_seconds
    later = sum(step.reserve_seconds for step in steps[2:])
    assert gpu_check.step_limit(1, steps, 100) == 100 - later  # squeezed: the later steps keep their reserves
    assert gpu_check.step_limit(len(steps) - 1, steps, 1000) == steps[-1].max_seconds


def test_pytest_stops_between_tests_once_its_budget_is_spent_and_still_writes_its_junit_xml(tmp_path):
    # Two files; the plugin runs test_flash.py first. With a budget of 0 s it stops after one test.
    (tmp_path / "test_a.py").write_text("def test_a_passes():\n    pass\n\ndef test_a_also():\n    pass\n")
    (tmp_path / "test_flash.py").write_text(textwrap.dedent("""
        import pytest
        def test_flash_fails():
            assert 1 == 2
        def test_flash_skips():
            pytest.skip("no")
    """))
    junit = tmp_path / "out.xml"
    env = {**os.environ, "GPU_CHECK_TEST_BUDGET": "0", "PYTHONPATH": BENCHMARKS}
    result = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "pytest_time_budget", "-p", "no:randomly",
                             "-p", "no:cacheprovider", f"--junitxml={junit}", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    counts = gpu_check.tests_result(str(junit), result.stdout)
    assert counts["source"] == "junit", result.stdout
    assert (counts["ran"], counts["failed"], counts["passed"]) == (1, 1, 0)
    assert counts["failures"] == ["test_flash::test_flash_fails"]
    assert counts["stopped"].startswith("time budget: 1 of 4 tests run") and counts["selected"] == 4
    # Without the XML (pytest killed), the -v lines give the same counts.
    from_log = gpu_check.tests_result(str(tmp_path / "missing.xml"), result.stdout)
    assert {key: from_log[key] for key in ("ran", "failed", "passed")} == {"ran": 1, "failed": 1, "passed": 0}
    assert from_log["failures"] == ["test_flash.py::test_flash_fails"]


# ----------------------------------------------------------------------------------------------------
# Reading results into the summary

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
 skipped="2" tests="7"><testcase classname="tests.test_x" name="test_ok"/><testcase classname="tests.test_x"
 name="test_bad[cupy]"><failure message="no"/></testcase><testcase classname="tests.test_y" name="test_broken">
 <error message="fixture"/></testcase></testsuite></testsuites>"""


def test_junit_counts_and_failed_test_names():
    counts = gpu_check.tests_from_junit_text(JUNIT)
    assert counts == {"passed": 3, "failed": 1, "errors": 1, "skipped": 2, "ran": 7,
                      "failures": ["tests.test_x::test_bad[cupy]", "tests.test_y::test_broken"]}


@pytest.mark.parametrize("text, state, want", [
    ("========= ERROR SUMMARY: 0 errors\n", "ran", "target failed"),       # the target never said OK
    ("SANITIZE TARGET OK\n========= ERROR SUMMARY: 0 errors\n", "ran", "clean"),
    ("SANITIZE TARGET OK\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "ran",
     "clean"),
    ("========= Invalid __global__ read of size 16 bytes\n========= ERROR SUMMARY: 3 errors\n", "ran", "errors"),
    ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n", "ran", "errors"),
    ("========= Error: Device not supported\n", "ran", "refused"),
    ("", "missing", "missing"), ("partial output", "timed out", "timed out"),
])
def test_sanitizer_output_reads_as_clean_errors_refused_or_not_run(text, state, want):
    result = gpu_check.sanitizer_result(text, state)
    assert result["status"] == want
    if want == "errors":
        assert result["errors"] in (3, 1)
    if want == "refused":
        assert result["detail"] == "Error: Device not supported"


def test_the_sanitizer_is_found_on_the_path_or_in_a_cuda_folder_and_none_elsewhere(tmp_path):
    for folder in ("bin", "cuda-13.0/bin"):
        (tmp_path / folder).mkdir(parents=True)
    tool = tmp_path / "cuda-13.0" / "bin" / "compute-sanitizer"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    empty = str(tmp_path / "bin")
    assert gpu_check.find_sanitizer(path=empty, roots=(str(tmp_path / "cuda-*"),), sites=()) == str(tool)
    assert gpu_check.find_sanitizer(path=str(tool.parent), roots=(), sites=()) == str(tool)
    assert gpu_check.find_sanitizer(path=empty, roots=(), sites=()) is None


def fabricated_report():
    """bench_flash_gpu.py's JSON report as it would come from a GPU, with made-up numbers."""
    rows = []
    for Dh, (fwd, bwd, sdpa_fwd, sdpa_bwd) in {64: (45.0, 30.0, 40.0, 37.5), 128: (42.0, 28.0, None, None)}.items():
        for causal in (False, True):
            for name, flash, sdpa in (("fwd", fwd, sdpa_fwd), ("fwd+bwd", bwd, sdpa_bwd)):
                rows.append({"Dh": Dh, "T": 4096, "causal": causal, "pass": name,
                             "tflops": {"flash": flash / (1 + causal), "sdpa": sdpa, "full": 10.0}})
    return {"meta": {"gpu": "NVIDIA H200"}, "rows": rows, "longest": [], "complete": True}


def test_the_summary_line_from_a_fabricated_benchmark_report():
    headline = gpu_check.bench_headline(fabricated_report())
    assert headline[64]["fwd"] == {"flash": 45.0, "sdpa": 40.0, "ratio": 1.125}   # the non-causal rows
    tests = {"passed": 117, "failed": 2, "errors": 0, "skipped": 0, "selected": 119, "stopped": None}
    sanitizers = {"memcheck": {"status": "clean"}, "racecheck": {"status": "refused"}}
    steps = {"info": {"status": "ok"}, "bench": {"status": "timed out"}}
    line = gpu_check.summary_line("NVIDIA H200", tests, headline, sanitizers, steps, 301.4)
    assert line == ("GPU CHECK NVIDIA H200 | tests 117 passed, 2 failed, 0 errors, 0 skipped of 119 | "
                    "T=4096 non-causal flash TFLOP/s: Dh=64 fwd 45.0 (1.12x sdpa), fwd+bwd 30.0 (0.80x sdpa); "
                    "Dh=128 fwd 42.0, fwd+bwd 28.0 | memcheck clean, racecheck refused | "
                    "steps: bench timed out | 301 s")
    empty = gpu_check.bench_headline(None)
    assert empty[128]["fwd+bwd"] == {"flash": None, "sdpa": None, "ratio": None}
    assert "Dh=64 fwd n/a, fwd+bwd n/a" in gpu_check.summary_line(None, None, empty, {}, {}, 0)


def test_finish_reads_every_output_file_and_writes_summary_json(tmp_path):
    paths = {name: str(tmp_path / name) for name in gpu_check.OUTPUT_FILES}
    (tmp_path / "tests.xml").write_text(JUNIT.replace('failures="1"', 'failures="0"').replace(
        '<failure message="no"/>', "").replace('errors="1"', 'errors="0"').replace('<error message="fixture"/>', ""))
    (tmp_path / "tests.txt").write_text("collected 541 items / 534 deselected / 7 selected\n")
    (tmp_path / "bench.json").write_text(json.dumps(fabricated_report()))
    (tmp_path / "sanitizer.txt").write_text("== memcheck: compute-sanitizer ...\nSANITIZE TARGET OK\n"
                                            "========= ERROR SUMMARY: 0 errors\n== racecheck: compute-sanitizer ..."
                                            "\n========= Error: Device not supported\n")
    steps = {name: {"status": "ok", "rc": 0, "seconds": 1, "limit": 9, "tail": []} for name in
             ("info", "tests", "bench")}
    steps.update(memcheck={"status": "ok", "rc": 0, "seconds": 1, "limit": 9, "tail": [], "sanitizer": "ran"},
                 racecheck={"status": "ok", "rc": 1, "seconds": 1, "limit": 9, "tail": [], "sanitizer": "ran"})
    said = []
    assert gpu_check.finish(paths, steps, 250.0, said.append) == 0   # a refusing sanitizer is reported, not failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is True and summary["gpu"] == "NVIDIA H200"
    assert summary["tests"]["passed"] == 5 and summary["tests"]["selected"] == 7
    assert summary["headline"]["64"]["fwd+bwd"]["ratio"] == 0.8
    assert summary["sanitizers"]["racecheck"]["status"] == "refused"
    assert summary["summary"] == said[-1].strip() and "tail" not in summary["steps"]["info"]
    # A timed-out step, or a test that failed, makes the run fail.
    steps["bench"]["status"] = "timed out"
    assert gpu_check.finish(paths, steps, 250.0, said.append) == 1


# ----------------------------------------------------------------------------------------------------
# The benchmark's bookkeeping, with a fake clock


def fake_seconds(fn, warmup, repeats):
    fn()                                                       # run it once (its errors must surface)
    return 1e-3


def numpy_device():
    return bench.Device(seconds=fake_seconds, free=lambda: None, synchronize=lambda: None,
                        inputs=lambda B, H, T, Dh: [np.zeros((B, H, T, Dh), np.float32)] * 4,
                        out_of_memory=lambda error: "out of memory" in str(error))


def run_out_of_memory_above(T_max):
    def method(q, k, v, dout, causal, backward):
        if q.shape[-2] > T_max:
            raise RuntimeError("CUDA out of memory (pretend)")
        return q
    return method


def numpy_difference(a, b):
    return float(np.abs(a - b).max())


def test_out_of_memory_gives_a_dash_and_stops_the_longest_search_and_other_errors_surface(tmp_path):
    args = bench.parse_args(["--Dh", "64", "--T", "64", "128", "--json", str(tmp_path / "b.json"), "--warmup", "0",
                             "--longest-start", "64", "--longest-cap", "1024", "--first-T", "128"])
    methods = {"flash": run_out_of_memory_above(1 << 20), "full": run_out_of_memory_above(64)}
    lines = []
    report = bench.run_benchmark(args, methods, numpy_device(), META, lines.append, numpy_difference)
    assert [(row["T"], row["causal"], row["pass"]) for row in report["rows"][:2]] == [(128, False, "fwd"),
                                                                                    (128, False, "fwd+bwd")]
    row_128 = report["rows"][0]
    assert row_128["seconds"]["full"] is None and row_128["tflops"]["full"] is None   # out of memory
    assert bench.format_row(row_128).split("|")[1].split()[1:] == ["-", "-"]     # no sdpa; full out of memory
    assert report["longest"] == [{"Dh": 64, "method": "flash", "T": 1024, "why": "the cap, 1024"},
                                 {"Dh": 64, "method": "full", "T": 64, "why": "out of memory at T = 128"}]
    assert json.loads((tmp_path / "b.json").read_text()) == report
    # An error that is not out of memory is a bug in the method: it is raised, not hidden as a dash.
    with pytest.raises(ZeroDivisionError):
        bench.measure(lambda *a: 1 / 0, [None] * 4, False, False, args, numpy_device())


def test_time_budgets_skip_what_would_start_after_them_and_say_so(tmp_path):
    args = bench.parse_args(["--Dh", "64", "128", "--T", "64", "--table-budget", "0", "--longest-budget", "0",
                             "--text", str(tmp_path / "b.txt")])
    report = bench.run_benchmark(args, {"flash": run_out_of_memory_above(1 << 20)}, numpy_device(), META,
                                 lambda line: None, numpy_difference)
    assert report["rows"] == [] and report["complete"] is False
    assert [(s["Dh"], s["T"]) for s in report["skipped"]] == [(64, 64), (128, 64)]
    assert {entry["why"] for entry in report["longest"]} == {"time budget spent before T = 16384"}
    text = (tmp_path / "b.txt").read_text()
    assert "# not measured: Dh=128 T=64 (table budget of 0.0 s spent)" in text


def test_the_headline_length_is_measured_first_for_every_head_width():
    assert bench.case_order([64, 128], [1024, 4096], first_T=4096) == [(64, 4096), (128, 4096), (64, 1024),
                                                                       (128, 1024)]
    assert bench.case_order([64], [2048, 1024]) == [(64, 2048), (64, 1024)]


META = {"gpu": "CuPy on a CPU", "date": "today", "cupy": "stand-in", "cupy_tf32": "0", "torch": None,
        "torch_allow_tf32": None}


@pytest.mark.cupy_on_cpu
def test_the_benchmark_measures_the_real_kernels_on_cupy_on_a_cpu(tmp_path):
    import cupy   # the stand-in, while this test runs
    args = bench.parse_args(["--Dh", "32", "--T", "70", "--tokens", "70", "--model-width", "32", "--warmup", "0",
                             "--repeats", "1", "--json", str(tmp_path / "b.json"), "--text", str(tmp_path / "b.txt")])
    rng = np.random.default_rng(0)
    device = numpy_device()._replace(
        inputs=lambda B, H, T, Dh: [cupy.asarray(rng.standard_normal((B, H, T, Dh)).astype(np.float32))
                                    for _ in range(4)])
    # Full attention stands in for sdpa, so the agreement check compares the kernels with attention.py.
    methods = {"flash": bench.run_flash, "sdpa": bench.run_full}
    rows = list(bench.measure_case(methods, 32, 70, args, device))
    assert len(rows) == 4
    for row in rows:
        assert row["agrees"] and row["max_diff_vs_sdpa"] < 1e-5   # float32 sums over <= 70 keys: ~1e-7
        work = bench.flops(1, 1, 70, 70, 32, row["causal"], row["pass"] == "fwd+bwd")
        assert row["tflops"] == {"flash": work / 1e-3 / 1e12, "sdpa": work / 1e-3 / 1e12}
        assert bench.ratio(row, "sdpa") == 1.0


# ----------------------------------------------------------------------------------------------------
# The GPU subcommands' parts that a CPU can run


@pytest.mark.cupy_on_cpu
def test_the_kernel_report_reads_every_kernel_from_flash_py_s_launch_plans():
    import cupy
    import flash
    plans = gpu_check.kernel_plans(cupy, flash)
    names = [name for name, _, _ in plans]
    assert len(names) == len(set(names)) == 3 * len(flash.KERNEL_HEAD_WIDTHS) + 1   # + flash_backward_delta
    assert all(threads == 256 and 0 <= shared <= 163 * 1024 for _, threads, shared in plans)
    with pytest.raises(RuntimeError, match="flash.py has no _cuda_module, _forward_launches"):
        gpu_check.flash_internals(type("flash", (), {"KERNEL_HEAD_WIDTHS": (64,), "_backward_launches": None}))


def test_blocks_per_sm_follow_from_registers_shared_memory_and_threads():
    h100 = {"maxThreadsPerMultiProcessor": 2048, "regsPerMultiprocessor": 65536, "sharedMemPerMultiprocessor": 233472,
            "reservedSharedMemPerBlock": 1024, "maxBlocksPerMultiProcessor": 32}
    # 128 registers x 256 threads = half the register file; 68 KiB + 1 KiB of shared memory fits 3 times.
    assert gpu_check.blocks_per_sm_limits(h100, 128, 256, 69632) == {"threads": 8, "registers": 2, "shared": 3,
                                                                     "blocks": 32}
    # 129 registers round up to 136 a thread (a warp's registers come in units of 256): one block only.
    assert gpu_check.blocks_per_sm_limits(h100, 129, 256, 0)["registers"] == 1
    assert gpu_check.blocks_per_sm_limits({}, 128, 256, 0) == dict.fromkeys(("threads", "registers", "shared",
                                                                           "blocks"))


H100_PROPS = {"name": b"NVIDIA H200 (pretend)", "major": 9, "minor": 0, "maxThreadsPerMultiProcessor": 2048,
              "regsPerMultiprocessor": 65536, "sharedMemPerMultiprocessor": 233472, "reservedSharedMemPerBlock": 1024,
              "maxBlocksPerMultiProcessor": 32}
# What info() reads from CuPy beyond the stand-in, with the names real CuPy gives them.
RUNTIME_NAMES = ("driverGetVersion", "runtimeGetVersion", "getDeviceProperties")
KERNEL_NAMES = ("num_regs", "local_size_bytes", "shared_size_bytes", "max_threads_per_block", "kernel")


@pytest.mark.cupy_on_cpu
def test_info_prints_versions_and_a_line_per_kernel_given_what_cupy_reports(monkeypatch, capsys):
    # The stand-in knows no versions, registers or occupancy: pretend, under real CuPy's names, so that
    # the code that reads them runs here (its figures are the pretence; a GPU gives the real ones).
    import cupy
    real = sys.modules.get("cupy_on_cpu")._real_cupy
    if real is not None:
        assert all(hasattr(real.cuda.runtime, name) for name in RUNTIME_NAMES)
        assert all(hasattr(real.RawKernel, name) for name in KERNEL_NAMES)
        assert hasattr(real.cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor")
        assert hasattr(real.cuda.nvrtc, "getVersion") and hasattr(real.cuda.function.Function, "ptr")
    runtime = cupy.cuda.runtime
    for name, value in zip(RUNTIME_NAMES, (lambda: 13000, lambda: 13000, lambda device: H100_PROPS)):
        monkeypatch.setattr(runtime, name, staticmethod(value), raising=False)
    monkeypatch.setattr(cupy.cuda, "nvrtc", type("nvrtc", (), {"getVersion": staticmethod(lambda: (13, 0))}),
                        raising=False)
    monkeypatch.setattr(cupy.cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor",
                        staticmethod(lambda pointer, threads, shared: 2), raising=False)
    for name, value in zip(KERNEL_NAMES, (128, 0, 0, 256, type("Function", (), {"ptr": 0}))):
        monkeypatch.setattr(cupy.RawKernel, name, value, raising=False)
    monkeypatch.setattr(cupy, "__version__", "stand-in", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)           # "torch not importable": faster than importing it
    assert gpu_check.info() == 0
    out = capsys.readouterr().out
    assert "CuPy stand-in; CUDA driver API 13.0, runtime 13.0, NVRTC 13.0" in out
    assert "GPU: NVIDIA H200 (pretend)" in out and "torch not importable" in out
    # 128 registers and 256 threads: 2 blocks by registers; 69632 + 1024 bytes of shared memory: 3; threads: 8
    row = ("flash_forward_64          128       0        0     69632     256     256 |"
           "         2 |       2       3      8")
    assert row in out.splitlines()


@pytest.mark.cupy_on_cpu
def test_the_sanitizer_s_target_passes_its_own_checks_on_correct_kernels(monkeypatch, capsys):
    import cupy
    monkeypatch.setattr(cupy.cuda, "set_allocator", lambda allocator: None, raising=False)  # no pool to turn off
    # Every case but the widest head (on a CPU it only costs time): the windows' rows with no key included.
    cases = [case for case in gpu_check.SANITIZE_CASES if case[0] != 128]
    assert any(case[-1] is not None for case in cases)        # the sliding-window cases are there
    assert gpu_check.sanitize_target(cases) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("SANITIZE TARGET OK") and "WRONG" not in out and "window=(20, 30)" in out


FAKE_SANITIZER = """#!/bin/sh
# compute-sanitizer as an older one without --padding would answer, with the target's OK line and a summary
case "$*" in *padding*) echo "Unrecognized option: --padding"; exit 1;; esac
echo "SANITIZE TARGET OK"
case "$*" in
  *racecheck*) echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)";;
  *) echo "========= ERROR SUMMARY: 0 errors";;
esac
"""


def test_memcheck_runs_again_without_padding_where_it_is_unknown_and_each_tool_reads_its_own_output(tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    out = tmp_path / "out"
    status = gpu_check.main(["--out", str(out), "--only", "memcheck", "racecheck", "--sanitizer", str(fake)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sanitizers"]["memcheck"]["status"] == "clean"
    race = "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
    assert summary["sanitizers"]["racecheck"] == {"status": "errors", "errors": 1, "detail": race}
    assert status == 1                                        # a race is a failure
    assert (out / "sanitizer.txt").read_text().count("== memcheck: ") == 2
