"""The segmented selection walk of csrc/selection.cu (chunk_segwalk_kernel), emulated on the CPU
step for step in NumPy and compared with the reference selection (sparsek/selection.py).

One CTA handles a chunk [n0, n0 + C) of prefix lengths. It scans the sorted row from the top into
the chunk's band (the keys present by the chunk's end whose score is above u_(K+1)(n0) - 1,
descending), then for each of its eight segments builds prefix counts and sums of the keys
present at the segment's start n_s, finds tau(n_s) with a 128-ary search over the band's
breakpoints (scores and scores - 1) and the closed form, and kth(n_s) with a binary search over
the prefix counts. One lane per warp then walks its segment (walk_chunk). The emulation follows
the kernel's arithmetic (float32 scores, float64 sums, the same comparisons and the same search
rounds), so a mistake in the algorithm shows here before any GPU runs it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsek import selection as sel_mod

WARPS = 8  # segments per chunk: one walker per warp of the 256-thread CTA
GROUP = 128  # threads per breakpoint family in the search


def select_chunk(S: int) -> int:
    """csrc/binding.cpp's chunk: 256 prefix lengths, doubled while chunk * 128 < S, up to 2048."""
    chunk = 256
    while chunk < 2048 and chunk * 128 < S:
        chunk *= 2
    return chunk


class _Band:
    """The shared band as walk_chunk reads it: ascending indices over the descending arrays."""

    def __init__(self, val, idx, pos_of, chunk_slot, n0):
        self.val, self.idx, self.pos_of, self.chunk_slot, self.n0 = val, idx, pos_of, chunk_slot, n0
        self.size = len(val)

    def value(self, a):
        return float(self.val[self.size - 1 - a])

    def key(self, a):
        return int(self.idx[self.size - 1 - a])

    def global_pos(self, a):
        return int(self.pos_of[self.key(a)])

    def index_of(self, j):
        d = int(self.chunk_slot[j - self.n0])
        return -1 if d < 0 else self.size - 1 - d

    def first_above(self, t, strict):
        lo, hi = 0, self.size
        while lo < hi:
            mid = (lo + hi) >> 1
            v = self.value(mid)
            if (v > t) if strict else (v >= t):
                hi = mid
            else:
                lo = mid + 1
        return lo


def _walk(band, u, tau_out, kth_out, W, K, ns, n_end, tau, kth, cU, cF, sF):
    """walk_chunk, line for line."""
    lo = band.first_above(tau, True)
    hi = band.first_above(tau + 1.0, False)
    n = ns
    while True:
        tau_out[n + W - 1] = np.float32(tau)
        kth_out[n] = band.global_pos(kth)
        if n + 1 >= n_end:
            break
        x = float(u[n])
        if x > tau:
            if x >= tau + 1.0:
                cU += 1
            else:
                cF += 1
                sF += x
        if band.index_of(n) > kth:
            kth += 1
            while band.key(kth) > n:
                kth += 1
        f = cU + sF - cF * tau
        while f > K:
            e1 = band.value(lo) if lo < band.size else math.inf
            e2 = band.value(hi) - 1.0 if hi < band.size else math.inf
            t = min(e1, e2)
            if not t < math.inf:
                break
            if cU + sF - cF * t <= K:
                tau = (sF - (K - cU)) / cF
                break
            tau = t
            if e1 <= e2:
                if band.key(lo) <= n:
                    cF -= 1
                    sF -= band.value(lo)
                lo += 1
            else:
                if band.key(hi) <= n:
                    cU -= 1
                    cF += 1
                    sF += band.value(hi)
                hi += 1
            f = cU + sF - cF * tau
        while lo < band.size and band.value(lo) <= tau:
            if band.key(lo) <= n:
                cF -= 1
                sF -= band.value(lo)
            lo += 1
        n += 1


def _search(pred, lo, hi):
    """The kernel's 128-ary search: pred holds at lo (or lo is -1), fails at hi (or past the end)."""
    while hi - lo > 1:
        open_ = hi - lo - 1
        step = max(1, (open_ + GROUP - 1) // GROUP)
        yes = 0
        for rank in range(GROUP):
            x = lo + (rank + 1) * step
            if x < hi and pred(x):
                yes += 1
        new_lo = lo + yes * step
        hi = min(new_lo + step, hi)
        lo = new_lo
    return lo


def _chunk(u, pos_of, order, K, W, n0, n_end, chunk, tau_out, kth_out):
    """One CTA of chunk_segwalk_kernel (the band always fits here)."""
    S = u.shape[0]
    desc = order[::-1]
    present0 = desc < n0
    rank0 = np.cumsum(present0)
    k1 = int(np.argmax(rank0 >= K + 1))  # descending index of the (K+1)-th best present at n0
    floor = float(u[desc[k1]]) - 1.0
    stop = S
    for base in range(0, S, 256):  # scan_band's batches of 256 sorted positions
        last = min(S, base + 256) - 1
        if rank0[last] > K and float(u[desc[last]]) <= floor:
            stop = last + 1
            break
    scanned = desc[:stop]
    band_idx = scanned[scanned < n_end]
    band_val = u[band_idx].astype(np.float64)
    m = band_val.shape[0]
    slot_of = {int(k): a for a, k in enumerate(band_idx)}
    chunk_slot = np.array([slot_of.get(j, -1) for j in range(n0, n0 + chunk)], dtype=np.int64)
    neg = -band_val  # ascending, for searchsorted
    band = _Band(band_val, band_idx, pos_of, chunk_slot, n0)
    seg = (chunk + WARPS - 1) // WARPS
    for w in range(WARPS):
        ns = n0 + w * seg
        if ns >= n_end:
            break
        present = band_idx < ns
        cnt = np.concatenate([[0], np.cumsum(present)])
        ssum = np.concatenate([[0.0], np.cumsum(np.where(present, band_val, 0.0))])

        def masses(t):
            a_sat = int(np.searchsorted(neg, -(t + 1.0), side="right"))  # slots with v >= t + 1
            a_zero = int(np.searchsorted(neg, -t, side="left"))  # slots with v > t
            return int(cnt[a_sat]), int(cnt[a_zero] - cnt[a_sat]), float(ssum[a_zero] - ssum[a_sat])

        def f_le_k(t):
            cU, cF, sF = masses(t)
            return cU + sF - cF * t <= K

        a1 = _search(lambda a: f_le_k(band_val[a]), 0, m)
        b1 = _search(lambda b: f_le_k(band_val[b] - 1.0), -1, m - 1)
        b_hi = band_val[a1] if b1 < 0 else min(band_val[a1], band_val[b1] - 1.0)
        b_lo = band_val[b1 + 1] - 1.0
        if a1 + 1 < m:
            b_lo = max(b_lo, band_val[a1 + 1])
        cU, cF, sF = masses(0.5 * (b_lo + b_hi))
        tau = (sF - (K - cU)) / cF if cF > 0 else b_hi
        cU, cF, sF = masses(tau)
        khi = int(np.argmax(cnt[1:] >= K))  # the first slot with K present keys at or above it
        _walk(band, u, tau_out, kth_out, W, K, ns, min(ns + seg, n_end), tau, m - 1 - khi, cU, cF, sF)


def emulate(u: torch.Tensor, topk: int, window: int, chunk: int | None = None):
    """tau (S,) float32 and end (S,) int32 of one score row, as the kernels would write them."""
    x = u.numpy().astype(np.float32)
    S = x.shape[0]
    K = min(topk, S)
    W = min(window, S)
    n_max = max(0, S - W)
    chunk = chunk or select_chunk(S)
    order = np.argsort(x, kind="stable")  # ascending (score, index)
    pos = np.empty(S, dtype=np.int64)
    pos[order] = np.arange(S)
    tau = np.full(S, -np.inf, dtype=np.float32)
    kth = np.full(S + 1, -1, dtype=np.int64)
    for n0 in range(K + 1, n_max + 1, chunk):
        _chunk(x, pos, order, K, W, n0, min(n0 + chunk, n_max + 1), chunk, tau, kth)
    # end_kernel: N_j = first n in [K + 1, n_max] with kth(n) > pos(j), else n_max + 1
    ks = kth[K + 1 : n_max + 1]
    assert (np.diff(ks) >= 0).all(), "kth must only move up"
    first = np.searchsorted(ks, pos, side="right") + K + 1
    n_end = np.maximum(first, np.arange(S) + 1)
    end = np.minimum(n_end - 1 + W, S).astype(np.int32)
    return torch.from_numpy(tau), torch.from_numpy(end)


CASES = [  # S, topk, window, scale, ties
    (300, 16, 8, 1.0, False),
    (333, 32, 0, 1.0, True),
    (700, 64, 33, 30.0, False),
    (700, 64, 33, 0.1, True),
    (520, 129, 5, 1e-3, False),
    (100, 500, 4, 1.0, False),  # topk >= every prefix
    (600, 7, 0, 1.0, True),
    (900, 31, 64, 1.0, False),  # several chunks, the last one partial
    (400, 1, 0, 1.0, True),
    (2500, 300, 40, 1.0, False),  # a band larger than one search round (128 slots)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "S{}-K{}-W{}-scale{}-ties{}".format(*c))
def test_segmented_walk_matches_reference(case):
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


def test_segmented_walk_constant_scores():
    S, topk = 260, 10
    u = torch.full((S,), 0.5)
    tau, end = emulate(u, topk, 0)
    sel = sel_mod.select(u.view(1, 1, S), topk, 0)
    assert torch.equal(end, sel.end[0, 0])
    finite = torch.isfinite(sel.tau[0, 0])
    torch.testing.assert_close(tau[finite], sel.tau[0, 0][finite], rtol=2e-6, atol=1e-6)
