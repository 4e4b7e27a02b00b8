"""`pytest --benchmark-only` on the front end (tests/test_pytest_benchmark.py) for real, on the
CPU subset, with --benchmark-json: the registry's cases reach pytest-benchmark with extra_info."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_only_writes_json_with_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_pytest_benchmark.py", "-q", "-p",
                           "no:cacheprovider", "--benchmark-only", f"--benchmark-json={out}", "-k",
                           "cpu-smoke and (sdpa-math or sparsek-ref or sparsek-decode)"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    by_key = {(b["extra_info"]["case"], b["extra_info"]["impl"]): b for b in report["benchmarks"]}
    assert {("cpu-smoke", "sdpa-math"), ("cpu-smoke", "sparsek-ref")} <= set(by_key), sorted(by_key)
    info = by_key[("cpu-smoke", "sparsek-ref")]["extra_info"]
    assert info["case"] == "cpu-smoke" and info["card"] and info["tflops"] > 0
    assert info["device_median_s"] > 0 and info["max_abs_error"] < 1e-3
    assert by_key[("cpu-smoke", "sdpa-math")]["extra_info"]["tiers"] == ["T1:peer"]
    assert by_key[("cpu-smoke", "sparsek-ref")]["stats"]["rounds"] >= 5
    # the training step of the same shape reaches pytest-benchmark too, with its gradients' errors
    step = by_key[("train-cpu-smoke", "sparsek-ref")]["extra_info"]
    assert step["kind"] == "train" and step["tflops"] > 0 and step["max_abs_error"] < 1e-3
    assert set(step["grad_max_abs_error"]) == {"q", "k", "v", "scores"}
    assert by_key[("train-cpu-smoke", "sdpa-math")]["extra_info"]["tiers"] == ["T1-train:peer"]
