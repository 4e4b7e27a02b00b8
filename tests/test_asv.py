"""The asv suite: configuration, discovery, the shared cache logic, and one real `asv run` on the CPU.

The real run benchmarks cpu-smoke with a few implementations (each asv benchmark is its own
process, about 2 s of interpreter start and torch import apiece), into a scratch results_dir
and a scratch HOME for the machine file, and then reads asv's result file back.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI") != "true":  # the test extra installs asv: in CI its absence is an error
    pytest.importorskip("asv")

from asv_runner.benchmarks.mark import SkipNotImplemented  # noqa: E402

from benchmarks import _common  # noqa: E402
from sparsek.bench.cases import CASES  # noqa: E402
from sparsek.bench.impls import IMPLS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MY_MODULES = ("bench_prefill", "bench_decode", "bench_selection")


def load_conf():
    from asv.util import load_json

    return load_json(str(REPO / "asv.conf.json"), js_comments=True)


def test_conf_has_the_issue_settings():
    conf = load_conf()
    assert conf["environment_type"] == "existing"
    assert conf["launch_method"] == "spawn"
    assert conf["benchmark_dir"] == "benchmarks"
    assert conf["results_dir"] == "benchmarks/results"
    assert conf["branches"] == ["main"]
    assert conf["show_commit_url"].startswith("https://") and conf["show_commit_url"].endswith("/commit/")
    assert conf["default_benchmark_timeout"] >= 3600  # one process measures a whole GPU case set
    thresholds = conf["regressions_thresholds"]
    assert all(isinstance(v, (int, float)) and v > 0 for v in thresholds.values())
    for module in MY_MODULES:
        assert any(module in regex for regex in thresholds), module
    # html_dir is generated: git must ignore it.
    done = subprocess.run(["git", "check-ignore", "-q", conf["html_dir"] + "/index.html"], cwd=REPO)
    assert done.returncode == 0, f"{conf['html_dir']} is not ignored by git"


def test_asv_accepts_the_conf():
    from asv.config import Config

    conf = Config.load(str(REPO / "asv.conf.json"))
    assert conf.environment_type == "existing" and conf.launch_method == "spawn"


def discovered() -> dict[str, object]:
    from asv_runner.discovery import disc_benchmarks

    return {b.name: b for b in disc_benchmarks(str(REPO / "benchmarks")) if b.name.split(".")[0] in MY_MODULES}


def test_discovery_names_units_versions_and_params():
    found = discovered()
    prefill = [n for n, c in CASES.items() if c.kind == "prefill"]
    decode = [n for n, c in CASES.items() if c.kind == "decode"]
    for name in ("time", "tflops", "speedup", "error", "peak_memory"):
        assert f"bench_prefill.Prefill.track_{name}" in found
        assert f"bench_decode.Decode.track_{name}" in found
    assert "bench_decode.Decode.track_gbps" in found
    assert "bench_prefill.PrefillTiers.track_speedup" in found and "bench_decode.DecodeTiers.track_speedup" in found
    assert not [n for n in found if "_common" in n or "Family" in n]
    time = found["bench_prefill.Prefill.track_time"]
    assert time.unit == "seconds"
    assert time.version == _common.VERSION
    assert time._params == [prefill, [i for i in IMPLS if IMPLS[i].kind == "prefill"]]
    assert found["bench_decode.Decode.track_time"]._params[0] == decode
    assert found["bench_selection.Selection.track_time"].unit == "seconds"
    assert found["bench_prefill.Prefill.track_tflops"].unit == "TFLOP/s"
    assert found["bench_prefill.Prefill.track_peak_memory"].unit == "bytes"
    # Both prefill classes share one measurement: asv keys setup_cache by its function.
    assert time.setup_cache_key == found["bench_prefill.PrefillTiers.track_speedup"].setup_cache_key
    assert time.setup_cache_key != found["bench_decode.Decode.track_time"].setup_cache_key


def _rec(status="ok", median=1.0, pattern="dense-causal", passed=True):
    return {"status": status, "reason": "why", "pattern": pattern, "samples": [median] * 3, "median": median,
            "tflops": 1.0, "gbps": None, "max_abs_error": 0.0, "error_passed": passed, "peak_bytes": None,
            "speedup": None}


def test_record_for_skips_and_fails_like_asv_expects():
    cache = {"records": {("c", "skip"): _rec("skipped"), ("c", "bad"): _rec("failed"), ("c", "ok"): _rec()}}
    with pytest.raises(NotImplementedError, match="why"):
        _common.record_for(cache, "c", "skip")
    with pytest.raises(NotImplementedError, match="not measured in this run"):
        _common.record_for(cache, "c", "absent")
    with pytest.raises(RuntimeError, match="failed: why"):
        _common.record_for(cache, "c", "bad")
    assert _common.record_for(cache, "c", "ok")["median"] == 1.0
    with pytest.raises(SkipNotImplemented):
        _common._value(cache["records"][("c", "ok")], "peak_bytes", "CUDA only")


def test_speedup_is_over_the_fastest_dense_that_passed_its_check():
    records = {
        ("c", "dense-slow"): _rec(median=4.0),
        ("c", "dense-fast"): _rec(median=2.0),
        ("c", "dense-wrong"): _rec(median=0.5, passed=False),  # fastest, but its output failed
        ("c", "sparse"): _rec(median=1.0, pattern="sparsek"),
        ("d", "sparse"): _rec(median=1.0, pattern="sparsek"),  # no dense in case d
    }
    _common.add_speedups(records, "prefill")
    assert records[("c", "sparse")]["speedup"] == 2.0
    assert records[("c", "dense-slow")]["speedup"] == 0.5
    assert records[("d", "sparse")]["speedup"] is None


def test_planned_cases_and_impls_from_the_environment(monkeypatch):
    monkeypatch.setenv(_common.ENV_CASES, "cpu-smoke, cpu-smoke-decode")
    monkeypatch.setenv(_common.ENV_IMPLS, "sdpa-math,sdpa-decode")
    assert _common.planned_cases("prefill") == ["cpu-smoke"]
    assert _common.planned_cases("decode") == ["cpu-smoke-decode"]
    assert _common.planned_impls("prefill") == ["sdpa-math"]
    monkeypatch.setenv(_common.ENV_IMPLS, "sdpa-math,cuda")
    assert _common.planned_impls("selection") == ["cuda"] and _common.planned_impls("prefill") == ["sdpa-math"]
    monkeypatch.setenv(_common.ENV_CASES, "no-such-case")
    with pytest.raises(ValueError, match="no-such-case"):
        _common.planned_cases("prefill")
    monkeypatch.delenv(_common.ENV_CASES)
    monkeypatch.setattr(_common, "device_type", lambda: "cpu")
    assert _common.planned_cases("prefill") == ["cpu-smoke"]
    monkeypatch.setenv(_common.ENV_QUICK, "0")
    assert not _common.quick()


def _asv_selected(regexes, benchmark) -> set[tuple]:
    """The parameter combinations of a discovered benchmark that asv 0.6's --bench selection keeps:
    asv matches each regex against `name(repr(p0), repr(p1))` (asv/benchmarks.py)."""
    import itertools
    import re

    kept = set()
    for combo in itertools.product(*benchmark._params):
        name = f"{benchmark.name}({', '.join(repr(p) for p in combo)})"
        if any(re.search(r, name) for r in regexes):
            kept.add(combo)
    return kept


def test_asv_select_keeps_only_the_planned_combinations(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "ci"))
    import asv_select

    monkeypatch.setenv(_common.ENV_CASES, "long-16k,long-64k")
    monkeypatch.setenv(_common.ENV_IMPLS, "sparsek,flex-window,sdpa-cudnn,cuda")
    found = discovered()
    regexes = [asv_select.selection_regex(c) for c in ("Prefill", "PrefillTiers", "Selection")]
    want = {(c, i) for c in ("long-16k", "long-64k") for i in ("sparsek", "flex-window", "sdpa-cudnn")}
    assert _asv_selected(regexes, found["bench_prefill.Prefill.track_time"]) == want
    tiers = {(c, t) for c in ("long-16k", "long-64k") for t in _common.tier_names("prefill")}
    assert _asv_selected(regexes, found["bench_prefill.PrefillTiers.track_speedup"]) == tiers
    assert _asv_selected(regexes, found["bench_selection.Selection.track_time"]) == {("long-16k", "cuda"), ("long-64k", "cuda")}
    assert not _asv_selected(regexes, found["bench_decode.Decode.track_time"])
    # --methods keeps the same combinations of the named methods only.
    timed = [asv_select.selection_regex("Prefill", ["track_time"])]
    assert _asv_selected(timed, found["bench_prefill.Prefill.track_time"]) == want
    assert not _asv_selected(timed, found["bench_prefill.Prefill.track_speedup"])
    with pytest.raises(SystemExit):  # argparse's error: a method name asv would never match
        asv_select.main(["--methods", "time", "Prefill"])
    # The expressions survive word splitting (no spaces), and a class with nothing planned is refused.
    assert all(" " not in r for r in regexes)
    monkeypatch.setenv(_common.ENV_IMPLS, "sparsek")
    with pytest.raises(ValueError, match="Selection: nothing planned"):
        asv_select.selection_regex("Selection")
    with pytest.raises(ValueError, match="unknown asv class 'Nope'"):
        asv_select.selection_regex("Nope")


# ------------------------------------------------------------------------------------------------
# asv for real


@pytest.fixture(scope="module")
def asv_run(tmp_path_factory):
    """`asv run -E existing --set-commit-hash HEAD --record-samples` on a cpu-smoke subset."""
    tmp = tmp_path_factory.mktemp("asv")
    home = tmp / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), SPARSEK_ASV_MACHINE="test-cpu", SPARSEK_CLOCK_POLICY="default",
               SPARSEK_ASV_CASES="cpu-smoke", SPARSEK_ASV_IMPLS="sparsek,sdpa-math,reference",
               ASV_PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "ci/fingerprint.py", "--out-dir", str(tmp)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "ci/asv_conf.py", "--checkout", ".", "--results", str(tmp / "results"),
                    "--out", str(tmp / "asv.conf.json")], cwd=REPO, env=env, check=True, capture_output=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    bench = (r"(Prefill\.track_(time|speedup|peak_memory)|PrefillTiers\.track_speedup|Selection\.track_time)"
             r"\('cpu-smoke', '(sparsek|sdpa-math|reference|T1)'\)")
    # `python -m asv`: the asv of this interpreter, whether or not its scripts directory is on PATH.
    done = subprocess.run([sys.executable, "-m", "asv", "--config", str(tmp / "asv.conf.json"), "run",
                           "-E", "existing", "--set-commit-hash", sha, "--machine", "test-cpu", "--record-samples",
                           "--show-stderr", "--bench", bench], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    files = [p for p in (tmp / "results" / "test-cpu").glob("*.json") if p.name != "machine.json"]
    assert files, done.stdout[-4000:] + done.stderr[-4000:]
    return {"proc": done, "result": json.loads(files[0].read_text()), "sha": sha,
            "machine": json.loads((tmp / "results" / "test-cpu" / "machine.json").read_text()),
            "benchmarks": json.loads((tmp / "results" / "benchmarks.json").read_text())}


def _values(result, name, column):
    row = dict(zip(result["result_columns"], result["results"][name]))
    import itertools

    combos = list(itertools.product(*row["params"]))
    values = row.get(column) or [None] * len(combos)
    return {tuple(v.strip("'") for v in combo): value for combo, value in zip(combos, values)}


@pytest.mark.slow
def test_asv_run_reports_median_iqr_and_ci_from_the_samples(asv_run):
    result = asv_run["result"]
    assert result["commit_hash"] == asv_run["sha"]
    key = ("cpu-smoke", "sdpa-math")
    samples = _values(result, "bench_prefill.Prefill.track_time", "samples")[key]
    assert samples and len(samples) >= 3, asv_run["proc"].stdout[-3000:]
    median = _values(result, "bench_prefill.Prefill.track_time", "result")[key]
    assert median == pytest.approx(statistics.median(samples))
    q25 = _values(result, "bench_prefill.Prefill.track_time", "stats_q_25")[key]
    q75 = _values(result, "bench_prefill.Prefill.track_time", "stats_q_75")[key]
    lo = _values(result, "bench_prefill.Prefill.track_time", "stats_ci_99_a")[key]
    hi = _values(result, "bench_prefill.Prefill.track_time", "stats_ci_99_b")[key]
    assert q25 <= median <= q75 and lo <= median <= hi
    assert asv_run["benchmarks"]["bench_prefill.Prefill.track_time"]["unit"] == "seconds"
    # The CPU subset: sdpa-math has no dense peer faster than itself, so its speedup is <= 1.
    assert 0 < _values(result, "bench_prefill.Prefill.track_speedup", "result")[key] <= 1.0
    assert _values(result, "bench_selection.Selection.track_time", "result")[("cpu-smoke", "reference")] > 0


@pytest.mark.slow
def test_asv_run_skips_what_cannot_run_here(asv_run):
    result = asv_run["result"]
    # sparsek's CUDA kernels on a CPU case: NotImplementedError in setup -> no value.
    sparsek = _values(result, "bench_prefill.Prefill.track_time", "result")[("cpu-smoke", "sparsek")]
    assert sparsek is None or sparsek != sparsek
    assert "asv: skipped" in asv_run["proc"].stdout
    memory = _values(result, "bench_prefill.Prefill.track_peak_memory", "result")[("cpu-smoke", "sdpa-math")]
    assert memory is None or memory != memory  # measured on CUDA only
    tier = _values(result, "bench_prefill.PrefillTiers.track_speedup", "result")[("cpu-smoke", "T1")]
    assert tier is None or tier != tier


@pytest.mark.slow
def test_machine_record_names_the_card(asv_run):
    for key in ("gpu", "gpu_driver", "cuda", "clock_policy"):
        assert key in asv_run["machine"] and key in asv_run["result"]["params"]
    assert asv_run["machine"]["machine"] == "test-cpu"
