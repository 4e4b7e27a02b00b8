"""`sparsek-bench` end to end on the CPU: run, tiers, compare, env, profile and learn-* routing."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types

import pytest

from sparsek.bench import cli, results

FAST = ["--quick", "--min-samples", "3", "--max-time", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One cpu-smoke run through the CLI, shared by the tests that read its file or output."""
    path = tmp_path_factory.mktemp("runs") / "smoke.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["run", "--case", "cpu-smoke", "--impl", "sparsek,sparsek-ref", "--impl", "sdpa-math",
                       "--json", str(path), *FAST])
    return rc, path, out.getvalue()


def test_run_cpu_smoke_end_to_end(smoke_run):
    rc, path, _ = smoke_run
    assert rc == 0
    doc = results.load_results(path)
    status = {r["impl"]: r["status"] for r in doc["records"]}
    assert status == {"sparsek": "skipped", "sparsek-ref": "ok", "sdpa-math": "ok"}
    assert all(r["error"]["passed"] for r in doc["records"] if r["status"] == "ok")
    assert doc["run"]["peaks"]["cpu"]["matmul"]["tflops"] > 0
    assert doc["run"]["device"]["software"]["torch"]
    assert doc["run"]["argv"][:3] == ["run", "--case", "cpu-smoke"]
    t1 = doc["tiers"][0]
    assert t1["tier"] == "T1" and t1["status"] == "not measurable" and "CUDA" in t1["reason"]


def test_run_prints_the_report_and_tiers(smoke_run):
    _, path, out = smoke_run
    assert "== cpu-smoke: prefill B1 Hq4 Hkv2 S256 D32 float32 topk32 window16 (cpu) ==" in out
    assert "sdpa-math" in out and "sparsek-ref" in out and "TIER ASSESSMENT" in out and f"results: {path}" in out
    assert "sparsek: skipped: sparsek's CUDA path runs on CUDA only" in out


def test_tiers_from_a_results_file_with_explain(smoke_run, capsys):
    _, path, _ = smoke_run
    assert cli.main(["tiers", "--results", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "TIER ASSESSMENT" in out and "NOT MEASURABLE" in out
    assert "366.72" in out and "35,979 TFLOP/s" in out  # the brief's SDPA figure, full-matrix count
    assert "no GPU peak measured" in out  # a CPU run has no GPU peak to compare with


def test_report_merges_runs(smoke_run, tmp_path, capsys):
    _, path, _ = smoke_run
    merged = tmp_path / "merged.json"
    assert cli.main(["report", "--results", str(path), "--results", str(path), "--json", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "== cpu-smoke" in out and "TIER ASSESSMENT" in out
    doc = results.load_results(merged)
    assert len(doc["records"]) == 3 and len(doc["run"]["merged"]) == 2


def test_unknown_names_exit_2_with_the_valid_ones(capsys):
    assert cli.main(["run", "--case", "sede", *FAST]) == 2
    assert "unknown case 'sede'; valid cases: seed" in capsys.readouterr().err
    assert cli.main(["run", "--case", "cpu-smoke", "--impl", "sdpa", *FAST]) == 2
    assert "valid ids: sparsek" in capsys.readouterr().err


def _results_file(path, samples):
    doc = results.new_results({"device": {"name": "NVIDIA H200"}})
    doc["records"] = [{"case": "seed", "impl": impl, "status": "ok", "timing": {"samples": s}} for impl, s in samples.items()]
    results.write_json_atomic(path, doc)
    return str(path)


def _compare_module(monkeypatch):
    """The real statistics module; a stub with the same interface only until it exists."""
    try:
        from sparsek.bench import compare  # noqa: F401
        return
    except ImportError:
        pass
    stub = types.ModuleType("sparsek.bench.compare")
    stub.compare_samples = lambda base, head, threshold, alpha: [
        {"key": k, "regression": sorted(head[k])[len(head[k]) // 2] > (1 + threshold) * sorted(base[k])[len(base[k]) // 2]}
        for k in base if k in head]
    stub.to_markdown = lambda rows: "\n".join(f"| {r['key']} | {r['regression']} |" for r in rows) + "\n"
    stub.has_regression = lambda rows: any(r["regression"] for r in rows)
    monkeypatch.setitem(sys.modules, "sparsek.bench.compare", stub)


def test_compare_exits_1_on_a_regression(tmp_path, monkeypatch, capsys):
    _compare_module(monkeypatch)
    base = [1e-3 * (1 + 0.001 * i) for i in range(20)]
    slow = [s * 1.3 for s in base]
    a = _results_file(tmp_path / "a.json", {"sdpa-cudnn": base, "sparsek": base})
    b = _results_file(tmp_path / "b.json", {"sdpa-cudnn": base, "sparsek": slow})
    assert cli.main(["compare", a, a]) == 0
    assert cli.main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    assert "seed/sparsek" in out and "seed/sdpa-cudnn" in out
    assert cli.main(["compare", a, str(tmp_path / "missing.json")]) == 2


def test_env_prints_the_fingerprint(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "software.torch" in out and "git.commit" in out
    assert cli.main(["env", "--json"]) == 0
    assert "software" in json.loads(capsys.readouterr().out)


def test_profile_is_delegated(monkeypatch):
    stub = types.ModuleType("sparsek.bench.profile")
    stub.main = lambda argv: 7 if argv == ["--case", "seed"] else 0
    monkeypatch.setitem(sys.modules, "sparsek.bench.profile", stub)
    assert cli.main(["profile", "--case", "seed"]) == 7


def test_learn_cases_are_routed_or_recorded_as_failed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsek.learn.bench", None)  # import fails
    path = tmp_path / "learn.json"
    assert cli.main(["run", "--case", "learn-copy", "--json", str(path), *FAST]) == 0
    (rec,) = results.load_results(path)["records"]
    assert rec["status"] == "failed" and "sparsek.learn.bench" in rec["reason"]
    assert "ModuleNotFoundError" in rec["reason"] or "ImportError" in rec["reason"]

    stub = types.ModuleType("sparsek.learn.bench")
    stub.run_learn_case = lambda name, quick: {"impl": "sparsek-scorer", "recall": 0.93, "quick": quick}
    monkeypatch.setitem(sys.modules, "sparsek.learn.bench", stub)
    assert cli.main(["run", "--case", "learn-copy", "--json", str(path), *FAST]) == 0
    (rec,) = results.load_results(path)["records"]
    assert (rec["status"], rec["case"], rec["impl"], rec["recall"], rec["quick"]) == ("ok", "learn-copy", "sparsek-scorer", 0.93, True)


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "sparsek.bench.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout and "compare" in out.stdout and "profile" in out.stdout
