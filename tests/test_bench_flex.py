"""FlexAttention adapters on the CPU: block masks built from tile tables cover exactly the tiles
the pattern touches (full tiles truly full), and the SparseK mask_mod/score_mod reproduce
sparsek's reference. The GPU run compiles the same masks and mods; here they run eagerly."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsek import reference, selection
from sparsek.bench.cases import Case, make_inputs
from sparsek.bench.impls import base, get_impl
from sparsek.bench.impls.dense import window_block_tables
from sparsek.bench.impls.sparsek_impls import sparsek_block_tables, sparsek_mods

flex = pytest.importorskip("torch.nn.attention.flex_attention")

BLOCK = 32  # 8 x 8 tiles at S = 256; the GPU adapters use 128
CASE = Case("flex-test", "prefill", 1, 4, 2, 256, 16, "float32", 24, 20, "cpu", 11)


def _eager(q, k, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex.flex_attention(q, k, v, enable_gqa=True, **kw)


def _tiles(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(S, S) bool -> (n, n, block*block) per tile."""
    n = mask.shape[0] // block
    return mask.view(n, block, n, block).permute(0, 2, 1, 3).reshape(n, n, -1)


@pytest.fixture(scope="module")
def selected():
    """Inputs, sparsek's reference output, and the selection (what the op returns on the CPU)."""
    x = make_inputs(CASE)
    sel = selection.select(x.scores, CASE.topk, CASE.window)
    out, _ = reference.attention_dense(x.q, x.k, x.v, x.scores, CASE.topk, CASE.window, CASE.scale, sel)
    return x, out, sel.tau, sel.end


@pytest.mark.parametrize("span", [None, 44, 32, 100])
def test_window_tables_are_exact(span):
    any_, full = window_block_tables(256, span, BLOCK)
    i, j = torch.arange(256).view(-1, 1), torch.arange(256).view(1, -1)
    mask = (j <= i) if span is None else (j <= i) & (i - j < span)
    tiles = _tiles(mask, BLOCK)
    assert torch.equal(any_, tiles.any(-1)) and torch.equal(full, tiles.all(-1))


def test_sparsek_tables_are_exact(selected):
    x, _, tau, end = selected
    mask_mod, _ = sparsek_mods(CASE, x.scores, tau, end)
    any_, full = sparsek_block_tables(end, CASE.window, CASE.group, BLOCK)
    assert any_.shape == full.shape == (1, 4, 8, 8)
    i, j = torch.arange(256).view(-1, 1), torch.arange(256).view(1, -1)
    for h in range(CASE.q_heads):
        tiles = _tiles(mask_mod(torch.tensor(0), torch.tensor(h), i, j), BLOCK)
        assert torch.equal(any_[0, h], tiles.any(-1)), h  # every touched tile, and no other
        assert bool((tiles.all(-1) | ~full[0, h]).all()), h  # a full tile never needs the mask


def test_flex_adapters_build_what_they_claim(selected):
    x = selected[0]
    rows = torch.arange(CASE.seq_len)
    for impl_id, ref in (("flex-causal", base.dense_causal_reference), ("flex-window", base.window_reference)):
        bm, score_mod, _, _ = get_impl(impl_id).build(CASE, x)
        got = _eager(x.q, x.k, x.v, score_mod=score_mod, block_mask=bm, scale=CASE.scale)
        torch.testing.assert_close(got, ref(CASE, x, rows), atol=2e-5, rtol=2e-5)
    # flex-sparsek: selection from sparsek's op (its reference on the CPU), output = the op's
    bm, score_mod, notes, compare_with = get_impl("flex-sparsek").build(CASE, x)
    assert "reference selection" in notes[0] and set(compare_with) == {"sparsek-op"}
    got = _eager(x.q, x.k, x.v, score_mod=score_mod, block_mask=bm, scale=CASE.scale)
    torch.testing.assert_close(got, selected[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, compare_with["sparsek-op"], atol=2e-5, rtol=2e-5)
