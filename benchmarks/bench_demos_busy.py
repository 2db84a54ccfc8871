"""Wall time of each concept file's demo on the machine as it is, and beside busy processes.

OpenBLAS starts one thread per core and lets them spin while they wait for work. On small matrices (every
demo here) the second thread has almost nothing to do, and when another process wants that core the
spinning turns into waiting for the scheduler: on a 2-core machine with other work, `python rnn.py` took
59 s instead of 2.6 s. So every demo limits BLAS to one thread itself (threadpoolctl, in its first lines).
This script checks that the limit holds where it matters: it runs each demo with OPENBLAS_NUM_THREADS and
friends removed from the environment (so the demo alone decides), first as the machine is, then with
`--busy` processes spinning beside it (`python -c "while True: pass"`, started here and stopped after the
demo), and prints a table: wall seconds, and the CPU seconds the demo's own threads used (with one BLAS
thread these stay near the idle wall time: a busy run is slower only because it shares the cores). The
demos run in a temporary folder.

    python benchmarks/bench_demos_busy.py                            # the 8 demos, a few minutes
    python benchmarks/bench_demos_busy.py --demos rnn.py transformer.py --root ../other-checkout

The machine's load average (os.getloadavg) is printed before and after: on a shared machine the idle
column is only as idle as the machine was.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = ("attention.py", "positional.py", "multihead.py", "flash.py", "linear_attention.py", "rnn.py", "transformer.py", "vit.py")
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
SPIN = "while True: pass"


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)      # finished (waited-for) children only
    return usage.ru_utime + usage.ru_stime


def run_demo(path, folder):
    """(wall seconds, CPU seconds) of `python path`, run in folder with no thread-count variable set.

    CPU seconds count every thread of the demo: far above the wall time means BLAS threads spinning."""
    environment = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}
    cpu, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, path], cwd=folder, env=environment, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{path} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wall, cpu


def run_beside_busy(path, folder, n_busy):
    """run_demo with n_busy processes spinning on the CPU for the whole run."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n_busy)]
    try:
        time.sleep(0.5)                                        # let the spinners reach their loop
        return run_demo(path, folder)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()                                     # (their CPU time is counted after the demo's)


def load_line():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", nargs="+", default=list(DEMOS), help="demo files, relative to --root")
    parser.add_argument("--root", default=ROOT, help="the checkout whose demos run (default: this one)")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the demo (default 2)")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.path.abspath(args.root)}, Python {sys.version.split()[0]}")
    print(f"# before: {load_line()}")
    print(f"{'demo':<16} {'idle s':>8} {'busy s':>8} {'busy/idle':>9} | {'idle cpu s':>10} {'busy cpu s':>10}")
    with tempfile.TemporaryDirectory() as folder:
        for demo in args.demos:
            path = os.path.join(os.path.abspath(args.root), demo)
            (idle, idle_cpu), (busy, busy_cpu) = run_demo(path, folder), run_beside_busy(path, folder, args.busy)
            print(f"{demo:<16} {idle:>8.1f} {busy:>8.1f} {busy / idle:>9.2f} | {idle_cpu:>10.1f} {busy_cpu:>10.1f}",
                  flush=True)
    print(f"# after: {load_line()}; busy = {args.busy} x `python -c \"{SPIN}\"` running beside the demo")


if __name__ == "__main__":
    main()
