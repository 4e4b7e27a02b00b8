"""ci/gate.py and the ci/ scripts around it, on the CPU.

asv results are written by asv 0.6.6 itself (Results.add_result + save, the code path of `asv run`),
so the gate reads exactly what a GPU runner leaves behind; sparsek-bench results go through
sparsek.bench.results. The end-to-end tests run ci/gate.sh, ci/bench.sh and ci/push-results.sh on
a throwaway git repository whose "kernel" gets 8% slower in its second commit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import bench_docs
import pytest

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "ci"
MACHINE = "node7-nvidia-h200"
BASE_SHA = "a" * 40
HEAD_SHA = "b" * 40


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"ci_{name}", CI / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gate = load_script("gate")
asv_conf = load_script("asv_conf")
fingerprint = load_script("fingerprint")


def timings(seed: int, n: int = 30, scale: float = 1.0, noise: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [250e-6 * scale * (1 + rng.gauss(0, noise)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# asv results, written by asv


TRACK_LATENCY = "bench_prefill.Prefill.track_latency"
TRACK_TFLOPS = "bench_prefill.Prefill.track_tflops"
TIME_SELECT = "bench_selection.Selection.time_select"
PARAMS = [["'seed'", "'long-16k'"], ["'sparsek'", "'sdpa-cudnn'"]]


def benchmarks_json(results_dir: Path, versions: dict[str, str] | None = None) -> None:
    from asv import util

    versions = versions or {}
    meta = {
        TRACK_LATENCY: {"type": "track", "unit": "seconds", "params": PARAMS, "param_names": ["case", "impl"]},
        TRACK_TFLOPS: {"type": "track", "unit": "TFLOP/s", "params": PARAMS, "param_names": ["case", "impl"]},
        TIME_SELECT: {"type": "time", "unit": "seconds", "params": [], "param_names": []},
    }
    for name, b in meta.items():
        b.update(name=name, version=versions.get(name, "1"))
    util.write_json(str(results_dir / "benchmarks.json"), meta, api_version=2)


def write_asv(results_dir: Path, commit: str, *, machine=MACHINE, scale=1.0, seed=0, record_samples=True,
              skip_long_cudnn=True, versions=None) -> Path:
    """One `asv run` worth of results: track_latency with samples, a skipped combination, a
    TFLOP/s track without samples, and a plain time_ benchmark. Returns the result file."""
    from asv import util
    from asv.results import Results
    from asv.runner import BenchmarkResult

    versions = versions or {}
    params = {"machine": machine, "gpu": "NVIDIA H200", "python": "3.11"}
    results = Results(params, {}, commit, 1_790_000_000_000, "3.11", "existing-py_python3.11", {})

    latency, latency_samples, number = [], [], []
    for i, combo in enumerate((("seed", "sparsek"), ("seed", "sdpa-cudnn"), ("long-16k", "sparsek"),
                               ("long-16k", "sdpa-cudnn"))):
        if skip_long_cudnn and combo == ("long-16k", "sdpa-cudnn"):
            # NotImplementedError in setup: asv_runner reports NaN and no samples.
            latency.append(math.nan)
            latency_samples.append(None)
            number.append(None)
            continue
        factor = scale if combo[1] == "sparsek" else 1.0
        latency.append(True)  # what runner.py stores for a {"samples", "number"} return
        latency_samples.append(timings(seed * 10 + i, scale=factor))
        number.append(1)
    results.add_result(
        {"name": TRACK_LATENCY, "version": versions.get(TRACK_LATENCY, "1"), "params": PARAMS},
        BenchmarkResult(result=latency, samples=latency_samples, number=number, errcode=0, stderr="",
                        profile=None),
        record_samples=record_samples,
    )
    results.add_result(
        {"name": TRACK_TFLOPS, "version": "1", "params": PARAMS},
        BenchmarkResult(result=[512.0, 600.0, 420.0, math.nan], samples=[None] * 4, number=[None] * 4,
                        errcode=0, stderr="", profile=None),
        record_samples=record_samples,
    )
    results.add_result(
        {"name": TIME_SELECT, "version": "1", "params": []},
        BenchmarkResult(result=[True], samples=[timings(seed * 10 + 9, n=20)], number=[3], errcode=0,
                        stderr="", profile=None),
        record_samples=record_samples,
    )
    results.save(str(results_dir))
    util.write_json(str(results_dir / machine / "machine.json"), {"machine": machine, "gpu": "NVIDIA H200"},
                    api_version=1)
    benchmarks_json(results_dir, versions)
    return results_dir / machine / f"{commit[:8]}-existing-py_python3.11.json"


def run_gate(capsys, *argv):
    code = gate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows_by_key(json_path: Path) -> dict[str, dict]:
    return {row["key"]: row for row in json.loads(json_path.read_text())["rows"]}


@pytest.fixture
def asv_pair(tmp_path):
    pytest.importorskip("asv")
    base_dir, head_dir = tmp_path / "base", tmp_path / "head"
    write_asv(base_dir, BASE_SHA, seed=1)
    write_asv(head_dir, HEAD_SHA, seed=2, scale=1.08)
    return base_dir, head_dir


def test_asv_regression_fails_with_a_summary(asv_pair, tmp_path, capsys, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base_dir, head_dir = asv_pair
    code, out, _ = run_gate(capsys, base_dir, head_dir, "--json", tmp_path / "gate.json")
    assert code == 1
    rows = rows_by_key(tmp_path / "gate.json")
    key = f"{TRACK_LATENCY}('seed', 'sparsek')"
    assert rows[key]["verdict"] == "regression"
    assert rows[key]["ratio"] == pytest.approx(1.08, rel=0.01)
    assert rows[f"{TRACK_LATENCY}('long-16k', 'sparsek')"]["verdict"] == "regression"
    assert rows[f"{TRACK_LATENCY}('seed', 'sdpa-cudnn')"]["verdict"] == "unchanged"
    assert rows[TIME_SELECT]["verdict"] == "unchanged"
    # Skipped combinations and non-time tracks are not benchmarks of the gate.
    assert f"{TRACK_LATENCY}('long-16k', 'sdpa-cudnn')" not in rows
    assert not any(TRACK_TFLOPS in k for k in rows)
    assert "| bench_prefill.Prefill.track_latency('seed', 'sparsek') |" in out
    assert "FAIL: significant regression" in out
    assert f"commit `{HEAD_SHA[:12]}`, machine `{MACHINE}`" in out
    text = summary.read_text()
    assert text.startswith("earlier step\n### Performance gate")
    assert "**regression**" in text


def test_asv_a_a_passes(tmp_path, capsys):
    pytest.importorskip("asv")
    write_asv(tmp_path / "base", BASE_SHA, seed=1)
    write_asv(tmp_path / "head", HEAD_SHA, seed=2)
    code, out, _ = run_gate(capsys, tmp_path / "base", tmp_path / "head")
    assert code == 0
    assert "PASS: no significant regression" in out
    assert "regression |" not in out


def test_asv_single_files_and_bench_filter(asv_pair, capsys, tmp_path):
    base_dir, head_dir = asv_pair
    base_file = next((base_dir / MACHINE).glob(f"{BASE_SHA[:8]}-*.json"))
    head_file = next((head_dir / MACHINE).glob(f"{HEAD_SHA[:8]}-*.json"))
    code, _, _ = run_gate(capsys, base_file, head_file, "--bench", "sdpa-cudnn|time_select", "--json",
                          tmp_path / "g.json")
    assert code == 0
    assert set(rows_by_key(tmp_path / "g.json")) == {f"{TRACK_LATENCY}('seed', 'sdpa-cudnn')", TIME_SELECT}


def test_asv_results_dir_with_both_commits(tmp_path, capsys):
    """benchmarks/results of a runner holds many commits: pick base and head by commit prefix."""
    pytest.importorskip("asv")
    results = tmp_path / "results"
    write_asv(results, BASE_SHA, seed=1)
    write_asv(results, HEAD_SHA, seed=2, scale=1.08)
    code, _, err = run_gate(capsys, results, results)
    assert code == 2 and "2 commits" in err and "--base-commit" in err
    code, _, _ = run_gate(capsys, results, results, "--base-commit", BASE_SHA[:7], "--head-commit", HEAD_SHA[:7])
    assert code == 1
    code, _, err = run_gate(capsys, results, results, "--base-commit", "c0ffee")
    assert code == 2 and "no asv result file for commit c0ffee" in err


def test_asv_results_of_two_machines_need_a_machine(tmp_path, capsys):
    pytest.importorskip("asv")
    results = tmp_path / "results"
    write_asv(results, BASE_SHA, seed=1)
    write_asv(results, BASE_SHA, seed=3, machine="node8-nvidia-h100-80gb-hbm3")
    write_asv(tmp_path / "head", HEAD_SHA, seed=2)
    code, _, err = run_gate(capsys, results, tmp_path / "head")
    assert code == 2 and "2 machines" in err
    code, _, _ = run_gate(capsys, results, tmp_path / "head", "--machine", MACHINE)
    assert code == 0


def test_different_machines_are_called_out(tmp_path, capsys):
    pytest.importorskip("asv")
    write_asv(tmp_path / "base", BASE_SHA, seed=1)
    write_asv(tmp_path / "head", HEAD_SHA, seed=2, machine="node8-nvidia-h100-80gb-hbm3")
    code, out, _ = run_gate(capsys, tmp_path / "base", tmp_path / "head")
    assert code == 0
    assert "not comparable" in out


def test_asv_without_recorded_samples_cannot_decide(tmp_path, capsys):
    """`asv run` without --record-samples keeps only the median: the gate must not pass on that."""
    pytest.importorskip("asv")
    write_asv(tmp_path / "base", BASE_SHA, seed=1, record_samples=False)
    write_asv(tmp_path / "head", HEAD_SHA, seed=2, scale=1.5, record_samples=False)
    code, out, err = run_gate(capsys, tmp_path / "base", tmp_path / "head", "--json", tmp_path / "g.json")
    assert code == 2
    assert "--record-samples" in err
    assert "NO VERDICT" in out
    rows = rows_by_key(tmp_path / "g.json")
    assert {row["verdict"] for row in rows.values()} == {"too-few-samples"}
    assert rows[f"{TRACK_LATENCY}('seed', 'sparsek')"]["ratio"] == pytest.approx(1.5, rel=0.02)


def test_changed_benchmark_version_is_not_compared(tmp_path, capsys):
    pytest.importorskip("asv")
    write_asv(tmp_path / "base", BASE_SHA, seed=1)
    write_asv(tmp_path / "head", HEAD_SHA, seed=2, scale=1.5, versions={TRACK_LATENCY: "2"})
    code, out, _ = run_gate(capsys, tmp_path / "base", tmp_path / "head", "--json", tmp_path / "g.json")
    assert code == 0  # only time_select is left to compare, and it did not change
    rows = rows_by_key(tmp_path / "g.json")
    assert rows[f"{TRACK_LATENCY}('seed', 'sparsek')"]["verdict"] == "missing-in-base"
    assert "version differs" in out


def test_asv_samples_without_benchmarks_json_keeps_sampled_benchmarks(asv_pair):
    base_dir, _ = asv_pair
    data = json.loads(next((base_dir / MACHINE).glob("*-existing-*.json")).read_text())
    samples, versions = gate.asv_samples(data, None)
    assert set(samples) == {
        f"{TRACK_LATENCY}('seed', 'sparsek')",
        f"{TRACK_LATENCY}('seed', 'sdpa-cudnn')",
        f"{TRACK_LATENCY}('long-16k', 'sparsek')",
        TIME_SELECT,
    }
    assert all(len(v) in (20, 30) for v in samples.values())
    assert versions[TIME_SELECT] == "1"


# ------------------------------------------------------------------------------------------------
# sparsek-bench results


def bench_records(scale: float, seed: int) -> list[dict]:
    records = [bench_docs.ok("seed", impl, timings(seed * 10 + i, scale=scale if impl == "sparsek" else 1.0))
               for i, impl in enumerate(("sparsek", "sdpa-cudnn", "flex-window"))]
    return records + [bench_docs.broken("seed", "vllm-paged", "skipped", "vllm is not installed")]


def write_bench(path: Path, scale: float, seed: int, *, records: list[dict] | None = None, finished=True) -> Path:
    from sparsek.bench.results import write_json_atomic

    doc = bench_docs.results_doc(bench_records(scale, seed) if records is None else records, finished=finished)
    return write_json_atomic(path, doc)


def test_sparsek_bench_regression(tmp_path, capsys):
    base = write_bench(tmp_path / "base.json", 1.0, 1)
    head = write_bench(tmp_path / "head.json", 1.08, 2)
    code, out, _ = run_gate(capsys, base, head, "--json", tmp_path / "g.json")
    assert code == 1
    rows = rows_by_key(tmp_path / "g.json")
    assert rows["seed/sparsek"]["verdict"] == "regression"
    assert rows["seed/sdpa-cudnn"]["verdict"] == "unchanged"
    assert "seed/vllm-paged" not in rows
    assert "Base: sparsek-bench." in out


def test_sparsek_bench_rounds_pool_their_samples(tmp_path, capsys):
    for r in range(2):
        write_bench(tmp_path / "base" / f"round-{r}.json", 1.0, 1 + r)
        write_bench(tmp_path / "head" / f"round-{r}.json", 1.0, 5 + r)
    code, _, _ = run_gate(capsys, tmp_path / "base", tmp_path / "head", "--json", tmp_path / "g.json")
    assert code == 0
    row = rows_by_key(tmp_path / "g.json")["seed/sparsek"]
    assert (row["n_base"], row["n_head"]) == (60, 60)
    # Comma-separated paths pool the same way.
    code, _, _ = run_gate(capsys, f"{tmp_path}/base/round-0.json,{tmp_path}/base/round-1.json",
                          tmp_path / "head" / "round-0.json", "--json", tmp_path / "g.json")
    assert rows_by_key(tmp_path / "g.json")["seed/sparsek"]["n_base"] == 60


def replaced(records: list[dict], impl: str, record: dict | None) -> list[dict]:
    """records with seed/<impl> replaced by record (None: dropped)."""
    return [record if r["impl"] == impl else r for r in records if r["impl"] != impl or record is not None]


BROKEN_HEADS = {
    "timeout": (bench_docs.broken("seed", "sparsek", "timeout", "exceeded the per-record timeout of 300 s"),
                "failed-in-head", "head timeout: exceeded the per-record timeout of 300 s"),
    "crash": (bench_docs.broken("seed", "sparsek", "failed", "RuntimeError: CUDA error: an illegal memory access"),
              "failed-in-head", "head failed: RuntimeError: CUDA error: an illegal memory access"),
    "oom": (bench_docs.broken("seed", "sparsek", "oom", "CUDA out of memory"), "failed-in-head", "head oom"),
    "missing": (None, "missing-in-head", None),
    "skipped": (bench_docs.broken("seed", "sparsek", "skipped", "no kernels for this GPU"), "missing-in-head", None),
}


@pytest.mark.parametrize("planted", list(BROKEN_HEADS))
def test_a_broken_head_fails_the_gate(planted, tmp_path, capsys, monkeypatch):
    """A head whose sparsek benchmark timed out, crashed or vanished must not pass: nothing slow
    was measured, because nothing was measured."""
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    record, verdict, detail = BROKEN_HEADS[planted]
    base = write_bench(tmp_path / "base.json", 1.0, 1)
    head = write_bench(tmp_path / "head.json", 1.0, 2, records=replaced(bench_records(1.0, 2), "sparsek", record))
    code, out, _ = run_gate(capsys, base, head, "--json", tmp_path / "g.json")
    assert code == 1
    row = rows_by_key(tmp_path / "g.json")["seed/sparsek"]
    assert row["verdict"] == verdict
    if detail:
        assert row["detail"].startswith(detail)
    assert rows_by_key(tmp_path / "g.json")["seed/sdpa-cudnn"]["verdict"] == "unchanged"
    assert "FAIL: 1 benchmark of base failed or missing in head" in out
    assert f"**{verdict}**" in summary.read_text()


def test_a_benchmark_that_base_failed_too_does_not_fail_the_gate(tmp_path, capsys):
    timeout = bench_docs.broken("seed", "sparsek", "timeout", "exceeded the per-record timeout of 300 s")
    base = write_bench(tmp_path / "base.json", 1.0, 1, records=replaced(bench_records(1.0, 1), "sparsek", timeout))
    head = write_bench(tmp_path / "head.json", 1.0, 2, records=replaced(bench_records(1.0, 2), "sparsek", timeout))
    code, out, _ = run_gate(capsys, base, head, "--json", tmp_path / "g.json")
    assert code == 0 and "PASS" in out
    assert rows_by_key(tmp_path / "g.json")["seed/sparsek"]["verdict"] == "failed-in-both"
    # Base failed it, head measured it: nothing to compare against, and nothing broken by head.
    head = write_bench(tmp_path / "head.json", 1.0, 2)
    code, _, _ = run_gate(capsys, base, head, "--json", tmp_path / "g.json")
    assert code == 0
    assert rows_by_key(tmp_path / "g.json")["seed/sparsek"]["verdict"] == "failed-in-base"


def test_a_timeout_in_one_head_round_fails_although_another_round_measured_it(tmp_path, capsys):
    timeout = bench_docs.broken("seed", "sparsek", "timeout", "exceeded the per-record timeout of 300 s")
    for r in range(2):
        write_bench(tmp_path / "base" / f"round-{r}.json", 1.0, 1 + r)
    write_bench(tmp_path / "head" / "round-0.json", 1.0, 5)
    write_bench(tmp_path / "head" / "round-1.json", 1.0, 6, records=replaced(bench_records(1.0, 6), "sparsek", timeout))
    code, _, _ = run_gate(capsys, tmp_path / "base", tmp_path / "head", "--json", tmp_path / "g.json")
    assert code == 1
    assert rows_by_key(tmp_path / "g.json")["seed/sparsek"]["verdict"] == "failed-in-head"


def test_asv_benchmark_lost_in_head_fails_the_gate(tmp_path, capsys):
    """asv keeps no record of a benchmark that failed: measured in base and absent in head fails."""
    pytest.importorskip("asv")
    write_asv(tmp_path / "base", BASE_SHA, seed=1, skip_long_cudnn=False)
    write_asv(tmp_path / "head", HEAD_SHA, seed=2)
    code, out, _ = run_gate(capsys, tmp_path / "base", tmp_path / "head", "--json", tmp_path / "g.json")
    assert code == 1
    assert rows_by_key(tmp_path / "g.json")[f"{TRACK_LATENCY}('long-16k', 'sdpa-cudnn')"]["verdict"] == "missing-in-head"
    assert "failed or missing in head" in out


def test_a_head_run_that_errored_fails_with_the_error_in_the_summary(tmp_path, capsys, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base = write_bench(tmp_path / "base.json", 1.0, 1)
    (tmp_path / "head").mkdir()  # the crashed run wrote nothing
    error = "round 1: sparsek-bench exited with status 1: RuntimeError: CUDA error: unspecified launch failure"
    code, out, _ = run_gate(capsys, base, tmp_path / "head", "--head-error", error)
    assert code == 1
    assert "FAIL: 3 benchmarks of base failed or missing in head; the head run errored" in out
    text = summary.read_text()
    assert error in text and "head results unusable" in text
    # A head run that errored after writing complete results still fails the gate.
    head = write_bench(tmp_path / "head.json", 1.0, 2)
    code, out, _ = run_gate(capsys, base, head, "--head-error", error)
    assert code == 1 and "FAIL: the head run errored" in out
    # A base run error is only reported.
    code, out, _ = run_gate(capsys, base, head, "--base-error", "round 2: sparsek-bench exited with status 137")
    assert code == 0 and "base run error: round 2" in out


def test_partial_runs_are_refused_unless_allowed(tmp_path, capsys):
    base = write_bench(tmp_path / "base.json", 1.0, 1)
    head = write_bench(tmp_path / "head.json", 1.0, 2, finished=False)
    code, _, err = run_gate(capsys, base, head)
    assert code == 2
    assert err.count("\n") == 1 and "PARTIAL RUN" in err and "--allow-partial" in err
    code, out, _ = run_gate(capsys, base, head, "--allow-partial")
    assert code == 0 and "PARTIAL RUN" in out  # accepted, and said so under the table


def test_gate_json_is_written_atomically_with_the_usual_mode(tmp_path, capsys):
    base = write_bench(tmp_path / "base.json", 1.0, 1)
    out_dir = tmp_path / "out"
    old = os.umask(0o022)
    try:
        code, _, _ = run_gate(capsys, base, base, "--json", out_dir / "g.json")
    finally:
        os.umask(old)
    assert code == 0
    assert os.listdir(out_dir) == ["g.json"]
    assert (out_dir / "g.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((out_dir / "g.json").read_text())["outcome"] == "PASS: no significant regression"


def test_bad_inputs_exit_2(tmp_path, capsys):
    pytest.importorskip("asv")
    bench = write_bench(tmp_path / "b.json", 1.0, 1)
    asv_file = write_asv(tmp_path / "asv", BASE_SHA, seed=1)
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{")
    for base, head, message in [
        (tmp_path / "nowhere", bench, "no such file"),
        (f"{bench},{asv_file}", bench, "mixes asv results"),
        (tmp_path / "other.json", bench, "not a sparsek-bench results file"),
        (tmp_path / "broken.json", bench, "cannot read JSON"),
        (tmp_path / "empty", bench, "no result files"),
    ]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        code, _, err = run_gate(capsys, base, head)
        assert code == 2, message
        assert message in err
    with pytest.raises(SystemExit) as exc:
        gate.main([str(bench), str(bench), "--alpha", "1.5"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------------
# ci/asv_conf.py and ci/fingerprint.py


def test_asv_conf_copy_is_absolute_and_names_head(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "asv.conf.json").write_text(
        '{\n  // asv\'s quickstart keeps comments\n  "version": 1, "project": "sparsek", "repo": ".",\n'
        '  "branches": ["main"], "environment_type": "existing", "show_commit_url": "https://x//commit/",\n'
        '  "benchmark_dir": "benchmarks", "results_dir": "benchmarks/results", "html_dir": "html"\n}\n'
    )
    out = tmp_path / "conf" / "asv.conf.json"
    assert asv_conf.main(["--checkout", str(checkout), "--results", str(tmp_path / "scratch" / "r"), "--out", str(out)]) == 0
    conf = json.loads(out.read_text())
    assert conf["repo"] == str(checkout.resolve())
    assert conf["benchmark_dir"] == str(checkout.resolve() / "benchmarks")
    assert conf["results_dir"] == str((tmp_path / "scratch" / "r").resolve())
    assert conf["html_dir"] == str((tmp_path / "scratch" / "r-html").resolve())
    assert conf["branches"] == ["HEAD"]
    assert conf["show_commit_url"] == "https://x//commit/"  # a // inside a string is no comment
    assert conf["version"] == 1
    default = asv_conf.derive(checkout / "asv.conf.json", checkout)
    assert default["results_dir"] == str(checkout.resolve() / "benchmarks" / "results")


def test_fingerprint_identity_and_throttling():
    fp = {
        "source": "nvml", "name": "NVIDIA H200", "driver": "580.95.05", "throttled": False,
        "software": {"cuda_runtime": "13.0"},
    }
    assert fingerprint.identity_from_fingerprint(fp) == {"gpu": "NVIDIA H200", "gpu_driver": "580.95.05", "cuda": "13.0"}
    assert fingerprint.find_throttled(fp) is False
    assert fingerprint.find_throttled({"a": [{"throttled": False}, {"clocks": {"throttled": True}}]}) is True
    assert fingerprint.find_throttled({"throttled": None}) is None
    assert fingerprint.identity_from_fingerprint({"source": "cpu", "name": "x86_64"})["gpu"] == "cpu"
    assert fingerprint.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert fingerprint.slug("$(rm -rf /); `x`") == "rm-rf-x"
    record = fingerprint.machine_record({"gpu": "NVIDIA H200", "gpu_driver": "", "cuda": ""}, "default", None)
    assert record["machine"].endswith("-nvidia-h200")
    assert fingerprint.machine_record(record, "locked-1980MHz", "My Box")["machine"] == "my-box"


def test_fingerprint_registers_the_asv_machine(tmp_path, monkeypatch, capsys):
    pytest.importorskip("asv")
    from asv.machine import MachineCollection

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPARSEK_ASV_MACHINE", "gpu-box")
    monkeypatch.setenv("SPARSEK_CLOCK_POLICY", "locked-1755MHz")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    github_output = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(github_output))
    fp = tmp_path / "fingerprint.json"
    fp.write_text(json.dumps({"source": "nvml", "name": "NVIDIA H200", "driver": "580.95.05", "throttled": True,
                              "throttle_reasons": ["SwPowerCap"], "software": {"cuda_runtime": "13.0"}}))
    assert fingerprint.main(["--fingerprint", str(fp), "--out-dir", str(tmp_path / "out")]) == 0
    assert "::warning title=GPU throttled::" in capsys.readouterr().out
    saved = MachineCollection.load("gpu-box", _path=str(tmp_path / ".asv-machine.json"))
    assert saved["gpu"] == "NVIDIA H200" and saved["cuda"] == "13.0" and saved["clock_policy"] == "locked-1755MHz"
    assert saved["os"] and saved["ram"]  # asv's own defaults are kept
    env = (tmp_path / "out" / "machine.env").read_text()
    assert env == "SPARSEK_ASV_MACHINE=gpu-box\nSPARSEK_GPU=nvidia-h200\nSPARSEK_THROTTLED=true\n"
    assert github_output.read_text() == "machine=gpu-box\nthrottled=true\n"


# ------------------------------------------------------------------------------------------------
# End to end: the scripts on a throwaway repository


TOY_BENCHMARK = '''
import random

import sparsek


class Kernel:
    params = [["seed"]]
    param_names = ["case"]
    unit = "seconds"
    version = "1"

    def track_latency(self, case):
        rng = random.Random()
        return {"samples": [sparsek.COST * 250e-6 * (1 + rng.gauss(0, 0.01)) for _ in range(30)], "number": 1}
'''

# `python -m sparsek.bench.cli run --default --json PATH` of the toy package (SPARSEK_GATE_TOOL=
# sparsek-bench): one record timed like the asv benchmark; a COST of None crashes the run.
TOY_CLI = '''
import random
import statistics
import sys

import sparsek
from sparsek.bench.results import new_results, write_final


def main(argv):
    if argv[:1] != ["run"]:
        return 1
    if sparsek.COST is None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    rng = random.Random()
    samples = [sparsek.COST * 250e-6 * (1 + rng.gauss(0, 0.01)) for _ in range(30)]
    q1, median, q3 = statistics.quantiles(samples, n=4)
    timing = {"samples": samples, "median": median, "iqr": q3 - q1, "rel_iqr": (q3 - q1) / median,
              "count": len(samples)}
    doc = new_results({"started": "t0", "finished": "t1", "device": {"name": "cpu"}})
    doc["records"] = [{"case": "seed", "impl": "sparsek", "status": "ok", "timing": timing}]
    write_final(argv[argv.index("--json") + 1], doc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

TOY_CONF = {
    "version": 1, "project": "sparsek", "repo": ".", "branches": ["main"], "environment_type": "existing",
    "launch_method": "spawn", "benchmark_dir": "benchmarks", "results_dir": "benchmarks/results", "html_dir": "html",
}


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def toy_repo(tmp_path):
    """Two commits of a package named sparsek (so that ci/gate.py finds its modules) with one
    asv benchmark; the second commit is 8% slower."""
    pytest.importorskip("asv")
    # The scripts call `asv`: give them this interpreter's (`python -m asv`), found whether or not its
    # scripts directory is on PATH.
    shim_dir = tmp_path / "asv-bin"
    shim_dir.mkdir()
    (shim_dir / "asv").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m asv "$@"\n')
    (shim_dir / "asv").chmod(0o755)
    repo = tmp_path / "toy"
    (repo / "ci").mkdir(parents=True)
    for name in ("gate.sh", "gate.py", "asv_conf.py", "fingerprint.sh", "fingerprint.py", "bench.sh",
                 "push-results.sh"):
        shutil.copy2(CI / name, repo / "ci" / name)
    (repo / "sparsek" / "bench").mkdir(parents=True)
    for name in ("compare.py", "asv_results.py", "results.py", "results_schema.py"):  # what ci/gate.py imports
        shutil.copy2(REPO / "sparsek" / "bench" / name, repo / "sparsek" / "bench" / name)
    (repo / "sparsek" / "bench" / "cli.py").write_text(TOY_CLI)
    (repo / "sparsek" / "__init__.py").write_text("COST = 1.0\n")
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "__init__.py").write_text("")
    (repo / "benchmarks" / "bench_kernel.py").write_text(TOY_BENCHMARK)
    (repo / "asv.conf.json").write_text(json.dumps(TOY_CONF, indent=2))
    (repo / ".gitignore").write_text("/out/\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    (repo / "sparsek" / "__init__.py").write_text("COST = 1.08\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "slower")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),  # ~/.asv-machine.json of the test only
        "SPARSEK_SKIP_INSTALL": "1",
        "SPARSEK_ASV_MACHINE": "toy-box",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    for key in ("GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT", "GITHUB_ACTIONS", "PYTHONPATH"):
        env.pop(key, None)
    return repo, env


@pytest.mark.slow
def test_gate_sh_catches_the_slower_commit(toy_repo):
    repo, env = toy_repo
    summary = repo.parent / "summary.md"
    env = env | {"GITHUB_STEP_SUMMARY": str(summary), "SPARSEK_GATE_ROUNDS": "2"}
    proc = subprocess.run(["bash", "ci/gate.sh", "HEAD~1", "HEAD"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # Two rounds (base-head, then head-base), 30 samples each, pooled per side.
    assert "| bench_kernel.Kernel.track_latency('seed') |" in proc.stdout
    assert "| 60/60 | **regression** |" in proc.stdout
    assert "Performance gate on toy-box" in summary.read_text()
    gate_json = json.loads((repo / "out" / "gate" / "gate.json").read_text())
    assert gate_json["base"]["commit"] == git(repo, "rev-parse", "HEAD~1")
    assert gate_json["head"]["commit"] == git(repo, "rev-parse", "HEAD")
    # The worktrees are gone and the committed results dir was never written.
    assert git(repo, "worktree", "list").count("\n") == 0
    assert not (repo / "benchmarks" / "results").exists()


def commit_broken_head(repo: Path) -> None:
    """A third commit whose kernel crashes: the asv benchmark raises, the toy run exits 1."""
    (repo / "sparsek" / "__init__.py").write_text("COST = None\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "broken")


@pytest.mark.slow
def test_gate_sh_fails_a_head_whose_benchmark_crashes(toy_repo):
    """asv keeps no record of the failed benchmark: it is measured in base and missing in head."""
    repo, env = toy_repo
    commit_broken_head(repo)
    summary = repo.parent / "summary.md"
    env = env | {"GITHUB_STEP_SUMMARY": str(summary), "SPARSEK_GATE_ROUNDS": "1"}
    proc = subprocess.run(["bash", "ci/gate.sh", "HEAD~2", "HEAD"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "asv reported failed benchmarks for head" in proc.stderr
    assert "| bench_kernel.Kernel.track_latency('seed') |" in proc.stdout and "**missing-in-head**" in proc.stdout
    assert "FAIL: 1 benchmark of base failed or missing in head" in summary.read_text()


@pytest.mark.slow
def test_gate_sh_fails_a_head_run_that_errors_with_the_error_in_the_summary(toy_repo):
    repo, env = toy_repo
    commit_broken_head(repo)
    summary = repo.parent / "summary.md"
    env = env | {"GITHUB_STEP_SUMMARY": str(summary), "SPARSEK_GATE_ROUNDS": "1", "SPARSEK_GATE_TOOL": "sparsek-bench"}
    proc = subprocess.run(["bash", "ci/gate.sh", "HEAD~2", "HEAD"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = summary.read_text()
    assert "FAIL: 1 benchmark of base failed or missing in head; the head run errored" in text
    assert ("**head run error**: round 1: sparsek-bench exited with status 1: "
            "RuntimeError: CUDA error: an illegal memory access was encountered") in text
    # The same tool on a healthy head passes: the error path is the head's, not the harness's.
    proc = subprocess.run(["bash", "ci/gate.sh", "HEAD~2", "HEAD~2"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr  # 30 vs 30 samples: pass (2 only if undecidable)
    assert "head run error" not in proc.stdout


@pytest.mark.slow
def test_six_concurrent_pushers_all_land(tmp_path):
    """Jittered exponential backoff: pushers that collided spread out instead of colliding again."""
    repo = tmp_path / "checkout"
    (repo / "ci").mkdir(parents=True)
    shutil.copy2(CI / "push-results.sh", repo / "ci" / "push-results.sh")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    git(repo, "remote", "add", "origin", str(remote))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "SPARSEK_PUSH_BACKOFF_MS": "200", "SPARSEK_PUSH_MAX_WAIT_MS": "3000"}
    pushers = []
    for i in range(6):
        staged = tmp_path / f"box-{i}" / "benchmarks" / "results" / f"box-{i}"
        staged.mkdir(parents=True)
        (staged / "machine.json").write_text(json.dumps({"machine": f"box-{i}"}))
        pushers.append(subprocess.Popen(["bash", "ci/push-results.sh", str(tmp_path / f"box-{i}"), f"box-{i}"],
                                        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [(p.wait(timeout=300), p.stdout.read()) for p in pushers]
    assert all(code == 0 for code, _ in outputs), outputs
    listing = git(remote, "ls-tree", "-r", "--name-only", "benchmark-results").splitlines()
    assert sorted(listing) == [f"benchmarks/results/box-{i}/machine.json" for i in range(6)]
    assert len(git(remote, "log", "--format=%s", "benchmark-results").splitlines()) == 6


def test_push_results_refuses_bad_retry_settings(tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "f").write_text("x")
    proc = subprocess.run(["bash", str(CI / "push-results.sh"), str(staged)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "SPARSEK_PUSH_ATTEMPTS": "many"}, timeout=60)
    assert proc.returncode == 2 and "'many' is not a whole number" in proc.stderr


@pytest.mark.slow
def test_bench_sh_stages_results_and_push_results_publishes_them(toy_repo, tmp_path):
    repo, env = toy_repo
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    git(repo, "remote", "add", "origin", str(remote))
    sha = git(repo, "rev-parse", "HEAD")

    proc = subprocess.run(["bash", "ci/bench.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    staged = repo / "out" / "results"
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert len(files) == 3
    assert files[0] == "benchmarks/results/benchmarks.json"
    assert files[1].startswith(f"benchmarks/results/toy-box/{sha[:8]}-existing-")
    assert files[2] == "benchmarks/results/toy-box/machine.json"
    result = json.loads((staged / files[1]).read_text())
    assert result["commit_hash"] == sha
    assert result["params"]["gpu"] == "cpu" and result["params"]["machine"] == "toy-box"

    def push_dir(directory, message="results"):
        return subprocess.run(["bash", "ci/push-results.sh", str(directory), message], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)

    def push(message):
        return push_dir(staged, message)

    proc = push("first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = git(remote, "ls-tree", "-r", "--name-only", "benchmark-results").splitlines()
    assert "benchmarks/results/toy-box/machine.json" in listing
    assert len(listing) == 3
    # Nothing new: no empty commit. Another machine's results: one more commit on top, old files kept.
    assert "already has these results" in push("again").stdout
    other = tmp_path / "other" / "benchmarks" / "results" / "other-box"
    other.mkdir(parents=True)
    (other / "machine.json").write_text("{}")
    proc = push_dir(tmp_path / "other", "second")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(git(remote, "ls-tree", "-r", "--name-only", "benchmark-results").splitlines()) == 4
    assert git(remote, "log", "--format=%s", "benchmark-results").splitlines() == ["second", "first"]

    # Two runs pushing at once: whichever loses the race rebuilds on the winner's commit.
    racers = []
    for name in ("box-a", "box-b"):
        machine_dir = tmp_path / name / "benchmarks" / "results" / name
        machine_dir.mkdir(parents=True)
        (machine_dir / "machine.json").write_text(json.dumps({"machine": name}))
        racers.append(subprocess.Popen(["bash", "ci/push-results.sh", str(tmp_path / name), name], cwd=repo,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stdout.read()
    listing = git(remote, "ls-tree", "-r", "--name-only", "benchmark-results").splitlines()
    assert {"benchmarks/results/box-a/machine.json", "benchmarks/results/box-b/machine.json"} <= set(listing)
    assert len(listing) == 6
    (tmp_path / "empty").mkdir()
    assert "nothing staged" in push_dir(tmp_path / "empty").stdout
    # The results gate.py reads straight from the branch layout.
    code = gate.main([str(staged / "benchmarks" / "results")] * 2)
    assert code == 0
