"""Tier rules T1/T2/T3 on synthetic results, and what the brief's absolute targets imply."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from sparsek.bench import tiers
from sparsek.bench.cases import CASES


def rec(case, impl, ms=None, status="ok", passed=True, reason=None):
    c = CASES[case]
    r = {"case": case, "impl": impl, "kind": c.kind, "case_spec": asdict(c), "status": status, "reason": reason}
    if status == "ok":
        r["timing"] = {"median": ms * 1e-3, "samples": [ms * 1e-3] * 3}
        r["error"] = {"passed": passed, "max_abs": 1e-4 if passed else 0.5, "atol": 2e-3}
    return r


def doc(*records):
    return {"records": list(records)}


def rows_of(results, tier, case=None):
    return [r for r in tiers.assess(results) if r["tier"] == tier and (case is None or r["case"] == case)]


def test_t1_pass_against_the_fastest_sdpa_backend():
    d = doc(rec("seed", "sparsek", 10.0), rec("seed", "sdpa-flash", 21.0), rec("seed", "sdpa-cudnn", 13.0),
            rec("seed", "sdpa-efficient", status="skipped", reason="nope"), rec("seed", "flex-causal", 5.0))
    (row,) = rows_of(d, "T1")
    assert row["status"] == "pass" and row["baseline"] == "sdpa-cudnn"  # flex-causal is not an SDPA backend
    assert row["speedup"] == pytest.approx(1.3) and row["subject_us"] == pytest.approx(10000.0)
    assert row["sdpa_floor"] == "sdpa-cudnn" and row["us_per_head"] == pytest.approx(10000.0 / 96)
    assert row["excluded"]["sdpa-efficient"] == "skipped: nope"


def test_t1_fail_when_slower():
    (row,) = rows_of(doc(rec("long-16k", "sparsek", 4.0), rec("long-16k", "sdpa-cudnn", 3.36)), "T1")
    assert row["status"] == "fail" and row["speedup"] == pytest.approx(0.84)
    assert row["brief"] is None  # the brief's targets are stated at seed only


def test_not_measurable_when_sparsek_did_not_run():
    d = doc(rec("seed", "sparsek", status="skipped", reason="the kernels are not built"), rec("seed", "sdpa-cudnn", 13.0))
    (row,) = rows_of(d, "T1")
    assert row["status"] == "not measurable" and "the kernels are not built" in row["reason"]
    assert row["baseline"] == "sdpa-cudnn" and row["speedup"] is None


def test_not_measurable_when_no_baseline_ran():
    d = doc(rec("seed", "sparsek", 10.0), rec("seed", "flex-window", status="failed", reason="compile error"))
    (row,) = rows_of(d, "T2")
    assert row["status"] == "not measurable"
    assert "flex-window failed: compile error" in row["reason"] and "xformers-local not run" in row["reason"]


def test_wrong_outputs_neither_set_nor_clear_a_bar():
    d = doc(rec("seed", "sparsek", 10.0), rec("seed", "flex-window", 5.0, passed=False), rec("seed", "flex-sparsek", 20.0))
    (t2,) = rows_of(d, "T2")
    assert t2["baseline"] == "flex-sparsek" and t2["status"] == "pass"
    assert "failed the error check" in t2["excluded"]["flex-window"]
    d = doc(rec("seed", "sparsek", 1.0, passed=False), rec("seed", "sdpa-cudnn", 13.0))
    (t1,) = rows_of(d, "T1")
    assert t1["status"] == "not measurable" and "error check" in t1["reason"]


def test_t3_prefers_vllm_then_the_fastest_full_context_decode():
    case = "decode-32k-b16"
    with_vllm = doc(rec(case, "sparsek-decode", 0.05), rec(case, "vllm-paged", 0.6), rec(case, "sdpa-decode", 0.5))
    (row,) = rows_of(with_vllm, "T3")
    assert row["baseline"] == "vllm-paged" and row["speedup"] == pytest.approx(12.0) and row["status"] == "pass"
    assert row["sdpa_floor"] == "sdpa-decode"
    without = doc(rec(case, "sparsek-decode", 0.05), rec(case, "vllm-paged", status="skipped", reason="vLLM is not installed"),
                  rec(case, "sdpa-decode", 0.5), rec(case, "flex-paged", 3.0))
    (row,) = rows_of(without, "T3")
    assert row["baseline"] == "sdpa-decode" and row["excluded"]["vllm-paged"].startswith("skipped")


def test_a_tier_without_its_kind_of_case_says_so():
    rows = tiers.assess(doc(rec("seed", "sparsek", 10.0), rec("seed", "sdpa-cudnn", 13.0)))
    assert [r["tier"] for r in rows] == ["T1", "T2", "T3", "T1-train", "T2-train"]
    t3 = rows[2]
    assert t3["status"] == "not measurable" and t3["reason"] == "no decode case in this run"
    assert rows[-1]["status"] == "not measurable" and rows[-1]["reason"] == "no train case in this run"


def test_brief_targets_at_seed():
    d = doc(rec("seed", "sparsek", 0.36), rec("seed", "sdpa-cudnn", 13.0), rec("seed", "flex-window", 0.3))
    t1, t2 = rows_of(d, "T1")[0], rows_of(d, "T2")[0]
    assert t1["brief"]["met"] is True  # 360 us / 96 heads = 3.75 <= 3.820
    assert t1["brief"]["speedup_over_sdpa"] == pytest.approx(13.0 / 0.36)
    assert t2["brief"]["met"] is False and t2["brief"]["strict"] is True  # 3.75 is not < 3.0
    assert t2["status"] == "fail"  # and the measured structured peer is faster


def test_explain_shows_the_brief_figures_are_impossible():
    rows = {r["tier"]: r for r in tiers.explain({"matmul": {"tflops": 775.0}})}
    t1 = rows["T1"]
    assert t1["us_per_iter"] == pytest.approx(366.72)
    assert t1["sdpa_full_matrix_tflops"] == pytest.approx(35979, rel=1e-3)  # DESIGN's "36 PFLOP/s"
    assert t1["sdpa_full_matrix_x_peak"] == pytest.approx(46.4, rel=1e-2)  # "about 46x"
    assert t1["sdpa_causal_tflops"] == pytest.approx(17994, rel=1e-3)
    assert rows["T2"]["us_per_iter"] == pytest.approx(288.0) and rows["T3"]["us_per_iter"] == pytest.approx(192.0)
    assert rows["T2"]["sparsek_tflops"] == pytest.approx(4 * 16 * 96 * 128 * 2851200 / 288e-6 / 1e12)
    assert tiers.explain(None)[0]["sparsek_x_peak"] is None
