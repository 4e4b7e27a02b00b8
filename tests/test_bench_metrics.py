"""FLOP and byte models, derived rates and the error check."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sparsek import selection
from sparsek.bench import metrics
from sparsek.bench.cases import CASES, DTYPES, Case


def _case(S, K, W, kind="prefill", B=2, Hq=4, Hkv=2, D=8, dtype="float32"):
    return Case("t", kind, B, Hq, Hkv, S, D, dtype, K, W, "cpu", 0)


@pytest.mark.parametrize("S,K,W", [(1, 1, 0), (7, 3, 0), (7, 3, 2), (20, 4, 3), (5, 8, 16), (64, 16, 16), (100, 1, 99)])
def test_attended_pairs_match_the_definition(S, K, W):
    c = _case(S, K, W)
    window = sum(min(W, i + 1) for i in range(S))
    selected = sum(min(K, max(0, i - W + 1)) for i in range(S))
    assert metrics.attended_pairs(c, "sparsek") == window + selected
    assert metrics.attended_pairs(c, "dense-causal") == sum(i + 1 for i in range(S))
    assert metrics.attended_pairs(c, "window") == sum(min(i + 1, K + W) for i in range(S))


def test_sparsek_pairs_equal_the_reference_selection():
    torch.manual_seed(0)
    c = _case(48, 5, 4)
    scores = torch.randn(1, 1, c.seq_len)
    sel = selection.select(scores, c.topk, c.window)
    chosen = selection.selected_mask(sel) | selection.window_mask(c.seq_len, c.window)
    assert int(chosen.sum()) == metrics.attended_pairs(c, "sparsek")


def test_flops_at_the_brief_configuration():
    seed = CASES["seed"]
    assert metrics.flops(seed, "dense-causal") == 4 * 16 * 96 * 128 * 4096 * 4097 // 2
    # window: 256*257/2 + 3840*256; selected: 512*513/2 + 3328*512
    assert metrics.attended_pairs(seed, "sparsek") == 32896 + 983040 + 131328 + 1703936
    assert metrics.dense_equivalent_flops(seed) == metrics.flops(seed, "dense-causal")


def test_decode_bytes_are_the_kv_actually_read():
    c = CASES["decode-32k-b16"]
    assert metrics.kv_bytes(c, "decode-full") == 2 * 16 * 8 * 32769 * 128 * 2
    assert metrics.kv_bytes(c, "decode-sparsek") == 2 * 16 * 8 * 2560 * 128 * 2
    assert metrics.kv_bytes(CASES["seed"], "sparsek") is None
    assert metrics.flops(c, "decode-sparsek") == 4 * 16 * 32 * 128 * 2560


def test_derive_rates_percent_and_implausible():
    seed = CASES["seed"]
    peaks = {"matmul": {"tflops": 775.0}, "copy": {"gbps": 4200.0}}
    d = metrics.derive(seed, "dense-causal", 13.0e-3, peaks)
    assert d["us_per_iter"] == pytest.approx(13000.0)
    assert d["us_per_head"] == pytest.approx(13000.0 / 96)
    assert d["tflops_effective"] == pytest.approx(metrics.flops(seed, "dense-causal") / 13e-3 / 1e12)
    assert d["pct_peak_tflops"] == pytest.approx(100 * d["tflops_effective"] / 775.0)
    assert d["implausible"] == [] and d["gbps"] is None
    # the brief's 366.72 us for dense SDPA: 18 PFLOP/s of causal work, above any measured peak
    brief = metrics.derive(seed, "dense-causal", 366.72e-6, peaks)
    assert brief["tflops_effective"] == pytest.approx(17994, rel=1e-3)
    assert brief["implausible"] and "exceeds the measured matmul peak" in brief["implausible"][0]
    # a sparse pattern's dense-equivalent rate may exceed the peak; that is not flagged
    sparse = metrics.derive(seed, "sparsek", 4.0e-3, peaks)
    assert sparse["tflops_dense_equivalent"] > 775 and sparse["implausible"] == []
    dec = metrics.derive(CASES["decode-32k-b16"], "decode-full", 100e-6, peaks)
    assert dec["gbps"] == pytest.approx(metrics.kv_bytes(CASES["decode-32k-b16"], "decode-full") / 100e-6 / 1e9)
    assert any("copy peak" in f for f in dec["implausible"])
    assert metrics.derive(seed, "sparsek", 1e-3, None)["pct_peak_tflops"] is None


def test_error_stats_verdicts():
    ref = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    ok = metrics.error_stats((ref + 1e-3).half(), ref, "float16")
    assert ok["passed"] and ok["max_abs"] == pytest.approx(1e-3, abs=1e-3) and ok["atol"] == 2e-3
    bad = metrics.error_stats(ref + 0.1, ref, "float16")
    assert not bad["passed"] and bad["max_rel"] == pytest.approx(0.1 / 2.0, rel=1e-5)
    nan = metrics.error_stats(torch.full_like(ref, math.nan), ref, "float32")
    assert not nan["passed"] and not nan["finite"] and nan["max_abs"] == math.inf


def test_every_dtype_has_a_tolerance_and_every_pattern_a_model():
    assert set(metrics.TOLERANCES) == set(DTYPES)
    c = _case(16, 4, 2)
    for p in metrics.PATTERNS:
        assert metrics.flops(dataclasses.replace(c, kind="decode" if p.startswith("decode") else "prefill"), p) > 0
    with pytest.raises(ValueError, match="unknown pattern"):
        metrics.attended_pairs(c, "nope")


def test_cpu_peaks_are_measured():
    peaks = metrics.measure_peaks("cpu", quick=True, timing_kwargs={"min_samples": 3, "max_time_s": 0.05,
                                                                    "warmup": 1, "warmup_s": 0})
    assert peaks["matmul"]["tflops"] > 0 and peaks["copy"]["gbps"] > 0
    assert peaks["matmul"]["n"] == metrics.PEAK_PROBES["cpu"]["matmul_n"]
