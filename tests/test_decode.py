"""SparseKCache on the CPU: stepping reproduces the prefill op row by row, in float64.

The invariant (docs/decode.md, "Why the state is exact and bounded"): a cache built from the
first P tokens of a sequence and stepped through the rest gives, at every step, the prefill
output of that row, including the steps where the window fills, where the first candidate
appears, where the top-k fills and where the selection churns. The key/value slots' size is
fixed at construction; the soft set grows (by doubling) only when scores pack into the
threshold's unit band, so finite scores never fail. The same holds for sequences that come and
go through the slots of one cache, for compiled steps, and with inputs that require grad
(detached: the state never gets a graph).
"""

from __future__ import annotations

import re
import runpy
import warnings
from pathlib import Path

import pytest
import torch

import sparsek
from sparsek import SparseKCache, decode
from sparsek.decode import SparseKCacheError, reference_step

from conftest import seed_for, shape_id
from decode_scheduler import serve

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


def test_a_step_grows_the_soft_set_by_doubling():
    # equal scores all stay in the threshold's unit band: the soft set gains an entry at every step
    K, C, S = 4, 5, 60
    q, k, v, _ = _sequence(1, 2, 1, S, 8, "normal")
    u = torch.zeros(1, 1, S, dtype=torch.float64)
    expected = sparsek.sparsek_attention(q, k, v, u, topk=K, window=0)
    cache = SparseKCache(1, 1, 8, topk=K, window=0, dtype=torch.float64, score_dtype=torch.float64, soft_capacity=C)
    kv_shape = cache.state.k_slots.shape
    rooms = []
    for i in range(S):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i])
        torch.testing.assert_close(out, expected[:, :, i : i + 1], atol=1e-12, rtol=1e-12, msg=lambda m: f"step {i}: {m}")
        rooms.append(cache.soft_allocated)
    assert int(cache.state.soft_count) == S  # every key is still soft
    assert sorted(set(rooms)) == [5, 10, 20, 40, 80]  # doubled only when full
    assert cache.soft_capacity == C and cache.state.k_slots.shape == kv_shape  # only the soft set grows


def test_a_fixed_soft_set_raises_and_leaves_the_state_unchanged():
    # reference_step (what the compiled step runs) never grows the soft set: it refuses the step
    cache = SparseKCache(1, 1, 4, topk=2, window=0, dtype=torch.float64, score_dtype=torch.float64, soft_capacity=4)
    x = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    u = torch.zeros(1, 1, dtype=torch.float64)
    for _ in range(4):
        cache.step(x, x, x, u)
    assert cache.soft_allocated == 4
    snapshot = cache.state.clone()
    with pytest.raises(SparseKCacheError, match="needs 5 entries but holds 4.*cache.reserve"):
        reference_step(cache.state, x, x, x, u, cache.topk, cache.window, cache.scale)
    for before, after in zip(snapshot.tensors(), cache.state.tensors()):
        assert torch.equal(before, after)


def _dense_scores(kind: str, g: torch.Generator, B: int, H: int, S: int) -> torch.Tensor:
    """Scores packed closer than the gate's unit band: the soft set holds most of the context."""
    if kind == "zeros":
        return torch.zeros(B, H, S, dtype=torch.float64)
    if kind == "std0.01":
        return torch.randn(B, H, S, generator=g, dtype=torch.float64) * 0.01
    # heavy ties: three levels half a unit apart, so tau keeps landing on breakpoints
    return torch.randint(0, 3, (B, H, S), generator=g).to(torch.float64) * 0.5


# (B, S, prefix per batch, topk, window, kind): the first is a constant-score context of 700 tokens
# at topk 64 (the default soft_capacity 256 holds a third of its soft set)
DENSE_CASES = [
    (1, 760, [700], 64, 0, "zeros"),
    (1, 760, [700], 64, 16, "zeros"),
    (2, 900, [800, 333], 64, 8, "std0.01"),
    (2, 700, [640, 500], 32, 5, "ties"),
    (1, 4096, [4000], 64, 32, "std0.01"),  # a long context: the soft set holds nearly all of it
    (1, 3072, [3000], 64, 0, "zeros"),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-P{'_'.join(map(str, c[2]))}-K{c[3]}-W{c[4]}-{c[5]}")
def test_finite_scores_never_fail(case):
    B, S, prefix, K, W, kind = case
    g = torch.Generator().manual_seed(seed_for(*case[:5], kind))
    q = torch.randn(B, 2, S, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, 1, S, 8, generator=g, dtype=torch.float64)
    v = torch.randn(B, 1, S, 8, generator=g, dtype=torch.float64)
    u = _dense_scores(kind, g, B, 1, S)
    expected = sparsek.sparsek_attention(q, k, v, u, topk=K, window=W)
    cache = SparseKCache.from_prefill(k, v, u, topk=K, window=W, lengths=prefix)
    assert cache.soft_allocated > cache.soft_capacity == 4 * K  # grew while building
    kv_shape = cache.state.k_slots.shape
    start = torch.tensor(prefix)
    for s in range(S - max(prefix)):
        pos = start + s
        out = cache.step(_at(q, pos), _at(k, pos), _at(v, pos), _at(u.unsqueeze(-1), pos)[..., 0])
        torch.testing.assert_close(out, _at(expected, pos), atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f"step {s} (positions {pos.tolist()}): {m}")
    room = cache.soft_allocated
    assert int(cache.state.soft_count.max()) <= room and room // cache.soft_capacity * cache.soft_capacity == room
    assert (room // cache.soft_capacity) & (room // cache.soft_capacity - 1) == 0  # soft_capacity x a power of 2
    assert cache.state.k_slots.shape == kv_shape == (B, 1, W + K + 1, 8)


# -- torch.compile and the registered op --------------------------------------------------------


def _op_args(cache, q, k, v, u, active):
    st = cache.state
    return (q, k, v, u, active, st.k_slots, st.v_slots, st.slot_score, st.slot_pos, st.spare, st.win_score, st.soft,
            st.soft_count, st.tau, st.lengths, cache.topk, cache.window, cache.scale)


def test_decode_step_op_passes_opcheck():
    q, k, v, u = _sequence(2, 4, 2, 60, 8, "normal")
    for W in (4, 0):
        cache = SparseKCache.from_prefill(k[:, :, :40], v[:, :, :40], u[:, :, :40], topk=6, window=W)
        args = _op_args(cache, q[:, :, 40:41], k[:, :, 40:41], v[:, :, 40:41], u[:, :, 40], torch.tensor([True, False]))
        torch.library.opcheck(torch.ops.sparsek.decode_step.default, args)


def test_compiled_steps_equal_eager_steps():
    # backend "aot_eager": functionalization of the in-place op runs as in inductor, without
    # inductor's code generation (tens of seconds on a CPU)
    B, Hq, Hkv, S, D, K, W, P = 2, 4, 2, 100, 8, 6, 4, 40
    q, k, v, u = _sequence(B, Hq, Hkv, S, D, "normal")
    eager = SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W, lengths=[P, P - 7])
    compiled = SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W, lengths=[P, P - 7])
    counter = _step_compiled_and_eager(compiled, eager, (q, k, v, u), [P, P - 7], S - P)
    for a, b in zip(compiled.state.tensors(), eager.state.tensors()):
        assert torch.equal(a, b)
    assert counter.frame_count == 1  # one graph for every step: no recompilation, no graph break


def _step_compiled_and_eager(compiled, eager, seq, start, steps, after_step=lambda: None):
    """Steps `compiled` through torch.compile(fullgraph=True, backend aot_eager) and `eager`
    through plain calls on the same tokens of seq = (q, k, v, u) from positions `start`, the
    second slot pausing every third step; every output must be bitwise equal. Returns the compile
    counter."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, u = seq
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def step(cache, q, k, v, u, active):
        return cache.step(q, k, v, u, active=active)

    start = torch.tensor(start)
    for s in range(steps):
        pos = start + s
        active = torch.tensor([True, s % 3 != 1])  # the second slot pauses now and then
        args = (_at(q, pos), _at(k, pos), _at(v, pos), _at(u.unsqueeze(-1), pos)[..., 0], active)
        torch.testing.assert_close(step(compiled, *args), eager.step(*args), atol=0, rtol=0, msg=lambda m: f"step {s}: {m}")
        after_step()
        start = start - (~active).long()  # a paused slot's next token is the one it skipped
    return counter


def test_a_compiled_step_cannot_grow_the_soft_set_and_reserve_makes_room():
    cache = SparseKCache(1, 1, 8, topk=2, window=0, dtype=torch.float64, score_dtype=torch.float64, soft_capacity=4)
    x = torch.ones(1, 1, 1, 8, dtype=torch.float64)
    u = torch.zeros(1, 1, dtype=torch.float64)  # equal scores: one more soft entry per step
    step = torch.compile(lambda x, u: cache.step(x, x, x, u), fullgraph=True, backend="aot_eager")
    for _ in range(4):
        step(x, u)
    with pytest.raises(SparseKCacheError, match="needs 5 entries but holds 4.*cache.reserve"):
        step(x, u)
    assert cache.seq_lens.tolist() == [4]
    cache.reserve(10)
    assert cache.soft_allocated == 16  # 4 entries + 10 steps, by doubling
    for _ in range(10):
        step(x, u)
    assert int(cache.state.soft_count) == 14


# -- continuous batching -----------------------------------------------------------------------

# (arrives at step, prompt length, tokens to generate, score kind); the zeros request needs a
# larger soft set than the others (it grows while other slots are live)
REQUESTS = [
    (0, 30, 25, "normal"),
    (0, 0, 12, "normal"),  # no prompt: the first token is stepped into an empty slot
    (1, 9, 40, "ties"),
    (3, 51, 8, "drift"),
    (4, 1, 20, "normal"),
    (6, 60, 15, "zeros"),
    (9, 17, 30, "ties"),
    (10, 70, 5, "normal"),
    (30, 4, 18, "normal"),
]


def _request_tensors(i, L, kind, Hq, Hkv, D):
    g = torch.Generator().manual_seed(seed_for("request", i, L, kind))
    q = torch.randn(1, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hkv, L, D, generator=g, dtype=torch.float64)
    u = torch.zeros(1, Hkv, L, dtype=torch.float64) if kind == "zeros" else _scores(kind, g, 1, Hkv, L)
    return q, k, v, u


def _serve(cache, Hq):
    """The shared scheduler (tests/decode_scheduler.py) on float64 requests, exact to 1e-12; then
    every slot is evicted and the state is that of a new cache."""
    slots, Hkv, D, K, W = cache.batch, cache.kv_heads, cache.head_dim, cache.topk, cache.window
    seqs = [_request_tensors(i, P + n, kind, Hq, Hkv, D) for i, (_, P, n, kind) in enumerate(REQUESTS)]
    serve(cache, REQUESTS, seqs, Hq, atol=1e-12)
    fresh = SparseKCache(slots, Hkv, D, topk=K, window=W, dtype=torch.float64, score_dtype=torch.float64)
    for a, b in zip(cache.state.tensors(), fresh.state.tensors()):
        if a.shape == b.shape:  # every slot evicted: the state of a new cache (the soft set kept its room)
            assert torch.equal(a, b)
    assert not bool(cache.state.soft.any())


def test_continuous_batching_matches_the_prefill_of_each_sequence():
    cache = SparseKCache(3, 2, 8, topk=6, window=4, dtype=torch.float64, score_dtype=torch.float64)
    _serve(cache, Hq=4)
    assert cache.soft_allocated > cache.soft_capacity  # the zeros request made it grow, beside live slots


class _StandInKernels:
    """torch.ops.sparsek_cuda on the CPU for the CUDA path's own logic: decode_step is the reference
    step with the kernels' argument list (the mask included)."""

    @staticmethod
    def decode_step(q, k_new, v_new, score_new, *rest):
        *state, _counters, topk, window, scale, _num_splits, active = rest
        return reference_step(decode.DecodeState(*state), q, k_new, v_new, score_new, topk, window, scale, active)


def _as_cuda_path(cache, monkeypatch, op=None):
    """The cache's CUDA-path logic (the soft set's host-side bound, growth, the mask, compile and
    capture handling) around a stand-in for the kernels' operator."""
    monkeypatch.setattr(SparseKCache, "_cuda_ops", staticmethod(lambda: _StandInKernels))
    cache.backend, cache._step_op = "cuda", op
    cache._counters = torch.zeros(cache.batch * cache.kv_heads, dtype=torch.int32)  # as a CUDA cache allocates them
    return cache


def test_the_cuda_paths_slot_handling_on_stand_in_kernels(monkeypatch):
    """The CUDA path's step with the same scheduler, on the reference in place of the kernels. The
    stand-in never grows the soft set (reference_step raises when it is full), so the zeros request
    passes only if the host-side bound grows it in time, with no status check to help
    (check_interval=0)."""
    cache = SparseKCache(3, 2, 8, topk=6, window=4, dtype=torch.float64, score_dtype=torch.float64, backend="reference",
                         check_interval=0)
    _as_cuda_path(cache, monkeypatch)
    _serve(cache, Hq=4)
    assert cache.soft_allocated > cache.soft_capacity and cache._steps > 0


def test_the_cuda_path_reads_the_soft_set_back_only_when_its_bound_runs_out(monkeypatch):
    # equal scores: every step adds a soft entry, the worst case for the bound
    K, S = 64, 1500
    q, k, v, _ = _sequence(1, 2, 1, S, 8, "normal")
    u = torch.zeros(1, 1, S, dtype=torch.float64)
    expected = sparsek.sparsek_attention(q, k, v, u, topk=K, window=8)
    cache = SparseKCache.from_prefill(k[:, :, :700], v[:, :, :700], u[:, :, :700], topk=K, window=8,
                                      backend="reference", check_interval=0)
    _as_cuda_path(cache, monkeypatch)
    reads = []
    read_room = SparseKCache._read_room
    monkeypatch.setattr(SparseKCache, "_read_room", lambda self: (reads.append(self.soft_allocated), read_room(self)))
    for i in range(700, S):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i])
        torch.testing.assert_close(out, expected[:, :, i : i + 1], atol=1e-12, rtol=1e-12, msg=lambda m: f"step {i}: {m}")
    assert int(cache.state.soft_count) == S - 8 + 1 and cache.soft_allocated == 2048
    # from_prefill left 693 entries in a room of 1024: the bound reached the room once in 800 steps,
    # and that one read back doubled it (less than 1/SOFT_HEADROOM was free)
    assert reads == [1024]


def _binding_schema(name: str) -> str:
    """The schema csrc/binding.cpp's decode section declares for sparsek_cuda::<name>."""
    text = (Path(__file__).resolve().parents[1] / "csrc" / "binding.cpp").read_text()
    section = text[text.index("// ---- decode"):]
    for call in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', section):
        schema = "".join(re.findall(r'"([^"]*)"', call))
        if schema.startswith(name + "("):
            return schema
    raise AssertionError(f"no schema for {name} in csrc/binding.cpp")


@pytest.fixture(scope="module")
def stand_in_op():
    """sparsek_decode_cpu::decode_step: the kernels' schema (read from csrc/binding.cpp) with the
    reference step as its CPU implementation and sparsek.decode's fake, so that torch.compile of
    the CUDA path's step can be traced here as it is on the GPU."""
    lib = torch.library.Library("sparsek_decode_cpu", "DEF")
    lib.define(_binding_schema("decode_step"))

    def impl(q, k_new, v_new, score_new, k_slots, v_slots, slot_score, slot_pos, spare, win_score, soft, soft_count, tau,
             lengths, status, counters, topk, window, scale, num_splits=0, active=None):
        st = decode.DecodeState(k_slots, v_slots, slot_score, slot_pos, spare, win_score, soft, soft_count, tau, lengths,
                                status)
        return reference_step(st, q, k_new, v_new, score_new, topk, window, scale, active)

    lib.impl("decode_step", impl, "CPU")
    decode.register_cuda_fakes("sparsek_decode_cpu")
    yield torch.ops.sparsek_decode_cpu.decode_step
    lib._destroy()


def test_a_compiled_cuda_path_step_traces_the_kernels_operator(stand_in_op, monkeypatch):
    # what a compiled CUDA step runs, on the CPU: the fake and the declared mutations carry the
    # state through functionalization; the host-side bound is marked unknown, not guarded on
    B, Hq, Hkv, S, D, K, W, P = 2, 4, 2, 90, 8, 6, 4, 40
    q, k, v, u = _sequence(B, Hq, Hkv, S, D, "normal")
    build = lambda: SparseKCache.from_prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=K, window=W,
                                              lengths=[P, P - 7], backend="reference", check_interval=0)
    eager, compiled = build(), _as_cuda_path(build(), monkeypatch, stand_in_op)
    compiled.reserve(S)

    def host_did_not_see_the_step():
        assert compiled._soft_bound is None

    counter = _step_compiled_and_eager(compiled, eager, (q, k, v, u), [P, P - 7], S - P, host_did_not_see_the_step)
    for a, b in zip(compiled.state.tensors(), eager.state.tensors()):
        if a.shape == b.shape:  # the reserved soft set is larger
            assert torch.equal(a, b)
    assert torch.equal(compiled.state.soft[..., : eager.soft_allocated], eager.state.soft)
    assert counter.frame_count == 1
    x = (q[:, :, :1], k[:, :, :1], v[:, :, :1], u[:, :, 0])  # any token: only the room is checked
    compiled.step(*x)  # eager: reads the sizes back
    assert compiled._soft_bound is not None


def test_prefill_slot_leaves_the_other_slots_alone():
    q, k, v, u = _sequence(3, 4, 2, 50, 8, "normal")
    cache = SparseKCache.from_prefill(k, v, u, topk=6, window=4, lengths=[50, 20, 33])
    before = cache.state.clone()
    cache.prefill_slot(1, k[0, :, :41], v[0, :, :41], u[0, :, :41])
    for a, b in zip(before.tensors(), cache.state.tensors()):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    alone = SparseKCache.from_prefill(k[:1, :, :41], v[:1, :, :41], u[:1, :, :41], topk=6, window=4)
    for a, b in zip(alone.state.tensors(), cache.state.tensors()):
        assert torch.equal(a[0], b[1])  # the slot is what from_prefill builds for that prompt


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda c, k, u: c.prefill_slot(3, k, k, u), ValueError, r"b must be in \[0, 2\], got 3"),
        (lambda c, k, u: c.prefill_slot(0, k[None], k, u), ValueError, r"k must be \(Hkv=2, L, D=8\), got \(1, 2, 5, 8\)"),
        (lambda c, k, u: c.prefill_slot(0, k, k[:, :4], u), ValueError, r"v must have shape \(Hkv, L, D\) = \(2, 5, 8\)"),
        (lambda c, k, u: c.prefill_slot(0, k, k, u.float()), TypeError, "scores must be torch.float64, got torch.float32"),
        (lambda c, k, u: c.prefill_slot(0, k, k, u.index_fill(1, torch.tensor([3]), float("inf"))), ValueError,
         r"scores must be finite, got inf at index \(0, 3\)"),
        (lambda c, k, u: c.evict(-1), ValueError, r"b must be in \[0, 2\], got -1"),
        (lambda c, k, u: c.step(*(torch.zeros(3, h, 1, 8, dtype=torch.float64) for h in (4, 2, 2)),
                                torch.zeros(3, 2, dtype=torch.float64), active=torch.ones(3)), TypeError,
         "active must be torch.bool, got torch.float32"),
        (lambda c, k, u: c.reserve(-1), ValueError, "steps must be >= 0, got -1"),
    ],
)
def test_slot_errors_name_the_argument(call, exc, match):
    cache = SparseKCache(3, 2, 8, topk=4, window=2, dtype=torch.float64, score_dtype=torch.float64)
    before = cache.state.clone()
    with pytest.raises(exc, match=match):
        call(cache, torch.zeros(2, 5, 8, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    for a, b in zip(before.tensors(), cache.state.tensors()):
        assert torch.equal(a, b)  # a refused call changes nothing


# -- autograd ---------------------------------------------------------------------------------


def test_inputs_that_require_grad_are_detached_with_one_warning(monkeypatch):
    monkeypatch.setattr(decode, "_warned_grad", set())
    q, k, v, u = (t.requires_grad_() for t in _sequence(2, 4, 2, 30, 8, "normal"))
    with pytest.warns(UserWarning, match="SparseKCache.from_prefill got inputs that require grad"):
        cache = SparseKCache.from_prefill(k, v, u, topk=4, window=3, lengths=[20, 25])
    with pytest.warns(UserWarning, match="SparseKCache.prefill_slot got inputs that require grad"):
        cache.prefill_slot(1, k[0, :, :22] * 2, v[0, :, :22], u[0, :, :22])
    for i in range(20, 25):
        args = (q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], u[:, :, i])
        if i == 20:
            with pytest.warns(UserWarning, match="SparseKCache.step got inputs that require grad"):
                out = cache.step(*args)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once per entry point
                out = cache.step(*args)
        assert not out.requires_grad and out.grad_fn is None
    for t in cache.state.tensors():
        assert t.grad_fn is None and not t.requires_grad
    monkeypatch.setattr(decode, "_warned_grad", set())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # no graph can grow: nothing to warn about
        cache.step(q[:, :, 25:26], k[:, :, 25:26], v[:, :, 25:26], u[:, :, 25])


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


def test_the_serving_example_runs_and_matches_the_prefill(capsys):
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "serve_tiny.py"), run_name="__main__")
    out = capsys.readouterr().out
    worst = float(re.search(r"largest difference over every decoded row: (\S+)", out).group(1))
    assert worst < 1e-5, out
    assert "128k tokens: full KV cache   512.0 MiB, SparseKCache  10.4 MiB" in out
