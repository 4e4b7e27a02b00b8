#!/usr/bin/env bash
# The GPU test suite (pytest -m gpu) on this machine's GPU; exits non-zero on any failure, a hang or no GPU.
#
#   ci/gpu_tests.sh [OUT_DIR [CHECKOUT]]     (defaults: out/gpu-tests, this checkout)
#
# Runs the tests of CHECKOUT (the fork gate passes the approved head it checked out beside the
# base) with CHECKOUT first on PYTHONPATH, so its sparsek is the one under test. Writes the pytest
# log and its junit XML to OUT_DIR/gpu-tests.log and OUT_DIR/gpu-tests.xml.
#
# A runner without a usable CUDA device fails instead of passing on a suite of skips, and CI=true
# (GitHub sets it; set here for runs by hand too) turns the tests' "tool not installed" skips
# (compute-sanitizer) into failures.
#
# Environment:
#   SPARSEK_GPU_TEST_TIMEOUT   seconds per test before pytest-timeout fails it (default 1200)
#   SPARSEK_GPU_SUITE_TIMEOUT  seconds for the whole suite (default 3600)
#   SPARSEK_SKIP_INSTALL=1     use the installed environment as it is (else pip install -e ".[test]")
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out_dir="${1:-out/gpu-tests}"
checkout="${2:-.}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
checkout="$(cd "$checkout" && pwd)"

if [ "${SPARSEK_SKIP_INSTALL:-0}" != 1 ]; then
  python -m pip install -q -e ".[test]"
fi
export CI=true

python -c 'import sys, torch
sys.exit(None if torch.cuda.is_available() else "gpu_tests: no usable CUDA device: the GPU tests would all skip")'

cd "$checkout"
# pytest-timeout fails a hung test and goes on to the next; `timeout` bounds the whole run.
PYTHONPATH="$checkout${PYTHONPATH:+:$PYTHONPATH}" timeout "${SPARSEK_GPU_SUITE_TIMEOUT:-3600}" \
  python -m pytest -m gpu -q -rs -p timeout --timeout "${SPARSEK_GPU_TEST_TIMEOUT:-1200}" \
  --junitxml "$out_dir/gpu-tests.xml" 2>&1 | tee "$out_dir/gpu-tests.log"
