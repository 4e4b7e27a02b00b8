"""The implementations registry: ids, availability reasons, adapters' layouts and references."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

import fake_xformers
from sparsek import reference
from sparsek.bench import impls as registry
from sparsek.bench.cases import CASES, UnknownName, make_inputs
from sparsek.bench.impls import base, dense
from sparsek.bench.metrics import PATTERNS

PREFILL_IDS = {"sparsek", "sparsek-ref", "flex-sparsek", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
               "flex-causal", "xformers-cutlass", "xformers-flash", "xformers-flash3", "flex-window", "xformers-local"}
DECODE_IDS = {"sparsek-decode", "sdpa-decode", "vllm-paged", "xformers-splitk-paged", "flex-paged"}
SMOKE = CASES["cpu-smoke"]


@pytest.fixture(scope="module")
def smoke_inputs():
    return make_inputs(SMOKE)


def test_the_registry_holds_the_design_ids():
    assert set(registry.IMPLS) == PREFILL_IDS | DECODE_IDS
    assert {i.id for i in registry.impls_for(SMOKE)} == PREFILL_IDS
    assert {i.id for i in registry.impls_for(CASES["decode-32k-b16"])} == DECODE_IDS
    for impl in registry.IMPLS.values():
        assert impl.pattern in PATTERNS and impl.kind in ("prefill", "decode") and impl.family
    with pytest.raises(UnknownName, match="valid ids: sparsek, sparsek-ref"):
        registry.get_impl("sparsek-cuda")


def test_cpu_availability_reasons():
    avail = {i.id: i.available(SMOKE) for i in registry.impls_for(SMOKE)}
    assert avail["sparsek-ref"] is None and avail["sdpa-math"] is None and avail["sdpa-flash"] is None
    assert "runs on CUDA only" in avail["sparsek"]  # the CUDA path never times the reference
    assert "no CPU kernel" in avail["sdpa-cudnn"] and "no CPU kernel" in avail["sdpa-efficient"]
    for i in ("flex-causal", "flex-window", "flex-sparsek", "xformers-cutlass", "xformers-local"):
        assert "runs on CUDA only" in avail[i], i
    assert registry.get_impl("sdpa-math").available(CASES["decode-4k-b1"]).endswith("is a decode case")


def test_decode_slots_are_registered_with_their_kind():
    # The adapters themselves are tested in tests/test_decode_bench.py.
    for impl_id in DECODE_IDS:
        impl = registry.get_impl(impl_id)
        assert impl.kind == "decode"
        assert impl.pattern in ("decode-sparsek", "decode-full")


def test_reference_is_timed_only_where_it_is_tractable(monkeypatch):
    ref = registry.get_impl("sparsek-ref")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "correctness oracle" in ref.available(CASES["long-128k"])
    assert "correctness oracle" in ref.available(CASES["seed"])  # B*Hkv*S = 6.3M
    assert ref.available(dataclasses.replace(SMOKE, device="cuda")) is None


def test_math_backend_memory_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 2**30, 80 * 2**30))
    reason = registry.get_impl("sdpa-math").available(CASES["seed"])
    assert reason.startswith("the math backend's two S x S matrices needs about 192.0 GiB; 80.0 GiB is free")


@pytest.mark.parametrize("impl_id", ["sdpa-math", "sdpa-flash", "sparsek-ref"])
def test_cpu_adapters_match_their_reference(impl_id, smoke_inputs):
    impl = registry.get_impl(impl_id)
    out = impl.prepare(SMOKE, smoke_inputs).output()
    rows = base.check_rows(SMOKE)
    ref = impl.reference_rows(SMOKE, smoke_inputs, rows)
    assert out.shape == (1, 4, 256, 32) and ref.shape == out.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_sdpa_expands_kv_heads_when_a_backend_rejects_gqa(monkeypatch, smoke_inputs):
    impl = registry.get_impl("sdpa-math")
    monkeypatch.setattr(impl, "_mode", lambda case: ("expand", "kv heads repeated (test)"))
    prepared = impl.prepare(SMOKE, smoke_inputs)
    assert prepared.notes == ["kv heads repeated (test)"]
    torch.testing.assert_close(prepared.output(), base.dense_causal_reference(SMOKE, smoke_inputs, torch.arange(256)),
                               atol=2e-5, rtol=2e-5)


def test_references_agree_with_independent_formulations(smoke_inputs):
    x, c = smoke_inputs, SMOKE
    rows = torch.arange(c.seq_len)
    sdpa = F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(base.dense_causal_reference(c, x, rows), sdpa, atol=2e-5, rtol=2e-5)
    span = c.key_budget
    i, j = rows.view(-1, 1), rows.view(1, -1)
    mask = (j <= i) & (j > i - span)
    windowed = F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(base.window_reference(c, x, rows), windowed, atol=2e-5, rtol=2e-5)
    dense_sk, _ = reference.attention_dense(x.q, x.k, x.v, x.scores, c.topk, c.window, c.scale)
    some = torch.tensor([0, 15, 16, 47, 48, 200, 255])
    torch.testing.assert_close(reference.attention_rows(x.q, x.k, x.v, x.scores, c.topk, c.window, c.scale, some.tolist()),
                               dense_sk[:, :, some], atol=2e-5, rtol=2e-5)


def test_decode_references_match_prefill_on_the_extended_sequence():
    c = CASES["cpu-smoke-decode"]
    x = make_inputs(c)
    k = torch.cat([x.k, x.k_new], 2)
    v = torch.cat([x.v, x.v_new], 2)
    u = torch.cat([x.scores, x.score_new], 2)
    q = torch.cat([torch.zeros(c.batch, c.q_heads, c.seq_len, c.head_dim), x.q], 2)  # only the last row matters
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[:, :, -1:]
    torch.testing.assert_close(base.decode_full_reference(c, x, None), full, atol=2e-5, rtol=2e-5)
    sk, _ = reference.attention_dense(q, k, v, u, c.topk, c.window, c.scale)
    torch.testing.assert_close(base.decode_sparsek_reference(c, x, None), sk[:, :, -1:], atol=2e-5, rtol=2e-5)


def test_check_rows_cover_the_pattern_edges():
    rows = base.check_rows(CASES["long-16k"])
    assert len(rows) == base.CHECK_ROWS and rows.unique().numel() == len(rows)
    assert {0, 511, 512, 2559, 2560, 16383} <= set(rows.tolist())
    assert torch.equal(rows, base.check_rows(CASES["long-16k"]))  # seeded
    assert torch.equal(base.check_rows(SMOKE), torch.arange(256))
    assert base.check_rows(CASES["decode-4k-b1"]).tolist() == [0]


# ---------------------------------------------------------------------------------------------
# xFormers through a fake module: the probe reports the library's own message, and the layout
# (B, S, Hkv, G, D) with stride-0 k/v plus the biases give the reference results.


# the shape of xFormers 0.0.35's refusal on a torch it was not built for
REFUSAL = """No operator found for `memory_efficient_attention_forward` with inputs:
     query       : shape=(1, 256, 2, 2, 32) (torch.bfloat16)
     key         : shape=(1, 256, 2, 2, 32) (torch.bfloat16)
     value       : shape=(1, 256, 2, 2, 32) (torch.bfloat16)
     attn_bias   : <class 'xformers.ops.fmha.attn_bias.LowerTriangularMask'>
     p           : 0.0
`fa2F@0.0.0` is not supported because:
    xFormers wasn't build with CUDA support
`cutlassF-pt` is not supported because:
    xFormers wasn't build with CUDA support
    operator wasn't built - see `python -m xformers.info` for more info"""


def test_xformers_probe_reports_the_real_refusal(monkeypatch):
    fake_xformers.install(monkeypatch, refuse=REFUSAL)
    reason = registry.get_impl("xformers-flash").probe(SMOKE, "cpu")
    assert reason == ("NotImplementedError: No operator found for `memory_efficient_attention_forward` with inputs "
                      "(fa2F@0.0.0: xFormers wasn't build with CUDA support; cutlassF-pt: xFormers wasn't build with "
                      "CUDA support, operator wasn't built - see `python -m xformers.info` for more info)")


def test_xformers_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    reason = registry.get_impl("xformers-cutlass").probe(SMOKE, "cpu")
    assert reason.startswith("xFormers is not installed")


@pytest.mark.parametrize("impl_id,ref", [("xformers-cutlass", base.dense_causal_reference),
                                         ("xformers-local", base.window_reference)])
@pytest.mark.parametrize("case_name", ["cpu-smoke", "mha"])
def test_xformers_layout_and_biases(monkeypatch, impl_id, ref, case_name):
    fake_xformers.install(monkeypatch)
    case = SMOKE if case_name == "cpu-smoke" else dataclasses.replace(SMOKE, kv_heads=4)
    x = make_inputs(case)
    impl = registry.get_impl(impl_id)
    assert impl.probe(case, "cpu") is None
    prepared = impl.prepare(case, x)
    torch.testing.assert_close(prepared.output(), ref(case, x, torch.arange(case.seq_len)), atol=2e-5, rtol=2e-5)
    if case.group > 1:
        q5, k5, _ = dense.XFormersImpl.layout(case, x.q, x.k, x.v)
        assert q5.shape == (1, 256, 2, 2, 32) and k5.stride(3) == 0  # expanded, not copied
