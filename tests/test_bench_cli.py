"""`sparsek-bench` end to end on the CPU: run, tiers, compare, env, profile and learn-* routing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import types

import bench_docs
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
    t1 = doc["tiers"][0]  # on a CPU the op runs its reference: the tier is computed as a pipeline check
    assert t1["tier"] == "T1" and t1["status"] in ("pass", "fail") and t1["subject"] == "sparsek-ref"
    assert t1["pipeline_check"] and t1["baseline"] == "sdpa-math"


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


def _results_file(path, samples, *, broken=(), finished=True):
    records = [bench_docs.ok("seed", impl, s) for impl, s in samples.items()]
    records += [bench_docs.broken("seed", impl, status, f"planted {status}") for impl, status in broken]
    results.write_json_atomic(path, bench_docs.results_doc(records, finished=finished))
    return str(path)


def test_compare_exits_1_on_a_regression(tmp_path, capsys):
    """The CLI over the real statistics (sparsek.bench.compare), end to end."""
    base = [1e-3 * (1 + 0.001 * i) for i in range(20)]
    slow = [s * 1.3 for s in base]
    a = _results_file(tmp_path / "a.json", {"sdpa-cudnn": base, "sparsek": base})
    b = _results_file(tmp_path / "b.json", {"sdpa-cudnn": base, "sparsek": slow})
    assert cli.main(["compare", a, a]) == 0
    assert cli.main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    assert "| seed/sparsek |" in out and "| 1.300x |" in out and "**regression** |" in out
    assert "| seed/sdpa-cudnn |" in out and "| unchanged |" in out
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


# ------------------------------------------------------------------------------------------------
# Arguments are checked by argparse: exit 2 with "argument --x: ..." before anything runs


@pytest.mark.parametrize("argv, says", [
    (["--min-samples", "-5"], "argument --min-samples: -5 is too small; expected an integer >= 1"),
    (["--min-samples", "0"], "argument --min-samples: 0 is too small"),
    (["--min-samples", "2.5"], "argument --min-samples: '2.5' is not a whole number"),
    (["--max-time", "nan"], "argument --max-time: 'nan' is not finite"),
    (["--max-time", "inf"], "argument --max-time: 'inf' is not finite"),
    (["--max-time", "0"], "argument --max-time: 0 is not positive"),
    (["--timeout", "-1"], "argument --timeout: -1 is negative; expected a finite number >= 0"),
    (["--timeout", "soon"], "argument --timeout: 'soon' is not a number"),
    (["--target-rel-iqr", "-0.01"], "argument --target-rel-iqr: -0.01 is not positive"),
], ids=["min-samples-neg", "min-samples-0", "min-samples-float", "max-time-nan", "max-time-inf", "max-time-0",
        "timeout-neg", "timeout-word", "rel-iqr-neg"])
def test_run_arguments_are_validated(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--case", "cpu-smoke", *argv])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_json_pointing_at_a_directory_is_refused_before_the_run(tmp_path, capsys):
    for argv in (["run", "--case", "cpu-smoke", "--json", str(tmp_path)],
                 ["report", "--results", "x.json", "--json", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert f"argument --json: '{tmp_path}' is a directory; expected a file path" in capsys.readouterr().err


def test_timeout_zero_still_means_no_timeout():
    args = cli.build_parser().parse_args(["run", "--case", "cpu-smoke", "--timeout", "0", "--min-samples", "3"])
    assert args.timeout == 0.0 and args.min_samples == 3


@pytest.mark.parametrize("argv, says", [
    (["--alpha", "1.5"], "argument --alpha: 1.5 is not in (0, 1)"),
    (["--threshold", "nan"], "argument --threshold: 'nan' is not finite"),
    (["--threshold", "-0.05"], "argument --threshold: -0.05 is negative"),
])
def test_compare_arguments_are_validated(argv, says, tmp_path, capsys):
    a = _results_file(tmp_path / "a.json", {"sparsek": [1e-3] * 10})
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", a, a, *argv])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# compare fails closed; partial runs are visible


@pytest.mark.parametrize("status", ["timeout", "failed", "oom", "skipped", "absent"])
def test_compare_fails_when_head_loses_a_benchmark_of_base(status, tmp_path, capsys):
    samples = [1e-3 * (1 + 0.001 * i) for i in range(20)]
    a = _results_file(tmp_path / "a.json", {"sdpa-cudnn": samples, "sparsek": samples})
    b = _results_file(tmp_path / "b.json", {"sdpa-cudnn": samples},
                      broken=[] if status == "absent" else [("sparsek", status)])
    assert cli.main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    verdict = "missing-in-head" if status in ("skipped", "absent") else "failed-in-head"
    assert f"| seed/sparsek |" in out and f"**{verdict}**" in out
    # The same failure in base: head broke nothing.
    c = _results_file(tmp_path / "c.json", {"sdpa-cudnn": samples}, broken=[("sparsek", "timeout")])
    d = _results_file(tmp_path / "d.json", {"sdpa-cudnn": samples}, broken=[("sparsek", "timeout")])
    assert cli.main(["compare", c, d]) == 0
    assert "failed-in-both" in capsys.readouterr().out


def test_partial_runs_are_marked_by_report_and_refused_by_compare(tmp_path, capsys):
    samples = [1e-3 * (1 + 0.001 * i) for i in range(20)]
    done = _results_file(tmp_path / "done.json", {"sparsek": samples})
    partial = _results_file(tmp_path / "partial.json", {"sparsek": samples}, finished=False)
    assert cli.main(["report", "--results", partial]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{partial}: PARTIAL RUN: it never finished")
    assert cli.main(["report", "--results", done]) == 0
    assert "PARTIAL RUN" not in capsys.readouterr().out
    assert cli.main(["tiers", "--results", partial]) == 0
    assert "PARTIAL RUN" in capsys.readouterr().out

    assert cli.main(["compare", done, partial]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PARTIAL RUN" in err and "pass --allow-partial" in err
    assert cli.main(["compare", done, partial, "--allow-partial"]) == 0
    assert "warning: " in capsys.readouterr().err

    merged = tmp_path / "merged.json"
    assert cli.main(["report", "--results", done, "--results", partial, "--json", str(merged)]) == 0
    assert results.is_partial(results.load_results(merged))  # a merge with a partial run is partial
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------
# A results file is never lost


def test_a_killed_run_leaves_the_previous_file_intact(tmp_path):
    """SIGKILL midway through `run --json EXISTING`: the existing file is untouched, the records
    finished so far are in the checkpoint, which the readers see as partial."""
    existing = tmp_path / "run.json"
    records = [bench_docs.ok(f"case-{i}", "sdpa-math", [1e-3 * (1 + 0.001 * j) for j in range(10)]) for i in range(13)]
    results.write_json_atomic(existing, bench_docs.results_doc(records, device="cpu"))
    before = existing.read_bytes()
    checkpoint = results.checkpoint_path(existing)
    # Normal timing (no --quick): the peaks and the timed loops take long enough to kill midway.
    proc = subprocess.Popen([sys.executable, "-m", "sparsek.bench.cli", "run", "--case", "cpu-smoke",
                             "--json", str(existing), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        assert checkpoint.exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert existing.read_bytes() == before
    assert len(results.load_results(existing)["records"]) == 13
    partial = results.load_results(checkpoint)
    assert results.is_partial(partial)
    assert cli.main(["compare", str(existing), str(checkpoint)]) == 2


def test_a_finished_run_replaces_the_file_and_leaves_no_temp_files(tmp_path, capsys):
    existing = tmp_path / "run.json"
    results.write_json_atomic(existing, bench_docs.results_doc([], device="cpu"))
    old = os.umask(0o022)
    try:
        assert cli.main(["run", "--case", "cpu-smoke", "--impl", "sdpa-math", "--json", str(existing), *FAST]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert os.listdir(tmp_path) == ["run.json"]  # no checkpoint, no temp file
    assert existing.stat().st_mode & 0o777 == 0o644
    doc = results.load_results(existing)
    assert [r["impl"] for r in doc["records"]] == ["sdpa-math"] and not results.is_partial(doc)
