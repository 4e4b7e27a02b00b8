"""The selection against a brute-force definition, and its structural properties."""

import pytest
import torch

from conftest import seed_for
from sparsek import selection as sel_mod


def brute_force(u, topk, window):
    """Per query: tau by bisection, S_i by sorting (score, index). u (S,) float64."""
    S = u.numel()
    taus, sets = [], []
    for i in range(S):
        n = max(0, i - window + 1)
        c = u[:n]
        if n <= topk:
            taus.append(float("-inf"))
            sets.append(set(range(n)))
            continue
        lo, hi = float(c.min()) - 1.0, float(c.max())
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if float((c - mid).clamp(0, 1).sum()) > topk:
                lo = mid
            else:
                hi = mid
        taus.append(hi)
        order = sorted(range(n), key=lambda j: (float(c[j]), j))
        sets.append(set(order[-topk:]))
    return taus, sets


CASES = [(S, K, W, scale, ties) for S, K, W in [(1, 1, 0), (7, 3, 0), (33, 5, 4), (40, 64, 3), (50, 7, 60), (64, 1, 1), (45, 12, 0)]
         for scale, ties in [(0.05, False), (1.0, False), (20.0, False), (1.0, True)]]


@pytest.mark.parametrize("S,topk,window,scale,ties", CASES, ids=lambda x: str(x))
def test_selection_matches_brute_force(S, topk, window, scale, ties):
    g = torch.Generator().manual_seed(seed_for(S, topk, window, scale, ties))
    u = torch.randn(2, 1, S, generator=g, dtype=torch.float64) * scale
    if ties:
        u = torch.round(u * 2) / 2
    sel = sel_mod.select(u, topk, window)
    for b in range(2):
        taus, sets = brute_force(u[b, 0], topk, window)
        for i in range(S):
            t = float(sel.tau[b, 0, i])
            assert t == taus[i] or abs(t - taus[i]) < 1e-9, (b, i, t, taus[i])
            got = {j for j in range(S) if j + window <= i < int(sel.end[b, 0, j])}
            assert got == sets[i], (b, i)


def _random_selection(S=300, topk=17, window=9, scale=1.0, ties=False, B=2, H=3):
    g = torch.Generator().manual_seed(seed_for(S, topk, window, scale, ties, B, H))
    u = torch.randn(B, H, S, generator=g) * scale
    if ties:
        u = torch.round(u * 2) / 2
    return u, sel_mod.select(u, topk, window)


@pytest.mark.parametrize("scale,ties", [(0.1, False), (1.0, False), (10.0, False), (1.0, True)])
def test_tau_is_non_decreasing(scale, ties):
    _, sel = _random_selection(scale=scale, ties=ties)
    assert (sel.tau[..., 1:] >= sel.tau[..., :-1]).all()


@pytest.mark.parametrize("window", [0, 9])
def test_gates_in_unit_interval_on_selection(window):
    u, sel = _random_selection(window=window)
    mask = sel_mod.selected_mask(sel)
    g = (u.double().unsqueeze(2) - sel.tau.double().unsqueeze(-1)).clamp(0, 1)
    assert (g[mask] > 0).all() and (g[mask] <= 1).all()
    gw = sel_mod.gates(sel, u)
    assert (gw[mask] == g[mask]).all()
    assert ((gw > 0) == (mask | sel_mod.window_mask(u.shape[-1], window).expand_as(mask))).all()


@pytest.mark.parametrize("topk,window", [(17, 9), (1, 0), (400, 3), (5, 0)])
def test_selected_set_size(topk, window):
    u, sel = _random_selection(topk=topk, window=window, ties=True)
    S = u.shape[-1]
    n = sel_mod.candidate_counts(S, window)
    size = sel_mod.selected_mask(sel).sum(-1)
    assert (size == n.clamp(max=topk)).all()


@pytest.mark.parametrize("window", [0, 9])
def test_each_key_selected_by_one_contiguous_run(window):
    u, sel = _random_selection(window=window, ties=True)
    mask = sel_mod.selected_mask(sel).long()  # (B, H, query, key)
    # Along the query axis, a contiguous run has at most one rising and one falling edge.
    edges = (mask[:, :, 1:] - mask[:, :, :-1]).abs().sum(2) + mask[:, :, 0] + mask[:, :, -1]
    assert (edges <= 2).all()
    S = u.shape[-1]
    j = torch.arange(S)
    runs = mask.sum(2)
    expected = (sel.end.long() - (j + window).clamp(max=S)).clamp(min=0)
    assert (runs == expected).all()


def test_nsoft_counts_soft_candidates():
    u, sel = _random_selection(scale=0.3)
    assert (sel.nsoft == sel_mod.soft_mask(sel, u).sum(-1)).all()
    assert int(sel.nsoft.max()) > 0


@pytest.mark.parametrize("block", [1, 8, 13, 64])
def test_block_union_is_union_of_selections(block):
    u, sel = _random_selection(topk=11, window=5, ties=True)
    S = u.shape[-1]
    mask = sel_mod.selected_mask(sel)
    for i0 in range(0, S, block):
        i1 = min(S, i0 + block)
        keys, valid = sel_mod.block_union(sel, i0, i1)
        want = mask[:, :, i0:i1].any(2)
        for b in range(u.shape[0]):
            for h in range(u.shape[1]):
                got = keys[b, h][valid[b, h]]
                assert got.tolist() == want[b, h].nonzero().flatten().tolist()
                assert got.numel() <= sel.topk + (i1 - i0) - 1


def test_no_candidates_when_window_covers_sequence():
    u = torch.randn(1, 2, 10)
    sel = sel_mod.select(u, 3, 10)
    assert torch.isinf(sel.tau).all() and not sel_mod.selected_mask(sel).any()
