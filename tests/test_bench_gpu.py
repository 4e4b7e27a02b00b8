"""Every prefill adapter on a small CUDA case: available ones must match their reference; the
others must say why not. Also one quick runner pass with CUDA-event timing and NVML sampling.

    python -m pytest tests/test_bench_gpu.py -q -rs     # -rs lists each skip reason
"""

from __future__ import annotations

import pytest
import torch

from sparsek.bench import metrics, runner
from sparsek.bench.cases import Case, make_inputs
from sparsek.bench.impls import IMPLS, base

pytestmark = pytest.mark.gpu

CASE = Case("gpu-small", "prefill", 2, 8, 2, 1024, 128, "bfloat16", 128, 64, "cuda", 5)
PREFILL = [i for i in IMPLS.values() if i.kind == "prefill"]
# The adapters of this project's CUDA kernels: on sm_90 (H100/H200) they must run, so an unavailable
# one there is a broken build that fails the test, not a skip.
OUR_KERNELS = ("sparsek",)


def kernels_expected() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(CASE)


@pytest.mark.parametrize("impl", PREFILL, ids=lambda i: i.id)
def test_adapter_matches_its_reference(impl, inputs):
    reason = impl.available(CASE)
    if reason:
        assert isinstance(reason, str) and reason
        if impl.id in OUR_KERNELS and kernels_expected():
            pytest.fail(f"{impl.id} must run on sm_90: {reason}")
        pytest.skip(f"{impl.id}: {reason}")
    with torch.no_grad():
        prepared = impl.prepare(CASE, inputs)
        out = prepared.output()
        rows = base.check_rows(CASE)
        ref = impl.reference_rows(CASE, inputs, rows)
        err = metrics.error_stats(out[:, :, rows.cuda()], ref, CASE.dtype)
        assert err["passed"], (impl.id, err)
        for name, other in prepared.compare_with.items():
            extra = metrics.error_stats(out[:, :, rows.cuda()], other[:, :, rows.cuda()].float(), CASE.dtype)
            assert extra["passed"], (impl.id, name, extra)


def test_a_quick_cuda_run(tmp_path, monkeypatch):
    monkeypatch.setitem(runner.CASES, CASE.name, CASE)
    options = runner.RunOptions(quick=True, timing={"max_time_s": 0.2})
    doc = runner.run([CASE.name], ["sdpa-flash", "sdpa-cudnn", "sparsek"], options=options,
                     json_path=tmp_path / "r.json")
    assert doc["run"]["peaks"]["cuda"]["matmul"]["tflops"] > 10
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    assert ok, [(r["impl"], r["reason"]) for r in doc["records"]]
    if kernels_expected():  # the run must have timed our kernels, not only the baselines
        assert "sparsek" in {r["impl"] for r in ok}, [(r["impl"], r["status"], r["reason"]) for r in doc["records"]]
    for r in ok:
        assert r["timing"]["timer"] == "cuda events" and r["timing"]["mode"] == "cold"
        assert r["error"]["passed"] and r["memory"]["peak_bytes"] >= 0
        assert r["metrics"]["tflops_effective"] < doc["run"]["peaks"]["cuda"]["matmul"]["tflops"] * 1.2
