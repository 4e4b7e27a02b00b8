"""The tile plan of the backward's CTA pairs (v2.14, csrc/attention_bwd.cu), checked on the CPU
against the reference selection.

Two CTAs of neighbouring query blocks 2c and 2c + 1 walk the same list: block 2c's list followed
by the "tail", the keys j = i1(2c) - W + t (t < the queries of block 2c + 1) whose run
[j + W, end_j) is non-empty, in ascending order. That is only right if the tail is exactly what
block 2c + 1's queries select beyond block 2c's list: the union of both blocks' selections must be
block 2c's union plus the tail, with nothing selected twice. Both CTAs must also build the same
tail, which the kernel gets from the ascending order of one warp's ballots.
"""

from __future__ import annotations

import pytest
import torch

from sparsek import selection as sel_mod


def kernel_tail(end: torch.Tensor, S: int, W: int, ip0: int, block_q: int) -> list[int]:  # end: (S,) of one head
    """The kernel's compaction: t over block 2c + 1's queries, 32 lanes at a time, ascending."""
    i_mid = min(S, ip0 + block_q)
    ip1 = min(S, ip0 + 2 * block_q)
    tail = []
    for base in range(0, ip1 - i_mid, 32):
        for lane in range(32):
            t = base + lane
            j = i_mid - W + t
            if t < ip1 - i_mid and j >= 0 and int(end[j]) > j + W:
                tail.append(j)
    return tail


def _keys(sel, i0: int, i1: int) -> set[int]:
    keys, valid = sel_mod.block_union(sel, i0, i1)
    return set(keys[0, 0][valid[0, 0]].tolist())


@pytest.mark.parametrize(
    "S, topk, window, block_q",
    [
        (700, 50, 37, 64),  # GQA 2 blocks
        (300, 400, 0, 128),  # topk above every prefix, window 0
        (513, 7, 200, 32),  # GQA 4, S not a multiple of the pair
        (260, 16, 1, 128),  # odd block count: the last pair has no second block
        (1000, 100, 128, 8),  # GQA 16
        (129, 3, 5, 128),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_list_is_block_list_plus_tail(S, topk, window, block_q, seed):
    gen = torch.Generator().manual_seed(1000 * seed + S)
    scores = torch.randn(1, 1, S, generator=gen).cumsum(-1) * 0.1 + torch.randn(1, 1, S, generator=gen)
    if seed == 2:
        scores = torch.zeros(1, 1, S)  # ties everywhere: every candidate soft
    sel = sel_mod.select(scores, topk, window)
    end = sel.end[0, 0].long()
    n_blocks = -(-S // block_q)
    for blk in range(0, n_blocks, 2):
        ip0 = blk * block_q
        i_mid, ip1 = min(S, ip0 + block_q), min(S, ip0 + 2 * block_q)
        first = _keys(sel, ip0, i_mid)
        tail = kernel_tail(end, S, window, ip0, block_q)
        assert tail == sorted(tail) and len(tail) <= block_q
        assert not first & set(tail), f"pair {blk // 2}: a tail key is already in block {blk}'s list"
        assert first | set(tail) == _keys(sel, ip0, ip1), f"pair {blk // 2}: the pair's list misses a key or has one too many"
