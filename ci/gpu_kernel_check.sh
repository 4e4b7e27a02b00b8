#!/usr/bin/env bash
# On a GPU box: build the CUDA extension, run the GPU kernel tests, then the kernel probe
# (phases vs the device's measured ceilings and dense SDPA). Logs and JSON go to ${OUT:-out}/.
# Every step runs even when an earlier one fails (each is `|| status=1`); the exit code says
# whether all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
SPARSEK_BUILD_VERBOSE=1 python3 -c "
import time; t = time.time()
from sparsek import _cuda
ops, reason = _cuda._build()
print(f'build {time.time() - t:.0f} s:', reason or 'ok')
raise SystemExit(0 if ops is not None else 1)" >"$OUT/build.log" 2>&1 || status=1
grep -E "build |error|Used [0-9]+ registers|spill" "$OUT/build.log" | sort | uniq -c | head -40 || true
# shellcheck disable=SC2086  # PYTEST_ARGS and PROBE_ARGS are lists of options
python3 -m pytest tests/test_kernels_gpu.py -q -x ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -25 || status=1
# shellcheck disable=SC2086
python3 -m sparsek.bench.kernel_probe --json "$OUT/probe.json" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe.log" || status=1
exit $status
