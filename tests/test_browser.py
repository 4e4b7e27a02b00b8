"""The history site in a real browser: build it from the committed asv results (asv publish, the
tier page, the vendored libraries) and load it in headless Chromium through ci/browser_check.py.

Outside CI the test skips when no Chromium is installed; under CI=true a missing browser fails
(.ci/run installs Debian's chromium).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI") != "true":  # the test extra installs asv: in CI its absence is an error
    pytest.importorskip("asv")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# A graph with CPU values in the committed results (the lead adds GPU machines beside them).
GRAPH = "bench_prefill.Prefill.track_time"
GRAPH_PARAMS = "p-case='cpu-smoke'&p-impl='sdpa-math'&p-impl='sparsek-ref'&p-impl='sdpa-flash'"


def require_chromium(done: subprocess.CompletedProcess) -> None:
    """ci/browser_check.py exits 77 when no Chromium is installed: skip outside CI, fail in it."""
    if done.returncode == 77:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is not installed; in CI it must be (.ci/run: apt-get install chromium)")
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    if not any(RESULTS.glob("*/*-existing-*.json")):
        pytest.skip("no committed asv results in benchmarks/results")
    tmp = tmp_path_factory.mktemp("site")
    conf = tmp / "asv.conf.json"
    subprocess.run([sys.executable, "ci/asv_conf.py", "--checkout", ".", "--publish", "--out", str(conf)],
                   cwd=REPO, check=True, capture_output=True)
    data = json.loads(conf.read_text())
    data["html_dir"] = str(tmp / "html")
    conf.write_text(json.dumps(data))
    # `python -m asv`: the asv of this interpreter, whether or not its scripts directory is on PATH.
    done = subprocess.run([sys.executable, "-m", "asv", "--config", str(conf), "publish"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "sparsek.bench.site", "--conf", str(conf), "--out",
                           str(tmp / "html" / "tiers.html"), "--repo", ".", "--offline", "ci/site-vendor"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp / "html"


def test_site_loads_in_chromium_without_errors(site_dir, tmp_path):
    done = subprocess.run([sys.executable, "ci/browser_check.py", str(site_dir), "--bench", GRAPH,
                           "--params", GRAPH_PARAMS, "--screenshots", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    require_chromium(done)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("asv-index.png", "asv-graph.png", "tiers.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


def test_browser_check_catches_a_broken_page(site_dir, tmp_path):
    """The check itself must fail on a JavaScript error and on a missing graph."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(site_dir, broken)
    (broken / "tiers.html").write_text("<!DOCTYPE html><html><head><script>undefinedFunction();</script>"
                                       "</head><body>no graphs</body></html>")
    done = subprocess.run([sys.executable, "ci/browser_check.py", str(broken), "--bench", GRAPH,
                           "--params", GRAPH_PARAMS], cwd=REPO, capture_output=True, text=True, timeout=600)
    require_chromium(done)
    assert done.returncode == 1
    assert "undefinedFunction" in done.stderr and "no tier graph" in done.stderr
