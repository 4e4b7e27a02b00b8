"""The tier-history page from the committed results: every case and tier that has results, T3
from the decode results files, no empty graphs for a CPU machine; and `make site` says how to
view it (asv's index.html cannot load its data from a file:// page)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sparsek.bench import site
from sparsek.bench.results import load_results
from sparsek.bench.tiers import TIERS, assess

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "benchmarks" / "runs"
RESULTS = REPO / "benchmarks" / "results"


def measured(paths) -> set[tuple[str, str]]:
    """(tier, case) with a speedup in any of these results files."""
    return {(r["tier"], r["case"]) for p in paths for r in assess(load_results(p)) if r.get("speedup")}


def test_results_files_give_one_history_per_card_with_t3():
    histories = {h.card: h for h in site.load_runs(RUNS)}
    assert set(histories) == {"NVIDIA H200", "NVIDIA H100 80GB HBM3"}  # the cards of the committed runs
    for history in histories.values():
        assert history.source == "runs" and not history.cpu
        assert [p.date for p in history.points] == sorted(p.date for p in history.points)
    got = {key for h in histories.values() for p in h.points for key in p.speedups}
    assert got == measured(sorted(RUNS.glob("*.json")))
    h200 = {key for p in histories["NVIDIA H200"].points for key in p.speedups}
    assert {c for t, c in h200 if t == "T3"} == {f"decode-{ctx}-b{b}" for ctx in ("32k", "128k") for b in (1, 16, 64)}
    h100 = {key for p in histories["NVIDIA H100 80GB HBM3"].points for key in p.speedups}
    # runs of different cards never share a history: the H100's points are its own files' alone
    assert h100 == measured(sorted(RUNS.glob("*-nvidia-h100-*.json")))
    assert {t for t, _ in h100} == {"T1", "T2", "T1-train", "T2-train", "T3"}
    # A file written without git names its commit only in its file name.
    assert "e9a1520" in [p.commit for p in histories["NVIDIA H200"].points]


def test_the_page_draws_every_tier_and_case_with_results_and_skips_empty_machines():
    machines = site.load_history(RESULTS) + site.load_runs(RUNS)
    page = site.render_page(machines, "https://github.com/o/r/commit/", {})
    drawn = [m for m in machines if m.tiers_with_results()]
    graphs = re.findall(r'class="tier-graph" data-tier="([^"]+)" data-machine="([^"]+)" data-points="(\d+)"', page)
    assert sorted((t, m) for t, m, _ in graphs) == sorted((t.name, m.name) for m in drawn for t in m.tiers_with_results())
    assert all(int(n) > 0 for _, _, n in graphs)  # no empty chart
    assert ("T3", "runs-nvidia-h200") in {(t, m) for t, m, _ in graphs}
    for m in drawn:
        for p in m.points:
            for _, case in p.speedups:
                assert f"<th>{case}</th>" in page, case
    empty = [m.name for m in machines if not m.tiers_with_results()]
    for name in empty:  # the CPU machine of the committed history: named once, not drawn
        assert f'data-machine="{name}"' not in page and f"<code>{name}</code>" in page
    assert "DESIGN" not in page and "docs/tiers.md" in page


def test_a_cpu_history_with_results_is_drawn_as_a_pipeline_check(tmp_path):
    machine = tmp_path / "results" / "laptop"
    machine.mkdir(parents=True)
    (machine / "machine.json").write_text('{"gpu": "cpu"}')
    data = {"commit_hash": "c" * 40, "date": 1000, "params": {}, "version": 2,
            "result_columns": ["result", "params", "version"],
            "results": {site.TIER_BENCHMARKS["prefill"]: [[0.02], [["'cpu-smoke'"], ["'T1'"]], "1"]}}
    (machine / "cccccccc-existing.json").write_text(json.dumps(data))
    page = site.render_page(site.load_history(tmp_path / "results"), None, {})
    assert page.count('class="tier-graph"') == 1 and "a pipeline check" in page


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_site_says_how_to_view_it():
    done = subprocess.run(["make", "-n", "--no-print-directory", "site", "PYTHON=python3"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "make serve-site" in done.stdout and "http://127.0.0.1:" in done.stdout
    assert "Error fetching content" in done.stdout  # what a file:// page shows, so the hint is recognised
    done = subprocess.run(["make", "-n", "--no-print-directory", "serve-site", "PYTHON=python3"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "-m http.server --bind 127.0.0.1" in done.stdout


def test_tier_names_on_the_page_come_from_the_tier_rules():
    page = site.render_page([], None, {})
    for tier in TIERS:
        assert f"{tier.name} {tier.title}" in page
