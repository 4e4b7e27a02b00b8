"""The parallel selection search of csrc/selection.cu (chunk_search_kernel), emulated on the CPU
step for step in NumPy and compared with the reference selection (sparsek/selection.py).

The kernel gives every prefix length n of a chunk [n0, n0 + C) its own thread: from the chunk's
band (the keys present by the chunk's end whose score is above u_(K+1)(n0) - 1, sorted
descending) and prefix counts and sums of the keys present at n0, each thread finds tau(n) by two
binary searches over the band's breakpoints (scores and scores - 1) and kth(n) by a third. The
emulation below follows the kernel's arithmetic (float32 scores, float64 sums, the same
comparisons), so a mistake in the algorithm shows here before any GPU runs it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsek import selection as sel_mod

CHUNK = 256  # kSearchThreads: prefix lengths per CTA


def _chunk_search(u: np.ndarray, K: int, W: int, n0: int, n_end: int, tau_out: np.ndarray, kth_out: np.ndarray):
    """One CTA: tau(n) into tau_out[n + W - 1] and kth(n) (sorted position) into kth_out[n]."""
    S = u.shape[0]
    order = np.argsort(u, kind="stable")  # ascending (score, index)
    pos = np.empty(S, dtype=np.int64)
    pos[order] = np.arange(S)
    # 1. The scan from the top: the (K+1)-th best key present at n0 sets the floor; the band keeps
    #    the keys present by n_end, descending, down to the first batch at or below the floor.
    desc = order[::-1]
    present0 = desc < n0
    rank0 = np.cumsum(present0)
    k1 = int(np.argmax(rank0 >= K + 1))  # descending index of the (K+1)-th best present at n0
    floor = float(u[desc[k1]]) - 1.0
    batch = 256
    stop = S
    for base in range(0, S, batch):  # the kernel's batches of 256 sorted positions
        last = min(S, base + batch) - 1
        if rank0[last] > K and float(u[desc[last]]) <= floor:
            stop = last + 1
            break
    scanned = desc[:stop]
    band_idx = scanned[scanned < n_end]
    band_val = u[band_idx].astype(np.float64)
    m = band_val.shape[0]
    # 2. Prefix counts and sums over the keys present at n0, in band order.
    p0 = band_idx < n0
    cnt = np.concatenate([[0], np.cumsum(p0)])
    ssum = np.concatenate([[0.0], np.cumsum(np.where(p0, band_val, 0.0))])
    slot_of = {int(k): a for a, k in enumerate(band_idx)}
    # query n reads keys n0 .. n - 1: the chunk's keys up to n_end - 2
    chunk_slot = np.array([slot_of.get(j, -1) for j in range(n0, n_end - 1)], dtype=np.int64)
    # chunk keys below the floor never matter to the chunk: -inf keeps them out of every sum
    chunk_x = np.where(chunk_slot >= 0, u[n0 : n_end - 1].astype(np.float64), -np.inf)
    neg = -band_val  # ascending, for searchsorted

    def masses(t, n):
        a_sat = int(np.searchsorted(neg, -(t + 1.0), side="right"))  # slots with v >= t + 1
        a_zero = int(np.searchsorted(neg, -t, side="left"))  # slots with v > t
        cU = int(cnt[a_sat])
        cF = int(cnt[a_zero] - cnt[a_sat])
        sF = float(ssum[a_zero] - ssum[a_sat])
        for x in chunk_x[: n - n0]:
            if x >= t + 1.0:
                cU += 1
            elif x > t:
                cF += 1
                sF += x
        return cU, cF, sF

    def f_le_k(t, n):
        cU, cF, sF = masses(t, n)
        return cU + sF - cF * t <= K

    for n in range(n0, n_end):
        lo, hi = 0, m  # stage 1: last slot a with f(v_a) <= K
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if f_le_k(band_val[mid], n) else (lo, mid)
        a1 = lo
        lo, hi = -1, m - 1  # stage 2: last slot b with f(v_b - 1) <= K, -1 if none
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if f_le_k(band_val[mid] - 1.0, n) else (lo, mid)
        b1 = lo
        b_hi = band_val[a1] if b1 < 0 else min(band_val[a1], band_val[b1] - 1.0)
        b_lo = band_val[b1 + 1] - 1.0
        if a1 + 1 < m:
            b_lo = max(b_lo, band_val[a1 + 1])
        cU, cF, sF = masses(0.5 * (b_lo + b_hi), n)
        tau = (sF - (K - cU)) / cF if cF > 0 else b_hi
        tau_out[n + W - 1] = np.float32(tau)
        # kth: the first slot a with K present keys at slots <= a
        lo, hi = -1, m - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = int(cnt[mid + 1]) + int(((chunk_slot[: n - n0] >= 0) & (chunk_slot[: n - n0] <= mid)).sum())
            lo, hi = (lo, mid) if c >= K else (mid, hi)
        kth_out[n] = pos[band_idx[hi]]


def emulate(u: torch.Tensor, topk: int, window: int):
    """tau (S,) float32 and end (S,) int32 of one score row, as the kernels would write them."""
    x = u.numpy().astype(np.float32)
    S = x.shape[0]
    K = min(topk, S)
    W = min(window, S)
    n_max = max(0, S - W)
    tau = np.full(S, -np.inf, dtype=np.float32)
    kth = np.full(S + 1, -1, dtype=np.int64)
    for n0 in range(K + 1, n_max + 1, CHUNK):
        _chunk_search(x, K, W, n0, min(n0 + CHUNK, n_max + 1), tau, kth)
    # end_kernel: N_j = first n in [K + 1, n_max] with kth(n) > pos(j), else n_max + 1
    order = np.argsort(x, kind="stable")
    pos = np.empty(S, dtype=np.int64)
    pos[order] = np.arange(S)
    ns = np.arange(K + 1, n_max + 1)
    ks = kth[K + 1 : n_max + 1]
    first = np.searchsorted(ks, pos, side="right") + K + 1
    n_end = np.maximum(first, np.arange(S) + 1)
    end = np.minimum(n_end - 1 + W, S).astype(np.int32)
    assert ns.shape == ks.shape
    return torch.from_numpy(tau), torch.from_numpy(end)


CASES = [  # S, topk, window, scale, ties
    (300, 16, 8, 1.0, False),
    (333, 32, 0, 1.0, True),
    (700, 64, 33, 30.0, False),
    (700, 64, 33, 0.1, True),
    (520, 129, 5, 1e-3, False),
    (100, 500, 4, 1.0, False),  # topk >= every prefix
    (600, 7, 0, 1.0, True),
    (900, 31, 64, 1.0, False),  # several chunks
    (400, 1, 0, 1.0, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "S{}-K{}-W{}-scale{}-ties{}".format(*c))
def test_search_matches_reference(case):
    S, topk, window, scale, ties = case
    g = torch.Generator().manual_seed(S * 7 + topk)
    u = ((torch.randn(S, generator=g).cumsum(0) * 0.05 + torch.randn(S, generator=g)) * scale).float()
    if ties:
        u = torch.round(u * 4) / 4
    tau, end = emulate(u, topk, window)
    sel = sel_mod.select(u.view(1, 1, S), topk, window)
    assert torch.equal(end, sel.end[0, 0]), "end positions differ from the reference"
    want = sel.tau[0, 0]
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(tau), finite)
    torch.testing.assert_close(tau[finite], want[finite], rtol=2e-6, atol=1e-6)


def test_search_constant_scores():
    S, topk = 260, 10
    u = torch.full((S,), 0.5)
    tau, end = emulate(u, topk, 0)
    sel = sel_mod.select(u.view(1, 1, S), topk, 0)
    assert torch.equal(end, sel.end[0, 0])
    finite = torch.isfinite(sel.tau[0, 0])
    torch.testing.assert_close(tau[finite], sel.tau[0, 0][finite], rtol=2e-6, atol=1e-6)
