#!/usr/bin/env bash
# Compile every CUDA kernel file with plain nvcc for sm_90a, as CI does on a machine without a
# GPU or torch's CUDA libraries. Prints registers, shared memory and spills per kernel and
# fails on any compile error or on any spill.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in csrc/*.cu; do
  echo "== $cu"
  if ! "$NVCC" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -Icsrc \
      -c "$cu" -o "$out/$(basename "$cu").o" 2>"$out/log"; then
    cat "$out/log"
    status=1
    continue
  fi
  grep -E "Compiling entry|Used [0-9]+ registers|spill" "$out/log" | sed 's/^ptxas info    : //'
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/log" >/dev/null; then
    echo "!! $cu spills registers" >&2
    status=1
  fi
done
exit $status
