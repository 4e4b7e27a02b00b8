#!/usr/bin/env bash
# Build the history site from the committed asv results: `asv publish` into asv.conf.json's
# html_dir, then the tier-history page (sparsek/bench/site.py) beside asv's index.html, and the
# libraries asv takes from CDNs copied in (ci/site-vendor): the site works offline.
#
#   ci/site.sh            (what `make site` runs; ci/publish.sh adds the results branch first)
#
# Needs the git history of the branches in asv.conf.json (asv publish dates and orders commits).
# In GitHub Actions the commit links point at $GITHUB_REPOSITORY (ci/asv_conf.py --publish).
# Preview: python -m http.server -d "$(python ci/asv_conf.py --checkout . --get html_dir)"
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python="${PYTHON:-python3}"

mkdir -p out
"$python" ci/asv_conf.py --checkout . --publish --out out/asv-site.conf.json >/dev/null
html_dir="$("$python" ci/asv_conf.py --checkout . --get html_dir)"
asv --config out/asv-site.conf.json publish
"$python" -m sparsek.bench.site --conf out/asv-site.conf.json --out "$html_dir/tiers.html" --repo . \
  --offline ci/site-vendor
echo "site: $html_dir/index.html and $html_dir/tiers.html"
