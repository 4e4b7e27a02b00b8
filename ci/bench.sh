#!/usr/bin/env bash
# Benchmark the checked-out commit with asv on this machine and stage the results for the history.
#
#   ci/bench.sh [extra `asv run` arguments, e.g. --bench Prefill]
#
# 1. installs the package with the bench extra (skip with SPARSEK_SKIP_INSTALL=1);
# 2. device fingerprint and asv machine registration (ci/fingerprint.sh); a throttled GPU marks the
#    run (a warning, and the fingerprint kept beside the results), or stops it when
#    SPARSEK_REFUSE_THROTTLED=1;
# 3. asv run -E existing --set-commit-hash <HEAD> with raw samples recorded, into asv.conf.json's
#    results_dir (benchmarks/results/<machine>/<commit>-existing-*.json);
# 4. copies the new files to out/results/ in the results branch's layout
#    (benchmarks/results/..., fingerprints/<machine>/<commit>.json) for ci/push-results.sh.
# Exits with asv's status (non-zero when a benchmark failed) after staging what it measured.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

if [ "${SPARSEK_SKIP_INSTALL:-0}" != 1 ]; then
  python -m pip install -q -e ".[bench]"
fi

bash ci/fingerprint.sh out
# shellcheck source=/dev/null
source out/machine.env
if [ "$SPARSEK_THROTTLED" = true ] && [ "${SPARSEK_REFUSE_THROTTLED:-0}" = 1 ]; then
  echo "bench: the GPU is throttled and SPARSEK_REFUSE_THROTTLED=1: not benchmarking" >&2
  exit 3
fi

sha="$(git rev-parse HEAD)"
# A copy of asv.conf.json that benchmarks HEAD even where no local `main` exists (see ci/asv_conf.py).
python ci/asv_conf.py --checkout . --out out/asv.conf.json >/dev/null
results_dir="$(python ci/asv_conf.py --checkout . --get results_dir)"
status=0
# ASV_PYTHONPATH: the benchmarks import this checkout's sparsek, whatever else is installed. asv's
# launcher replaces PYTHONPATH by it, so it carries PYTHONPATH along (asv installed with --target).
# Which cases: SPARSEK_ASV_CASES / SPARSEK_ASV_IMPLS (benchmarks/_common.py; default: the GPU set).
ASV_PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" asv --config out/asv.conf.json run -E existing --set-commit-hash "$sha" \
  --machine "$SPARSEK_ASV_MACHINE" --record-samples --show-stderr "$@" || status=$?

stage="out/results"
rm -rf "$stage"
mkdir -p "$stage/benchmarks/results/$SPARSEK_ASV_MACHINE" "$stage/fingerprints/$SPARSEK_ASV_MACHINE"
shopt -s nullglob
new=("$results_dir/$SPARSEK_ASV_MACHINE/${sha:0:8}"-*.json)
if [ ${#new[@]} -eq 0 ]; then
  echo "bench: asv saved no results for $sha (status $status)" >&2
  exit $((status == 0 ? 1 : status))
fi
cp "${new[@]}" "$results_dir/$SPARSEK_ASV_MACHINE/machine.json" "$stage/benchmarks/results/$SPARSEK_ASV_MACHINE/"
cp "$results_dir/benchmarks.json" "$stage/benchmarks/results/"
if [ -f out/fingerprint.json ]; then
  cp out/fingerprint.json "$stage/fingerprints/$SPARSEK_ASV_MACHINE/$sha.json"
fi
echo "bench: staged $(find "$stage" -type f | wc -l) files in $stage (machine $SPARSEK_ASV_MACHINE, throttled: $SPARSEK_THROTTLED)"
exit "$status"
