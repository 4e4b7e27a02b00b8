#!/usr/bin/env bash
# Add staged results to the results branch on the remote, retrying when another run pushed first.
#
#   ci/push-results.sh STAGED_DIR [MESSAGE]
#
# STAGED_DIR mirrors the branch layout (benchmarks/results/<machine>/..., fingerprints/...), as
# ci/bench.sh leaves it in out/results. The branch ($SPARSEK_RESULTS_BRANCH, default
# benchmark-results, on $SPARSEK_RESULTS_REMOTE, default origin) holds results only and starts as an
# orphan. Each attempt builds one commit on top of the remote tip in a private index, so the
# checkout, its index and its branch are never touched; staged files replace same-named ones (a rerun
# of a commit on a machine replaces that commit's results). Needs push rights on the remote and a
# git identity (user.name/email or the GIT_AUTHOR_*/GIT_COMMITTER_* variables).
#
# A rejected push is retried after a random wait drawn from an exponentially growing window
# ("full jitter"): pushers that collided once spread out instead of colliding again in lockstep.
#   SPARSEK_PUSH_ATTEMPTS    attempts before giving up (default 8)
#   SPARSEK_PUSH_BACKOFF_MS  first wait window in milliseconds, doubled per attempt (default 2000)
#   SPARSEK_PUSH_MAX_WAIT_MS cap of the window (default 60000)
set -euo pipefail

staged="$(cd "${1:?usage: ci/push-results.sh STAGED_DIR [MESSAGE]}" && pwd)"
message="${2:-benchmark results}"
branch="${SPARSEK_RESULTS_BRANCH:-benchmark-results}"
remote="${SPARSEK_RESULTS_REMOTE:-origin}"
cd "$(git rev-parse --show-toplevel)"
if [ -z "$(find "$staged" -type f -print -quit)" ]; then
  echo "push-results: nothing staged in $staged"
  exit 0
fi

attempts="${SPARSEK_PUSH_ATTEMPTS:-8}"
backoff_ms="${SPARSEK_PUSH_BACKOFF_MS:-2000}"
max_wait_ms="${SPARSEK_PUSH_MAX_WAIT_MS:-60000}"
for value in "$attempts" "$backoff_ms" "$max_wait_ms"; do
  case "$value" in '' | *[!0-9]*) echo "push-results: '$value' is not a whole number (SPARSEK_PUSH_*)" >&2; exit 2 ;; esac
done
if [ "$attempts" -lt 1 ]; then attempts=1; fi

# Sleep a random time in [0, min(max_wait, backoff * 2^(attempt - 1))) milliseconds.
backoff() {
  local window=$((backoff_ms << ($1 - 1 > 20 ? 20 : $1 - 1)))
  if [ "$window" -gt "$max_wait_ms" ]; then window="$max_wait_ms"; fi
  if [ "$window" -lt 1 ]; then return 0; fi
  local ms=$((((RANDOM << 15) | RANDOM) % window))
  sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
}

scratch="$(mktemp -d)"
index="$scratch/index"
# The fetched tip goes to a ref of this process only and is used by its hash: pushers that share
# one checkout (or a remote-tracking ref) must never build on each other's half-fetched tips.
tip_ref="refs/push-results/$$"
trap 'git update-ref -d "$tip_ref" 2>/dev/null || true; rm -rf "$scratch"' EXIT

die() {
  echo "push-results: $*" >&2
  exit 1
}

# One attempt: 0 pushed (or nothing new), 1 try again; exits on anything else. Called as an `if`
# condition, where bash ignores `set -e`: every step that must not fail says so itself (an index
# left empty by a failed read-tree would push a commit that deletes the branch's results).
push_once() {
  local found=0 tip="" tree commit
  local parent=()
  rm -f "$index"
  git ls-remote --exit-code --heads "$remote" "$branch" >/dev/null || found=$?
  case "$found" in
    0)
      git fetch -q --no-tags --no-write-fetch-head "$remote" "+refs/heads/$branch:$tip_ref" || return 1
      tip="$(git rev-parse "$tip_ref^{commit}")" || die "cannot resolve the fetched tip of $branch"
      parent=(-p "$tip")
      GIT_INDEX_FILE="$index" git read-tree "$tip" || die "cannot read the tree of $tip"
      ;;
    2) GIT_INDEX_FILE="$index" git read-tree --empty || die "cannot start an empty index" ;;
    *) die "cannot reach $remote (git ls-remote exit $found)" ;;
  esac
  GIT_INDEX_FILE="$index" git --work-tree="$staged" add --force --ignore-removal . || die "cannot stage $staged"
  tree="$(GIT_INDEX_FILE="$index" git write-tree)" || die "cannot write the tree"
  if [ -n "$tip" ] && [ "$tree" = "$(git rev-parse "$tip^{tree}")" ]; then
    echo "push-results: $branch already has these results"
    return 0
  fi
  commit="$(git commit-tree "$tree" "${parent[@]}" -m "$message")" || die "cannot create the commit"
  # Without --force: a push that is not a fast-forward of the tip it was built on is refused.
  if git push -q "$remote" "$commit:refs/heads/$branch"; then
    echo "push-results: pushed $commit to $remote/$branch"
    return 0
  fi
  return 1
}

for ((attempt = 1; attempt <= attempts; attempt++)); do
  if push_once; then exit 0; fi
  echo "push-results: push rejected (attempt $attempt of $attempts); rebuilding on the new tip" >&2
  if [ "$attempt" -lt "$attempts" ]; then backoff "$attempt"; fi
done
echo "push-results: gave up after $attempts attempts" >&2
exit 1
