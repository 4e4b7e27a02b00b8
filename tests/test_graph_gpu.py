"""The forward without a host synchronisation (run on the GPU machine; skipped without a GPU):
captured in a CUDA graph and replayed on new inputs, non-finite scores poisoned on the device,
and the segmented selection walk (the default) against the serial walk (SPARSEK_SELECT=walk)."""

from __future__ import annotations

import pytest
import torch

import sparsek
from conftest import cuda_kernels
from sparsek import _cuda
from sparsek import selection as sel_mod
from sparsek.bench.kernel_ab import shaped_scores

pytestmark = pytest.mark.gpu


def _inputs(seed, B, Hq, Hkv, S, D, dtype=torch.bfloat16, ties=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=gen).to("cuda", dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to("cuda", dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to("cuda", dtype)
    u = torch.randn(B, Hkv, S, generator=gen).cumsum(-1) * 0.05 + torch.randn(B, Hkv, S, generator=gen)
    if ties:
        u = torch.round(u * 4) / 4
    return q, k, v, u.float().cuda()


@pytest.mark.parametrize("check_finite", [False, True], ids=["check_finite=False", "check_finite=True"])
def test_forward_captured_in_a_cuda_graph(check_finite):
    """check_finite=True is skipped during the capture (a capture cannot synchronise)."""
    cuda_kernels()
    topk, window = 40, 16
    static = _inputs(1, 2, 8, 2, 300, 128)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (build, allocator) outside the capture
        for _ in range(2):
            sparsek.sparsek_attention(*static, topk=topk, window=window, check_finite=check_finite)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = sparsek.sparsek_attention(*static, topk=topk, window=window, check_finite=check_finite, return_lse=True)
    for seed in (2, 3):
        fresh = _inputs(seed, 2, 8, 2, 300, 128)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = sparsek.sparsek_attention(*fresh, topk=topk, window=window, return_lse=True)
        assert torch.equal(out, want), f"replay {seed}: output differs from eager"
        assert torch.equal(lse, want_lse), f"replay {seed}: lse differs from eager"
    # Non-finite scores in a replay: NaN over that (batch, kv head), the rest as eager.
    static[3][1, 0, 123] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(out[1, :4]).all() and torch.isnan(lse[1, :4]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, 4:]).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_scores_give_nan_rows(bad):
    cuda_kernels()
    topk, window = 24, 8
    q, k, v, u = _inputs(4, 2, 8, 2, 257, 64)
    good_out, good_lse = sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window, return_lse=True)
    u_bad = u.clone()
    u_bad[0, 1, 100] = bad
    u_bad[1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"scores must be finite, got .* at index \(0, 1, 100\)"):
        sparsek.sparsek_attention(q, k, v, u_bad, topk=topk, window=window)
    out, lse = sparsek.sparsek_attention(q, k, v, u_bad, topk=topk, window=window, return_lse=True, check_finite=False)
    torch.cuda.synchronize()
    poisoned = [(0, slice(4, 8)), (1, slice(0, 4))]  # (batch, query heads of the kv head)
    for b, heads in poisoned:
        assert torch.isnan(out[b, heads]).all() and torch.isnan(lse[b, heads]).all(), (b, heads)
    for b, heads in [(0, slice(0, 4)), (1, slice(4, 8))]:  # untouched rows: exactly as before
        assert torch.equal(out[b, heads], good_out[b, heads]) and torch.equal(lse[b, heads], good_lse[b, heads])
    tau = torch.ops.sparsek.attention_fwd(q, k, v, u_bad, topk, window, 64**-0.5, False)[2]
    assert torch.isnan(tau[0, 1]).all() and torch.isnan(tau[1, 0]).all()
    assert not torch.isnan(tau[0, 0]).any() and not torch.isnan(tau[1, 1]).any()


SELECT_CASES = [  # B, H, S, topk, window, scores
    (2, 3, 700, 31, 5, "walk"),
    (1, 4, 3000, 129, 64, "ties"),  # flat roots and equal breakpoints
    (1, 2, 5000, 512, 256, "walk"),  # the seed case's topk and window, several chunks
    (1, 2, 2000, 1, 0, "ties"),
    (1, 2, 600, 900, 0, "walk"),  # topk >= every prefix
    # every score within a unit of the others: chunks past 9216 keys (kSegMaxBand) overflow the
    # segmented kernel's shared band and walk serially in global memory inside that kernel
    (1, 2, 16384, 10000, 0, "narrow"),
]


def _select(u, topk, window, block_q, algo, monkeypatch):
    monkeypatch.setenv("SPARSEK_SELECT", algo)
    out = _cuda.ops().select(u, topk, window, block_q, True)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "B{}-H{}-S{}-K{}-W{}-{}".format(*c))
def test_segmented_matches_walk_and_reference(case, monkeypatch):
    B, H, S, topk, window, kind = case
    cuda_kernels()
    gen = torch.Generator().manual_seed(S + topk)
    u = torch.randn(B, H, S, generator=gen).cumsum(-1) * 0.05 + torch.randn(B, H, S, generator=gen)
    if kind == "ties":
        u = torch.round(u * 4) / 4
    if kind == "narrow":
        u = torch.rand(B, H, S, generator=gen) * 0.5
    u = u.float().cuda()
    block_q = 32
    walk = _select(u, topk, window, block_q, "walk", monkeypatch)
    seg = _select(u, topk, window, block_q, "segmented", monkeypatch)
    assert torch.equal(seg[1], walk[1]), "end differs between the segmented and the serial walk"
    assert torch.equal(seg[3], walk[3]), "block counts differ"
    for r in range(B * H):  # list order: the same scan in both, so the same lists
        for blk in range(seg[3].shape[1]):
            n = int(seg[3][r, blk])
            assert torch.equal(seg[2][r, blk, :n], walk[2][r, blk, :n]), (r, blk)
    assert torch.equal(torch.isfinite(seg[0]), torch.isfinite(walk[0]))
    finite = torch.isfinite(walk[0])
    torch.testing.assert_close(seg[0][finite], walk[0][finite], rtol=2e-6, atol=1e-6)
    sel = sel_mod.select(u, topk, window)
    assert torch.equal(seg[1], sel.end), "end differs from the reference"
    torch.testing.assert_close(seg[0][finite], sel.tau[finite], rtol=2e-6, atol=1e-6)


def _drifting_scores(seed):
    """(2, 3, 5000) scores: a slow random walk plus noise, so bands vary from chunk to chunk."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 5000, generator=gen).cumsum(-1) * 0.05 + torch.randn(2, 3, 5000, generator=gen)).float().cuda()


@pytest.mark.parametrize("variable, value, seed", [
    *(("SPARSEK_SELECT_CHUNK", chunk, 5) for chunk in ("8", "100", "256", "1024", "2048")),
    *(("SPARSEK_SELECT_BAND", band, 6) for band in ("256", "2048", "2816", "9216")),
])
def test_segmented_overrides_match_walk(variable, value, seed, monkeypatch):
    """Every override of the segmented walk gives the serial walk's integers.
    SPARSEK_SELECT_CHUNK: the rule picks 1024 prefix lengths per CTA, fewer (down to 256) where
    SMs would idle; any chunk, odd or not a multiple of the eight segments, is exact.
    SPARSEK_SELECT_BAND: the keys a segmented CTA keeps in shared memory in the first launch; a
    chunk whose band is larger goes to the second launch, with the whole band (9216: one launch)."""
    cuda_kernels()
    u = _drifting_scores(seed)
    walk = _select(u, 512, 256, 32, "walk", monkeypatch)
    monkeypatch.setenv(variable, value)
    seg = _select(u, 512, 256, 32, "segmented", monkeypatch)
    assert torch.equal(seg[1], walk[1]) and torch.equal(seg[3], walk[3]), f"{variable}={value}"


@pytest.mark.parametrize("kind", ["drift", "flat", "constant"])
def test_two_launch_plan_matches_one_launch(kind, monkeypatch):
    """topk <= 512 at S = 4096 (the seed case's shape): the rule's first launch keeps 2,816 keys
    and defers larger bands to a second launch of persistent CTAs (flat and constant scores: every
    chunk from the third on, 512 of them, about two per CTA). The same tau, end and block lists,
    bit for bit, as one launch with the whole band, and the serial walk's integers."""
    cuda_kernels()
    B, H, S, topk, window = 8, 32, 4096, 512, 256
    gen = torch.Generator().manual_seed(11)
    u = torch.randn(B, H, S, generator=gen).cumsum(-1) * 0.05 + torch.randn(B, H, S, generator=gen)
    u = shaped_scores(u.float(), {"drift": "case"}.get(kind, kind)).cuda()  # kernel_ab's flat and constant scores
    two = _select(u, topk, window, 32, "segmented", monkeypatch)
    monkeypatch.setenv("SPARSEK_SELECT_BAND", "9216")
    one = _select(u, topk, window, 32, "segmented", monkeypatch)
    walk = _select(u, topk, window, 32, "walk", monkeypatch)
    assert torch.equal(two[0], one[0]), "tau differs between the two-launch plan and one launch"
    for a, name in ((one, "one launch"), (walk, "the serial walk")):
        assert torch.equal(two[1], a[1]) and torch.equal(two[3], a[3]), f"end or counts differ from {name}"
        listed = torch.arange(two[2].shape[-1], device=u.device) < two[3].unsqueeze(-1)
        assert torch.equal(two[2][listed], a[2][listed]), f"block lists differ from {name}"


@pytest.mark.parametrize("value", ["255", "9217", "2k"])
def test_select_band_override_rejects_bad_value(value, monkeypatch):
    cuda_kernels()
    monkeypatch.setenv("SPARSEK_SELECT_BAND", value)
    with pytest.raises(ValueError, match=r"SPARSEK_SELECT_BAND must be an integer in \[256, 9216\], got '" + value):
        _cuda.ops().select(torch.zeros(1, 1, 2000, device="cuda"), 4, 2, 32)


@pytest.mark.parametrize("value", ["4", "4096", "12x", "big"])
def test_select_chunk_override_rejects_bad_value(value, monkeypatch):
    cuda_kernels()
    monkeypatch.setenv("SPARSEK_SELECT_CHUNK", value)
    with pytest.raises(ValueError, match=r"SPARSEK_SELECT_CHUNK must be an integer in \[8, 2048\], got '" + value):
        _cuda.ops().select(torch.zeros(1, 1, 100, device="cuda"), 4, 2, 32)


@pytest.mark.parametrize("variable, value, message", [
    ("SPARSEK_SELECT", "serial", r"SPARSEK_SELECT must be 'segmented' or 'walk', got 'serial'"),
    ("SPARSEK_FWD_KERNEL", "6", r"SPARSEK_FWD_KERNEL must be 7 \(the default, warp-specialised\) or 5 \(the previous kernel\), got '6'"),
    ("SPARSEK_FWD_KERNEL", "78", r"SPARSEK_FWD_KERNEL must be 7 .*got '78'"),
])
def test_kernel_switch_rejects_bad_value(variable, value, message, monkeypatch):
    """A mistyped switch is an error naming it, never a silent fallback to the default."""
    cuda_kernels()
    monkeypatch.setenv(variable, value)
    q = torch.zeros(1, 4, 100, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 100, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        sparsek.sparsek_attention(q, k, k, torch.zeros(1, 1, 100, device="cuda"), topk=4, window=2)


def test_segmented_long_64k_matches_walk(monkeypatch):
    """long-64k's selection (B1 Hkv8 S65536, topk 2048, window 512): end bit for bit."""
    cuda_kernels()
    from sparsek.bench.cases import get_case, make_inputs

    case = get_case("long-64k")
    u = make_inputs(case).scores
    walk = _select(u, case.topk, case.window, 32, "walk", monkeypatch)
    seg = _select(u, case.topk, case.window, 32, "segmented", monkeypatch)
    assert torch.equal(seg[1], walk[1]) and torch.equal(seg[3], walk[3])
    finite = torch.isfinite(walk[0])
    torch.testing.assert_close(seg[0][finite], walk[0][finite], rtol=2e-6, atol=1e-6)
