"""SparseKCache on the CPU: stepping reproduces the prefill op row by row, in float64.

The invariant (DESIGN section 1, Decode): a cache built from the first P tokens of a sequence and
stepped through the rest gives, at every step, the prefill output of that row, including the
steps where the window fills, where the first candidate appears, where the top-k fills and where
the selection churns. The state's size is fixed at construction.
"""

from __future__ import annotations

import pytest
import torch

import sparsek
from sparsek import SparseKCache
from sparsek.decode import SparseKCacheError

from conftest import seed_for, shape_id

# Each case: (B, Hq, Hkv, S, D, topk, window, prefix lengths per batch, score kind)
INVARIANT_CASES = [
    (1, 2, 1, 48, 8, 4, 3, [0], "normal"),  # from an empty cache: window, first candidate, top-k fill
    (2, 4, 2, 90, 8, 8, 5, [0, 0], "drift"),  # rising scores: the newest key evicts at every step
    (2, 4, 2, 90, 8, 8, 0, [3, 3], "normal"),  # window 0: the new token is a candidate at once
    (2, 4, 2, 90, 8, 6, 5, [0, 0], "ties"),  # equal scores: the tie rule and flat thresholds
    (3, 6, 3, 80, 8, 6, 4, [0, 17, 41], "normal"),  # ragged prefixes in one batch
    (1, 2, 1, 70, 8, 1, 1, [10], "ties"),  # topk 1, window 1
    (1, 4, 1, 40, 8, 64, 4, [0], "normal"),  # topk > every length: the gates stay 1
    (2, 2, 2, 60, 16, 5, 7, [30, 52], "normal"),  # prefixes past the window + top-k
]


def _scores(kind: str, g: torch.Generator, B: int, H: int, S: int) -> torch.Tensor:
    u = torch.randn(B, H, S, generator=g, dtype=torch.float64) * 2
    if kind == "drift":  # each new key outscores the old ones by more than the noise
        u = u * 0.1 + torch.arange(S, dtype=torch.float64) * 0.3
    if kind == "ties":
        u = torch.round(u * 2) / 2
    return u


def _sequence(B, Hq, Hkv, S, D, kind):
    g = torch.Generator().manual_seed(seed_for(B, Hq, Hkv, S, D, kind))
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    return q, k, v, _scores(kind, g, B, Hkv, S)


def _at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, ...) at per-batch positions pos (B,) -> (B, H, 1, ...)."""
    idx = pos.view(-1, 1, 1, *([1] * (x.dim() - 3))).expand(x.shape[0], x.shape[1], 1, *x.shape[3:])
    return x.gather(2, idx)


def _ids(case):
    B, Hq, Hkv, S, D, K, W, prefix, kind = case
    return f"{shape_id(B, Hq, Hkv, S, D, prefix='decode')}-K{K}-W{W}-P{'_'.join(map(str, prefix))}-{kind}"


@pytest.mark.parametrize("case", INVARIANT_CASES, ids=_ids)
def test_stepping_reproduces_the_prefill_row_by_row(case):
    B, Hq, Hkv, S, D, K, W, prefix, kind = case
    q, k, v, u = _sequence(B, Hq, Hkv, S, D, kind)
    expected = sparsek.sparsek_attention(q, k, v, u, topk=K, window=W)  # (B, Hq, S, D)
    if max(prefix) == 0:
        cache = SparseKCache(B, Hkv, D, topk=K, window=W, dtype=torch.float64, score_dtype=torch.float64)
    else:
        cache = SparseKCache.from_prefill(k, v, u, topk=K, window=W, lengths=prefix)
    nbytes = cache.nbytes
    start = torch.tensor(prefix)
    evictions = 0
    for s in range(S - max(prefix)):
        pos = start + s
        before = cache.state.slot_pos.clone()
        out = cache.step(_at(q, pos), _at(k, pos), _at(v, pos), _at(u.unsqueeze(-1), pos)[..., 0])
        torch.testing.assert_close(out, _at(expected, pos), atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f"step {s} (positions {pos.tolist()}): {m}")
        evictions += int(((before >= 0) & (cache.state.slot_pos != before)).sum())
        assert cache.nbytes == nbytes  # nothing grows
    assert cache.seq_lens.tolist() == [S - max(prefix) + p for p in prefix]
    if S - W > K and kind != "ties":
        assert evictions > 0, "the case should churn the top-k"


def test_state_bytes_do_not_depend_on_the_context():
    sizes = set()
    for S in (40, 400, 4000):
        q, k, v, u = _sequence(1, 2, 2, S, 8, "normal")
        cache = SparseKCache.from_prefill(k, v, u.float(), topk=16, window=8, soft_capacity=64)
        sizes.add(cache.nbytes)
        cache.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], u[:, :, :1].float())
        sizes.add(cache.nbytes)
    assert len(sizes) == 1
    per_seq = SparseKCache.bytes_per_sequence(2, 8, topk=16, window=8, dtype=torch.float64, soft_capacity=64)
    assert per_seq["kv"] == 2 * 2 * (16 + 1 + 8) * 8 * 8  # the top-k, its spare slot and the window
    # the whole state is the per-sequence figure (one sequence here); counters exist only on CUDA
    assert sizes == {per_seq["total"]}


def _live_positions(st):
    """slot_pos with the spare slot (stale after an eviction) as -1."""
    return st.slot_pos.scatter(-1, st.spare.long().unsqueeze(-1), -1)


def test_prefill_state_equals_stepping_from_empty():
    """from_prefill's closed-form state (sorted top-k, bisected tau, filtered soft set) is the
    state that stepping builds, up to the order of slots and soft entries."""
    B, H, S, D, K, W = 2, 2, 75, 8, 6, 5
    q, k, v, u = _sequence(B, 2 * H, H, S, D, "normal")
    stepped = SparseKCache(B, H, D, topk=K, window=W, dtype=torch.float64, score_dtype=torch.float64)
    for i in range(S):
        stepped.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i])
    built = SparseKCache.from_prefill(k, v, u, topk=K, window=W)
    a, b = stepped.state, built.state
    torch.testing.assert_close(a.tau, b.tau, atol=1e-12, rtol=0)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.soft_count, b.soft_count)
    assert torch.equal(a.k_slots[:, :, :W], b.k_slots[:, :, :W])
    assert torch.equal(_live_positions(a).sort(-1).values, _live_positions(b).sort(-1).values)
    n = int(a.soft_count.max())
    torch.testing.assert_close(a.soft[..., :n].sort(-1).values, b.soft[..., :n].sort(-1).values, atol=0, rtol=0)


def test_soft_set_overflow_raises_and_leaves_the_state_unchanged():
    # equal scores all stay in the threshold's unit band: the soft set grows with every step
    cache = SparseKCache(1, 1, 4, topk=2, window=0, dtype=torch.float64, score_dtype=torch.float64, soft_capacity=4)
    x = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    u = torch.zeros(1, 1, dtype=torch.float64)
    for _ in range(4):
        cache.step(x, x, x, u)
    snapshot = cache.state.clone()
    with pytest.raises(SparseKCacheError, match="soft_capacity=4"):
        cache.step(x, x, x, u)
    for before, after in zip(snapshot.tensors(), cache.state.tensors()):
        assert torch.equal(before, after)


def test_float32_cache_matches_the_float32_prefill():
    q, k, v, u = _sequence(1, 4, 2, 60, 16, "normal")
    q, k, v, u = q.float(), k.float(), v.float(), u.float()
    expected = sparsek.sparsek_attention(q, k, v, u, topk=8, window=4)
    cache = SparseKCache.from_prefill(k[:, :, :20], v[:, :, :20], u[:, :, :20], topk=8, window=4)
    assert cache.backend == "reference"
    for i in range(20, 60):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i : i + 1])
        torch.testing.assert_close(out, expected[:, :, i : i + 1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"topk": 0}, ValueError, "topk must be >= 1, got 0"),
        ({"window": -1}, ValueError, "window must be >= 0, got -1"),
        ({"topk": 2.0}, TypeError, "topk must be an int"),
        ({"soft_capacity": 4}, ValueError, r"soft_capacity must be >= 5, got 4"),
        ({"backend": "triton"}, ValueError, "backend must be one of"),
        ({"scale": -1.0}, ValueError, "scale must be a finite float > 0"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating"),
        ({"num_splits": 65}, ValueError, r"num_splits must be in \[0, 64\]"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, exc, match):
    args = {"topk": 4, "window": 2, **kwargs}
    with pytest.raises(exc, match=match):
        SparseKCache(1, 2, 8, **args)


def test_step_errors_name_the_argument():
    cache = SparseKCache(2, 2, 8, topk=4, window=2, dtype=torch.float32)
    q = torch.zeros(2, 4, 1, 8)
    kv = torch.zeros(2, 2, 1, 8)
    u = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"q must be \(B=2, Hq, 1, D=8\), got \(2, 4, 2, 8\)"):
        cache.step(torch.zeros(2, 4, 2, 8), kv, kv, u)
    with pytest.raises(ValueError, match="query heads Hq=3 must be a multiple of kv heads Hkv=2"):
        cache.step(torch.zeros(2, 3, 1, 8), kv, kv, u)
    with pytest.raises(ValueError, match=r"k_new must have shape \(B, Hkv, 1, D\)"):
        cache.step(q, torch.zeros(2, 1, 1, 8), kv, u)
    with pytest.raises(TypeError, match="v_new must be torch.float32, got torch.float64"):
        cache.step(q, kv, kv.double(), u)
    with pytest.raises(ValueError, match="score_new must be finite, got nan at batch 1, kv head 0"):
        cache.step(q, kv, kv, torch.tensor([[0.0, 0.0], [float("nan"), 0.0]]))
    assert cache.seq_lens.tolist() == [0, 0]  # a refused step changes nothing


def test_from_prefill_errors_name_the_argument():
    k = torch.zeros(1, 2, 10, 8)
    u = torch.zeros(1, 2, 10)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, S=10\], got \[11\]"):
        SparseKCache.from_prefill(k, k, u, topk=2, lengths=[11])
    with pytest.raises(ValueError, match=r"scores must have shape \(B, Hkv, S\)"):
        SparseKCache.from_prefill(k, k, u[..., :9], topk=2)
    bad = u.clone()
    bad[0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"scores must be finite, got inf at index \(0, 1, 3\)"):
        SparseKCache.from_prefill(k, k, bad, topk=2)
    bad[0, 1, 3] = float("nan")  # beyond the sequence's length: padding, never read
    SparseKCache.from_prefill(k, k, bad, topk=2, lengths=[3])


def test_cuda_backend_is_refused_on_the_cpu():
    with pytest.raises(RuntimeError, match="backend='cuda' but the decode kernels cannot run this cache: the cache is on cpu"):
        SparseKCache(1, 1, 64, topk=4, dtype=torch.bfloat16, backend="cuda")
