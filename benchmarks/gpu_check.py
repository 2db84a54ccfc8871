"""One command that checks the GPU half of the project on a real GPU, well inside 8 minutes.

    bash benchmarks/gpu_check.sh            # = python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/gpu_out}"

Steps, each a child process with its own time limit (killed, with all its children, when it overruns), so
that a step that hangs or crashes costs only its own time and the next step still runs:

    info       GPU, driver, CUDA, NVRTC, CuPy and torch versions; for every flash.py kernel its registers,
               local memory (spills), static and dynamic shared memory, and blocks per SM: the driver's
               occupancy figure and what registers, shared memory and threads each allow     -> info.txt
    tests      pytest -m gpu: every test marked gpu, which includes the [cupy] variant of every test that
               takes the xp fixture (tests/conftest.py marks it so); it stops cleanly between two tests once
               its budget is spent (pytest_time_budget.py)                            -> tests.xml, tests.txt
    bench      bench_flash_gpu.py, T = 4096 first, longest-T search capped               -> bench.json, bench.txt
    memcheck   compute-sanitizer --tool memcheck on small forwards+backwards (partial tiles, causal,
               rows with no allowed key; sliding windows whose band skips tiles on both sides), checked
               against the NumPy path                                                     -> sanitizer.txt
    racecheck  compute-sanitizer --tool racecheck on the same                             -> sanitizer.txt

then one summary line (tests passed/failed, forward and forward+backward TFLOP/s at T = 4096 for Dh = 64
and 128 and their ratio to SDPA, the sanitizers), also written to summary.json. Everything printed is in
gpu_check.log too. The output folder gets these 8 files and no others.

The steps share a budget (--budget, 420 s): each step may run up to its own maximum but must leave the
later steps their reserves, so the whole run ends inside the budget whatever happens.

Exit status: 0 every step ran and passed; 1 a step failed, timed out or was skipped, a test failed, or a
sanitizer found an error (a sanitizer that is missing or refuses the device is reported, not counted);
3 no GPU: nothing was run (the message says why).

The steps that need a GPU are subcommands (`info`, `sanitize-target`) that the orchestrator runs as child
processes; everything else here runs anywhere and is tested in tests/test_gpu_check.py.
"""
import argparse
import collections
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NO_GPU = 3                                   # exit status: no GPU, nothing checked
HEADLINE_T = 4096
HEADLINE_DH = (64, 128)
OUTPUT_FILES = ("gpu_check.log", "info.txt", "tests.xml", "tests.txt", "bench.json", "bench.txt",
                "sanitizer.txt", "summary.json")
# name, the most seconds it may take, the seconds it leaves to later steps (see step_limit)
Step = collections.namedtuple("Step", "name max_seconds reserve_seconds")
STEPS = (Step("info", 90, 30), Step("tests", 150, 45), Step("bench", 150, 45),
         Step("memcheck", 50, 15), Step("racecheck", 60, 15))
DEFAULT_BUDGET = 420                          # 7 minutes: "well inside 8"
TEXT = {"encoding": "utf-8", "errors": "replace"}   # logs take any output, whatever the locale


# ----------------------------------------------------------------------------------------------------
# Running steps with time limits


def step_limit(index, steps, seconds_left):
    """Seconds step `index` may run: its own maximum, but never eating into the reserves of the steps
    after it. So the steps together never outrun the budget, and time an early step leaves unused goes
    to the later ones (up to their maxima)."""
    later = sum(step.reserve_seconds for step in steps[index + 1:])
    return max(0.0, min(steps[index].max_seconds, seconds_left - later))


def kill_group(process, grace=3.0):
    """SIGTERM to the child's whole process group, then SIGKILL to whatever of it is left after `grace` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)                        # the group outlives the child while members live
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    process.wait()


def run_step(argv, limit, logs=(), echo=True, env=None, cwd=ROOT):
    """Run argv in a process group of its own, copying its output (stdout and stderr) line by line to the
    open files `logs` (and to our stdout when echo), and kill the whole group once `limit` seconds pass.

    Returns {'status': 'ok' | 'failed' | 'timed out' | 'could not start', 'rc', 'seconds', 'limit', 'tail'}
    with tail the last 40 lines of output.
    """
    start = time.monotonic()
    tail = collections.deque(maxlen=40)

    def copy(line):
        tail.append(line.rstrip("\n"))
        for log in logs:
            log.write(line)
            log.flush()
        if echo:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (UnicodeEncodeError, OSError):            # a console that cannot show it: the logs have it
                pass

    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                   start_new_session=True, encoding="utf-8", errors="replace")
    except OSError as error:
        copy(f"could not start {argv[0]}: {error}\n")
        return {"status": "could not start", "rc": None, "seconds": 0.0, "limit": limit, "tail": list(tail)}

    reader = threading.Thread(target=lambda: [copy(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=limit)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        kill_group(process)
        rc, status = None, "timed out"
    reader.join(timeout=5)
    seconds = time.monotonic() - start
    if status == "timed out":
        copy(f"[gpu_check: killed after its limit of {limit:.0f} s]\n")
    return {"status": status, "rc": rc, "seconds": round(seconds, 1), "limit": round(limit, 1),
            "tail": list(tail)}


# ----------------------------------------------------------------------------------------------------
# Reading the steps' results


def tests_from_junit(path):
    """Counts from pytest's JUnit XML file, or None when it is missing or unreadable (pytest was killed)."""
    try:
        with open(path, encoding="utf-8") as f:
            return tests_from_junit_text(f.read())
    except (OSError, ElementTree.ParseError):
        return None


def tests_from_junit_text(text):
    """Counts from JUnit XML: {'passed', 'failed', 'errors', 'skipped', 'ran', 'failures': [names]}."""
    root = ElementTree.fromstring(text)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    failures = [f"{case.get('classname')}::{case.get('name')}" for suite in suites for case in suite.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "ran": counts["tests"], "failures": failures}


VERBOSE_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def tests_from_log(text):
    """The same counts from pytest's -v output (one line a test), for when it was killed before its XML."""
    results = {}
    for line in text.splitlines():
        match = VERBOSE_RESULT.match(line)
        if match:
            results[match.group(1)] = match.group(2)
    count = collections.Counter(results.values())
    return {"passed": count["PASSED"] + count["XPASS"], "failed": count["FAILED"], "errors": count["ERROR"],
            "skipped": count["SKIPPED"] + count["XFAIL"], "ran": len(results),
            "failures": [name for name, result in results.items() if result in ("FAILED", "ERROR")]}


def tests_result(junit_path, log_text):
    """Counts from the JUnit XML, else from the log; with 'selected' (pytest's count of tests it was to
    run), 'stopped' (the budget plugin's line, if it stopped the session) and 'source'."""
    result = tests_from_junit(junit_path)
    source = "junit"
    if result is None:
        result, source = tests_from_log(log_text), "log (no JUnit XML: pytest did not finish)"
    selected = re.search(r"(\d+) selected", log_text) or re.search(r"collected (\d+) items?\b(?! /)", log_text)
    stopped = re.search(r"time budget: \d+ of \d+ tests run[^!\n]*", log_text)
    return {**result, "selected": int(selected.group(1)) if selected else None,
            "stopped": stopped.group(0).strip() if stopped else None, "source": source}


def sanitizer_result(text, state):
    """What compute-sanitizer said in its output `text`, where state is 'ran', 'missing', 'not run' or
    'timed out': {'status': 'clean' | 'errors' | 'refused' | 'target failed' | state, 'errors': int or None,
    'detail': str}. 'refused': no summary line (the device or the process was not supported)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if state != "ran":
        return {"status": state, "errors": None, "detail": lines[-1].strip() if lines else ""}
    race = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    plain = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    if not (race or plain):
        complaint = [line for line in lines if re.search(r"error|not supported|unable", line, re.IGNORECASE)]
        return {"status": "refused", "errors": None,
                "detail": (complaint or lines or ["no output"])[0].strip("= ").strip()}
    errors = int(race.group(2)) if race else int(plain.group(1))
    detail = (race or plain).group(0)
    if errors:
        return {"status": "errors", "errors": errors, "detail": detail}
    if "SANITIZE TARGET OK" not in text:
        return {"status": "target failed", "errors": 0,
                "detail": f"{detail}; the forward+backward did not finish or disagreed with the NumPy path"}
    return {"status": "clean", "errors": 0, "detail": detail}


def sanitizer_sections(text):
    """sanitizer.txt cut into {tool: its output}: each run starts with a line '== tool: command'."""
    sections, tool = {}, None
    for line in text.splitlines(keepends=True):
        marker = re.match(r"== (\w+): ", line)
        if marker:
            tool = marker.group(1)
            sections.setdefault(tool, "")
        elif tool is not None:
            sections[tool] += line
    return sections


def bench_headline(report, T=HEADLINE_T, Dhs=HEADLINE_DH):
    """From bench_flash_gpu.py's JSON report: {Dh: {'fwd' | 'fwd+bwd': {'flash', 'sdpa', 'ratio'}}} for the
    non-causal rows at length T (None where a number is missing)."""
    headline = {}
    for Dh in Dhs:
        headline[Dh] = {}
        for name in ("fwd", "fwd+bwd"):
            rows = [row for row in (report or {}).get("rows", [])
                    if row["Dh"] == Dh and row["T"] == T and not row["causal"] and row["pass"] == name]
            tflops = rows[0]["tflops"] if rows else {}
            flash, sdpa = tflops.get("flash"), tflops.get("sdpa")
            headline[Dh][name] = {"flash": flash, "sdpa": sdpa, "ratio": flash / sdpa if flash and sdpa else None}
    return headline


def _number(value, spec):
    return "n/a" if value is None else format(value, spec)


def summary_line(gpu, tests, headline, sanitizers, steps, seconds):
    """The last line: one line that says how the run went."""
    if tests is None:
        test_part = "tests n/a"
    else:
        test_part = (f"tests {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped" + (f" of {tests['selected']}" if tests.get("selected") else "")
                     + (" (stopped: time budget)" if tests.get("stopped") else ""))
    bench_parts = []
    for Dh, passes in headline.items():
        cells = [f"{name} {_number(cell['flash'], '.1f')}" + (f" ({cell['ratio']:.2f}x sdpa)" if cell["ratio"] else "")
                 for name, cell in passes.items()]
        bench_parts.append(f"Dh={Dh} " + ", ".join(cells))
    bench_part = f"T={HEADLINE_T} non-causal flash TFLOP/s: " + "; ".join(bench_parts)
    sanitizer_part = ", ".join(f"{name} {result['status']}" for name, result in sanitizers.items()) or "sanitizers n/a"
    bad = [f"{name} {step['status']}" for name, step in steps.items() if step["status"] != "ok"]
    step_part = "steps: all ok" if not bad else "steps: " + ", ".join(bad)
    parts = [f"GPU CHECK {gpu or 'unknown GPU'}", test_part, bench_part, sanitizer_part, step_part, f"{seconds:.0f} s"]
    return " | ".join(parts)


def passed(tests, sanitizers, steps):
    """Exit status 0 or 1: every step ok, no test failed, no sanitizer error (missing or refused is not one)."""
    if any(step["status"] != "ok" for step in steps.values()):
        return False
    if tests is None or tests["failed"] or tests["errors"] or tests.get("stopped") or not tests["passed"]:
        return False                                           # (all skipped: nothing was shown on the GPU)
    return not any(result["status"] in ("errors", "target failed", "timed out") for result in sanitizers.values())


def write_json(path, data):
    with open(f"{path}.partial", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(f"{path}.partial", path)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------
# compute-sanitizer


def find_sanitizer(path=None, roots=None, sites=None):
    """compute-sanitizer's path, or None: on `path` (default PATH), under `roots` (default CUDA_HOME,
    CUDA_PATH and the usual CUDA folders), or in `sites` (default: this Python's site-packages, where the pip
    package nvidia-cuda-sanitizer-api puts it under nvidia/)."""
    found = shutil.which("compute-sanitizer", path=path)
    if found:
        return found
    if roots is None:
        roots = [os.environ[name] for name in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(name)]
        roots += ["/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda", "/opt/nvidia/*"]
    if sites is None:
        sites = [site for site in sys.path if site.endswith("site-packages")]
    patterns = [os.path.join(root, sub, "compute-sanitizer") for root in roots for sub in ("bin", "compute-sanitizer")]
    patterns += [os.path.join(site, "nvidia", "**", "compute-sanitizer") for site in sites]
    for pattern in patterns:
        for candidate in sorted(glob.glob(pattern, recursive=True)):
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


def sanitizer_argv(sanitizer, tool, python, padding=False):
    """The command line: `tool` on sanitize-target. With padding, memcheck puts 64 KiB after every allocation,
    so a read or write past an array's end is caught even where the next array would start right there."""
    target = [python, os.path.join(HERE, "gpu_check.py"), "sanitize-target"]
    return [sanitizer, "--tool", tool, *(["--padding", "65536"] if padding else []), "--print-limit", "20", *target]


# ----------------------------------------------------------------------------------------------------
# The orchestrator


def orchestrate(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in OUTPUT_FILES:                                  # a previous run's results must not be read as ours
        for stale in (os.path.join(out, name), os.path.join(out, name + ".partial")):
            if os.path.exists(stale):
                os.remove(stale)
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES}
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}   # read as UTF-8 by run_step
    steps = {}
    with open(paths["gpu_check.log"], "a", **TEXT) as log:
        def say(text):
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}; budget {args.budget:.0f} s; "
            f"output in {out}")
        plan = [step for step in STEPS if not args.only or step.name in args.only]
        for index, step in enumerate(plan):
            limit = step_limit(index, plan, args.budget - (time.monotonic() - start))
            say(f"\n==== {step.name} (limit {limit:.0f} s) ====")
            if limit < 5:
                steps[step.name] = {"status": "not run", "rc": None, "seconds": 0, "limit": limit, "tail": []}
                say(f"not run: only {limit:.0f} s left of the budget")
                continue
            try:
                if step.name in ("memcheck", "racecheck"):
                    steps[step.name] = run_sanitizer(step.name, limit, args, paths, env, log, say)
                else:
                    steps[step.name] = STEP_RUNNERS[step.name](limit, args, paths, env, log, say)
            except Exception as error:  # a bug here must not cost the other steps
                say(f"gpu_check could not run {step.name}: {type(error).__name__}: {error}")
                steps[step.name] = {"status": "failed", "rc": None, "seconds": 0, "limit": limit, "tail": []}
            result = steps[step.name]
            if step.name == "info" and result["rc"] == NO_GPU:
                result["status"] = "no GPU"
            say(f"---- {step.name}: {result['status']} in {result['seconds']:.0f} s"
                + (f" (exit {result['rc']})" if result["rc"] not in (0, None) else ""))
            if result["status"] == "no GPU":
                message = next((line for line in result["tail"] if line.startswith("No CUDA GPU")),
                               "No CUDA GPU visible to CuPy")
                write_json(paths["summary.json"], {"no_gpu": message, "steps": steps})
                say(f"GPU CHECK: {message} Nothing was checked (exit status {NO_GPU}).")
                return NO_GPU
        try:
            return finish(paths, steps, time.monotonic() - start, say)
        except Exception as error:  # the steps' own files are all there; say so rather than die silently
            say(f"GPU CHECK: could not summarise ({type(error).__name__}: {error}); the steps' outputs are in {out}")
            return 1


def run_info(limit, args, paths, env, log, say):
    with open(paths["info.txt"], "w", **TEXT) as info:
        return run_step([args.python, os.path.join(HERE, "gpu_check.py"), "info"], limit, [log, info], env=env)


def run_tests(limit, args, paths, env, log, say):
    """pytest -m gpu, verbose (one line a test, for tests_from_log), stopping itself 25 s before the limit."""
    argv = [args.python, "-m", "pytest", "-m", "gpu", "-v", "-p", "pytest_time_budget", "-p", "no:randomly",
            f"--junitxml={paths['tests.xml']}", "-o", "junit_family=xunit2"]
    if args.pytest_timeout:
        argv += ["--timeout", "60"]                            # a hung test fails alone instead of eating the budget
    test_env = {**env, "GPU_CHECK_TEST_BUDGET": f"{max(1.0, limit - 25):.0f}",
                "PYTHONPATH": os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))}
    with open(paths["tests.txt"], "w", **TEXT) as tests:
        result = run_step(argv, limit, [log, tests], echo=False, env=test_env)
    for line in result["tail"][-12:]:
        say(line)
    if result["rc"] == 1 or (result["rc"] == 2 and "time budget:" in read_text(paths["tests.txt"])):
        result["status"] = "ok"                                # it ran; failures and the budget are in the counts
    return result


def run_bench(limit, args, paths, env, log, say):
    """The benchmark, T = 4096 first. Its table starts no case later than 65 s before the limit, nor its
    longest-T search a probe later than 40 s before: the slack covers importing torch and CuPy (the
    budgets count from the first case) and the case or probe under way when a budget runs out."""
    table = max(10.0, limit - 65)
    argv = [args.python, os.path.join(HERE, "bench_flash_gpu.py"), "--json", paths["bench.json"],
            "--text", paths["bench.txt"], "--first-T", str(HEADLINE_T), "--warmup", "1", "--repeats", "3",
            "--table-budget", f"{table:.0f}", "--longest-budget", "25", "--longest-cap", "131072"]
    result = run_step(argv, limit, [log], env=env)
    for name in ("bench.json", "bench.txt"):
        partial = paths[name] + ".partial"
        if os.path.exists(partial):                            # killed mid-write: the last whole file stays
            os.remove(partial)
    return result


def run_sanitizer(tool, limit, args, paths, env, log, say):
    """compute-sanitizer's `tool` on sanitize-target; its verdict is read from the output in finish()."""
    sanitizer = args.sanitizer or find_sanitizer()
    with open(paths["sanitizer.txt"], "a", **TEXT) as text:
        if sanitizer is None:
            message = "compute-sanitizer not found (not on PATH, not in a CUDA folder): skipped"
            text.write(f"== {tool}: {message}\n")
            say(message)
            return {"status": "ok", "rc": None, "seconds": 0, "limit": limit, "tail": [message], "sanitizer": "missing"}
        start = time.monotonic()
        for padding in ((True, False) if tool == "memcheck" else (False,)):
            argv = sanitizer_argv(sanitizer, tool, args.python, padding)
            text.write(f"== {tool}: {' '.join(argv)}\n")
            result = run_step(argv, limit - (time.monotonic() - start), [log, text], echo=False, env=env)
            said = "\n".join(result["tail"])
            unknown_padding = "padding" in said.lower() and "SUMMARY" not in said and result["status"] != "timed out"
            if not (padding and unknown_padding):
                break                                          # else a sanitizer without --padding: once more
    for line in result["tail"][-6:]:
        say(line)
    result["sanitizer"] = "timed out" if result["status"] == "timed out" else "ran"
    if result["status"] == "failed":
        result["status"] = "ok"                                # it ran: errors, refusals are in its output
    return result


STEP_RUNNERS = {"info": run_info, "tests": run_tests, "bench": run_bench}


def finish(paths, steps, seconds, say):
    log_text = read_text(paths["tests.txt"])
    ran_tests = "tests" in steps and steps["tests"]["status"] != "not run"
    tests = tests_result(paths["tests.xml"], log_text) if ran_tests else None
    report = read_json(paths["bench.json"])
    headline = bench_headline(report)
    sections = sanitizer_sections(read_text(paths["sanitizer.txt"]))
    sanitizers = {tool: sanitizer_result(sections.get(tool, ""), steps[tool].get("sanitizer", steps[tool]["status"]))
                  for tool in ("memcheck", "racecheck") if tool in steps}
    gpu = (report or {}).get("meta", {}).get("gpu") or first_match(r"^GPU: (.*)$", read_text(paths["info.txt"]))
    line = summary_line(gpu, tests, headline, sanitizers, steps, seconds)
    ok = passed(tests, sanitizers, steps)
    write_json(paths["summary.json"], {
        "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1), "passed": ok,
        "steps": {name: {k: v for k, v in step.items() if k != "tail"} for name, step in steps.items()},
        "tests": tests, "headline_T": HEADLINE_T, "headline": {str(Dh): cells for Dh, cells in headline.items()},
        "bench_complete": (report or {}).get("complete"), "longest": (report or {}).get("longest"),
        "sanitizers": sanitizers, "summary": line})
    if tests and tests["failures"]:
        say("failed tests: " + ", ".join(tests["failures"][:20]))
    say("\n" + line)
    return 0 if ok else 1


def first_match(pattern, text):
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else None


# ----------------------------------------------------------------------------------------------------
# Subcommands that run on the GPU (children of the orchestrator)

FLASH_INTERNALS = ("KERNEL_HEAD_WIDTHS", "_cuda_module", "_forward_launches", "_backward_launches")


def flash_internals(flash):
    """The names of flash.py the kernel report reads (tests/test_flash_gpu.py imports the same ones), in one
    clear error if flash.py renamed any of them."""
    missing = [name for name in FLASH_INTERNALS if not hasattr(flash, name)]
    if missing:
        raise RuntimeError(f"flash.py has no {', '.join(missing)}: benchmarks/gpu_check.py reads the kernels' "
                           f"launch plans and compiled module through {FLASH_INTERNALS}; update FLASH_INTERNALS "
                           f"and kernel_plans() to flash.py's new names")
    return {name: getattr(flash, name) for name in FLASH_INTERNALS}


def kernel_plans(cupy, flash):
    """Every kernel flash.py launches, once: (name, threads per block, dynamic shared bytes), read from the
    launch plans of a small causal problem at each compiled head width (T = 70: two tiles)."""
    internals = flash_internals(flash)
    plans = {}
    for width in internals["KERNEL_HEAD_WIDTHS"]:
        q = cupy.zeros((1, 70, width), dtype=cupy.float32)
        lse = cupy.zeros((1, 70), dtype=cupy.float32)
        band = (140, 0)                                        # causal at T = S = 70 (flash._band)
        launches = (internals["_forward_launches"](q, q, q, q, lse, band, 1.0)
                    + internals["_backward_launches"](q, q, q, q, lse, q, q, q, q, band, 1.0))
        for launch in launches:
            threads = launch.block[0] * launch.block[1] * launch.block[2]
            plans.setdefault(launch.kernel, (launch.kernel, threads, launch.shared_mem))
    return list(plans.values())


def blocks_per_sm_limits(props, regs_per_thread, threads, shared_bytes):
    """Blocks of a kernel that fit on one SM, by each resource (the CUDA occupancy rules of sm_80 / sm_90):
    threads; registers (a warp's registers are allocated in units of 256); shared memory (each block also
    takes reservedSharedMemPerBlock, 1 KiB); the per-SM block limit. None where a property is missing."""
    def get(key):
        value = props.get(key)
        return int(value) if value is not None else None

    warps = -(-threads // 32)
    regs_per_warp = -(-regs_per_thread * 32 // 256) * 256
    limits = {"threads": None, "registers": None, "shared": None, "blocks": get("maxBlocksPerMultiProcessor")}
    if get("maxThreadsPerMultiProcessor"):
        limits["threads"] = get("maxThreadsPerMultiProcessor") // threads
    if get("regsPerMultiprocessor") and regs_per_warp:
        limits["registers"] = (get("regsPerMultiprocessor") // regs_per_warp) // warps
    if get("sharedMemPerMultiprocessor"):
        limits["shared"] = get("sharedMemPerMultiprocessor") // (shared_bytes + (get("reservedSharedMemPerBlock") or 0))
    return limits


def _version(module_name):
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "?")
    except Exception as error:  # not installed, or broken: say which
        return f"not importable ({type(error).__name__})"


def info():
    """Print versions, the device and the kernels' resources; exit NO_GPU without a GPU."""
    import platform
    print(f"python {platform.python_version()} ({sys.executable}); numpy {_version('numpy')}, "
          f"pytest {_version('pytest')}, hypothesis {_version('hypothesis')}")
    try:
        import cupy
        available = bool(cupy.is_available())
    except Exception as error:  # no CuPy, or no driver
        print(f"No CUDA GPU: CuPy is not usable here ({type(error).__name__}: {error}).")
        return NO_GPU
    if not available:
        print(f"No CUDA GPU: CuPy {cupy.__version__} is installed but cupy.is_available() is False "
              f"(no GPU, or no driver).")
        return NO_GPU
    runtime = cupy.cuda.runtime

    def cuda_version(number):
        return f"{number // 1000}.{number % 1000 // 10}"

    nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    print(f"CuPy {cupy.__version__}; CUDA driver API {cuda_version(runtime.driverGetVersion())}, "
          f"runtime {cuda_version(runtime.runtimeGetVersion())}, NVRTC {nvrtc}")
    try:
        import torch
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, sees a GPU: {torch.cuda.is_available()})")
    except Exception as error:  # torch is optional: the bench then has no sdpa column
        print(f"torch not importable ({type(error).__name__}): no sdpa column in the benchmark")
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
        try:
            result = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                                    timeout=20)
            print("nvidia-smi:", result.stdout.strip().replace("\n", " | "))
        except subprocess.TimeoutExpired:
            print("nvidia-smi did not answer within 20 s")
    device = cupy.cuda.Device()
    props = runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"GPU: {name}")
    keys = ("major", "minor", "multiProcessorCount", "totalGlobalMem", "l2CacheSize", "sharedMemPerMultiprocessor",
            "sharedMemPerBlockOptin", "reservedSharedMemPerBlock", "regsPerMultiprocessor",
            "maxThreadsPerMultiProcessor", "maxBlocksPerMultiProcessor", "clockRate")
    print("device: " + ", ".join(f"{key}={props.get(key)}" for key in keys))

    sys.path.insert(0, ROOT)
    import flash
    print("compiling flash.py's kernels (NVRTC; CuPy's disk cache keeps them for the later steps) ...", flush=True)
    start = time.monotonic()
    module = flash_internals(flash)["_cuda_module"]()
    plans = kernel_plans(cupy, flash)
    print(f"{len(plans)} kernels in {time.monotonic() - start:.1f} s")
    header = (f"{'kernel':<24} {'regs':>4} {'local B':>7} {'static B':>8} {'dynamic B':>9} {'threads':>7} "
              f"{'max thr':>7} | {'blocks/SM':>9} | {'by regs':>7} {'by smem':>7} {'by thr':>6}")
    print(header)
    for kernel_name, threads, shared in plans:
        kernel = module.get_function(kernel_name)
        if shared > 48 * 1024:                                  # what _run_on_gpu does before a launch
            kernel.max_dynamic_shared_size_bytes = shared
        regs, local, static = kernel.num_regs, kernel.local_size_bytes, kernel.shared_size_bytes
        active = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, threads, shared)
        limits = blocks_per_sm_limits(props, regs, threads, shared + static)
        print(f"{kernel_name:<24} {regs:>4} {local:>7} {static:>8} {shared:>9} {threads:>7} "
              f"{kernel.max_threads_per_block:>7} | {active:>9} | {limits['registers']!s:>7} {limits['shared']!s:>7} "
              f"{limits['threads']!s:>6}" + ("  <- spills to local memory" if local else "")
              + ("  <- its max_threads_per_block is below the launch's" if kernel.max_threads_per_block < threads
                 else ""))
    return 0


# (Dh, T, S, causal, window) of the sanitizer's target: partial tiles (T = 100, S = 70: 64 + 36 and 64 + 6
# rows), causal with T > S so rows 0..29 have no allowed key, at a padded head width (40 runs the 64-wide
# kernels) and the widest (128); then sliding windows whose band skips key tiles on both sides (every kernel
# starts its loop mid-sequence), the second with T > S so its top rows' windows hold no key.
SANITIZE_CASES = ((40, 100, 70, True, None), (128, 100, 70, True, None), (40, 200, 200, False, (20, 30)),
                  (32, 190, 100, False, (0, 10)))


def sanitize_target(cases=SANITIZE_CASES):
    """Small forwards+backwards of the kernels for compute-sanitizer (SANITIZE_CASES), each checked against
    the NumPy path in float64, with zeros and lse = -inf on every row whose window holds no key."""
    import numpy as np
    import cupy
    sys.path.insert(0, ROOT)
    from flash import flash_attention_backward, flash_attention_forward
    from attention import causal_mask, sliding_window_mask
    cupy.cuda.set_allocator(None)             # every array its own cudaMalloc: the sanitizer knows each one's end
    ok = True
    for Dh, T, S, causal, window in cases:
        rng = np.random.default_rng(Dh + T)
        q, dout = (rng.standard_normal((2, T, Dh)).astype(np.float32) for _ in range(2))
        k, v = (rng.standard_normal((2, S, Dh)).astype(np.float32) for _ in range(2))
        options = dict(causal=causal, window=window)
        out, cache = flash_attention_forward(*(cupy.asarray(x) for x in (q, k, v)), **options)
        grads = flash_attention_backward(cupy.asarray(dout), cache)
        got = [cupy.asnumpy(x) for x in (out, cache["lse"], *grads)]
        want_out, want_cache = flash_attention_forward(*(x.astype(np.float64) for x in (q, k, v)), **options)
        want = [want_out, want_cache["lse"], *flash_attention_backward(dout.astype(np.float64), want_cache)]
        label = f"Dh={Dh} T={T} S={S} causal={causal} window={window}"
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            finite = np.isfinite(w)
            # float32 sums over <= 260 keys against float64: ~1e-6; a wrong tile or mask is off by ~1e-1
            good = (np.array_equal(np.isfinite(g), finite) and np.allclose(g[finite], w[finite], rtol=1e-3, atol=1e-4))
            error = np.abs(g[finite] - w[finite]).max() if finite.any() else 0.0
            print(f"{label} {name}: max |kernel - numpy| = {error:.1e}" + ("" if good else "  <- WRONG"))
            ok &= good
        allowed = sliding_window_mask(T, S, *(window or (None, None))) & (causal_mask(T, S) if causal else True)
        empty = ~allowed.any(axis=-1)                          # rows whose window holds no key
        ok &= bool(np.all(got[0][:, empty] == 0) and np.all(np.isneginf(got[1][:, empty])))
    print("SANITIZE TARGET OK" if ok else "SANITIZE TARGET FAILED")
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="all", choices=["all", "info", "sanitize-target"],
                        help="all (the default): every step; the others are the steps run as child processes")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "gpu_out"),
                        help="output folder (default: $OUT, else benchmarks/gpu_out)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps together")
    parser.add_argument("--only", nargs="+", choices=[step.name for step in STEPS], help="run only these steps")
    parser.add_argument("--python", default=sys.executable, help="the Python the steps run in")
    parser.add_argument("--sanitizer", default=None, help="compute-sanitizer's path (default: searched)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "sanitize-target":
        return sanitize_target()
    import importlib.util
    # pytest-timeout, where the steps' Python is this one and has it (the H200 image does)
    args.pytest_timeout = args.python == sys.executable and importlib.util.find_spec("pytest_timeout") is not None
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
