"""Decode adapters of the benchmark registry on the CPU: outputs against the references,
availability reasons, the paged layouts, and the T3 rows' bytes per sequence."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from sparsek.bench import impls as registry
from sparsek.bench import tiers
from sparsek.bench.cases import CASES, make_inputs
from sparsek.bench.impls import base
from sparsek.bench.impls import decode as dec

SMOKE = CASES["cpu-smoke-decode"]


@pytest.fixture(scope="module")
def smoke():
    return make_inputs(SMOKE)


def test_decode_ids_are_registered_with_reasons_on_the_cpu():
    avail = {i.id: i.available(SMOKE) for i in registry.impls_for(SMOKE)}
    assert set(avail) == {"sparsek-decode", "sdpa-decode", "vllm-paged", "xformers-splitk-paged", "flex-paged"}
    assert avail["sparsek-decode"] is None and avail["sdpa-decode"] is None
    for impl_id in ("vllm-paged", "xformers-splitk-paged", "flex-paged"):
        assert "runs on CUDA only" in avail[impl_id], impl_id
    assert registry.get_impl("sparsek-decode").available(CASES["seed"]).endswith("is a prefill case")


def test_sparsek_decode_checked_output_is_the_new_tokens_step(smoke):
    impl = registry.get_impl("sparsek-decode")
    prepared = impl.prepare(SMOKE, smoke)
    ref = base.decode_sparsek_reference(SMOKE, smoke, None)
    torch.testing.assert_close(prepared.output(), ref, atol=2e-5, rtol=2e-5)
    for _ in range(5):  # timed steps advance the cache with replayed context tokens
        assert prepared.fn().shape == ref.shape
    torch.testing.assert_close(prepared.output(), ref, atol=2e-5, rtol=2e-5)  # restored, then stepped
    assert any("reference step" in n for n in prepared.notes)


def test_sdpa_decode_attends_the_full_context(smoke):
    prepared = registry.get_impl("sdpa-decode").prepare(SMOKE, smoke)
    torch.testing.assert_close(prepared.output(), base.decode_full_reference(SMOKE, smoke, None), atol=2e-5, rtol=2e-5)


def test_page_tables_are_seeded_permutations_and_pages_hold_the_tokens(smoke):
    case = dataclasses.replace(SMOKE, seq_len=300)
    table = dec.page_table(case, 16, "cpu")
    assert table.shape == (2, 19) and sorted(table.flatten().tolist()) == list(range(38))
    assert torch.equal(table, dec.page_table(case, 16, "cpu"))
    x = make_inputs(case)
    k_pool, v_pool = dec.token_major_pages(case, x, table, 16)
    k, v = dec.full_cache(x)
    for b, t in ((0, 0), (1, 17), (1, 300)):  # 300: the new token
        page, off = table[b, t // 16], t % 16
        assert torch.equal(k_pool[page, off], k[b, :, t]) and torch.equal(v_pool[page, off], v[b, :, t])


def test_flex_paged_mask_gives_the_full_context_output():
    """Eager FlexAttention on the CPU (the adapter times the compiled one on a GPU) over the
    paged pools with the adapter's block mask equals the full-context reference."""
    from torch.nn.attention.flex_attention import flex_attention

    case = dataclasses.replace(SMOKE, seq_len=300)
    x = make_inputs(case)
    k_pool, v_pool, table, logical = dec.flex_paged_layout(case, x)
    block_mask = dec.flex_paged_block_mask(case, table, logical)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile")  # eager on purpose: no GPU here
        out = flex_attention(x.q, k_pool, v_pool, block_mask=block_mask, scale=case.scale, enable_gqa=True)
    torch.testing.assert_close(out, base.decode_full_reference(case, x, None), atol=2e-5, rtol=2e-5)


def test_t3_rows_carry_bytes_per_sequence():
    assert tiers.T3_CASES == ("decode-32k-b1", "decode-32k-b16", "decode-32k-b64",
                              "decode-128k-b1", "decode-128k-b16", "decode-128k-b64")

    def rec(impl, seconds):
        return {"case": "decode-128k-b16", "impl": impl, "kind": "decode", "status": "ok",
                "case_spec": dataclasses.asdict(CASES["decode-128k-b16"]), "timing": {"median": seconds},
                "error": {"passed": True}}

    rows = [r for r in tiers.assess({"records": [rec("sparsek-decode", 60e-6), rec("sdpa-decode", 1.9e-3)]})
            if r["tier"] == "T3"]
    (row,) = rows
    assert row["status"] == "pass"
    kv = row["kv_bytes_per_seq"]
    assert kv["sparsek_kv"] == 2 * 8 * (2048 + 1 + 512) * 128 * 2  # 10 MiB per sequence for any context
    assert kv["full_context_kv"] == 2 * 8 * 131073 * 128 * 2
    assert kv["sparsek_state"] > kv["sparsek_kv"]
