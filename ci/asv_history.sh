#!/usr/bin/env bash
# Record asv results for past commits: each commit's library code, measured by today's harness.
#
#   ci/asv_history.sh SHA [SHA ...] [-- extra `asv run` arguments, e.g. --bench Prefill]
#
# For every SHA: a detached worktree of that commit under $SPARSEK_HISTORY_DIR (default
# out/history), with this checkout's sparsek/bench/ copied over its own (or added where the commit
# predates it), so only the library code (sparsek/, csrc/) differs between commits and the
# measurement method stays the same (modules the commit lacks entirely are added the same way);
# then `asv run -E existing --set-commit-hash SHA --record-samples` with this checkout's
# benchmarks/ and asv.conf.json, importing sparsek from that worktree (ASV_PYTHONPATH) and
# building its CUDA extension in a cache of its own (TORCH_EXTENSIONS_DIR=<dir>/ext-<sha>; the
# extension has one name in every commit). Results go to asv.conf.json's results_dir
# (benchmarks/results/<machine>/).
#
# Environment:
#   SPARSEK_ASV_MACHINE    a registered asv machine (ci/fingerprint.sh, docs/asv.md); required
#   SPARSEK_ASV_CASES, SPARSEK_ASV_IMPLS, SPARSEK_ASV_QUICK   what is measured (benchmarks/_common.py)
#   SPARSEK_HISTORY_BUILD=1  build every commit's CUDA extension first, all at once (MAX_JOBS each)
#   PYTHON                 interpreter (default python3)
# Exits non-zero when asv reported a failure for any commit, after trying them all.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
root="$PWD"

shas=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do shas+=("$1"); shift; done
if [ "${1:-}" = "--" ]; then shift; fi
if [ ${#shas[@]} -eq 0 ]; then
  echo "usage: ci/asv_history.sh SHA [SHA ...] [-- asv run arguments]" >&2
  exit 2
fi
machine="${SPARSEK_ASV_MACHINE:?set SPARSEK_ASV_MACHINE to a registered asv machine (ci/fingerprint.sh)}"
work="${SPARSEK_HISTORY_DIR:-out/history}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
python="${PYTHON:-python3}"

# benchmarks/ and results_dir of this checkout; branches=HEAD so -E existing needs no local main.
"$python" ci/asv_conf.py --checkout . --out "$work/asv.conf.json" >/dev/null

full=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  for sha in "${full[@]}"; do
    if [ -e "$work/src-${sha:0:12}" ]; then git worktree remove --force "$work/src-${sha:0:12}"; fi
  done
}
trap cleanup EXIT

for ref in "${shas[@]}"; do
  sha="$(git rev-parse --verify "$ref^{commit}")"
  full+=("$sha")
  src="$work/src-${sha:0:12}"
  if [ -e "$src" ]; then git worktree remove --force "$src"; fi
  git worktree add --quiet --detach "$src" "$sha"
  rm -rf "$src/sparsek/bench"
  cp -R "$root/sparsek/bench" "$src/sparsek/bench"
  # Modules the commit does not have yet (benchmarks/ imports them, and asv's discovery fails
  # as a whole on one failed import) come from this checkout; none of the commit's code is replaced.
  for entry in "$root"/sparsek/*; do
    name="$(basename "$entry")"
    if [ "$name" != __pycache__ ] && [ ! -e "$src/sparsek/$name" ]; then
      cp -R "$entry" "$src/sparsek/$name"
      echo "history: ${sha:0:12} has no sparsek/$name; using this checkout's"
    fi
  done
  # Commits before the decode kernels landed already carried binding.cpp's decode section (it
  # includes decode_params.h, which was not committed yet), so they do not build as committed.
  # The section is self-contained at the end of the file: cut it there. The prefill code
  # measured here stays exactly the commit's own.
  if [ ! -e "$src/csrc/decode_params.h" ] && grep -q '^// ---- decode' "$src/csrc/binding.cpp" 2>/dev/null; then
    sed -i '/^\/\/ ---- decode/,$d' "$src/csrc/binding.cpp"
    echo "history: ${sha:0:12} lacks csrc/decode_params.h; built without binding.cpp's decode section"
  fi
done

if [ "${SPARSEK_HISTORY_BUILD:-0}" = 1 ]; then
  # The builds dominate a short history run; they share the CPUs instead of taking turns.
  pids=()
  for sha in "${full[@]}"; do
    (cd "$work/src-${sha:0:12}" && TORCH_EXTENSIONS_DIR="$work/ext-${sha:0:12}" "$python" -c \
      'from sparsek import _cuda; ops, reason = _cuda._build(); print("build:", reason or "ok")' \
      >"$work/build-${sha:0:12}.log" 2>&1) &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || true
    echo "history: ${full[$i]:0:12} $(tail -n 1 "$work/build-${full[$i]:0:12}.log")"
  done
fi

status=0
for sha in "${full[@]}"; do
  src="$work/src-${sha:0:12}"
  echo "history: ${sha:0:12} $(git log -1 --format=%s "$sha")"
  # PYTHONPATH is dropped by asv's benchmark launcher; ASV_PYTHONPATH replaces it there, so it
  # carries whatever PYTHONPATH held (e.g. asv_runner installed with --target).
  TORCH_EXTENSIONS_DIR="$work/ext-${sha:0:12}" ASV_PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" \
    asv --config "$work/asv.conf.json" run -E existing --set-commit-hash "$sha" \
    --machine "$machine" --record-samples --show-stderr "$@" || {
    echo "history: asv reported failures for ${sha:0:12}" >&2
    status=1
  }
done
exit "$status"
