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

index="$(mktemp -d)/index"
trap 'rm -rf "$(dirname "$index")"' EXIT
tracking="refs/remotes/$remote/$branch"

for attempt in 1 2 3 4 5; do
  rm -f "$index"
  found=0
  git ls-remote --exit-code --heads "$remote" "$branch" >/dev/null || found=$?
  parent=()
  case "$found" in
    0)
      git fetch -q --no-tags "$remote" "+refs/heads/$branch:$tracking"
      parent=(-p "$tracking")
      GIT_INDEX_FILE="$index" git read-tree "$tracking"
      ;;
    2) GIT_INDEX_FILE="$index" git read-tree --empty ;;
    *) echo "push-results: cannot reach $remote (git ls-remote exit $found)" >&2; exit 1 ;;
  esac
  GIT_INDEX_FILE="$index" git --work-tree="$staged" add --force --ignore-removal .
  tree="$(GIT_INDEX_FILE="$index" git write-tree)"
  if [ "$found" = 0 ] && [ "$tree" = "$(git rev-parse "$tracking^{tree}")" ]; then
    echo "push-results: $branch already has these results"
    exit 0
  fi
  commit="$(git commit-tree "$tree" "${parent[@]}" -m "$message")"
  if git push -q "$remote" "$commit:refs/heads/$branch"; then
    echo "push-results: pushed $commit to $remote/$branch"
    exit 0
  fi
  echo "push-results: push rejected (attempt $attempt); rebuilding on the new tip" >&2
  sleep $((attempt * 5))
done
echo "push-results: gave up after 5 attempts" >&2
exit 1
