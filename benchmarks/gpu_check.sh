#!/usr/bin/env bash
# One command that checks the GPU half of the project on a machine with an NVIDIA GPU (H100/H200), in
# about 3 to 7 minutes and never more than 8:
#
#     bash benchmarks/gpu_check.sh
#
# Needs python3 with CuPy, numpy, pytest and hypothesis (PyTorch with CUDA for the SDPA column, and
# compute-sanitizer for the memcheck and racecheck steps; each is reported and skipped when missing).
# Results go to $OUT, or to benchmarks/gpu_out/ when OUT is unset: gpu_check.log, info.txt, tests.xml,
# tests.txt, bench.json, bench.txt, sanitizer.txt, summary.json. The last line printed is the summary.
# benchmarks/gpu_check.py does the work and documents the steps; this wrapper adds a hard stop in case
# that script itself hangs. PYTHON=... picks another interpreter; arguments are passed on (--help).
#
# Exit status: 0 all passed; 1 something failed or timed out; 3 no GPU (nothing was run); 124 the backstop.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT" || exit 1
export OUT PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

# gpu_check.py keeps its steps inside a 420 s budget; the backstop stops everything at 470 s regardless.
timeout --kill-after=5 470 "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "GPU CHECK: stopped by the 470 s backstop of gpu_check.sh; what was written is in $OUT" \
        | tee -a "$OUT/gpu_check.log"
    status=124
fi
exit "$status"
