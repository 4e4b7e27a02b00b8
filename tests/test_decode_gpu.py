"""CUDA decode kernels against the reference step (run on the GPU machine; skipped without one).

Two caches start from the same context: one steps with the kernels, one with the PyTorch
reference in float32 on the same device. The update must leave the same state (tau to float
rounding, the same slots, positions, spare and soft-set sizes); the attention output must be within
a small multiple of what low-precision arithmetic costs against the float32 reference. With a
window the two kernels of a step run concurrently, so these comparisons also catch a race between
them (the attention reading a slot the update is rewriting). The scheduler test steps sequences that
come and go through the slots of one cache (prefill_slot, step with active, evict) and compares every
output with the prefill op in float64; its logic runs on the CPU in tests/test_decode.py. Scores that
pack into the threshold's unit band (constant, std 0.01, a freshly initialised scorer) at >= 32k
tokens make the soft set grow; compiled steps and a captured CUDA graph must equal eager steps.

One command runs them all: python -m pytest -m gpu tests/test_decode_gpu.py -x -q
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsek import SparseKCache, SparseKScorer, reference
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


def test_equal_scores_grow_the_soft_set_and_stay_exact():
    # equal scores stay in the threshold's unit band, so the soft set gains one entry per step; the
    # host's bound grows it before a step could overflow, without status checks (check_interval=0)
    cache = SparseKCache(1, 1, 64, topk=2, window=0, dtype=torch.bfloat16, device="cuda", backend="cuda",
                         soft_capacity=4, check_interval=0)
    ref = SparseKCache(1, 1, 64, topk=2, window=0, dtype=torch.bfloat16, device="cuda", backend="reference",
                       soft_capacity=4)
    g = torch.Generator().manual_seed(seed_for("equal scores"))
    u = torch.zeros(1, 1, device="cuda")
    for i in range(300):
        q, k, v = (torch.randn(1, 1, 1, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
        got = cache.step(q, k, v, u)
        ref._make_room(ref.state.soft_count.long() + 1)  # the reference state grows beside it
        want = reference_step(ref.state, q.float(), k, v, u, ref.topk, ref.window, ref.scale)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"step {i}: {m}")
    cache.check()
    assert int(cache.state.soft_count) == 300 and cache.soft_allocated >= 300


def test_a_step_the_host_did_not_see_overflows_into_the_status():
    # the operator called directly (as a compiled step or a graph replay runs it) cannot grow the soft
    # set: the update refuses the step, the output is NaN and check() names the size it needed
    cache = SparseKCache(1, 1, 64, topk=2, window=0, dtype=torch.bfloat16, device="cuda", backend="cuda",
                         soft_capacity=4, check_interval=0)
    x = torch.ones(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    u = torch.zeros(1, 1, device="cuda")
    st = cache.state
    outs = [cache._step_op(x, x, x, u, *st.tensors(), cache._counters_for(1), 2, 0, cache.scale, 0) for _ in range(5)]
    assert not bool(outs[3].isnan().any()) and bool(outs[4].isnan().all())
    assert cache.seq_lens.tolist() == [4]  # the refused step changed nothing but the status
    with pytest.raises(SparseKCacheError, match="needs 5 entries but holds 4.*cache.reserve"):
        cache.check()


def test_prefill_grows_the_soft_set():
    # the first report: constant scores, 700 tokens, topk 64 (the default room is 256)
    g = torch.Generator().manual_seed(seed_for("prefill grows"))
    q, k, v = (torch.randn(1, h, 760, 64, generator=g).to("cuda", torch.bfloat16) for h in (4, 1, 1))
    u = torch.zeros(1, 1, 760, device="cuda")
    cache = SparseKCache.from_prefill(k[:, :, :700], v[:, :, :700], u[:, :, :700], topk=64, backend="cuda", check_interval=0)
    assert cache.soft_allocated == 1024 and int(cache.state.soft_count) == 700
    cache.reserve(2000)
    assert cache.soft_allocated == 4096
    want = reference.attention_rows(*(t.double().cpu() for t in (q, k, v)), u.cpu(), 64, 0, 64**-0.5, range(700, 760))
    for i in range(700, 760):
        got = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i])
        torch.testing.assert_close(got.cpu().double(), want[:, :, i - 700 : i - 699], atol=2e-2, rtol=2e-2,
                                   msg=lambda m: f"row {i}: {m}")
    cache.check()


# Scores that pack into the threshold's unit band at long contexts: the soft set holds most of the
# context and grows far past the default room (the update then works on global memory).
def _long_scores(kind, g, S):
    if kind == "constant":
        return torch.zeros(1, 1, S)
    if kind == "std0.01":
        return torch.randn(1, 1, S, generator=g) * 0.01
    # SparseKScorer at its default initialisation on unit-variance hidden states (std ~0.58)
    torch.manual_seed(seed_for("scorer", S))
    with torch.no_grad():
        return SparseKScorer(256, 1)(torch.randn(1, S, 256, generator=g)).float()


@pytest.mark.parametrize("kind", ["constant", "std0.01", "scorer"])
def test_long_contexts_with_packed_scores_match_the_prefill(kind):
    P, n, D, K, W = 32768, 24, 64, 256, 64
    g = torch.Generator().manual_seed(seed_for("long", kind, P))
    q = torch.randn(1, 4, P + n, D, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(1, 1, P + n, D, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(1, 1, P + n, D, generator=g).to("cuda", torch.bfloat16)
    u = _long_scores(kind, g, P + n).float().cuda()
    cache = SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W, backend="cuda",
                                      check_interval=0)
    assert cache.backend == "cuda"
    rows = range(P, P + n)
    want = reference.attention_rows(*(t.double().cpu() for t in (q, k, v)), u.cpu(), K, W, D**-0.5, rows)
    for i in rows:
        got = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i])
        assert not bool(got.isnan().any()), f"row {i}"
        torch.testing.assert_close(got.cpu().double(), want[:, :, i - P : i - P + 1], atol=2e-2, rtol=2e-2,
                                   msg=lambda m: f"{kind}, row {i}: {m}")
    cache.check()
    if kind == "constant":  # every candidate is soft
        assert int(cache.state.soft_count) == P + n - W + 1 and cache.soft_allocated > cache.soft_capacity


# (arrives at step, prompt length, tokens to generate, score kind); the zeros request makes the soft
# set grow while other slots are live
REQUESTS = [
    (0, 30, 25, "normal"),
    (0, 0, 12, "normal"),  # no prompt: the first token is stepped into an empty slot
    (1, 9, 40, "ties"),
    (3, 51, 8, "normal"),
    (4, 1, 20, "normal"),
    (6, 60, 15, "zeros"),
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
    if kind == "zeros":
        u = torch.zeros(1, Hkv, L)
    return q, k, v, u.float().to(device)


def run_scheduler(device, dtype, backend, atol, slots=3, Hq=8, Hkv=2, D=64, K=16, W=8):
    """The shared scheduler (tests/decode_scheduler.py) on a cache of ``backend``."""
    cache = SparseKCache(slots, Hkv, D, topk=K, window=W, dtype=dtype, device=device, backend=backend, check_interval=0)
    seqs = [_request(i, P + n, kind, Hq, Hkv, D, device, dtype) for i, (_, P, n, kind) in enumerate(REQUESTS)]
    return serve(cache, REQUESTS, seqs, Hq, atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_continuous_batching_matches_the_prefill_of_each_sequence(dtype):
    cache = run_scheduler("cuda", dtype, "cuda", ATOL[dtype])
    assert cache.backend == "cuda" and cache.soft_allocated > cache.soft_capacity  # the zeros request grew it
    cache.check()  # free slots were masked over NaN rows: their status must be clean


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
        counters=torch.zeros(B * Hkv, **i32), topk=K, window=W, scale=0.125, num_splits=0,
        active=torch.ones(B, device="cuda", dtype=torch.bool))


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
        ({"active": lambda a: a["active"].float()}, TypeError, "active must be Bool, got Float"),
        ({"active": lambda a: a["active"][:1]}, ValueError, "active must have shape \\[2\\], got \\[1\\]"),
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


# -- torch.compile, CUDA graphs, opcheck ----------------------------------------------------------

GRAPH_SHAPE = (3, 16, 4, 300, 30, 128, 64, 16)  # (B, Hq, Hkv, prefix, steps, D, topk, window)


def _stepping(shape, dtype=torch.bfloat16):
    """Two CUDA caches from the same ragged context, and the inputs of step s with a mask that
    pauses slot 1 every third step (a paused slot's next token is the one it skipped)."""
    B, Hq, Hkv, P, n, D, K, W = shape
    q, k, v, u = _context(shape, dtype)
    lengths = [P - 3 * b for b in range(B)]
    build = lambda: SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W, lengths=lengths,
                                              backend="cuda", check_interval=0)
    pos = torch.tensor(lengths, device="cuda")

    def inputs(s):
        nonlocal pos
        active = torch.ones(B, dtype=torch.bool, device="cuda")
        active[1] = s % 3 != 1
        args = (_at(q, pos), _at(k, pos), _at(v, pos), _at(u.unsqueeze(-1), pos)[..., 0], active)
        pos = pos + active.long()
        return args

    return build(), build(), inputs


def _same_final_state(a, b):
    for x, y in zip(a.state.tensors(), b.state.tensors()):
        if x.shape == y.shape:
            assert torch.equal(x, y)
    n = min(a.soft_allocated, b.soft_allocated)  # reserve may have grown one of them
    assert torch.equal(a.state.soft[..., :n], b.state.soft[..., :n])


def test_compiled_steps_equal_eager_steps():
    from torch._dynamo.testing import CompileCounterWithBackend

    eager, compiled, inputs = _stepping(GRAPH_SHAPE)
    compiled.reserve(GRAPH_SHAPE[4])  # a compiled step cannot grow the soft set
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(fullgraph=True, backend=counter)
    def step(cache, q, k, v, u, active):
        return cache.step(q, k, v, u, active=active)

    for s in range(GRAPH_SHAPE[4]):
        *args, active = inputs(s)
        got = step(compiled, *args, active)
        want = eager.step(*args, active=active)
        assert torch.equal(got, want), f"step {s}"
    compiled.check()
    _same_final_state(compiled, eager)
    assert counter.frame_count == 1  # one graph for every step: no recompilation, no graph break


def test_a_captured_step_replays_like_eager_steps():
    eager, graphed, inputs = _stepping(GRAPH_SHAPE)
    n = GRAPH_SHAPE[4]
    # the launchers' one-time set-up (kernel attributes, occupancy) runs at the first launch of the
    # process, outside the capture; its inputs serve as the static buffers (overwritten before each replay)
    warm, _, warm_inputs = _stepping(GRAPH_SHAPE)
    static = list(warm_inputs(0))
    warm.step(*static[:4], active=static[4])
    graphed.reserve(n)  # room for every replay: a graph cannot grow the soft set
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed.step(*static[:4], active=static[4])
    assert graphed.seq_lens.tolist() == eager.seq_lens.tolist()  # capturing ran nothing
    for s in range(n):
        args = inputs(s)
        for buf, x in zip(static, args):
            buf.copy_(x)
        graph.replay()
        want = eager.step(*args[:4], active=args[4])
        assert torch.equal(out, want), f"replay {s}"
    graphed.check()
    _same_final_state(graphed, eager)


def test_a_capture_without_room_is_refused():
    _, cache, inputs = _stepping(GRAPH_SHAPE)
    cache._soft_bound = None  # as after steps the host did not see
    args = inputs(0)
    with pytest.raises(SparseKCacheError, match="reserve\\(steps\\) before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cache.step(*args[:4], active=args[4])


def test_decode_step_op_passes_opcheck():
    _, cache, inputs = _stepping(GRAPH_SHAPE)
    q, k_new, v_new, score_new, active = inputs(0)
    st = cache.state
    # the raw op takes score_new as (B, Hkv); cache.step also accepts (B, Hkv, 1) and squeezes it
    op_args = (q, k_new, v_new, score_new[..., 0], *st.tensors(), cache._counters_for(GRAPH_SHAPE[1]), cache.topk, cache.window, cache.scale, 0, active)
    torch.library.opcheck(torch.ops.sparsek_cuda.decode_step.default, op_args)
