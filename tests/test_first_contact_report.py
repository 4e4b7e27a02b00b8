"""`sparsek-bench report` reads like a report: short prose lines, each reason said once, the
timer that was really used, CPU tiers marked as a pipeline check. Checked on every committed GPU
results file and on a real CPU run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsek.bench import report, runner, tiers
from sparsek.bench.results import load_results

REPO = Path(__file__).resolve().parents[1]
GPU_RUNS = sorted((REPO / "benchmarks" / "runs").glob("*.json"))
_RULE = re.compile(r"-+(?:  +-+)+")  # tabulate's rule under a table's header


def prose_lines(text: str) -> list[str]:
    """Every line but a table's header, rule and rows (tables may be as wide as their columns)."""
    lines, out, in_table = text.splitlines(), [], False
    for i, line in enumerate(lines):
        if _RULE.fullmatch(line):
            in_table = True
            continue
        if in_table and (not line.strip() or line.startswith("  ")):
            in_table = False
        header = i + 1 < len(lines) and _RULE.fullmatch(lines[i + 1])
        if not in_table and not header:
            out.append(line)
    return out


def unwrap(text: str) -> str:
    """Wrapped prose lines joined again (their continuations are indented 4 more spaces)."""
    return re.sub(r"\n(?: {4}| {6})(?=\S)", " ", text)


def full_report(doc: dict) -> str:
    return report.format_report(doc) + "\n\n" + report.format_tiers(tiers.assess(doc))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    options = runner.RunOptions(quick=True, peaks=False, timing={"min_samples": 3, "max_time_s": 0.05})
    ids = ["sparsek", "sparsek-ref", "sdpa-math", "sdpa-cudnn", "xformers-flash", "xformers-cutlass"]
    return runner.run(["cpu-smoke"], ids, options=options, json_path=tmp_path_factory.mktemp("cpu") / "r.json")


@pytest.mark.parametrize("path", GPU_RUNS, ids=lambda p: p.name)
def test_prose_lines_are_short_on_every_committed_run(path):
    text = full_report(load_results(path))
    long = [line for line in prose_lines(text) if len(line) > report.WIDTH]
    assert not long, long
    assert "Triggered internally" not in text and "Traceback" not in text


def test_a_library_refusal_becomes_its_first_sentence():
    sdpa = ("kv heads repeated to Hq=32 in prepare (not timed): RuntimeError: No available kernel. Aborting "
            "execution. (Memory efficient kernel not used because: (Triggered internally at /pytorch/aten/src/"
            "ATen/native/transformers/cuda/sdp_utils.cpp:986.); For dense input, both fused kernels require ...")
    assert report.short_reason(sdpa) == "kv heads repeated to Hq=32 in prepare (not timed)"
    cpu = ("PyTorch has no CPU kernel for SDPA backend CUDNN_ATTENTION (RuntimeError: No viable backend for "
           "scaled_dot_product_attention was found. This is likely due to turning off both ...)")
    assert report.short_reason(cpu) == "PyTorch has no CPU kernel for SDPA backend CUDNN_ATTENTION"
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 16.02 GiB. GPU 0 has a total capacity of ..."
    assert report.short_reason(oom) == "OutOfMemoryError: CUDA out of memory."
    missing = "xFormers is not installed (pip install 'sparsek[xformers]'): ModuleNotFoundError: No module named 'x'"
    assert report.short_reason(missing) == "xFormers is not installed (pip install 'sparsek[xformers]')"
    check = "includes the op's finite-scores check (one host sync per call; SPARSEK_SKIP_FINITE_CHECK=1 removes it)"
    assert report.short_reason(check) == check  # a ";" inside parentheses ends nothing
    assert len(report.short_reason("word " * 200)) <= report.REASON_LIMIT


def test_repeated_reasons_are_said_once():
    doc = load_results(REPO / "benchmarks/runs/20261201T041316Z-nvidia-h200-5d28bbb.json")
    text = unwrap(report.format_report(doc))
    # Four xFormers implementations x five cases: one line in NOT RUN.
    assert text.count("xFormers is not installed") == 1
    assert text.count("kv heads repeated to Hq=32") == 1
    assert ("  xformers-cutlass, xformers-flash, xformers-flash3, xformers-local: skipped: xFormers is not installed "
            "(pip install 'sparsek[xformers]') [seed, long-16k, long-32k, long-64k, long-128k]") in text.splitlines()
    # Each case still names what did not run there.
    assert text.count("- not run, reasons under NOT RUN: sparsek-ref, xformers-cutlass") == 5


def test_the_header_names_the_timer_really_used(cpu_run):
    cpu_header = report.header(cpu_run)
    assert "host perf_counter" in cpu_header and "CUDA events" not in cpu_header.replace("cuda events", "")
    assert "cuda events" not in cpu_header and "L2 flushed" not in cpu_header
    assert "pipeline check" in cpu_header
    gpu_header = report.header(load_results(GPU_RUNS[0]))
    assert "GPU cases: cuda events, cold (L2 flushed before every sample)" in gpu_header
    assert "host perf_counter" not in gpu_header and "pipeline check" not in gpu_header


def test_cpu_tiers_are_computed_as_a_pipeline_check(cpu_run):
    t1 = next(r for r in cpu_run["tiers"] if r["tier"] == "T1")
    assert t1["case"] == "cpu-smoke" and t1["subject"] == "sparsek-ref" and t1["pipeline_check"]
    assert t1["status"] in ("pass", "fail") and t1["speedup"] > 0
    text = report.format_tiers(cpu_run["tiers"])
    assert "(pipeline check)" in text and "not how fast SparseK is" in text
    prose = prose_lines(full_report(cpu_run))
    assert not [line for line in prose if len(line) > report.WIDTH]
    out = unwrap(report.format_report(cpu_run))
    assert out.count("xFormers' attention runs on CUDA only and this case is a CPU case") == 1


def test_gpu_tiers_keep_sparsek_as_the_subject():
    doc = load_results(REPO / "benchmarks/runs/20261201T041316Z-nvidia-h200-5d28bbb.json")
    rows = [r for r in tiers.assess(doc) if r.get("case")]
    assert rows and all(r["subject"] == "sparsek" and not r["pipeline_check"] for r in rows)
