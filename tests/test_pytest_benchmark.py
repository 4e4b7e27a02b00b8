"""pytest-benchmark front end: the registry's default cases x implementations through `benchmark`.

    python -m pytest tests/test_pytest_benchmark.py --benchmark-only --benchmark-json=out/bench.json
    python -m pytest tests/test_pytest_benchmark.py --benchmark-only --benchmark-autosave
    python -m pytest tests/test_pytest_benchmark.py --benchmark-only --benchmark-compare \
        --benchmark-compare-fail=median:5%

pyproject's addopts skip these tests (--benchmark-skip) unless --benchmark-only is given. On a
GPU they run the GPU default cases (seed, long-*, train-seed, train-16k, train-64k), elsewhere
cpu-smoke, train-cpu-smoke and cpu-smoke-decode. Pedantic mode: the same prepared call every
round, one call per round, warm-up rounds first; on CUDA each round ends in a synchronize, so
pytest-benchmark's clock covers the device work, and extra_info also carries the CUDA-event
timing of sparsek.bench.timing (L2 flushed) that the CLI and asv report. An output (for train
cases: the step's gradients) that fails its error check fails the test.
"""

from __future__ import annotations

import pytest
import torch

from sparsek.bench import device as device_mod
from sparsek.bench import metrics, runner, timing, tiers
from sparsek.bench.cases import CASES, DEFAULT_CASES, make_inputs
from sparsek.bench.impls import impls_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE_NAMES = {
    "cuda": [*DEFAULT_CASES["cuda"], "decode-32k-b16"],
    "cpu": [*DEFAULT_CASES["cpu"], "cpu-smoke-decode"],
}[DEVICE]
ROUNDS = {"cuda": {"rounds": 30, "warmup_rounds": 5}, "cpu": {"rounds": 10, "warmup_rounds": 2}}[DEVICE]

PLAN = [(CASES[name], impl) for name in CASE_NAMES for impl in impls_for(CASES[name])]


def _tier_roles(impl_id: str, kind: str) -> list[str]:
    """'T1:subject', 'T2:peer', ...: where this implementation stands in the tier rules of a kind."""
    roles = []
    for tier in (t for t in tiers.TIERS if t.kind == kind):
        if impl_id == tier.subject:
            roles.append(f"{tier.name}:subject")
        elif impl_id in tier.peers:
            roles.append(f"{tier.name}:peer")
    return roles


@pytest.fixture(scope="module")
def card() -> str:
    fp = device_mod.fingerprint()
    return str(fp.get("name") or DEVICE)


@pytest.fixture(scope="module")
def contexts():
    """One CaseContext (inputs, checked rows, references) per case, built on first use."""
    made = {}

    def get(case):
        if case.name not in made:
            made[case.name] = runner.CaseContext(case, make_inputs(case), runner.RunOptions().check_rows)
        return made[case.name]

    return get


@pytest.mark.parametrize("case,impl", PLAN, ids=[f"{c.kind}-{c.name}-{i.id}" for c, i in PLAN])
def test_bench(benchmark, case, impl, card, contexts):
    reason = impl.available(case)
    if reason:
        pytest.skip(f"{impl.id} on {case.name}: {reason}")
    ctx = contexts(case)
    cuda = case.device == "cuda"
    with torch.no_grad():
        prepared = impl.prepare(case, ctx.inputs)
        error = runner.check_output(ctx, impl, prepared.output(), prepared.compare_with)
        assert error.get("passed") is not False, f"{impl.id} on {case.name}: output failed its check: {error}"

        def call():
            prepared.fn()
            if cuda:
                torch.cuda.synchronize()

        benchmark.group = case.name
        benchmark.pedantic(call, iterations=1, **ROUNDS)
        device_timed = timing.measure(prepared.fn, device=case.device, **runner.TIMING_PROFILES["quick"])

    derived = metrics.derive(case, impl.pattern, device_timed.median, None)
    benchmark.extra_info.update(
        card=card,
        case=case.name,
        kind=case.kind,
        impl=impl.id,
        pattern=impl.pattern,
        tiers=_tier_roles(impl.id, case.kind),
        device_timer=device_timed.timer,
        device_median_s=device_timed.median,
        device_rel_iqr=device_timed.rel_iqr,
        tflops=derived["tflops_effective"],
        tflops_dense_equivalent=derived["tflops_dense_equivalent"],
        gbps=derived["gbps"],
        max_abs_error=error.get("max_abs"),
    )
    if case.kind == "train":  # the worst gradient above; each one here, and how the step's FLOPs count
        benchmark.extra_info.update(grad_max_abs_error={n: e["max_abs"] for n, e in error["grads"].items()},
                                    grad_subset=error["subset"], flop_convention=derived["flop_convention"])
