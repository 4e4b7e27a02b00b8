"""Load the published history site in headless Chromium and fail on JavaScript errors or missing graphs.

    python ci/browser_check.py SITE_DIR [--bench NAME] [--params QUERY] [--screenshots DIR] [--browser PATH]

SITE_DIR is what ci/site.sh builds (asv's html_dir with tiers.html). The site is served on
127.0.0.1 (asv's pages fetch JSON, which browsers refuse over file://) and three pages are loaded
with Chromium's own command line (--headless --dump-dom, with a virtual-time budget so the pages'
requests and scripts finish):
- asv's index: the summary grid is drawn and at least one summary graph loads;
- one benchmark's graph (default bench_prefill.Prefill.track_time, with asv's URL parameters
  --params, e.g. "p-case='long-16k'&p-impl='sparsek'"): its graph JSON loads and holds at least
  one measured value, and flot draws a canvas with a legend;
- tiers.html: one SVG graph per machine and tier.
Failures: any console message (an uncaught exception, a blocked or failed script, an integrity
error), asv's "external dependencies failed to load" page, any request answered 4xx/5xx other
than asv's summary-graph probes of benchmarks with no results, any request to another host (the
site must work offline: Chromium runs with every other host unreachable), a missing element.
With --screenshots, a PNG of each page is written there (docs/screenshots/ in the repository).

Exit status: 0 all pages pass, 1 a check failed, 77 no Chromium found (install Debian's
`chromium`; tests/test_browser.py skips on 77 outside CI).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
NO_BROWSER = 77
DEFAULT_BENCH = "bench_prefill.Prefill.track_time"
BUDGET_MS = 15000  # virtual time for scripts and XHRs to settle
WINDOW = "1280,1400"
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)")


@dataclass
class Page:
    name: str
    path: str  # URL path and fragment
    screenshot: str


def find_browser(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if (os.path.isfile(explicit) or shutil.which(explicit)) else None
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Log(http.server.SimpleHTTPRequestHandler):
    """Serves the site and records (path, status) of every request."""

    requests: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path.split("?", 1)[0], int(code) if str(code).isdigit() else 0))

    def log_message(self, *args):
        pass


def serve(site: Path):
    requests: list[tuple[str, int]] = []
    handler = functools.partial(type("Handler", (_Log,), {"requests": requests}), directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


def chromium(browser: str, url: str, profile: str, extra: list[str]) -> subprocess.CompletedProcess:
    args = [browser, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--window-size={WINDOW}",
            f"--virtual-time-budget={BUDGET_MS}", "--hide-scrollbars",
            # Offline: every host but the local server is unreachable, so a CDN reference fails loudly.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *extra, url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root (containers)
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def console_messages(stderr: str) -> list[str]:
    return [m.group(1).strip() for m in map(_CONSOLE.search, stderr.splitlines()) if m]


def check_dom(page: Page, dom: str, bench: str) -> list[str]:
    problems = []
    if "Can not determine continental origin of swallow" in dom:
        return ["asv's error page: its JavaScript dependencies failed to load"]
    if page.name == "index":
        if 'class="benchmark-group"' not in dom or bench.split(".")[0] not in dom:
            problems.append(f"the summary grid lists no benchmark of {bench.split('.')[0]}")
    elif page.name == "graph":
        if 'id="main-graph"' not in dom or 'class="flot-base"' not in dom:
            problems.append(f"no graph canvas for {bench}")
        if 'class="legendLabel"' not in dom:
            problems.append(f"the graph of {bench} has no legend (no series drawn)")
    elif page.name == "tiers":
        if dom.count('class="tier-graph"') < 1:
            problems.append("tiers.html has no tier graph")
    return problems


def _has_value(node) -> bool:
    """Any finite number in asv's graph JSON ([[revision, value or [values]], ...])."""
    if isinstance(node, list):
        return any(_has_value(x) for x in (node[1:] if len(node) == 2 and isinstance(node[0], int) else node))
    return isinstance(node, (int, float)) and not isinstance(node, bool) and node == node


def check_requests(page: Page, requests: list[tuple[str, int]], bench: str, site: Path) -> list[str]:
    problems = []
    for path, code in requests:
        if code >= 400 and not path.startswith("/graphs/summary/"):
            problems.append(f"GET {path} -> {code}")
    if page.name == "index" and not any(p.startswith("/graphs/summary/") and c == 200 for p, c in requests):
        problems.append("no summary graph loaded")
    if page.name == "graph":
        loaded = [p for p, c in requests if p.endswith(f"/{bench}.json") and c == 200]
        if not loaded:
            problems.append(f"the graph data of {bench} did not load")
        elif not any(_has_value(json.loads((site / unquote(p).lstrip("/")).read_text(encoding="utf-8")))
                     for p in loaded):
            problems.append(f"the graph of {bench} has no measured value (an empty graph)")
    return problems


def run_checks(site: Path, browser: str, bench: str, params: str, screenshots: Path | None) -> list[str]:
    fragment = bench + (f"?{params}" if params else "")
    pages = [Page("index", "/index.html", "asv-index.png"),
             Page("graph", f"/index.html#{quote(fragment, safe='?&=-._')}", "asv-graph.png"),
             Page("tiers", "/tiers.html", "tiers.png")]
    server, requests = serve(site)
    failures = []
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for page in pages:
            # A fresh profile per page: nothing cached from the previous page hides a missing file.
            with tempfile.TemporaryDirectory(prefix="sparsek-chromium-") as profile:
                requests.clear()
                done = chromium(browser, base + page.path, profile, ["--dump-dom"])
                seen = list(requests)
                problems = [f"console: {m}" for m in console_messages(done.stderr)]
                if done.returncode != 0:
                    problems.append(f"chromium exited {done.returncode}: {done.stderr.strip()[-500:]}")
                problems += check_dom(page, done.stdout, bench) + check_requests(page, seen, bench, site)
                status = "ok" if not problems else "FAILED"
                print(f"browser: {page.name:6s} {page.path}: {status} ({len(seen)} requests)")
                failures += [f"{page.name}: {p}" for p in problems]
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    shot = screenshots / page.screenshot
                    chromium(browser, base + page.path, profile, [f"--screenshot={shot.resolve()}"])
                    if not shot.is_file():
                        failures.append(f"{page.name}: no screenshot written to {shot}")
    finally:
        server.shutdown()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browser_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site (asv html_dir with tiers.html)")
    parser.add_argument("--bench", default=DEFAULT_BENCH, help=f"benchmark whose graph is loaded (default {DEFAULT_BENCH})")
    parser.add_argument("--params", default="", help="asv graph URL parameters, e.g. \"p-case='long-16k'\"")
    parser.add_argument("--screenshots", type=Path, help="write a PNG of each page here")
    parser.add_argument("--browser", help="Chromium executable (default: the first of %s on PATH)" % ", ".join(BROWSERS))
    args = parser.parse_args(argv)
    for required in ("index.html", "tiers.html"):
        if not (args.site / required).is_file():
            parser.error(f"{args.site}: no {required} (build the site with ci/site.sh)")
    browser = find_browser(args.browser)
    if browser is None:
        print("browser: no Chromium found; install it (Debian: apt-get install chromium)", file=sys.stderr)
        return NO_BROWSER
    failures = run_checks(args.site, browser, args.bench, args.params, args.screenshots)
    for failure in failures:
        print(f"browser: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
