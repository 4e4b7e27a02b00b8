"""SparseK selection: the reference definition, in plain PyTorch.

For one (batch, kv head) row of scores ``u`` (length S), ``topk = K`` and ``window = W``,
query ``i`` sees

* the window      ``W_i = {j : i - W < j <= i}``
* the candidates  ``C_i = {j : 0 <= j <= i - W}``, ``n_i = |C_i| = max(0, i - W + 1)``
* the threshold   ``tau_i`` with ``sum_{j in C_i} clip(u_j - tau_i, 0, 1) = K``
  (``-inf`` while ``n_i <= K``; the smallest root when the roots form an interval)
* the selection   ``S_i = TopK(u over C_i, K)``, ties broken toward the larger index
* the gate        ``g_ij = clip(u_j - tau_i, 0, 1)`` on ``S_i`` and ``1`` on ``W_i``.

Everything depends on ``i`` only through ``n = n_i``, the length of the candidate prefix.
Two facts make the whole pattern cheap to describe (see docs/semantics.md):

* ``tau`` is non-decreasing in ``n``: adding a candidate can only raise the threshold.
* The K-th best candidate ``kth(n)`` (in the order "score, then index") is non-decreasing too,
  so key ``j`` is selected by one contiguous run of queries ``[j + W, end_j)``.

This module computes ``tau``, the size of the soft support ``|F_i|`` (keys with
``0 < clip(u_j - tau_i, 0, 1) < 1``, needed by the score gradient) and ``end``. All of it is
derived from one stable sort of each score row, so the selection is exact, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Elements of the (B, H, rows, S) work tensors per chunk of candidate prefixes: small on the
# CPU (cache), large on a GPU (fewer, bigger launches; about 1.5 GB of work tensors).
_ELEMENTS_PER_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 26}


@dataclass(frozen=True)
class Selection:
    """The whole SparseK pattern of one call.

    ``tau`` and ``nsoft`` are per query, ``end`` per key; with ``window`` they define every
    selected set: key ``j`` is selected by query ``i`` iff ``j + window <= i < end[j]``.
    """

    topk: int
    window: int
    tau: Tensor  # (B, H, S) float: threshold per query, -inf while n_i <= topk
    nsoft: Tensor | None  # (B, H, S) int64: |F_i|, candidates with 0 < gate < 1 (None when
    # rebuilt from tau and end alone; soft_mask(...).sum(-1) recomputes it)
    end: Tensor  # (B, H, S) int32: end of key j's selected run, in [min(j + W, S), S]


def candidate_counts(seq_len: int, window: int, device=None) -> Tensor:
    """``n_i = max(0, i - window + 1)`` for every query ``i``: (S,) int64."""
    i = torch.arange(seq_len, device=device)
    return (i - window + 1).clamp(min=0)


def _order(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ascending order of (score, index): the order in which keys win the top-k.

    Returns sorted values (B, H, S) float64, the key index at each sorted position
    (B, H, S) int64 and each key's sorted position (B, H, S) int64. A stable sort of the
    index-ordered row puts equal scores in ascending index order, so among equal scores
    the larger index sorts higher: exactly the tie rule of the top-k.
    """
    values, key_at = torch.sort(scores.double().contiguous(), dim=-1, stable=True)
    position = torch.empty_like(key_at)
    position.scatter_(-1, key_at, torch.arange(scores.shape[-1], device=scores.device).expand_as(key_at))
    return values, key_at, position


def _soft_sums(values: Tensor, cum_count: Tensor, cum_sum: Tensor, n: Tensor, t: Tensor):
    """Saturated count, soft count and soft sum of the present keys at threshold ``t``.

    values (B, H, S) ascending; cum_count, cum_sum (B, H, R, S + 1) prefix counts and sums of
    the present keys in sorted order; n (R,) present keys per row; t (B, H, R) thresholds.
    A present key is saturated when u >= t + 1 and soft when t < u < t + 1.
    """
    lo = torch.searchsorted(values, t, right=True)  # keys with u <= t
    hi = torch.searchsorted(values, t + 1.0, right=False)  # keys with u < t + 1
    c_lo = cum_count.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    c_hi = cum_count.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    s_lo = cum_sum.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    s_hi = cum_sum.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    saturated = n.view(1, 1, -1) - c_hi
    return saturated, c_hi - c_lo, s_hi - s_lo


def _threshold_rows(values, key_at, n, topk):
    """tau, |F| and the K-th best sorted position for candidate prefixes of lengths ``n`` (R,).

    Rows with n <= topk get tau = -inf, |F| = 0 and kth = -1 (every candidate is selected).
    """
    B, H, S = values.shape
    R = n.numel()
    present = key_at.unsqueeze(2) < n.view(1, 1, R, 1)  # (B, H, R, S)
    zero = values.new_zeros(B, H, R, 1)
    cum_count = torch.cat([zero.long(), present.long().cumsum(-1)], -1)
    cum_sum = torch.cat([zero, (present * values.unsqueeze(2)).cumsum(-1)], -1)

    # K-th best present key: the highest sorted position p with at least K present keys at
    # positions >= p, i.e. cum_count[p] <= n - K.
    kth = torch.searchsorted(cum_count[..., 1:].contiguous(), (n - topk).view(1, 1, R, 1).expand(B, H, R, 1).contiguous(), right=True).squeeze(-1)
    # cum_count[..., 1:][p] counts positions <= p; searchsorted gives the first p whose count
    # exceeds n - K, which is the K-th best from the top.

    # f(t) = sum clip(u - t, 0, 1) over present keys is continuous and non-increasing; its
    # breakpoints are the scores and the scores minus one. Bisect over those breakpoints for
    # the piece where f crosses K, then solve the piece in closed form.
    breaks = torch.sort(torch.cat([values - 1.0, values], -1), -1).values  # (B, H, 2S)
    lo = torch.zeros(B, H, R, dtype=torch.long, device=values.device)  # f(breaks[lo]) > K
    hi = torch.full_like(lo, 2 * S - 1)  # f(breaks[hi]) <= K (f(max u) = 0)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        t = breaks.gather(-1, mid)
        sat, cnt, tot = _soft_sums(values, cum_count, cum_sum, n, t)
        above = (sat + tot - t * cnt) > topk
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    t_mid = 0.5 * (breaks.gather(-1, lo) + breaks.gather(-1, hi))
    sat, cnt, tot = _soft_sums(values, cum_count, cum_sum, n, t_mid)
    # On the piece around t_mid, f(t) = sat + tot - cnt * t; cnt > 0 because f strictly drops
    # across the piece. When all gates are 0 or 1 the root set is an interval whose smallest
    # point is breaks[hi], which the same formula returns.
    # Written as (sum - integer) / count so that a single soft key at a flat root gives its
    # own score back exactly.
    tau = (tot - (topk - sat)) / cnt.clamp(min=1)
    _, nsoft, _ = _soft_sums(values, cum_count, cum_sum, n, tau)

    dense = (n <= topk).view(1, 1, R)
    tau = torch.where(dense, torch.full_like(tau, float("-inf")), tau)
    nsoft = torch.where(dense, torch.zeros_like(nsoft), nsoft)
    kth = torch.where(dense, torch.full_like(kth, -1), kth)
    return tau, nsoft, kth


def select(scores: Tensor, topk: int, window: int) -> Selection:
    """Compute the SparseK selection for scores (B, H, S); tau is returned in float64 or
    float32 to match ``scores`` (it is computed in float64 either way)."""
    B, H, S = scores.shape
    values, key_at, position = _order(scores)
    n_max = max(0, S - window)  # candidates of the last query
    lengths = torch.arange(1, n_max + 1, device=scores.device)  # every prefix length that occurs

    tau_n = values.new_full((B, H, n_max), float("-inf"))
    nsoft_n = torch.zeros(B, H, n_max, dtype=torch.long, device=scores.device)
    kth_n = torch.full((B, H, n_max), -1, dtype=torch.long, device=scores.device)
    budget = _ELEMENTS_PER_CHUNK.get(scores.device.type, 1 << 22)
    rows = max(1, budget // max(1, B * H * S))
    for r0 in range(0, n_max, rows):
        n = lengths[r0 : r0 + rows]
        if int(n[-1]) <= topk:  # every candidate is selected: nothing to solve
            continue
        tau_n[..., r0 : r0 + rows], nsoft_n[..., r0 : r0 + rows], kth_n[..., r0 : r0 + rows] = _threshold_rows(
            values, key_at, n, topk
        )

    # Per query: n_i = i - W + 1 candidates; queries without candidates keep -inf and 0.
    tau = values.new_full((B, H, S), float("-inf"))
    nsoft = torch.zeros(B, H, S, dtype=torch.long, device=scores.device)
    if n_max > 0:
        tau[..., window:] = tau_n
        nsoft[..., window:] = nsoft_n

    # Key j is selected for prefix lengths n in [j + 1, N_j), where N_j is the first n whose
    # K-th best key sorts above j (kth(n) is non-decreasing in n). Query i = n + W - 1.
    first_beaten = torch.searchsorted(kth_n.contiguous(), position.contiguous(), right=True) + 1  # N_j
    j = torch.arange(S, device=scores.device)
    n_end = torch.maximum(first_beaten, j + 1)
    end = (n_end - 1 + window).clamp(max=S)
    return Selection(topk=topk, window=window, tau=tau.to(scores.dtype), nsoft=nsoft, end=end.to(torch.int32))


def last_tau(scores: Tensor, topk: int) -> Tensor:
    """tau (B, H) float64 of a query whose candidates are all of ``scores`` (B, H, n): -inf when
    n <= topk. The same solve as ``select`` (decode builds its state from a context with it)."""
    values, key_at, _ = _order(scores)
    n = torch.tensor([scores.shape[-1]], device=scores.device)
    return _threshold_rows(values, key_at, n, topk)[0][..., 0]


def selected_mask(sel: Selection, rows: Tensor | None = None) -> Tensor:
    """Boolean (B, H, R, S): key j in S_i for each query i in ``rows`` (default: all)."""
    B, H, S = sel.end.shape
    i = torch.arange(S, device=sel.end.device) if rows is None else rows
    j = torch.arange(S, device=sel.end.device)
    end = sel.end.long().unsqueeze(2)  # (B, H, 1, S)
    return (j.view(1, 1, 1, -1) + sel.window <= i.view(1, 1, -1, 1)) & (i.view(1, 1, -1, 1) < end)


def window_mask(seq_len: int, window: int, rows: Tensor | None = None, device=None) -> Tensor:
    """Boolean (R, S): key j in the window W_i of query i."""
    i = torch.arange(seq_len, device=device) if rows is None else rows
    j = torch.arange(seq_len, device=device)
    d = i.view(-1, 1) - j.view(1, -1)
    return (d >= 0) & (d < window)


def soft_mask(sel: Selection, scores: Tensor, rows: Tensor | None = None) -> Tensor:
    """Boolean (B, H, R, S): key j in F_i, the candidates with 0 < clip(u_j - tau_i, 0, 1) < 1."""
    B, H, S = scores.shape
    i = torch.arange(S, device=scores.device) if rows is None else rows
    j = torch.arange(S, device=scores.device)
    tau = sel.tau[..., i].unsqueeze(-1).to(torch.float64)  # (B, H, R, 1)
    u = scores.to(torch.float64).unsqueeze(2)  # (B, H, 1, S)
    candidate = (j.view(1, -1) + sel.window <= i.view(-1, 1)).view(1, 1, len(i), S)
    return candidate & (u > tau) & (u < tau + 1)


def soft_ranges(scores: Tensor, tau: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """The soft sets as ranges: key l is in F_i exactly for the queries i in [lo_l, hi_l).

    l is in F_i when l is a candidate of i (l + window <= i) and tau_i < u_l < tau_i + 1. tau is
    non-decreasing, so the queries with tau_i < u_l are a prefix and those with tau_i > u_l - 1
    a suffix: one binary search each over the tau row, no (S, S) mask. Returns lo, hi (B, H, S)
    int64 and |F_i| (B, H, S) int64, the number of ranges that cover i. Comparisons are exact in
    float64 for float32 scores and tau, the same ones ``soft_mask`` makes.
    """
    B, H, S = scores.shape
    # cummax only guards the binary search against a rounding step down in a computed tau
    t = torch.cummax(tau.double(), -1).values.contiguous()
    u = scores.double().contiguous()
    j = torch.arange(S, device=scores.device)
    lo = torch.maximum(torch.searchsorted(t, u - 1.0, right=True), j + window).clamp(max=S)  # first i: tau_i > u - 1
    hi = torch.maximum(torch.searchsorted(t, u, right=False), lo)  # first i: tau_i >= u
    # |F_i|: +1 where a range opens, -1 where it closes, summed up to i. Integers, so exact in any
    # order; one flat index_add, which has a deterministic CUDA implementation.
    row = torch.arange(B * H, device=scores.device).view(B, H, 1) * (S + 1)
    ones = torch.ones(B * H * S, dtype=torch.int64, device=scores.device)
    edges = torch.zeros(B * H * (S + 1), dtype=torch.int64, device=scores.device)
    edges.index_add_(0, (lo + row).flatten(), ones).index_add_(0, (hi + row).flatten(), -ones)
    nsoft = edges.view(B, H, S + 1).cumsum(-1)[..., :S]
    return lo, hi, nsoft


def gates(sel: Selection, scores: Tensor, rows: Tensor | None = None) -> Tensor:
    """Gate matrix (B, H, R, S) in float64: g_ij on S_i, 1 on W_i, 0 elsewhere."""
    B, H, S = scores.shape
    i = torch.arange(S, device=scores.device) if rows is None else rows
    tau = sel.tau[..., i].unsqueeze(-1).to(torch.float64)
    g = (scores.to(torch.float64).unsqueeze(2) - tau).clamp(0.0, 1.0)
    g = torch.where(selected_mask(sel, i), g, torch.zeros_like(g))
    return torch.where(window_mask(S, sel.window, i, scores.device), torch.ones_like(g), g)


def block_union(sel: Selection, i0: int, i1: int) -> tuple[Tensor, Tensor]:
    """Keys selected by at least one query of the block [i0, i1), padded per (b, h).

    Returns (keys (B, H, U) int64, valid (B, H, U) bool), keys ascending, padding = 0. A key's
    run [j + W, end_j) meets the block iff max(j + W, i0) < min(end_j, i1); there are at most
    K + (i1 - i0) - 1 such keys (the top-k of i0 plus the keys that become candidates later).
    """
    B, H, S = sel.end.shape
    j = torch.arange(S, device=sel.end.device)
    start = (j + sel.window).view(1, 1, S)
    hit = torch.maximum(start, torch.full_like(start, i0)) < sel.end.long().clamp(max=i1)
    count = hit.sum(-1)
    width = max(1, int(count.max()))
    # Stable sort of "not hit" moves the hit keys to the front in ascending order.
    order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=sel.end.device).view(1, 1, -1) < count.unsqueeze(-1)
    return torch.where(valid, order, torch.zeros_like(order)), valid
