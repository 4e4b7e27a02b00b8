"""The ncu driver (sparsek.bench.profile) and the process it profiles (nsight/profile_worker.py).

No GPU here: a fake ``ncu`` on PATH answers --version and --query-metrics like Nsight Compute
2025.3.1 and, for a profiling run, records its argv and environment and writes a real H200
fixture to --log-file, so the driver runs end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from sparsek.bench import profile

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nsight"
sys.path.insert(0, str(REPO / "nsight"))

import ncu_to_json  # noqa: E402
import profile_worker  # noqa: E402

CASE = "B2-H8-S2048-D128-bf16"  # the case range of the fixtures
IMPLS = ["sdpa-flash", "sdpa-cudnn", "reference"]
BASE_METRICS = ("gpu__time_duration", "sm__throughput", "gpu__compute_memory_throughput", "dram__throughput",
                "lts__throughput", "sm__warps_active", "sm__pipe_tensor_op_hmma_cycles_active", "dram__bytes")

FAKE_NCU = """\
#!{python}
import json, os, shutil, sys
argv = sys.argv[1:]
if argv == ["--version"]:
    print("NVIDIA (R) Nsight Compute Command Line Profiler")
    print("Copyright (c) 2018-2025 NVIDIA Corporation")
    print("Version 2025.3.1.0 (build 36398880) (public-release)")
    sys.exit(0)
if "--query-metrics" in argv:
    print('"Metric name","Metric type","Metric unit","Metric description","NVIDIA H200"')
    for name in os.environ["FAKE_NCU_METRICS"].split(","):
        print(f'"{{name}}","Counter","","fake","1"')
    sys.exit(0)
if os.environ.get("FAKE_NCU_HANG"):  # ncu and the worker it started both hang
    import subprocess, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.environ["FAKE_NCU_HANG"], "w") as f:
        f.write(str(worker.pid))
    time.sleep(120)
with open(os.environ["FAKE_NCU_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": argv, "LC_ALL": os.environ.get("LC_ALL"),
                        "PYTHONPATH": os.environ.get("PYTHONPATH")}}) + "\\n")
shutil.copyfile(os.environ["FAKE_NCU_FIXTURE"], argv[argv.index("--log-file") + 1])
if os.environ.get("FAKE_NCU_STATUS"):
    with open(argv[argv.index("--status") + 1], "w") as f:
        f.write(os.environ["FAKE_NCU_STATUS"])
print("==PROF== Disconnected from process 441")
sys.exit(int(os.environ.get("FAKE_NCU_RC", "0")))
"""


@pytest.fixture
def fake_ncu(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ncu = bin_dir / "ncu"
    ncu.write_text(FAKE_NCU.format(python=sys.executable))
    ncu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("NCU", raising=False)
    monkeypatch.setenv("FAKE_NCU_METRICS", ",".join(BASE_METRICS))
    monkeypatch.setenv("FAKE_NCU_RECORD", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_NCU_FIXTURE", str(FIXTURES / "raw_logfile.csv"))
    monkeypatch.setattr(profile, "resolve_plan", lambda cases, impls, defaults: [(CASE, list(IMPLS))])
    return types.SimpleNamespace(path=ncu, calls=lambda: [json.loads(line) for line in
                                                          (tmp_path / "calls.jsonl").read_text().splitlines()])


def run(tmp_path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "metrics.json"
    rc = profile.main(["--case", CASE, "--iters", "1", "--output", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


# --- the command ncu runs ----------------------------------------------------------------------

def test_ncu_argv():
    argv = profile.ncu_argv("/usr/local/cuda/bin/ncu", ["sdpa-cudnn", "sparsek"], metrics=["a.sum", "b.avg"],
                            section_set=None, clock_control="none", cache_control="all", log_file="/tmp/c.csv",
                            app=["python3", "w.py"])
    assert argv == ["/usr/local/cuda/bin/ncu", "--nvtx",
                    "--nvtx-include", "sparsek@sdpa-cudnn/", "--nvtx-include", "sparsek@sparsek/",
                    "--metrics", "a.sum,b.avg", "--clock-control", "none", "--cache-control", "all",
                    "--csv", "--page", "raw", "--print-units", "base", "--log-file", "/tmp/c.csv",
                    "python3", "w.py"]
    with_set = profile.ncu_argv("ncu", ["x"], metrics=[], section_set="full", clock_control="base",
                                cache_control="none", log_file="l", app=[])
    assert with_set[with_set.index("--set") + 1] == "full" and "--metrics" not in with_set
    assert with_set[with_set.index("--clock-control") + 1] == "base"


def test_nvtx_filter_is_the_form_that_selected_the_fixture_kernel():
    # details.csv was captured with --nvtx-include "sparsek@sdpa-cudnn/" and holds the kernel
    # whose stack is case:... > sdpa-cudnn: a push/pop filter matches a range below the top.
    assert profile.nvtx_filter("sdpa-cudnn") == "sparsek@sdpa-cudnn/"
    (kernel,) = ncu_to_json.convert((FIXTURES / "details.csv").read_text())["kernels"]
    assert [e["range"] for e in kernel["nvtx_stack"]] == [f"case:{CASE}", "sdpa-cudnn"]


def test_worker_argv_and_env():
    argv = profile.worker_argv("/usr/bin/python3", "long-16k", ["sdpa-cudnn", "sparsek"], iters=3, warmup=2,
                               status="/tmp/s.json")
    assert argv == ["/usr/bin/python3", str(REPO / "nsight" / "profile_worker.py"), "--case", "long-16k",
                    "--impl", "sdpa-cudnn,sparsek", "--iters", "3", "--warmup", "2", "--status", "/tmp/s.json"]
    env = profile.child_env({"PATH": "/bin", "PYTHONPATH": "/carry/nvtx", "LC_ALL": "de_DE.UTF-8"})
    assert env["LC_ALL"] == "C"
    assert env["PYTHONPATH"] == f"{REPO}{os.pathsep}/carry/nvtx"
    assert env["PATH"] == "/bin"


def test_default_metrics_are_the_fixture_names():
    header = next(line for line in (FIXTURES / "raw_logfile.csv").read_text().splitlines() if line.startswith('"ID"'))
    for metric in ncu_to_json.DEFAULT_METRICS:
        assert f'"{metric}"' in header
    assert profile.unknown_metrics(list(ncu_to_json.DEFAULT_METRICS), set(BASE_METRICS)) == []
    assert profile.unknown_metrics(["sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm__nope.sum",
                                    "regex:sm__.*"], {"sm__throughput"}) == ["sm__nope.sum"]


# --- end to end with the fake ncu --------------------------------------------------------------

def test_end_to_end(tmp_path, fake_ncu, capsys):
    rc, doc = run(tmp_path)
    assert rc == 0, capsys.readouterr().err
    (call,) = fake_ncu.calls()
    assert call["LC_ALL"] == "C" and call["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    argv = call["argv"]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--nvtx-include"] == [f"sparsek@{i}/" for i in IMPLS]
    assert argv[argv.index("--metrics") + 1] == ",".join(ncu_to_json.DEFAULT_METRICS)
    assert argv[argv.index("--clock-control") + 1] == "none"
    assert argv[argv.index("--impl") + 1] == ",".join(IMPLS)

    assert doc["ncu"]["version"] == "2025.3.1.0" and doc["ncu"]["clock_control"] == "none"
    assert doc["ncu"]["path"] == str(fake_ncu.path)
    assert doc["device"] == {"name": "NVIDIA H200", "cc": "9.0", "sm_count": 132}
    assert doc["targets"] == ncu_to_json.DEFAULT_TARGETS
    (case,) = doc["cases"]
    assert case["case"] == CASE and case["error"] is None and case["exit_code"] == 0
    assert case["unattributed_kernels"] == 2  # the startend-matmul kernels belong to no implementation
    impls = {r["impl"]: r for r in case["impls"]}
    flash, cudnn, ref = impls["sdpa-flash"], impls["sdpa-cudnn"], impls["reference"]
    assert (flash["status"], flash["kernels"], flash["duration_ns_per_call"]) == ("profiled", 1, 103424)
    assert flash["metrics"]["sm_throughput_pct"] == 27.32 and flash["pass"] is False
    assert flash["targets"]["warps_active_pct"] == {"target": 90.0, "value": 11.2, "pass": False}
    assert cudnn["duration_ns"] == 51552 and cudnn["dram_bytes_per_call"] == 26368256
    (row,) = cudnn["kernel_table"]
    assert row["grid"] == [132, 1, 1] and row["block"] == [384, 1, 1] and row["registers_per_thread"] == 168
    assert ref["kernels"] == 6 and ref["duration_ns"] == 564032
    assert ref["kernel_table"][0]["duration_ns"] == 186848  # longest first
    assert "phases" not in ref
    out = capsys.readouterr().out
    assert "sdpa-cudnn" in out and "NVIDIA H200, ncu 2025.3.1.0, clock control none" in out


def test_worker_status_names_skipped_implementations(tmp_path, fake_ncu, monkeypatch):
    monkeypatch.setattr(profile, "resolve_plan", lambda *a: [(CASE, ["sdpa-cudnn", "sparsek"])])
    monkeypatch.setenv("FAKE_NCU_STATUS", json.dumps({"impls": {
        "sdpa-cudnn": {"status": "profiled", "calls": 1},
        "sparsek": {"status": "skipped", "reason": "the CUDA extension is not built"}}}))
    rc, doc = run(tmp_path)
    assert rc == 0
    cudnn, sparsek = doc["cases"][0]["impls"]
    assert (cudnn["status"], cudnn["calls"]) == ("profiled", 1)
    assert sparsek == {"impl": "sparsek", "status": "skipped", "reason": "the CUDA extension is not built"}


def test_clock_control_and_targets_are_configurable(tmp_path, fake_ncu):
    rc, doc = run(tmp_path, "--clock-control", "base", "--target", "sm_throughput_pct=30")
    assert rc == 0
    assert doc["ncu"]["clock_control"] == "base"
    assert fake_ncu.calls()[0]["argv"][fake_ncu.calls()[0]["argv"].index("--clock-control") + 1] == "base"
    cudnn = doc["cases"][0]["impls"][1]
    assert cudnn["targets"]["sm_throughput_pct"] == {"target": 30.0, "value": 36.86, "pass": True}


def test_no_kernels_is_a_failed_case(tmp_path, fake_ncu, monkeypatch):
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== Connected to process 1 (/usr/bin/python3)\n==WARNING== No kernels were profiled.\n")
    monkeypatch.setenv("FAKE_NCU_FIXTURE", str(empty))
    rc, doc = run(tmp_path)
    assert rc == profile.EXIT_FAILED
    case = doc["cases"][0]
    assert "no kernel profiled" in case["error"] and "No kernels were profiled" in case["error"]
    assert all(r["status"] == "unknown" for r in case["impls"])


def _gone_or_zombie(pid: int, within_s: float = 10.0) -> bool:
    """Whether the process has exited (gone, or a zombie awaiting its reaper) within a bound.

    SIGKILL is delivered at once, but the kernel tears the process down a moment later; a worker
    re-parented to init can still read "R (running)" right after killpg, so one look races.
    """
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + within_s
    while True:
        try:
            if "State:\tZ" in status.read_text():
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_timeout_ends_ncu_and_its_worker(tmp_path, fake_ncu, monkeypatch):
    pid_file = tmp_path / "worker.pid"
    monkeypatch.setenv("FAKE_NCU_HANG", str(pid_file))
    rc, doc = run(tmp_path, "--timeout", "5")
    assert rc == profile.EXIT_FAILED
    assert "did not finish within --timeout 5 s" in doc["cases"][0]["error"]
    assert _gone_or_zombie(int(pid_file.read_text()))  # the worker was killed with ncu's process group


def test_missing_ncu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile, "resolve_plan", lambda *a: [(CASE, IMPLS)])
    rc, doc = run(tmp_path, "--ncu", str(tmp_path / "nowhere" / "ncu"))
    assert rc == profile.EXIT_SETUP and doc is None
    assert "ncu (Nsight Compute CLI) not found" in capsys.readouterr().err


def test_counter_permission_error(tmp_path, fake_ncu, monkeypatch, capsys):
    log = tmp_path / "perm.csv"
    log.write_text("==PROF== Connected to process 7 (/usr/bin/python3.12)\n"
                   "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU "
                   "Performance Counters on the target device 0.\n")
    monkeypatch.setenv("FAKE_NCU_FIXTURE", str(log))
    monkeypatch.setenv("FAKE_NCU_RC", "1")
    rc, doc = run(tmp_path)
    assert rc == profile.EXIT_PERMISSION and doc is None
    err = capsys.readouterr().err
    assert "ERR_NVGPUCTRPERM" in err and "NVreg_RestrictProfilingToAdminUsers=0" in err


def test_unknown_metric_stops_before_profiling(tmp_path, fake_ncu, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_NCU_METRICS", ",".join(m for m in BASE_METRICS if m != "lts__throughput"))
    rc, doc = run(tmp_path)
    assert rc == profile.EXIT_SETUP and doc is None
    assert "lts__throughput.avg.pct_of_peak_sustained_elapsed" in capsys.readouterr().err
    assert not (tmp_path / "calls.jsonl").exists()  # ncu never profiled


def test_metric_query_that_lists_nothing_stops(tmp_path, fake_ncu, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_NCU_METRICS", "")  # e.g. no GPU attached: only the header comes back
    rc, doc = run(tmp_path)
    assert rc == profile.EXIT_SETUP and doc is None
    assert "--skip-metric-check" in capsys.readouterr().err
    rc, doc = run(tmp_path, "--skip-metric-check")
    assert rc == 0 and doc["cases"][0]["impls"][0]["kernels"] == 1


def test_dry_run_prints_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile, "resolve_plan", lambda *a: [("long-16k", ["sdpa-cudnn", "sparsek"])])
    assert profile.main(["--case", "long-16k", "--dry-run", "--ncu", "/opt/ncu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("/opt/ncu --nvtx --nvtx-include sparsek@sdpa-cudnn/ --nvtx-include sparsek@sparsek/")
    assert "--log-file long-16k.ncu.csv" in line and "--case long-16k --impl sdpa-cudnn,sparsek" in line


def test_no_case_chosen(capsys):
    assert profile.main([]) == profile.EXIT_SETUP
    assert "--default" in capsys.readouterr().err


# --- the plan from the registry ----------------------------------------------------------------

@pytest.fixture
def fake_registry(monkeypatch):
    cases = {n: types.SimpleNamespace(name=n) for n in ("seed", "long-16k")}
    impls = {i: types.SimpleNamespace(id=i) for i in ("sparsek", "sparsek-ref", "sdpa-cudnn", "sdpa-flash",
                                                      "sdpa-math", "flex-window")}
    cases_mod = types.ModuleType("sparsek.bench.cases")
    cases_mod.get_case = lambda name: cases[name]
    impls_mod = types.ModuleType("sparsek.bench.impls")
    impls_mod.get_impl = lambda i: impls[i]
    impls_mod.impls_for = lambda case: [impls[i] for i in ("sdpa-math", "sdpa-flash", "sparsek", "sdpa-cudnn")]
    monkeypatch.setitem(sys.modules, "sparsek.bench.cases", cases_mod)
    monkeypatch.setitem(sys.modules, "sparsek.bench.impls", impls_mod)


def test_resolve_plan(fake_registry):
    assert profile.resolve_plan(["seed", "long-16k"], None, True) == [
        ("seed", ["sparsek", "sdpa-cudnn", "sdpa-flash"]), ("long-16k", ["sparsek", "sdpa-cudnn", "sdpa-flash"])]
    assert profile.resolve_plan(["seed"], None, False) == [("seed", ["sdpa-math", "sdpa-flash", "sparsek", "sdpa-cudnn"])]
    assert profile.resolve_plan(["seed"], ["sparsek-ref"], False) == [("seed", ["sparsek-ref"])]
    with pytest.raises(KeyError):
        profile.resolve_plan(["nope"], None, False)


def test_unknown_case_is_a_clear_error(fake_registry, capsys):
    assert profile.main(["--case", "nope"]) == profile.EXIT_SETUP
    assert "nope" in capsys.readouterr().err


# --- the worker --------------------------------------------------------------------------------

class FakeImpl:
    def __init__(self, impl_id, log, unavailable=None, fails=False):
        self.id, self.log, self.unavailable, self.fails = impl_id, log, unavailable, fails

    def available(self, case):
        return self.unavailable

    def prepare(self, case, inputs):
        if self.fails:
            raise RuntimeError("out of memory")
        return types.SimpleNamespace(fn=lambda: self.log.append(("call", self.id, tuple(self.log_stack))))


def test_worker_wraps_each_timed_call_in_case_then_impl_ranges():
    log, stack = [], []

    @contextlib.contextmanager
    def annotate(name):
        stack.append(name)
        yield
        stack.pop()

    impls = [FakeImpl("sdpa-cudnn", log), FakeImpl("sparsek", log, unavailable="kernel not built"),
             FakeImpl("flex-window", log, fails=True)]
    for impl in impls:
        impl.log_stack = stack
    case = types.SimpleNamespace(name="long-16k")
    status = profile_worker.run_case(case, None, impls, iters=3, warmup=2, annotate=annotate,
                                     sync=lambda: log.append(("sync",)))
    calls = [entry for entry in log if entry[0] == "call"]
    assert calls[:2] == [("call", "sdpa-cudnn", ())] * 2  # warm-up outside the ranges
    assert calls[2:] == [("call", "sdpa-cudnn", ("case:long-16k", "sdpa-cudnn"))] * 3
    assert status == {
        "sdpa-cudnn": {"status": "profiled", "calls": 3},
        "sparsek": {"status": "skipped", "reason": "kernel not built"},
        "flex-window": {"status": "failed", "error": "RuntimeError: out of memory"},
    }


def test_worker_without_nvtx_refuses(tmp_path, monkeypatch):
    from sparsek import _nvtx

    monkeypatch.setattr(_nvtx, "_nvtx_pkg", None)  # as without the package, whether or not it is installed
    status = tmp_path / "status.json"
    rc = profile_worker.main(["--case", "long-16k", "--impl", "sdpa-cudnn", "--status", str(status)])
    assert rc == profile_worker.EXIT_SETUP
    assert "nvtx package is not importable" in json.loads(status.read_text())["error"]


def test_overhead_helpers_measure_enabled_and_disabled():
    enabled = {"on": True}
    entered = []

    def set_enabled(flag):
        previous, enabled["on"] = enabled["on"], flag
        return previous

    @contextlib.contextmanager
    def annotate(name):
        if enabled["on"]:
            entered.append(name)
        yield

    cost = profile_worker.range_cost_ns(annotate, set_enabled, ("case:x", "impl"), loops=100)
    assert set(cost) == {"enabled", "disabled", "overhead_ns"} and len(entered) == 200
    assert enabled["on"] is True  # restored
    calls = []
    latency = profile_worker.call_latency_us(lambda: calls.append(enabled["on"]), annotate, set_enabled,
                                             ("case:x", "impl"), samples=5, timer=lambda call: (call(), 1e-6)[1])
    assert calls == [True, False] * 5  # interleaved
    assert latency["ranges_on"]["median"] == pytest.approx(1.0) and latency["delta_us"] == pytest.approx(0.0)
    assert latency["ranges_on"]["n"] == latency["ranges_off"]["n"] == 5

    seen = []

    def measure(fn, *, device, around):  # stands in for sparsek.bench.timing.measure
        with around():
            fn()
        seen.append((device, enabled["on"], tuple(entered[-2:])))
        return types.SimpleNamespace(median=(2e-6 if enabled["on"] else 1e-6))

    entered.clear()
    harness = profile_worker.harness_latency_us(lambda: None, "cuda", annotate, set_enabled, ("case:x", "impl"),
                                                rounds=2, measure=measure)
    assert [s[1] for s in seen] == [True, False, True, False]
    assert seen[0] == ("cuda", True, ("case:x", "impl")) and len(entered) == 4  # ranges only when enabled
    assert harness["ranges_on"] == pytest.approx(2.0) and harness["ranges_off"] == pytest.approx(1.0)
    assert harness["delta_us"] == pytest.approx(1.0) and harness["delta_pct"] == pytest.approx(100.0)
    assert enabled["on"] is True
