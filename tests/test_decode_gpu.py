"""CUDA decode kernels against the reference step (run on the GPU machine; skipped without one).

Two caches start from the same context: one steps with the kernels, one with the PyTorch
reference in float32 on the same device. The update must leave the same state (tau to float
rounding, the same slots, positions, spare and soft-set sizes); the attention output must be within
a small multiple of what low-precision arithmetic costs against the float32 reference. With a
window the two kernels of a step run concurrently, so these comparisons also catch a race between
them (the attention reading a slot the update is rewriting). The scheduler test steps sequences that
come and go through the slots of one cache (prefill_slot, step with active, evict) and compares every
output with the prefill op in float64; its logic runs on the CPU in tests/test_decode.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsek import SparseKCache
from sparsek.decode import SparseKCacheError, reference_step

from conftest import seed_for
from decode_scheduler import serve

pytestmark = pytest.mark.gpu

# (B, Hq, Hkv, prefix, steps, D, topk, window)
SHAPES = [
    (2, 8, 2, 37, 40, 64, 16, 8),  # odd lengths; the top-k fills during the steps
    (3, 32, 8, 301, 25, 128, 64, 32),  # Llama GQA 4
    (1, 12, 1, 257, 20, 128, 40, 17),  # group 12: two head chunks, the second one partial
    (2, 16, 16, 90, 30, 64, 7, 0),  # window 0: the new token is a candidate at once
    (2, 4, 2, 11, 30, 128, 500, 9),  # topk > every length: all gates 1
    (1, 48, 8, 700, 12, 64, 200, 64),  # group 6 and many splits
]
DTYPES = [torch.bfloat16, torch.float16]
# Error against the float32 reference: the kernels round P to the input dtype before P @ V.
ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _ids(shape):
    B, Hq, Hkv, P, n, D, K, W = shape
    return f"decode-B{B}-Hq{Hq}-Hkv{Hkv}-P{P}+{n}-D{D}-K{K}-W{W}"


def _context(shape, dtype):
    B, Hq, Hkv, P, n, D, K, W = shape
    g = torch.Generator().manual_seed(seed_for(*shape, str(dtype)))
    S = P + n
    k = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dtype)
    q = torch.randn(B, Hq, S, D, generator=g).to("cuda", dtype)
    walk = torch.randn(B, Hkv, S, generator=g).cumsum(-1) * 0.05  # neighbouring keys correlate
    u = (walk + torch.randn(B, Hkv, S, generator=g) * 1.5).float().cuda()
    return q, k, v, u


def _pair(shape, dtype, **kw):
    B, Hq, Hkv, P, n, D, K, W = shape
    q, k, v, u = _context(shape, dtype)
    lengths = [P - 3 * b for b in range(B)]  # ragged batch
    cuda = SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W, lengths=lengths,
                                     backend="cuda", check_interval=1, **kw)
    ref = SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W, lengths=lengths,
                                    backend="reference", **kw)
    return (q, k, v, u), torch.tensor(lengths, device="cuda"), cuda, ref


def _at(x, pos):  # x (B, H, S, ...) at positions pos (B,) -> (B, H, 1, ...)
    idx = pos.view(-1, 1, 1, *([1] * (x.dim() - 3))).expand(x.shape[0], x.shape[1], 1, *x.shape[3:])
    return x.gather(2, idx)


def _same_state(a, b):
    sa, sb = a.state, b.state
    assert torch.equal(sa.lengths, sb.lengths)
    assert torch.equal(sa.soft_count, sb.soft_count)
    assert torch.equal(sa.slot_pos, sb.slot_pos) and torch.equal(sa.spare, sb.spare)
    assert torch.equal(sa.k_slots, sb.k_slots) and torch.equal(sa.v_slots, sb.v_slots)
    torch.testing.assert_close(sa.tau, sb.tau, atol=1e-9, rtol=1e-9)
    assert not bool(sa.status[..., 0].any())


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_step_matches_the_reference(shape, dtype):
    (q, k, v, u), start, cuda, ref = _pair(shape, dtype)
    assert cuda.backend == "cuda"
    for s in range(shape[4]):
        pos = start + s
        args = (_at(q, pos), _at(k, pos), _at(v, pos), _at(u.unsqueeze(-1), pos)[..., 0])
        got = cuda.step(*args)
        # the reference step, attending in float32 over the same low-precision slots
        want = reference_step(ref.state, args[0].float(), *args[1:], ref.topk, ref.window, ref.scale)
        _same_state(cuda, ref)
        torch.testing.assert_close(got.float(), want, atol=ATOL[dtype], rtol=ATOL[dtype],
                                   msg=lambda m: f"step {s}: {m}")


@pytest.mark.parametrize("window", [16, 0], ids=["beside", "first"])
def test_unstaged_update_matches_the_reference(window):
    # 2 x (topk + 1) + soft_capacity floats = 68.5 KiB > the 64 KiB the update stages in shared
    # memory: the update works on global memory instead (csrc/decode_update.cu, kMaxStageBytes)
    shape = (2, 8, 2, 300, 30, 64, 64, window)
    (q, k, v, u), start, cuda, ref = _pair(shape, torch.bfloat16, soft_capacity=17000)
    for s in range(shape[4]):
        pos = start + s
        args = (_at(q, pos), _at(k, pos), _at(v, pos), _at(u.unsqueeze(-1), pos)[..., 0])
        got = cuda.step(*args)
        want = reference_step(ref.state, args[0].float(), *args[1:], ref.topk, ref.window, ref.scale)
        _same_state(cuda, ref)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"step {s}: {m}")


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_split_counts_agree(splits):
    shape = (2, 32, 8, 400, 3, 128, 128, 64)
    (q, k, v, u), start, cuda, ref = _pair(shape, torch.bfloat16, num_splits=splits)
    args = (_at(q, start), _at(k, start), _at(v, start), _at(u.unsqueeze(-1), start)[..., 0])
    got = cuda.step(*args)
    want = reference_step(ref.state, args[0].float(), *args[1:], ref.topk, ref.window, ref.scale)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_update_and_attention_ops_compose_to_the_step():
    shape = (2, 8, 2, 300, 1, 128, 64, 16)
    (q, k, v, u), start, a, _ = _pair(shape, torch.bfloat16)
    b = SparseKCache.from_prefill(k[:, :, :300], v[:, :, :300], u[:, :, :300], topk=64, window=16,
                                  lengths=start.tolist(), backend="cuda")
    args = (_at(q, start), _at(k, start), _at(v, start), _at(u.unsqueeze(-1), start)[..., 0])
    out = a.step(*args)
    ops, st = b._cuda_ops(), b.state
    score_new = args[3][..., 0].contiguous()  # (B, Hkv)
    # window 16: the attention reads the state first, the update then prepares the next query
    out2 = ops.decode_attention(args[0], args[1], args[2], score_new, st.k_slots, st.v_slots, st.slot_score, st.spare,
                                st.tau, st.lengths, st.status, b._counters_for(8), 64, 16, b.scale, 0)
    ops.decode_update(args[1], args[2], score_new, st.k_slots, st.v_slots, st.slot_score, st.slot_pos, st.spare,
                      st.win_score, st.soft, st.soft_count, st.tau, st.lengths, st.status, 64, 16)
    assert torch.equal(out, out2)
    _same_state(a, b)


def test_nonfinite_score_raises_at_the_next_check():
    shape = (2, 4, 2, 50, 1, 64, 8, 4)
    (q, k, v, u), start, cuda, _ = _pair(shape, torch.bfloat16)  # check_interval=1: every step
    score = _at(u.unsqueeze(-1), start)[..., 0].clone()
    score[1, 0] = float("nan")
    with pytest.raises(SparseKCacheError, match="score_new must be finite; batch 1, kv head 0"):
        cuda.step(_at(q, start), _at(k, start), _at(v, start), score)


def test_poisoned_sequence_answers_nan_and_the_others_stay_exact():
    shape = (2, 4, 2, 50, 1, 64, 8, 4)
    (q, k, v, u), start, cuda, ref = _pair(shape, torch.bfloat16)
    cuda.check_interval = 0
    score = _at(u.unsqueeze(-1), start)[..., 0].clone()
    good = score.clone()
    score[1, 0] = float("inf")
    args = (_at(q, start), _at(k, start), _at(v, start))
    out = cuda.step(*args, score)
    ref.step(*args, good)
    assert bool(out[1, :2].isnan().all()) and not bool(out[0].isnan().any())
    with pytest.raises(SparseKCacheError, match="batch 1, kv head 0 got a non-finite score at position 47"):
        cuda.check()


def test_soft_overflow_raises():
    # equal scores stay in the threshold's unit band, so the soft set grows by one per step
    cache = SparseKCache(1, 1, 64, topk=2, window=0, dtype=torch.bfloat16, device="cuda", backend="cuda",
                         soft_capacity=4, check_interval=1)
    x = torch.ones(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    u = torch.zeros(1, 1, device="cuda")
    for _ in range(4):
        cache.step(x, x, x, u)
    with pytest.raises(SparseKCacheError, match="soft_capacity=4"):
        cache.step(x, x, x, u)


def test_prefill_does_not_grow_the_soft_set_on_the_cuda_path():
    # the reference path grows it; the kernels cannot yet, so the CUDA path still refuses
    k = torch.zeros(1, 1, 700, 64, device="cuda", dtype=torch.bfloat16)
    u = torch.zeros(1, 1, 700, device="cuda")  # equal scores: every candidate is soft
    with pytest.raises(SparseKCacheError, match="needs 700 entries but soft_capacity=256.*building the cache"):
        SparseKCache.from_prefill(k, k, u, topk=64, backend="cuda")
    cache = SparseKCache.from_prefill(k[:, :, :100], k[:, :, :100], u[:, :, :100], topk=64, backend="cuda")
    with pytest.raises(SparseKCacheError, match="needs 356 entries but soft_capacity=256.*reserving room"):
        cache.reserve(256)
    assert cache.soft_allocated == 256


# (arrives at step, prompt length, tokens to generate, score kind); scores spread over several units,
# so the default soft set holds them (the CUDA path cannot grow it)
REQUESTS = [
    (0, 30, 25, "normal"),
    (0, 0, 12, "normal"),  # no prompt: the first token is stepped into an empty slot
    (1, 9, 40, "ties"),
    (3, 51, 8, "normal"),
    (4, 1, 20, "normal"),
    (6, 60, 15, "ties"),
    (9, 17, 30, "normal"),
    (10, 70, 5, "normal"),
    (30, 4, 18, "normal"),
]


def _request(i, L, kind, Hq, Hkv, D, device, dtype):
    g = torch.Generator().manual_seed(seed_for("request", i, L, kind))
    q = torch.randn(1, Hq, L, D, generator=g).to(device, dtype)
    k = torch.randn(1, Hkv, L, D, generator=g).to(device, dtype)
    v = torch.randn(1, Hkv, L, D, generator=g).to(device, dtype)
    u = torch.randn(1, Hkv, L, generator=g) * 2
    if kind == "ties":
        u = torch.round(u * 2) / 2
    return q, k, v, u.float().to(device)


def run_scheduler(device, dtype, backend, atol, slots=3, Hq=8, Hkv=2, D=64, K=16, W=8):
    """The shared scheduler (tests/decode_scheduler.py) on a cache of ``backend``."""
    cache = SparseKCache(slots, Hkv, D, topk=K, window=W, dtype=dtype, device=device, backend=backend, check_interval=1)
    seqs = [_request(i, P + n, kind, Hq, Hkv, D, device, dtype) for i, (_, P, n, kind) in enumerate(REQUESTS)]
    return serve(cache, REQUESTS, seqs, Hq, atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_continuous_batching_matches_the_prefill_of_each_sequence(dtype):
    cache = run_scheduler("cuda", dtype, "cuda", ATOL[dtype])
    assert cache.backend == "cuda" and cache.soft_allocated == cache.soft_capacity
    cache.check()  # free slots were stepped over NaN rows: their status must be clean


def _op_args(B=2, Hq=8, Hkv=2, D=64, K=16, W=8, C=64):
    f = dict(device="cuda")
    bf = dict(device="cuda", dtype=torch.bfloat16)
    i32 = dict(device="cuda", dtype=torch.int32)
    return dict(
        q=torch.zeros(B, Hq, 1, D, **bf), k_new=torch.zeros(B, Hkv, 1, D, **bf), v_new=torch.zeros(B, Hkv, 1, D, **bf),
        score_new=torch.zeros(B, Hkv, **f), k_slots=torch.zeros(B, Hkv, W + K + 1, D, **bf),
        v_slots=torch.zeros(B, Hkv, W + K + 1, D, **bf), slot_score=torch.zeros(B, Hkv, K + 1, **f),
        slot_pos=torch.full((B, Hkv, K + 1), -1, **i32), spare=torch.full((B, Hkv), K, **i32),
        win_score=torch.zeros(B, Hkv, W, **f),
        soft=torch.zeros(B, Hkv, C, **f), soft_count=torch.zeros(B, Hkv, **i32),
        tau=torch.full((B, Hkv), float("-inf"), device="cuda", dtype=torch.float64),
        lengths=torch.zeros(B, Hkv, **i32), status=torch.zeros(B, Hkv, 2, **i32),
        counters=torch.zeros(B * Hkv, **i32), topk=K, window=W, scale=0.125, num_splits=0)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"k_slots": lambda a: a["k_slots"][..., :32]}, ValueError, "head dim must be 64 or 128, got 32"),
        ({"k_slots": lambda a: a["k_slots"].float()}, TypeError, "k_slots must be float16 or bfloat16"),
        ({"v_slots": lambda a: a["v_slots"].half()}, TypeError, "v_slots must be BFloat16, got Half"),
        ({"topk": lambda a: 15}, ValueError, "k_slots must have window \\+ topk \\+ 1 = 24 slots .*, got 25"),
        ({"slot_score": lambda a: a["slot_score"][..., :16]}, ValueError, "slot_score must have shape \\[2, 2, 17\\]"),
        ({"spare": lambda a: a["spare"].long()}, TypeError, "spare must be Int, got Long"),
        ({"topk": lambda a: 0}, ValueError, "topk must be >= 1, got 0"),
        ({"window": lambda a: -1}, ValueError, "window must be >= 0, got -1"),
        ({"q": lambda a: torch.zeros(2, 5, 1, 64, device="cuda", dtype=torch.bfloat16)}, ValueError,
         "query heads Hq=5 must be a multiple of kv heads Hkv=2"),
        ({"k_new": lambda a: a["k_new"][:1]}, ValueError, "k_new must have shape"),
        ({"score_new": lambda a: a["score_new"].double()}, TypeError, "score_new must be Float, got Double"),
        ({"soft": lambda a: a["soft"][..., :16]}, ValueError, "soft_capacity must be > topk = 16, got 16"),
        ({"tau": lambda a: a["tau"].float()}, TypeError, "tau must be Double, got Float"),
        ({"lengths": lambda a: a["lengths"].cpu()}, ValueError, "lengths must be on cuda:0, got cpu"),
        ({"counters": lambda a: a["counters"][:3]}, ValueError, "counters must have shape \\[4\\], got \\[3\\]"),
        ({"num_splits": lambda a: 65}, ValueError, "num_splits must be in \\[0, 64\\]"),
        ({"q": lambda a: torch.zeros(2, 8, 1, 72, device="cuda", dtype=torch.bfloat16)[..., 4:68]}, ValueError,
         "q must have a contiguous last dim and 16-byte aligned rows"),
    ],
)
def test_op_errors_name_the_argument(change, exc, match):
    import sparsek._cuda as _cuda

    args = _op_args()
    for name, fn in change.items():
        args[name] = fn(args)
    with pytest.raises(exc, match=match):
        _cuda.ops().decode_step(*args.values())


def test_cache_on_an_unsupported_head_dim_falls_back_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = SparseKCache(1, 1, 96, topk=4, dtype=torch.bfloat16, device="cuda")
    assert cache.backend == "reference"
    assert any("head dim 64 or 128, got 96" in str(w.message) for w in caught)
