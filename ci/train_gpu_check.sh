#!/usr/bin/env bash
# GPU check of the training path, for a GPU machine or runner: the backward's GPU tests (with the
# forward's, since they share the binding), then the training probe (backward kernel, backward op
# fast and deterministic, one training step against dense SDPA). Writes the pytest log, its junit
# XML and the probe's JSON into OUT_DIR; exits non-zero if any test or the probe fails.
#
#   bash ci/train_gpu_check.sh [OUT_DIR]        (default: benchmarks/local)
#   TESTS="tests/test_backward_gpu.py" CASES=long-16k bash ci/train_gpu_check.sh /tmp/out
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-benchmarks/local}
mkdir -p "$out_dir"
tests=${TESTS:-tests/test_backward_gpu.py tests/test_kernels_gpu.py}
cases=${CASES:-long-16k,long-64k,seed}
status=0
# shellcheck disable=SC2086  # TESTS is a list of paths and pytest options
python3 -m pytest -q -m gpu -p timeout --timeout "${TEST_TIMEOUT:-600}" $tests \
  --junitxml "$out_dir/train-gpu-tests.xml" 2>&1 | tee "$out_dir/train-gpu-tests.log" || status=1
python3 -m sparsek.bench.kernel_probe --train --cases "$cases" --json "$out_dir/train-probe.json" 2>&1 \
  | tee "$out_dir/train-probe.log" || status=1
exit "$status"
