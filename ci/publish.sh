#!/usr/bin/env bash
# Build the static history site (asv publish + the tier-history page) into a directory for Pages.
#
#   ci/publish.sh [OUT_DIR]        (default: out/site)
#
# Results: the committed benchmarks/results/ with, on top, benchmarks/results/ of the results branch
# ($SPARSEK_RESULTS_BRANCH, default benchmark-results, fetched from $SPARSEK_RESULTS_REMOTE, default
# origin) when it exists. Then `make site` (asv publish + ci/site.sh, which write into asv's
# html_dir) and a copy of html_dir in OUT_DIR. asv publish needs the full git history of the
# branches in asv.conf.json (fetch-depth: 0 in Actions). The overlay changes benchmarks/results/ in
# the working tree: run it in a scratch checkout if that matters to you.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

out="${1:-out/site}"
branch="${SPARSEK_RESULTS_BRANCH:-benchmark-results}"
remote="${SPARSEK_RESULTS_REMOTE:-origin}"
tracking="refs/remotes/$remote/$branch"

found=0
git ls-remote --exit-code --heads "$remote" "$branch" >/dev/null 2>&1 || found=$?
if [ "$found" = 0 ]; then
  git fetch -q --no-tags "$remote" "+refs/heads/$branch:$tracking"
  if git cat-file -e "$tracking:benchmarks/results" 2>/dev/null; then
    git archive "$tracking" benchmarks/results | tar -x
    echo "publish: added the results of $remote/$branch"
  fi
else
  echo "publish: no $remote/$branch (exit $found): committed results only"
fi

make site
html_dir="$(python ci/asv_conf.py --checkout . --get html_dir)"
if [ ! -f "$html_dir/index.html" ]; then
  echo "publish: make site left no $html_dir/index.html" >&2
  exit 1
fi
rm -rf "$out"
mkdir -p "$(dirname "$out")"
cp -R "$html_dir" "$out"
touch "$out/.nojekyll"  # for Pages served from a branch; the Actions deployment runs no Jekyll
echo "publish: site in $out"
