"""The results file (atomic, versioned) and the runner's promise: one bad record never loses the others."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from sparsek.bench import results, runner
from sparsek.bench.cases import CASES
from sparsek.bench.impls import base, get_impl

QUICK = runner.RunOptions(quick=True, peaks=False, timeout_s=2.0,
                          timing={"min_samples": 3, "max_time_s": 0.05, "warmup": 1, "warmup_s": 0.0})


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "r.json"
    results.write_json_atomic(path, {"a": 1, "x": math.inf, "y": [math.nan]})
    assert json.loads(path.read_text()) == {"a": 1, "x": "inf", "y": ["nan"]}
    with pytest.raises(TypeError):
        results.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["a"] == 1  # the old file survives a failed write
    assert os.listdir(path.parent) == ["r.json"]  # and no temp file is left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = results.write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_a_write_removes_the_temp_files_of_killed_writers(tmp_path):
    """A SIGKILL skips every cleanup; the next write in the directory removes what it left."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = results._HOST
    stale = tmp_path / f".old.json.{host}.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".other.json.{host}.{os.getppid()}.0123abcd.tmp"  # a writer still running
    elsewhere = tmp_path / f".old.json.another-host.{dead.pid}.0123abcd.tmp"  # not ours to judge
    unrelated = tmp_path / ".notes.tmp"
    for path in (stale, live, elsewhere, unrelated):
        path.write_text("{")
    results.write_json_atomic(tmp_path / "new.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["new.json", live.name, elsewhere.name, unrelated.name])


def test_checkpoints_go_beside_the_results_file(tmp_path):
    path = tmp_path / "run.json"
    results.write_json_atomic(path, results.new_results({"finished": "t1"}))
    before = path.read_bytes()
    results.write_checkpoint(path, results.new_results({"finished": None}))
    assert path.read_bytes() == before  # a run in progress never touches the results file
    assert results.checkpoint_path(path) == tmp_path / "run.json.partial"
    assert results.is_partial(results.load_results(results.checkpoint_path(path)))
    results.write_final(path, results.new_results({"finished": "t2"}))
    assert os.listdir(tmp_path) == ["run.json"]
    assert results.load_results(path)["run"]["finished"] == "t2"


def test_load_checks_the_schema(tmp_path):
    good = tmp_path / "good.json"
    results.write_json_atomic(good, results.new_results({"argv": []}))
    assert results.load_results(good)["schema_version"] == results.SCHEMA_VERSION
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "sparsek-bench", "schema_version": 0}))
    with pytest.raises(ValueError, match="schema_version 0; this sparsek-bench reads version 1"):
        results.load_results(old)
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="not a sparsek-bench results file"):
        results.load_results(other)
    with pytest.raises(results.ResultsFileError, match="is a directory; expected a results file"):
        results.load_results(tmp_path)
    with pytest.raises(results.ResultsFileError, match="no such file"):
        results.load_results(tmp_path / "missing.json")


def test_samples_by_key_takes_ok_records_only():
    doc = {"records": [
        {"case": "seed", "impl": "sdpa-cudnn", "status": "ok", "timing": {"samples": [1.0, 2.0]}},
        {"case": "seed", "impl": "sparsek", "status": "skipped", "reason": "no kernels"},
        {"case": "seed", "impl": "flex-window", "status": "failed", "reason": "boom"},
    ]}
    assert results.samples_by_key(doc) == {"seed/sdpa-cudnn": [1.0, 2.0]}


class Boom(base.Impl):
    def __init__(self, id, exc):
        super().__init__(id, family="test", kind="prefill", pattern="dense-causal")
        self.exc = exc

    def prepare(self, case, inputs):
        if self.exc == "slow":
            time.sleep(30)
        raise self.exc


class WrongShape(base.Impl):
    def __init__(self):
        super().__init__("wrong-shape", family="test", kind="prefill", pattern="dense-causal")

    def prepare(self, case, inputs):
        return base.Prepared(fn=lambda: inputs.q[:, :, :3])


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    plan = [get_impl("sdpa-math"), Boom("boom", RuntimeError("kernel exploded")),
            Boom("oom", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")),
            Boom("slow", "slow"), WrongShape(), get_impl("sparsek"), get_impl("sdpa-flash")]
    monkeypatch.setattr(runner, "impls_for", lambda case: plan)
    seen = []

    def progress(line):  # after each record the checkpoint on disk already holds it
        if ": preparing" not in line and line.startswith("["):
            seen.append(len(results.load_results(results.checkpoint_path(path))["records"]))

    path = tmp_path / "run.json"
    doc = runner.run(["cpu-smoke"], options=QUICK, json_path=path, progress=progress)
    status = {r["impl"]: r["status"] for r in doc["records"]}
    assert status == {"sdpa-math": "ok", "boom": "failed", "oom": "oom", "slow": "timeout", "wrong-shape": "failed",
                      "sparsek": "skipped", "sdpa-flash": "ok"}
    by_id = {r["impl"]: r for r in doc["records"]}
    assert by_id["boom"]["reason"] == "RuntimeError: kernel exploded" and by_id["boom"]["traceback"]
    assert "exceeded the per-record timeout of 2 s" in by_id["slow"]["reason"]
    assert "returned shape (1, 4, 3, 32)" in by_id["wrong-shape"]["reason"]
    ok = by_id["sdpa-math"]
    assert ok["error"]["passed"] and ok["error"]["rows"] == 256 and ok["timing"]["count"] >= 3
    assert ok["metrics"]["us_per_iter"] == pytest.approx(ok["timing"]["median"] * 1e6)
    assert seen == [0, 1, 2, 3, 4, 5, 6]  # printed before the write of the record they report
    on_disk = results.load_results(path)
    assert not results.checkpoint_path(path).exists()  # the finished file replaces the checkpoint
    assert [r["impl"] for r in on_disk["records"]] == [i.id for i in plan]
    assert on_disk["run"]["finished"] and on_disk["run"]["status_counts"]["failed"] == 2
    assert {"T1", "T2", "T3"} <= {r["tier"] for r in on_disk["tiers"]}
    assert set(results.samples_by_key(on_disk)) == {"cpu-smoke/sdpa-math", "cpu-smoke/sdpa-flash"}


def test_an_interrupted_run_keeps_the_finished_records(tmp_path, monkeypatch):
    plan = [get_impl("sdpa-math"), Boom("interrupt", KeyboardInterrupt())]
    monkeypatch.setattr(runner, "impls_for", lambda case: plan)
    path = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        runner.run(["cpu-smoke"], options=QUICK, json_path=path)
    assert not path.exists()  # no results file for a run that did not finish
    checkpoint = results.load_results(results.checkpoint_path(path))
    assert [r["impl"] for r in checkpoint["records"]] == ["sdpa-math"]
    assert results.is_partial(checkpoint)


def test_cuda_cases_without_cuda_are_skipped_with_a_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    doc = runner.run(["seed"], ["sdpa-cudnn", "sparsek"], options=QUICK, json_path=tmp_path / "r.json")
    assert [(r["impl"], r["status"], r["reason"]) for r in doc["records"]] == [
        ("sparsek", "skipped", "CUDA is not available on this machine"),
        ("sdpa-cudnn", "skipped", "CUDA is not available on this machine")]
    assert doc["run"]["cases"]["seed"] == dict(CASES["seed"].__dict__)


def test_nvtx_ranges_nest_impl_inside_case(monkeypatch):
    from sparsek import _nvtx

    stack, seen = [], []

    class Range:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            stack.append(self.name)

        def __exit__(self, *exc):
            stack.pop()

    monkeypatch.setattr(_nvtx, "annotate", Range)
    case, impl = CASES["cpu-smoke"], get_impl("sdpa-math")
    with runner.nvtx_ranges(case, impl):
        seen.append(list(stack))
    assert seen == [["case:cpu-smoke", "sdpa-math"]] and stack == []  # impl innermost, nothing between


def test_merging_runs_of_one_gpu():
    def run(started, device, records, throttled=None):
        doc = results.new_results({"started": started, "device": {"name": device}, "throttled": throttled})
        doc["records"] = [{"case": c, "impl": i, "status": s} for c, i, s in records]
        return doc

    a = run("t0", "NVIDIA H200", [("seed", "sparsek", "failed"), ("seed", "sdpa-cudnn", "ok")], throttled=False)
    b = run("t1", "NVIDIA H200", [("seed", "sparsek", "ok"), ("long-16k", "sdpa-cudnn", "ok")], throttled=True)
    merged = results.merge_results([a, b], ["a.json", "b.json"])
    assert [(r["case"], r["impl"], r["status"]) for r in merged["records"]] == [
        ("seed", "sparsek", "ok"), ("seed", "sdpa-cudnn", "ok"), ("long-16k", "sdpa-cudnn", "ok")]
    assert [m["path"] for m in merged["run"]["merged"]] == ["a.json", "b.json"] and merged["run"]["throttled"] is True
    with pytest.raises(ValueError, match="different devices"):
        results.merge_results([a, run("t2", "NVIDIA H100 80GB HBM3", [])])


def test_a_merge_is_partial_when_any_run_is():
    done = [results.new_results({"started": s, "finished": f, "device": {"name": "H200"}})
            for s, f in (("t0", "t1"), ("t2", "t3"))]
    assert results.merge_results(done)["run"]["finished"] == "t3"
    partial = results.new_results({"started": "t4", "finished": None, "device": {"name": "H200"}})
    merged = results.merge_results(done + [partial])
    assert results.is_partial(merged) and [m["finished"] for m in merged["run"]["merged"]] == ["t1", "t3", None]
