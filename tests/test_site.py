"""The tier-history page and the offline rewrite of asv's index (sparsek/bench/site.py), on
synthetic asv result files written in asv 0.6's format (api version 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsek.bench import site

COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
           "stats_q_25", "stats_q_75", "stats_number", "stats_repeat", "samples", "profile"]
EVIL = '<script>alert("x")</script>'


def _result(sha: str, date: int, prefill: dict, decode: dict | None = None) -> dict:
    """An asv result file with PrefillTiers/DecodeTiers values; prefill = {(case, tier): speedup}."""

    def row(values, cases, tiers):
        grid = [values.get((c, t)) for c in cases for t in tiers]
        return [grid, [[repr(c) for c in cases], [repr(t) for t in tiers]], "1"]

    results = {site.TIER_BENCHMARKS["prefill"]: row(prefill, ["long-16k", f"evil{EVIL}"], ["T1", "T2"])}
    if decode is not None:
        results[site.TIER_BENCHMARKS["decode"]] = row(decode, ["decode-32k-b16"], ["T3"])
    results["bench_prefill.Prefill.track_time"] = [[0.1], [["'long-16k'"], ["'sparsek'"]], "1"]
    return {"commit_hash": sha, "date": date, "params": {}, "result_columns": COLUMNS, "results": results,
            "version": 2}


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    machine = root / "node7-nvidia-h200"
    machine.mkdir(parents=True)
    (machine / "machine.json").write_text(json.dumps({"machine": "node7-nvidia-h200", "gpu": f"NVIDIA H200 {EVIL}",
                                                      "gpu_driver": "580.65", "cuda": "13.0", "clock_policy": "default",
                                                      "version": 1}))
    # Written out of date order: the page orders by commit date.
    (machine / "bbbbbbbb-existing.json").write_text(json.dumps(
        _result("b" * 40, 2000, {("long-16k", "T1"): 1.5, ("long-16k", "T2"): 0.8}, {("decode-32k-b16", "T3"): 2.0})))
    (machine / "aaaaaaaa-existing.json").write_text(json.dumps(
        _result("a" * 40, 1000, {("long-16k", "T1"): 0.9, (f"evil{EVIL}", "T1"): 1.2})))
    (root / "benchmarks.json").write_text("{}")
    return root


def test_tier_speedups_reads_asv_rows(results_dir):
    data = json.loads((results_dir / "node7-nvidia-h200" / "bbbbbbbb-existing.json").read_text())
    got = site.tier_speedups(data)
    assert got == {("T1", "long-16k"): 1.5, ("T2", "long-16k"): 0.8, ("T3", "decode-32k-b16"): 2.0}


def test_history_is_ordered_by_commit_date(results_dir):
    (machine,) = site.load_history(results_dir)
    assert [p.commit[0] for p in machine.points] == ["a", "b"]
    assert machine.card.startswith("NVIDIA H200")


def test_page_marks_pass_and_fail_and_links_commits(results_dir):
    machines = site.load_history(results_dir)
    page = site.render_page(machines, "https://github.com/o/r/commit/", {"a" * 40: "first"})
    assert page.count('class="tier-graph"') == 3  # T1, T2, T3: the tiers with results on the one machine
    assert "No results here for T1-train, T2-train." in page
    assert f'href="https://github.com/o/r/commit/{"a" * 40}"' in page
    assert '<td class="fail">0.9x fail</td>' in page and '<td class="pass">1.5x pass</td>' in page
    assert 'class="pass"' in page and 'class="fail"' in page  # the graph's markers too
    assert "first" in page
    assert 'data-points="3"' in page  # T1: long-16k twice, the evil case once


def test_every_name_is_escaped(results_dir):
    machines = site.load_history(results_dir)
    page = site.render_page(machines, "https://x/commit/", {"a" * 40: EVIL})
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_commit_links_only_for_hex_hashes_and_http_urls():
    assert site.commit_link("https://h/commit/", "abc1234") == "https://h/commit/abc1234"
    assert site.commit_link("javascript:alert(1)//", "abc1234") is None
    assert site.commit_link("https://h/commit/", "abc1234\" onmouseover=\"x") is None
    assert site.commit_link(None, "abc1234") is None


def test_page_is_offline_and_says_when_empty(tmp_path):
    empty = tmp_path / "results"
    (empty / "m").mkdir(parents=True)
    (empty / "m" / "machine.json").write_text('{"gpu": "cpu"}')
    page = site.render_page(site.load_history(empty), None, {})
    assert site.remote_resources(page) == []
    assert "No tier results yet." in page and 'class="tier-graph"' not in page
    assert "Not drawn, no tier result: <code>m</code>" in page  # named, not drawn as empty graphs


def _asv_index(text_extra: str = "") -> str:
    tags = "".join(f'<script src="{u}" integrity="sha512-x" crossorigin="anonymous"></script>'
                   for u in site.CDN_TO_VENDOR if u.endswith(".js"))
    css = next(u for u in site.CDN_TO_VENDOR if u.endswith(".css"))
    return (f'<html><head><link href="{css}" rel="stylesheet" integrity="sha384-y">{tags}{text_extra}</head>'
            f'<body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body></html>')


def test_make_offline_points_asv_at_the_vendored_copies(tmp_path):
    html_dir = tmp_path / "html"
    html_dir.mkdir()
    (html_dir / "index.html").write_text(_asv_index())
    vendor = Path(__file__).resolve().parents[1] / "ci" / "site-vendor"
    replaced = site.make_offline(html_dir, vendor)
    assert sorted(replaced) == sorted(site.CDN_TO_VENDOR)
    text = (html_dir / "index.html").read_text()
    assert site.remote_resources(text) == []
    assert "integrity=" not in text and "vendor/jquery-3.3.1.min.js" in text
    assert "https://github.com/airspeed-velocity/asv/" in text  # a link, not a resource
    for local in site.CDN_TO_VENDOR.values():
        assert (html_dir / site.VENDOR_SUBDIR / local).is_file()


def test_make_offline_refuses_an_unknown_cdn(tmp_path):
    html_dir = tmp_path / "html"
    html_dir.mkdir()
    (html_dir / "index.html").write_text(_asv_index('<script src="https://cdn.example/new.js"></script>'))
    vendor = Path(__file__).resolve().parents[1] / "ci" / "site-vendor"
    with pytest.raises(ValueError, match="cdn.example/new.js"):
        site.make_offline(html_dir, vendor)


def test_cli_writes_the_page_beside_asv(results_dir, tmp_path):
    conf = tmp_path / "asv.conf.json"
    conf.write_text('// comment\n{"results_dir": "results", "html_dir": "html", '
                    '"show_commit_url": "https://github.com/o/r/commit/"}\n')
    assert site.main(["--conf", str(conf), "--repo", str(tmp_path)]) == 0
    page = (tmp_path / "html" / site.PAGE_NAME).read_text()
    assert page.startswith("<!DOCTYPE html>") and "T3 production decode" in page
