"""Every train adapter on a small CUDA case: available ones must match the reference gradients;
the others must say why not. Also a quick training-step run and the cost of the long cases'
gradient check.

    python -m pytest tests/test_bench_train_gpu.py -q -rs     # -rs lists each skip reason
"""

from __future__ import annotations

import time

import pytest
import torch

from sparsek.bench import runner
from sparsek.bench.cases import CASES, Case, make_inputs
from sparsek.bench.impls import IMPLS, grad_reference

pytestmark = pytest.mark.gpu

CASE = Case("gpu-train-small", "train", 2, 8, 2, 1024, 128, "bfloat16", 128, 64, "cuda", 5)
TRAIN = [i for i in IMPLS.values() if "train" in i.kinds]


@pytest.fixture(scope="module")
def ctx():
    return runner.CaseContext(CASE, make_inputs(CASE), runner.RunOptions().check_rows)


@pytest.mark.parametrize("impl", TRAIN, ids=lambda i: i.id)
def test_train_adapter_gradients_match_the_reference(impl, ctx):
    reason = impl.available(CASE)
    if reason:
        assert isinstance(reason, str) and reason
        pytest.skip(f"{impl.id}: {reason}")
    with torch.no_grad():
        prepared = impl.prepare(CASE, ctx.inputs)
        err = runner.check_grads(ctx, impl, prepared.output())
    assert err["passed"], (impl.id, err)
    expected = {"q", "k", "v", "scores"} if impl.id in ("sparsek", "sparsek-ref") else {"q", "k", "v"}
    assert set(err["grads"]) == expected


def test_a_quick_cuda_train_run(tmp_path, monkeypatch):
    monkeypatch.setitem(runner.CASES, CASE.name, CASE)
    options = runner.RunOptions(quick=True, timing={"max_time_s": 0.2})
    doc = runner.run([CASE.name], ["sdpa-flash", "sdpa-cudnn", "flex-window", "sparsek"], options=options,
                     json_path=tmp_path / "r.json")
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    assert ok, [(r["impl"], r["reason"]) for r in doc["records"]]
    for r in ok:
        assert r["kind"] == "train" and r["timing"]["timer"] == "cuda events" and r["error"]["passed"]
        mem = r["memory"]
        assert mem["step_peak_bytes"] == mem["inputs_bytes"] + mem["peak_bytes"] and mem["peak_bytes"] > 0
        assert r["metrics"]["tflops_effective"] < doc["run"]["peaks"]["cuda"]["matmul"]["tflops"] * 1.2
    assert {r["tier"] for r in doc["tiers"] if r.get("case") == CASE.name} == {"T1-train", "T2-train"}


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["sparsek", "window", "dense-causal"])
def test_the_64k_gradient_check_takes_tens_of_seconds(pattern):
    case = CASES["train-64k"]
    inputs = make_inputs(case)
    subset = grad_reference.grad_subset(case, pattern)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    refs = grad_reference.reference_grads(case, inputs, pattern, subset)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert all(bool(torch.isfinite(r).all()) for r in refs.values())
    assert seconds < 90, f"{pattern}: {seconds:.1f} s for {subset.describe()}"
