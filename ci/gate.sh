#!/usr/bin/env bash
# Measure BASE and HEAD on this machine in alternating rounds and gate HEAD on the outcome.
#
#   ci/gate.sh [BASE_REF [HEAD_REF]]        (defaults: origin/main and HEAD)
#
# BASE and HEAD are checked out as detached worktrees under the scratch directory; each is timed
# by its own benchmark suite (asv.conf.json + benchmarks/ of that commit, a benchmark whose
# `version` changed is not compared), imported from its worktree through ASV_PYTHONPATH, in this one
# environment on this one GPU. Rounds alternate the order (base then head, head then base, ...) so
# a slow drift of clocks or temperature hits both sides alike; the samples of all rounds are
# pooled per side. Then ci/gate.py from this checkout decides: a markdown table on stdout and in
# $GITHUB_STEP_SUMMARY; exit 0 pass, 1 on a significant regression beyond the threshold or a broken
# head (a benchmark of base failed or missing in head, or a head run that errored: its last output
# line goes into the summary), 2 when the input is unusable or nothing could be compared.
#
# Environment:
#   SPARSEK_GATE_THRESHOLD  relative slowdown that fails (default 0.05)
#   SPARSEK_GATE_ALPHA      significance level (default 0.01)
#   SPARSEK_GATE_ROUNDS     measurement rounds per side (default 2)
#   SPARSEK_GATE_BENCH      asv --bench regular expression (default: every benchmark)
#   SPARSEK_GATE_TOOL       asv (default) or sparsek-bench (`sparsek-bench run --default --json`)
#   SPARSEK_GATE_DIR        scratch directory (default out/gate)
#   SPARSEK_SKIP_INSTALL=1  use the installed environment as it is
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"

base_ref="${1:-origin/main}"
head_ref="${2:-HEAD}"
declare -A sha
sha[base]="$(git rev-parse --verify "$base_ref^{commit}")"
sha[head]="$(git rev-parse --verify "$head_ref^{commit}")"
rounds="${SPARSEK_GATE_ROUNDS:-2}"
tool="${SPARSEK_GATE_TOOL:-asv}"
case "$tool" in asv | sparsek-bench) ;; *) echo "gate: SPARSEK_GATE_TOOL=$tool: expected asv or sparsek-bench" >&2; exit 2 ;; esac
work="${SPARSEK_GATE_DIR:-out/gate}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

if [ "${SPARSEK_SKIP_INSTALL:-0}" != 1 ]; then
  python -m pip install -q -e ".[bench]"
fi

remove_worktrees() {
  for side in base head; do
    if [ -e "$work/src-$side" ]; then git worktree remove --force "$work/src-$side"; fi
  done
}
trap remove_worktrees EXIT
remove_worktrees

bash ci/fingerprint.sh "$work"
# shellcheck source=/dev/null
source "$work/machine.env"

bench_args=()
if [ -n "${SPARSEK_GATE_BENCH:-}" ]; then bench_args=(--bench "$SPARSEK_GATE_BENCH"); fi
for side in base head; do
  git worktree add --quiet --detach "$work/src-$side" "${sha[$side]}"
  rm -rf "$work/results-$side"
  mkdir -p "$work/results-$side"
  if [ "$tool" = asv ]; then
    python ci/asv_conf.py --checkout "$work/src-$side" --results "$work/results-$side" \
      --out "$work/asv-$side.conf.json" >/dev/null
  fi
done

run_errors=()
measure() {
  local side="$1" round="$2" log="$work/$1-round-$2.log" status=0 last
  echo "gate: round $round, $side (${sha[$side]:0:12})"
  if [ "$tool" = asv ]; then
    # asv's benchmark runner strips PYTHONPATH from sys.path and puts ASV_PYTHONPATH first;
    # carry PYTHONPATH along for an asv installed with pip --target.
    ASV_PYTHONPATH="$work/src-$side${PYTHONPATH:+:$PYTHONPATH}" \
      asv --config "$work/asv-$side.conf.json" run -E existing \
      --set-commit-hash "${sha[$side]}" --machine "$SPARSEK_ASV_MACHINE" \
      --append-samples --show-stderr "${bench_args[@]}" 2>&1 | tee "$log" || status=$?
    if [ "$status" = 2 ]; then
      # asv's exit status when some benchmarks failed: ci/gate.py judges those one by one (one
      # measured in base and missing in head fails the gate, unless base lost it too).
      echo "gate: asv reported failed benchmarks for $side in round $round" >&2
      return 0
    fi
  else
    # Run from the worktree so that its sparsek, not this checkout's, is imported.
    (cd "$work/src-$side" && python -m sparsek.bench.cli run --default --json "$work/results-$side/round-$round.json") \
      2>&1 | tee "$log" || status=$?
  fi
  if [ "$status" != 0 ]; then
    last="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)"
    echo "gate: the $side run of round $round failed (exit status $status)" >&2
    run_errors+=("--$side-error" "round $round: $tool exited with status $status: ${last:-no output}")
  fi
}

for ((round = 1; round <= rounds; round++)); do
  if ((round % 2)); then order=(base head); else order=(head base); fi
  for side in "${order[@]}"; do measure "$side" "$round"; done
done

notes=()
if [ "$SPARSEK_THROTTLED" = true ]; then
  notes+=(--note "The GPU reported throttling during this run: treat small differences with care.")
fi
status=0
python ci/gate.py "$work/results-base" "$work/results-head" \
  --base-commit "${sha[base]}" --head-commit "${sha[head]}" \
  --threshold "${SPARSEK_GATE_THRESHOLD:-0.05}" --alpha "${SPARSEK_GATE_ALPHA:-0.01}" \
  --title "Performance gate on $SPARSEK_ASV_MACHINE: ${sha[head]:0:12} against ${sha[base]:0:12}" \
  --json "$work/gate.json" "${notes[@]}" "${run_errors[@]}" || status=$?
exit "$status"
