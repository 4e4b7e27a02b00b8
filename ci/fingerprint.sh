#!/usr/bin/env bash
# Device fingerprint check and asv machine registration. Run it before any asv command on a GPU box.
#
#   ci/fingerprint.sh [OUT_DIR]        (default: out)
#
# Writes OUT_DIR/fingerprint.json (`sparsek-bench env --json`: NVML name, UUID, driver, clocks,
# clocks-event reasons and the throttled flag) and OUT_DIR/machine.env (SPARSEK_ASV_MACHINE,
# SPARSEK_GPU, SPARSEK_THROTTLED: `source` it), and registers the asv machine in
# ~/.asv-machine.json with the GPU keys (gpu, gpu_driver, cuda, clock_policy).
#
# Environment: SPARSEK_ASV_MACHINE  asv machine name (default <hostname>-<gpu>)
#              SPARSEK_CLOCK_POLICY recorded clock policy (default "default")
#              PYTHON               interpreter (default: `python`, else `python3`, on PATH; a
#                                   machine may have only python3, e.g. a GPU image's venv)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

python="${PYTHON:-$(command -v python || command -v python3)}"
out="${1:-out}"
mkdir -p "$out"
args=(--out-dir "$out")
if "$python" -m sparsek.bench.cli env --json >"$out/fingerprint.json.part"; then
  mv "$out/fingerprint.json.part" "$out/fingerprint.json"
  args+=(--fingerprint "$out/fingerprint.json")
else
  rm -f "$out/fingerprint.json.part"
  echo "fingerprint: 'sparsek-bench env --json' failed; throttling state unknown" >&2
fi
"$python" ci/fingerprint.py "${args[@]}"
