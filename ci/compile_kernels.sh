#!/usr/bin/env bash
# Compile every CUDA kernel file with plain nvcc for sm_90a, as CI does on a machine without a
# GPU or torch's CUDA libraries. Prints registers, shared memory and spills per kernel and
# fails on any compile error, on any spill, and on ptxas serialising warpgroup MMAs ("wgmma.mma_async
# instructions are serialized", e.g. C7520: each wgmma then waits for the one before it to finish,
# which cost the forward's v7 its overlap without any other symptom than its speed).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The macros torch.utils.cpp_extension passes to nvcc: they remove the implicit half/bfloat16
# conversions and operators, so a kernel that compiles here also builds as the extension.
TORCH_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --use_fast_math)
status=0
for cu in csrc/*.cu; do
  echo "== $cu"
  if ! "$NVCC" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -Icsrc "${TORCH_FLAGS[@]}" \
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
  if grep -E "wgmma.mma_async instructions are serialized" "$out/log" >/dev/null; then
    grep -E "wgmma.mma_async instructions are serialized" "$out/log" | sed 's/^ptxas info    : //' | cut -c1-160
    echo "!! $cu: ptxas serialised warpgroup MMAs" >&2
    status=1
  fi
done
exit $status
