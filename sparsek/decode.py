"""SparseK decode: a constant-size cache per sequence and one step per new token.

The state of one (batch, kv head) pair (docs/decode.md derives all of it) always holds what the
*next* query needs, except the next token itself:

* ``window + topk + 1`` key/value **slots**: ``[0, window)`` is the window ring (the key at position
  ``p`` lives in slot ``p % window``), then ``topk + 1`` candidate slots of which ``topk`` are live
  and one, ``spare``, is free. While there are at most ``topk`` candidates, candidate ``c`` lives in
  candidate slot ``c`` (and the spare is slot ``topk``).
* the candidates are the positions ``<= L - window`` after ``L`` tokens when ``window >= 1``: the key
  that leaves the window when token ``L`` arrives is a candidate already (its score has been known
  since it arrived), so a step's selection is ready before the step starts. With ``window == 0`` the
  new token is itself a candidate, so its own step must insert it first.
* the **soft set**: every candidate score ``u > tau``, unordered, in an array of ``soft_capacity``
  entries to start with. ``tau`` never decreases, so a key with ``u <= tau`` has gate 0 now and
  forever and is dropped; the keys that remain are exactly what the next ``tau`` depends on. Its
  size is not bounded by ``topk`` in general (equal scores all share the soft band): the cache
  doubles the array when it must (the key/value slots never grow), before a step that could need
  it. The reference path reads the sizes every step; the CUDA path keeps an upper bound on the
  host (a step adds at most one entry) and reads them back only when that bound runs out of room,
  so its steps need no host synchronisation. Never a silent approximation.
* ``tau`` (float64, exact), the candidate slots' scores and positions (the tie rule of the top-k:
  score, then the larger position), the window slots' scores, the token count and a status.

``step`` attends the new query over the window (the new token in place of the ring slot it is
about to take) and the live candidates with their gates, then prepares the next query: the key
that will leave the window becomes a candidate (into the spare slot if it beats the weakest live
key, whose slot becomes the spare; being the newest, it wins ties), ``tau`` advances exactly and the
new token takes its ring slot. Because the attention never reads what that preparation writes (the
spare slot, the new token's ring slot, the next tau), the CUDA kernels run the two concurrently.
Stepping through a sequence reproduces the prefill op row by row (tests/test_decode.py).

Two paths compute the same step: a pure-PyTorch reference (any device, any float dtype; registered
as the operator ``sparsek::decode_step`` so that ``torch.compile`` traces it) and the CUDA kernels
of csrc/decode_*.cu (sm_90a, fp16/bf16, head dim 64/128, float32 scores), chosen like
``sparsek.ops``: the kernels when they support the cache, else the reference with a one-time
warning naming the reason.

For serving, the batch rows are slots that sequences come and go through: ``prefill_slot`` starts
one from its prompt, ``evict`` frees it, ``step(..., active=mask)`` steps only the live ones.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import _cuda
from .reference import compute_dtype
from .selection import last_tau

_FN = "SparseKCache"
BACKENDS = ("auto", "reference", "cuda")
# Default soft-set capacity in units of topk. With scores spread like a trained scorer's (or
# i.i.d. normal with std >= 1) the soft set holds 1.1-2.6 x topk keys up to 128k tokens; scores
# packed closer than the gate's unit band need more (docs/decode.md, "The soft set").
DEFAULT_SOFT_FACTOR = 4
# How often (in steps) a CUDA cache reads its status back to raise on a failed sequence; each check
# is a host synchronisation, and between checks a failed sequence answers NaN (never a wrong number).
DEFAULT_CHECK_INTERVAL = 64
# CUDA path: when the soft set's room is read back (the host's bound on its size ran out), it doubles
# if less than 1/SOFT_HEADROOM of it is free, so the next read back is at least that many steps away.
SOFT_HEADROOM = 8
MAX_SPLITS = 64  # kDecodeMaxSplits in csrc/decode_params.h
INT32_MAX = 2**31 - 1

# status codes written by the update (csrc/decode_params.h)
STATUS_OK = 0
STATUS_SOFT_OVERFLOW = 1
STATUS_SOLVER_STUCK = 2
STATUS_POSITION_OVERFLOW = 3
STATUS_NONFINITE_SCORE = 4


class SparseKCacheError(RuntimeError):
    """A decode cache cannot continue exactly (a score was not finite, positions ran out, or a step
    that could not grow the soft set -- compiled, or replayed from a CUDA graph -- found it full).
    The affected sequences answer NaN until their slot is refilled or the cache rebuilt."""


@dataclass
class DecodeState:
    """The tensors of a decode cache. All have a fixed size except the soft set, which the cache
    doubles when the scores pack into the threshold's unit band; the key/value slots never grow."""

    k_slots: Tensor  # (B, Hkv, W + K + 1, D): [0, W) window ring, [W, W + K + 1) candidate slots
    v_slots: Tensor  # (B, Hkv, W + K + 1, D)
    slot_score: Tensor  # (B, Hkv, K + 1) score of each candidate slot (the spare's is stale)
    slot_pos: Tensor  # (B, Hkv, K + 1) int32 position of each candidate slot, -1 while empty
    spare: Tensor  # (B, Hkv) int32: the candidate slot not in use (K while the top-k fills)
    win_score: Tensor  # (B, Hkv, W) score of each window slot
    soft: Tensor  # (B, Hkv, C) the candidate scores > tau, unordered; the first soft_count are used
    soft_count: Tensor  # (B, Hkv) int32
    tau: Tensor  # (B, Hkv) float64; -inf while there are <= K candidates
    lengths: Tensor  # (B, Hkv) int32 tokens seen (the next token's position)
    status: Tensor  # (B, Hkv, 2) int32 {code, detail}, code 0 = ok

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def clone(self) -> "DecodeState":
        return DecodeState(*(t.clone() for t in self.tensors()))

    def copy_(self, other: "DecodeState") -> None:
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sparsek: SparseKCache uses the PyTorch reference on CUDA tensors: {reason}", RuntimeWarning,
                      stacklevel=4)


def _fail(msg: str, exc=ValueError):
    raise exc(f"{_FN}: {msg}")


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{name} must be an int, got {type(value).__name__} {value!r}", TypeError)
    if value < minimum or (maximum is not None and value > maximum):
        want = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        _fail(f"{name} must be {want}, got {value}")
    return value


def _check_tensor(name: str, t, shape: tuple, dtype: torch.dtype | tuple, device: torch.device, layout: str) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if tuple(t.shape) != shape:
        _fail(f"{name} must have shape {layout} = {shape}, got {tuple(t.shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        _fail(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}", TypeError)
    if t.device != device:
        _fail(f"{name} is on {t.device} but the cache is on {device}")


def _check_finite_context(scores: Tensor, lengths: Tensor, batched: bool = True) -> None:
    """scores (B, H, S) must be finite within each sequence's lengths (B,); padding is never read.
    batched=False: one sequence's scores (1, H, S), reported as indices of (H, S)."""
    S = scores.shape[-1]
    inside = torch.arange(S, device=scores.device).view(1, 1, S) < lengths.view(-1, 1, 1)
    if not bool((torch.isfinite(scores) | ~inside).all()):
        bad = tuple((~torch.isfinite(scores) & inside).nonzero()[0].tolist())
        _fail(f"scores must be finite, got {scores[bad].item()} at index {bad if batched else bad[1:]}")


_warned_grad: set[str] = set()


def _detached(where: str, *tensors: Tensor) -> tuple:
    """The tensors without autograd history. The cache has no backward, and a graph through its
    state would keep every step's inputs alive (memory growing with the context), so inputs that
    require grad are detached; with grad mode on that is worth one warning per entry point."""
    if not any(t.requires_grad for t in tensors):
        return tensors
    if torch.is_grad_enabled() and where not in _warned_grad:
        _warned_grad.add(where)
        warnings.warn(f"sparsek: SparseKCache.{where} got inputs that require grad; the cache has no backward, so "
                      f"they are detached (the state and the outputs carry no gradient). Run decode under "
                      f"torch.no_grad() or torch.inference_mode() to avoid this warning.", UserWarning, stacklevel=3)
    return tuple(t.detach() for t in tensors)


def _rows16(t: Tensor) -> Tensor:
    """t (B, H, 1, D) with a contiguous last dim and 16-byte aligned rows (the kernels' loads).
    Inside torch.compile the address is not known: the strides are checked, the binding checks the
    rest and names the argument."""
    es = t.element_size()
    ok = t.stride(-1) == 1 and (t.stride(0) * es) % 16 == 0 and (t.stride(1) * es) % 16 == 0
    if ok and not torch.compiler.is_compiling():
        ok = t.data_ptr() % 16 == 0
    return t if ok else t.contiguous()


# ---------------------------------------------------------------------------------------------
# the reference step


def _advance_tau(soft: Tensor, count: Tensor, ux: Tensor, tau: Tensor, topk: int, rows: Tensor):
    """tau after adding candidate score ux (B, H) to the soft set, for the rows ``rows`` (B, H).

    Walks the breakpoints of f(t) = sum clip(u - t, 0, 1) over soft + {ux} upward from tau (the
    threshold never decreases), then drops every score <= the new tau. Returns (tau, soft, count)
    for all rows (others unchanged); count may exceed the capacity (the caller raises).
    """
    C = soft.shape[-1]
    idx = torch.arange(C + 1, device=soft.device)
    valid = (idx < count.unsqueeze(-1)) | (idx == C)
    vals = torch.cat([soft, ux.unsqueeze(-1)], -1).to(torch.float64)
    vals = torch.where(valid, vals, torch.full_like(vals, float("-inf")))
    inf = torch.full_like(vals, float("inf"))
    t = tau.clone()
    new_tau = tau.clone()
    active = rows.clone()
    while bool(active.any()):
        tt = t.unsqueeze(-1)
        above = vals > tt
        # u - 1 > t, not u > t + 1: the breakpoint below is computed as u - 1.0, so at t = u - 1.0
        # the key must count as soft, else rounding keeps t on the same breakpoint for ever
        saturated = above & (vals - 1.0 > tt)
        soft_band = above & ~saturated
        n_sat = saturated.sum(-1)
        n_soft = soft_band.sum(-1)
        soft_sum = torch.where(soft_band, vals, torch.zeros_like(vals)).sum(-1)
        next_break = torch.where(saturated, vals - 1.0, torch.where(soft_band, vals, inf)).amin(-1)
        # f is linear on (t, next_break]; the same (sum - integer) / count form as the prefill
        root = (soft_sum - (topk - n_sat).to(torch.float64)) / n_soft.clamp(min=1).to(torch.float64)
        hit = active & (n_soft > 0) & (root <= next_break)
        flat = active & ~hit & torch.isinf(next_break)  # only rounding leads here
        new_tau = torch.where(hit, torch.maximum(root, t), torch.where(flat, t, new_tau))
        active = active & ~hit & ~flat
        t = torch.where(active, next_break, t)
    keep = valid & (vals > new_tau.unsqueeze(-1))
    new_count = keep.sum(-1)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :C]  # kept first
    packed = vals.gather(-1, order)
    packed = torch.where(idx[:C] < new_count.unsqueeze(-1), packed, torch.zeros_like(packed)).to(soft.dtype)
    return (
        torch.where(rows, new_tau, tau),
        torch.where(rows.unsqueeze(-1), packed, soft),
        torch.where(rows, new_count.to(count.dtype), count),
        torch.where(rows, new_count, torch.zeros_like(new_count)),
    )


def candidates(lengths: Tensor, window: int) -> Tensor:
    """Candidates the state holds after ``lengths`` tokens (B, H): the positions ``<= L - window``
    when ``window >= 1`` (the next step's selection is ready), ``<= L - 1`` when ``window == 0``."""
    return (lengths.long() - window + (1 if window > 0 else 0)).clamp(min=0)


def _add_candidate(st: DecodeState, kx: Tensor, vx: Tensor, ux: Tensor, x_pos: Tensor, topk: int) -> None:
    """Make the key at x_pos (B, H) a candidate, in place: kx, vx (B, H, D), ux (B, H); x_pos < 0 = none.

    While there are fewer than topk candidates it takes the next candidate slot; afterwards it moves
    into the spare slot if it beats the weakest live key (whose slot becomes the spare), and tau
    advances. Raises SparseKCacheError without changing the state when the soft set would overflow.
    """
    B, H, NS, D = st.k_slots.shape
    K, C = topk, st.soft.shape[-1]
    W = NS - K - 1
    dev = st.k_slots.device
    bi = torch.arange(B, device=dev).view(B, 1).expand(B, H)
    hi = torch.arange(H, device=dev).view(1, H).expand(B, H)
    spare = st.spare.long()
    filling = (x_pos >= 0) & (x_pos < K)
    full = x_pos >= K

    # the weakest live key: lowest score, then lowest position; x (the newest) beats it on ties
    live = torch.arange(K + 1, device=dev).view(1, 1, K + 1) != spare.unsqueeze(-1)
    score = torch.where(live, st.slot_score, torch.full_like(st.slot_score, float("inf")))
    weakest = score.min(-1).values
    tied = live & (score == weakest.unsqueeze(-1))
    weakest_slot = torch.where(tied, st.slot_pos.long(), torch.full_like(st.slot_pos, INT32_MAX, dtype=torch.long)).argmin(-1)
    enter = full & (ux >= weakest)
    dst = torch.where(filling, x_pos.clamp(0, K - 1), spare)
    write = filling | enter

    solve = full & (ux.to(torch.float64) > st.tau)
    if bool(solve.any()):
        tau, soft, count, needed = _advance_tau(st.soft, st.soft_count, ux, st.tau, K, solve)
        if bool((needed > C).any()):
            b, h = (needed > C).nonzero()[0].tolist()
            raise SparseKCacheError(_fixed_overflow_message(b, h, int(needed[b, h]), C))
        st.tau.copy_(tau)
        st.soft.copy_(soft)
        st.soft_count.copy_(count)
    if bool(filling.any()):
        st.soft[bi[filling], hi[filling], x_pos[filling]] = ux[filling]
        st.soft_count[filling] = (x_pos[filling] + 1).to(st.soft_count.dtype)
    if bool(write.any()):
        bw, hw, dw = bi[write], hi[write], dst[write]
        st.k_slots[bw, hw, W + dw] = kx[write]
        st.v_slots[bw, hw, W + dw] = vx[write]
        st.slot_score[bw, hw, dw] = ux[write]
        st.slot_pos[bw, hw, dw] = x_pos[write].to(st.slot_pos.dtype)
    st.spare.copy_(torch.where(enter, weakest_slot, spare).to(st.spare.dtype))


def reference_attention(st: DecodeState, q: Tensor, k_new: Tensor, v_new: Tensor, pos: Tensor, window: int,
                        scale: float) -> Tensor:
    """The query at positions pos (B, H) over the window and the live candidates -> (B, Hq, 1, D).

    q (B, Hq, 1, D); k_new, v_new (B, Hkv, 1, D) are the query's own key and value, which take the
    place of the ring slot pos % window (its old key is a candidate by now). The state must hold the
    candidates of query pos, the positions <= pos - window. Float32 arithmetic (float64
    for float64 q) with tau rounded to the score dtype first, exactly as the prefill reference
    computes the gates; the result is in q's dtype.
    """
    B, H, NS, D = st.k_slots.shape
    Hq = q.shape[1]
    W = window
    K = NS - W - 1
    ct = compute_dtype(q.dtype)
    dev = q.device
    pos = pos.long()
    slot = torch.arange(NS, device=dev).view(1, 1, NS)
    # query pos selects among the positions <= pos - W: candidate slots [0, n) minus the spare are live
    n = (pos + 1 - W).clamp(min=0, max=K + 1)
    in_ring = slot < torch.minimum(pos + 1, torch.full_like(pos, W)).unsqueeze(-1)
    cand = slot - W
    live = (cand >= 0) & (cand < n.unsqueeze(-1)) & (cand != st.spare.long().unsqueeze(-1))
    valid = in_ring | live  # (B, H, NS)
    tau = st.tau.to(st.slot_score.dtype).to(ct).unsqueeze(-1)
    gate = torch.cat([torch.ones(B, H, W, dtype=ct, device=dev), (st.slot_score.to(ct) - tau).clamp(0.0, 1.0)], -1)
    gate = torch.where(valid, gate, torch.zeros_like(gate))
    k, v = st.k_slots.to(ct), st.v_slots.to(ct)
    if W > 0:  # the query's own key replaces the ring slot it is about to take
        own = (slot == (pos % W).unsqueeze(-1)).unsqueeze(-1)  # (B, H, NS, 1)
        k = torch.where(own, k_new.to(ct), k)
        v = torch.where(own, v_new.to(ct), v)
    k = torch.where(valid.unsqueeze(-1), k, torch.zeros((), dtype=ct, device=dev))
    v = torch.where(valid.unsqueeze(-1), v, torch.zeros((), dtype=ct, device=dev))
    qg = q.to(ct).reshape(B, H, Hq // H, D)  # (B, Hkv, G, D): query head h reads kv head h // G
    logits = scale * qg @ k.transpose(-1, -2)  # (B, Hkv, G, NS)
    log_gate = torch.where(gate > 0, torch.log(gate.clamp(min=torch.finfo(ct).tiny)), torch.full_like(gate, float("-inf")))
    logits = torch.where(gate.unsqueeze(2) > 0, logits + log_gate.unsqueeze(2), torch.full_like(logits, float("-inf")))
    out = torch.softmax(logits, -1) @ v  # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D).to(q.dtype)


def reference_step(st: DecodeState, q: Tensor, k_new: Tensor, v_new: Tensor, score_new: Tensor, topk: int, window: int,
                   scale: float, active: Tensor | None = None) -> Tensor:
    """One step in place: q (B, Hq, 1, D), k_new, v_new (B, Hkv, 1, D), score_new (B, Hkv) -> the
    query's output (B, Hq, 1, D) in q's dtype.

    window >= 1: attend first (the state holds this query's selection), then make the key that
    leaves the window at the next step a candidate and put the new token into the ring. window == 0:
    the new token is a candidate of its own query, so it is added first. active (B,) bool, default
    all: an inactive row's state is left as it is, its inputs are never read into the state and its
    output is zeros. Raises SparseKCacheError without changing the state when the soft set would
    overflow (this function never grows it: ``SparseKCache.step`` makes room first).
    """
    B, H, NS, D = st.k_slots.shape
    W = window
    dev = st.k_slots.device
    bi = torch.arange(B, device=dev).view(B, 1).expand(B, H)
    hi = torch.arange(H, device=dev).view(1, H).expand(B, H)
    act = torch.ones(B, H, dtype=torch.bool, device=dev) if active is None else active.view(B, 1).expand(B, H)
    pos = st.lengths.long()
    if bool(((pos >= INT32_MAX) & act).any()):
        raise SparseKCacheError(f"{_FN}: positions are int32 and a sequence reached {INT32_MAX} tokens")
    kn, vn = k_new[:, :, 0], v_new[:, :, 0]  # (B, H, D)
    if score_new.dim() == 3:  # (B, H, 1), as step accepts it
        score_new = score_new[..., 0]
    un = score_new.to(st.soft.dtype)
    none = torch.full_like(pos, -1)  # an inactive row adds no candidate (x_pos < 0 = none)
    if W == 0:
        _add_candidate(st, kn, vn, un, torch.where(act, pos, none), topk)
        out = reference_attention(st, q, k_new, v_new, pos, W, scale)
    else:
        out = reference_attention(st, q, k_new, v_new, pos, W, scale)
        # the key that leaves the window when token pos + 1 arrives: ring slot (pos + 1) % W, which is
        # the new token itself when W == 1
        nxt = (pos + 1) % W
        if W == 1:
            kx, vx, ux = kn, vn, un
        else:
            kx, vx, ux = st.k_slots[bi, hi, nxt], st.v_slots[bi, hi, nxt], st.win_score[bi, hi, nxt]
        _add_candidate(st, kx, vx, ux, torch.where(act, pos + 1 - W, none), topk)
        ring = pos % W
        st.k_slots[bi[act], hi[act], ring[act]] = kn[act]
        st.v_slots[bi[act], hi[act], ring[act]] = vn[act]
        st.win_score[bi[act], hi[act], ring[act]] = un[act]
    st.lengths += act.to(st.lengths.dtype)
    if active is None:
        return out
    return torch.where(active.view(B, 1, 1, 1), out, torch.zeros((), dtype=out.dtype, device=dev))


# The step as an operator, so that torch.compile traces a function that steps a cache without a graph
# break (the fake below gives the output's shape; the state is updated in place, hence mutates_args).
# It runs the reference on any device; the CUDA kernels are torch.ops.sparsek_cuda.decode_step.
@torch.library.custom_op(
    "sparsek::decode_step",
    mutates_args=("k_slots", "v_slots", "slot_score", "slot_pos", "spare", "win_score", "soft", "soft_count", "tau",
                  "lengths"),
)
def decode_step_op(
    q: Tensor,  # (B, Hq, 1, D)
    k_new: Tensor,  # (B, Hkv, 1, D)
    v_new: Tensor,  # (B, Hkv, 1, D)
    score_new: Tensor,  # (B, Hkv)
    active: Tensor,  # (B,) bool
    k_slots: Tensor,  # (B, Hkv, W + K + 1, D)
    v_slots: Tensor,  # (B, Hkv, W + K + 1, D)
    slot_score: Tensor,  # (B, Hkv, K + 1)
    slot_pos: Tensor,  # (B, Hkv, K + 1) int32
    spare: Tensor,  # (B, Hkv) int32
    win_score: Tensor,  # (B, Hkv, W)
    soft: Tensor,  # (B, Hkv, C)
    soft_count: Tensor,  # (B, Hkv) int32
    tau: Tensor,  # (B, Hkv) float64
    lengths: Tensor,  # (B, Hkv) int32
    topk: int,
    window: int,
    scale: float,
) -> Tensor:
    """``reference_step`` on the given state tensors -> (B, Hq, 1, D) in q's dtype, zeros for inactive
    rows. Checks here what depends on values (finite scores), so the caller's checks need no sync."""
    bad = ~torch.isfinite(score_new) & active.view(-1, 1)
    if bool(bad.any()):
        b, h = bad.nonzero()[0].tolist()
        _fail(f"score_new must be finite, got {score_new[b, h].item()} at batch {b}, kv head {h}")
    status = torch.zeros(*spare.shape, 2, dtype=torch.int32, device=spare.device)  # the reference never sets it
    st = DecodeState(k_slots, v_slots, slot_score, slot_pos, spare, win_score, soft, soft_count, tau, lengths, status)
    return reference_step(st, q, k_new, v_new, score_new, topk, window, scale, active)


@decode_step_op.register_fake
def _(q, k_new, v_new, score_new, active, k_slots, v_slots, slot_score, slot_pos, spare, win_score, soft, soft_count, tau,
      lengths, topk, window, scale):
    return q.new_empty(q.shape)


# The CUDA kernels' operators (csrc/binding.cpp, decode section) under torch.compile: their fake
# implementations give the output's shape; the state is updated in place, as their schemas declare
# (Tensor(a!)), so functionalization handles it like any mutating op. Registered when the kernels
# are loaded (SparseKCache._cuda_ops).


def _fake_decode_step(q, k_new, v_new, score_new, k_slots, v_slots, slot_score, slot_pos, spare, win_score, soft,
                      soft_count, tau, lengths, status, counters, topk, window, scale, num_splits=0, active=None):
    return q.new_empty(q.shape)  # (B, Hq, 1, D) contiguous, like the kernel's output


def _fake_decode_update(*args, **kwargs):
    return None


def _fake_decode_attention(q, *args, **kwargs):
    return q.new_empty(q.shape)


_fakes_registered: set[str] = set()


def register_cuda_fakes(namespace: str = "sparsek_cuda") -> None:
    """Register the fakes of ``namespace``'s decode operators once (the tests pass a stand-in
    namespace with the same schemas)."""
    if namespace in _fakes_registered:
        return
    for name, fake in (("decode_step", _fake_decode_step), ("decode_update", _fake_decode_update),
                       ("decode_attention", _fake_decode_attention)):
        if hasattr(getattr(torch.ops, namespace), name):
            torch.library.register_fake(f"{namespace}::{name}")(fake)
    _fakes_registered.add(namespace)


def _fixed_overflow_message(b: int, h: int, needed: int, capacity: int) -> str:
    return (f"{_FN}: the soft set of batch {b}, kv head {h} needs {needed} entries but holds {capacity}, and this "
            f"step cannot grow it (inside torch.compile its size is fixed, as it is for reference_step called "
            f"directly). Call cache.reserve(steps) before the compiled region, or step eagerly: an eager step "
            f"of the reference path doubles the soft set when it must. The state is unchanged.")


def _overflow_message(b: int, h: int, needed: int, capacity: int) -> str:
    return (f"{_FN}: the soft set of batch {b}, kv head {h} needs {needed} entries but holds {capacity}, and the "
            f"step that found it full could not grow it (a compiled step, or a CUDA graph replay: the host does "
            f"not see those steps). Call cache.reserve(steps) before the compiled region or the capture, for "
            f"every step run there (eager steps grow the soft set themselves). That step was refused and the "
            f"sequence's outputs are NaN until its slot is refilled (evict, prefill_slot) or the cache rebuilt.")


# ---------------------------------------------------------------------------------------------
# prefill: the state after `lengths` tokens, from the context


# ---------------------------------------------------------------------------------------------
# the cache


class SparseKCache:
    """Constant-size SparseK decode cache for a batch of sequences.

    Args:
        batch, kv_heads, head_dim: the cache's shape (query heads may be any multiple of kv_heads).
        topk, window: as in ``sparsek_attention``.
        dtype: key/value dtype (float16/bfloat16 for the CUDA kernels; float32/64 run the reference).
        device: where the cache lives.
        score_dtype: float32 (float64 is accepted for float64 caches, reference only).
        soft_capacity: initial room for candidate scores above tau per (batch, kv head); default
            4 * topk; must exceed topk. The cache doubles the room when a context or a step could
            need more (``soft_allocated`` is the room now; see docs/decode.md). Compiled steps and
            CUDA graph replays cannot grow it: ``reserve(steps)`` before them.
        scale: softmax scale, default head_dim ** -0.5.
        backend: "auto" (CUDA kernels when they support the cache, else the reference with a
            warning), "cuda" (raise if the kernels cannot run) or "reference".
        check_interval: CUDA path: read the status back every this many steps (a host
            synchronisation, which also refreshes the soft set's size bound) and raise on a failed
            sequence; 0 = only when ``check()`` is called (for CUDA graphs). The reference checks
            every step.
        num_splits: CUDA path: splits of the slots per (batch, kv head); 0 = automatic.

    Use ``SparseKCache.from_prefill(k, v, scores, ...)`` to start from a context. In a serving loop
    the batch rows are slots: ``prefill_slot(b, ...)`` starts a sequence in slot b from its prompt,
    ``evict(b)`` frees it, and ``step(..., active=mask)`` steps only the slots that hold a sequence.

    The cache has no backward: inputs that require grad are detached, with a one-time warning
    (a graph through the state would grow with every step; run decode under ``torch.no_grad()``
    or ``torch.inference_mode()``).
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        *,
        topk: int,
        window: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        score_dtype: torch.dtype = torch.float32,
        soft_capacity: int | None = None,
        scale: float | None = None,
        backend: str = "auto",
        check_interval: int = DEFAULT_CHECK_INTERVAL,
        num_splits: int = 0,
    ):
        _check_int("batch", batch, 1)
        _check_int("kv_heads", kv_heads, 1)
        _check_int("head_dim", head_dim, 1)
        self.topk = _check_int("topk", topk, 1)
        self.window = _check_int("window", window, 0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            _fail(f"dtype must be a floating torch.dtype, got {dtype!r}", TypeError)
        if score_dtype not in (torch.float32, torch.float64):
            _fail(f"score_dtype must be torch.float32 or torch.float64, got {score_dtype!r}", TypeError)
        if soft_capacity is None:
            soft_capacity = DEFAULT_SOFT_FACTOR * topk
        self.soft_capacity = _check_int("soft_capacity", soft_capacity, topk + 1)
        if topk + window >= INT32_MAX // 2 or soft_capacity >= INT32_MAX // 2:
            _fail(f"topk + window ({topk + window}) and soft_capacity ({soft_capacity}) must be < {INT32_MAX // 2}")
        if scale is None:
            scale = head_dim**-0.5
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            _fail(f"scale must be a finite float > 0 or None, got {scale!r}")
        self.scale = float(scale)
        if backend not in BACKENDS:
            _fail(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.check_interval = _check_int("check_interval", check_interval, 0)
        self.num_splits = _check_int("num_splits", num_splits, 0, MAX_SPLITS)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())

        B, H, D, K, W, C = batch, kv_heads, head_dim, topk, window, soft_capacity
        i32 = dict(dtype=torch.int32, device=dev)
        f = dict(dtype=score_dtype, device=dev)
        # zeros, not empty: slots past the valid range are never read as data, but a NaN left in
        # freed memory must not be able to reach an output through a 0 * NaN
        self.state = DecodeState(
            k_slots=torch.zeros(B, H, W + K + 1, D, dtype=dtype, device=dev),
            v_slots=torch.zeros(B, H, W + K + 1, D, dtype=dtype, device=dev),
            slot_score=torch.zeros(B, H, K + 1, **f),
            slot_pos=torch.full((B, H, K + 1), -1, **i32),
            spare=torch.full((B, H), K, **i32),
            win_score=torch.zeros(B, H, W, **f),
            soft=torch.zeros(B, H, C, **f),
            soft_count=torch.zeros(B, H, **i32),
            tau=torch.full((B, H), float("-inf"), dtype=torch.float64, device=dev),
            lengths=torch.zeros(B, H, **i32),
            status=torch.zeros(B, H, 2, **i32),
        )
        self.batch, self.kv_heads, self.head_dim = B, H, D
        self.dtype, self.score_dtype, self.device = dtype, score_dtype, dev
        self._counters: Tensor | None = None  # CUDA split-K arrival counters (see _counters_for)
        self._steps = 0
        # CUDA path: an upper bound on every sequence's soft-set size, kept on the host (a step adds at
        # most one entry), so a step knows without a device read whether it could run out of room;
        # None = unknown (after steps the host did not see: compiled, captured), read back when needed
        self._soft_bound: int | None = 0
        self._graphed = False  # a step was captured in a CUDA graph: its replays are invisible here
        self._step_op = None
        # probing builds the extension (minutes, once), so a requested reference skips it
        reason = "the reference was requested" if backend == "reference" else self._cuda_reason()
        if backend == "cuda" and reason is not None:
            _fail(f"backend='cuda' but the decode kernels cannot run this cache: {reason}", RuntimeError)
        if backend == "auto" and reason is not None and dev.type == "cuda":
            _warn_once(reason)
        self.backend = "cuda" if reason is None else "reference"
        if self.backend == "cuda":
            # the operator itself, looked up once: torch.compile traces a call to it, not the lookup
            self._step_op = self._cuda_ops().decode_step
            self._counters = torch.zeros(B * H, dtype=torch.int32, device=dev)  # query groups of up to 8 heads

    # -- construction from a context --------------------------------------------------------

    @classmethod
    def from_prefill(
        cls,
        k: Tensor,  # (B, Hkv, S, D)
        v: Tensor,  # (B, Hkv, S, D)
        scores: Tensor,  # (B, Hkv, S) float32
        *,
        topk: int,
        window: int = 0,
        lengths=None,  # (B,) tokens of each sequence (the rest is padding); default S for all
        **options,
    ) -> "SparseKCache":
        """The cache after the context (k, v, scores); the next ``step`` is position ``lengths[b]``.

        ``options`` are the constructor's keyword arguments (soft_capacity, scale, backend, ...).
        The soft set starts larger than soft_capacity when the context needs it.
        """
        for name, t in (("k", k), ("v", v), ("scores", scores)):
            if not isinstance(t, Tensor):
                _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if k.dim() != 4:
            _fail(f"k must be 4-D (B, Hkv, S, D), got shape {tuple(k.shape)}")
        B, H, S, D = k.shape
        if S < 1:
            _fail(f"the context length S must be >= 1, got {S} (use SparseKCache(...) for an empty cache)")
        _check_tensor("v", v, (B, H, S, D), k.dtype, k.device, "(B, Hkv, S, D)")
        _check_tensor("scores", scores, (B, H, S), (torch.float32, torch.float64), k.device, "(B, Hkv, S)")
        if scores.dtype == torch.float64 and k.dtype != torch.float64:
            _fail(f"scores must be float32 for k of dtype {k.dtype}, got {scores.dtype}", TypeError)
        _check_int("topk", topk, 1)
        _check_int("window", window, 0)
        if lengths is None:
            L = torch.full((B,), S, dtype=torch.long, device=k.device)
        else:
            L = torch.as_tensor(lengths, device=k.device)
            if L.shape != (B,) or L.dtype.is_floating_point or L.dtype == torch.bool:
                _fail(f"lengths must be B={B} integers, got {tuple(L.shape)} {L.dtype}")
            L = L.long()
            if bool(((L < 0) | (L > S)).any()):
                _fail(f"lengths must be in [0, S={S}], got {L.tolist()}")
        _check_finite_context(scores, L)
        k, v, scores = _detached("from_prefill", k, v, scores)
        cache = cls(B, H, D, topk=topk, window=window, dtype=k.dtype, device=k.device, score_dtype=scores.dtype, **options)
        cache._fill(k, v, scores, L)
        return cache

    def prefill_slot(
        self,
        b: int,
        k: Tensor,  # (Hkv, L, D)
        v: Tensor,  # (Hkv, L, D)
        scores: Tensor,  # (Hkv, L) in the cache's score dtype
    ) -> None:
        """Start a new sequence in slot b from its prompt of L tokens (L = 0: an empty sequence),
        replacing whatever the slot held; the other slots are not touched. Its next ``step`` is
        position L. Refused arguments raise before the slot changes; a prompt whose soft set needs
        more than ``soft_allocated`` grows it first (for every slot: one tensor)."""
        B, H, D = self.batch, self.kv_heads, self.head_dim
        b = _check_int("b", b, 0, B - 1)
        if not isinstance(k, Tensor) or k.dim() != 3 or k.shape[0] != H or k.shape[2] != D:
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            _fail(f"k must be (Hkv={H}, L, D={D}), got {shape}")
        L = k.shape[1]
        _check_tensor("k", k, (H, L, D), self.dtype, self.device, "(Hkv, L, D)")
        _check_tensor("v", v, (H, L, D), self.dtype, self.device, "(Hkv, L, D)")
        _check_tensor("scores", scores, (H, L), self.score_dtype, self.device, "(Hkv, L)")
        if L >= INT32_MAX:
            _fail(f"the prompt length must be < {INT32_MAX} (positions are int32), got {L}")
        k, v, scores = _detached("prefill_slot", k, v, scores)
        lengths = torch.full((1,), L, dtype=torch.long, device=self.device)
        _check_finite_context(scores.unsqueeze(0), lengths, batched=False)
        if L == 0:
            self._reset_rows(b, b + 1)
            return
        self._fill(k.unsqueeze(0), v.unsqueeze(0), scores.unsqueeze(0), lengths, first=b)

    def evict(self, b: int) -> None:
        """Free slot b: it holds an empty sequence again (as in a new cache), so stepping it without
        ``active`` masking it out would start a sequence there. The soft set keeps its room."""
        b = _check_int("b", b, 0, self.batch - 1)
        self._reset_rows(b, b + 1)

    def reserve(self, steps: int) -> None:
        """Make room in the soft set for ``steps`` more steps of every sequence (each step adds at
        most one entry); reads the sizes back (a host synchronisation). A compiled region or a CUDA
        graph cannot grow the soft set (its tensor is part of the graph), so call this before one
        that runs ``steps`` steps, and before capturing (capture again if the soft set grows
        later: ``soft_allocated`` changes)."""
        steps = _check_int("steps", steps, 0)
        largest = self._make_room(self.state.soft_count.long() + steps) - steps
        self._soft_bound = max(largest, 0)

    def _fill(self, k: Tensor, v: Tensor, scores: Tensor, L: Tensor, first: int = 0) -> None:
        """Write the state of the sequences (k, v, scores) after L tokens into rows [first, first + n).

        k, v (n, Hkv, S, D); scores (n, Hkv, S); L (n,) int64 with S >= 1. The soft set's room is
        settled before anything is written, so a refused fill leaves the rows as they were.
        """
        n_seq, H, S, D = k.shape
        K, W = self.topk, self.window
        rows = slice(first, first + n_seq)
        dev = k.device
        zero = torch.zeros((), dtype=k.dtype, device=dev)

        # candidates: positions [0, n) (with a window, the key that leaves it at the next step is one
        # already); the top-k by (score, position) in candidate slots [0, K), in position order while
        # n <= K; the spare is slot K
        n = candidates(L, W)  # (n_seq,)
        width = max(S, K)
        cand = torch.full((n_seq, H, width), float("-inf"), dtype=torch.float64, device=dev)
        j = torch.arange(S, device=dev).view(1, 1, S)
        cand[..., :S] = torch.where(j < n.view(-1, 1, 1), scores.to(torch.float64), torch.full_like(cand[..., :S], float("-inf")))
        # tau: exact for sequences with more than K candidates
        tau = torch.full((n_seq, H), float("-inf"), dtype=torch.float64, device=dev)
        for i in (n > K).nonzero().flatten().tolist():  # one solve per sequence: lengths differ
            tau[i] = last_tau(scores[i : i + 1, :, : int(n[i])], K)[0]
        # soft set: every candidate score above tau
        keep = cand > tau.unsqueeze(-1)  # -inf never passes
        count = keep.sum(-1)  # (n_seq, H)
        largest = self._make_room(count)
        if self._soft_bound is not None:
            self._soft_bound = max(self._soft_bound, largest)
        st, C = self.state, self.soft_allocated

        # window: slot r holds the last position q < L with q % W == r (none when q < 0)
        if W > 0:
            last = (L - 1).view(-1, 1)
            q_pos = last - (last - torch.arange(W, device=dev).view(1, W)) % W  # (n_seq, W)
            present = (q_pos >= 0).view(-1, 1, W)
            idx = q_pos.clamp(min=0).view(-1, 1, W).expand(n_seq, H, W)
            win_rows = idx.unsqueeze(-1).expand(n_seq, H, W, D)
            st.k_slots[rows, :, :W] = torch.where(present.unsqueeze(-1), k.gather(2, win_rows), zero)
            st.v_slots[rows, :, :W] = torch.where(present.unsqueeze(-1), v.gather(2, win_rows), zero)
            st.win_score[rows] = torch.where(present, scores.gather(-1, idx), torch.zeros((), dtype=scores.dtype, device=dev))

        # stable ascending sort: equal scores stay in position order, so the tail (the top-k)
        # prefers the larger position, the tie rule of the selection
        top = torch.sort(cand, dim=-1, stable=True).indices[..., width - K:]
        in_order = torch.arange(K, device=dev).view(1, 1, K).expand(n_seq, H, K)
        pos = torch.where((n > K).view(-1, 1, 1), top, in_order)
        present = torch.arange(K, device=dev).view(1, 1, K) < n.clamp(max=K).view(-1, 1, 1)
        pos = torch.where(present, pos, torch.zeros_like(pos)).clamp(max=S - 1)
        cand_rows = pos.unsqueeze(-1).expand(n_seq, H, K, D)
        st.k_slots[rows, :, W : W + K] = torch.where(present.unsqueeze(-1), k.gather(2, cand_rows), zero)
        st.v_slots[rows, :, W : W + K] = torch.where(present.unsqueeze(-1), v.gather(2, cand_rows), zero)
        st.slot_score[rows, :, :K] = torch.where(present, scores.gather(-1, pos), torch.zeros((), dtype=scores.dtype, device=dev))
        st.slot_pos[rows, :, :K] = torch.where(present, pos, torch.full_like(pos, -1)).to(torch.int32)
        # the spare slot: free and empty, as in a new cache (the rows may have held a sequence)
        st.k_slots[rows, :, W + K] = 0
        st.v_slots[rows, :, W + K] = 0
        st.slot_score[rows, :, K] = 0
        st.slot_pos[rows, :, K] = -1
        st.spare[rows] = K

        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept first
        packed = cand.gather(-1, order)[..., :C]
        if width < C:
            packed = torch.cat([packed, packed.new_full((n_seq, H, C - width), float("-inf"))], -1)
        slot = torch.arange(C, device=dev).view(1, 1, C)
        st.soft[rows] = torch.where(slot < count.unsqueeze(-1), packed, torch.zeros_like(packed)).to(st.soft.dtype)
        st.soft_count[rows] = count.to(torch.int32)
        st.tau[rows] = tau
        st.lengths[rows] = L.view(-1, 1).expand(n_seq, H).to(torch.int32)
        st.status[rows] = 0

    def _reset_rows(self, first: int, end: int) -> None:
        """Rows [first, end) hold empty sequences, exactly as in a new cache."""
        st, rows = self.state, slice(first, end)
        for t in (st.k_slots, st.v_slots, st.slot_score, st.win_score, st.soft, st.soft_count, st.lengths, st.status):
            t[rows] = 0
        st.slot_pos[rows] = -1
        st.spare[rows] = self.topk
        st.tau[rows] = float("-inf")

    # -- the soft set's room ----------------------------------------------------------------------

    @property
    def soft_allocated(self) -> int:
        """Entries the soft set holds per (batch, kv head) now: soft_capacity, or more after growth."""
        return self.state.soft.shape[-1]

    def _make_room(self, needed: Tensor | int) -> int:
        """Make the soft set hold ``needed`` entries (per sequence and kv head as a tensor, or one
        number for all); returns the largest need (a host read when it is a tensor).

        The room doubles until it suffices (amortised: every entry is copied O(1) times over a
        cache's life), for every row at once (the soft set is one (B, Hkv, C) tensor); nothing
        else grows. Never called where the host cannot run (inside torch.compile, during a capture).
        """
        C = self.soft_allocated
        target = needed if isinstance(needed, int) else (int(needed.max()) if needed.numel() else 0)
        if target <= C:
            return target
        if target > INT32_MAX:
            _fail(f"the soft set would need {target} entries per (batch, kv head); positions are int32")
        grown = C
        while grown < target:
            grown *= 2
        grown = min(grown, INT32_MAX)
        if self._graphed:
            warnings.warn(f"sparsek: SparseKCache's soft set grows from {C} to {grown} entries per (batch, kv head): "
                          f"a CUDA graph captured before replays on the old tensor; capture it again "
                          f"(reserve(steps) before capturing makes room up front)", RuntimeWarning, stacklevel=3)
        st = self.state
        soft = torch.zeros(*st.soft.shape[:-1], grown, dtype=st.soft.dtype, device=st.soft.device)
        soft[..., :C] = st.soft
        st.soft = soft
        return target

    # -- stepping ------------------------------------------------------------------------------

    def step(
        self,
        q: Tensor,  # (B, Hq, 1, D)
        k_new: Tensor,  # (B, Hkv, 1, D)
        v_new: Tensor,  # (B, Hkv, 1, D)
        score_new: Tensor,  # (B, Hkv, 1) or (B, Hkv)
        active: Tensor | None = None,  # (B,) bool; default every slot
    ) -> Tensor:
        """Add one token to every active sequence and return the attention output of its query,
        (B, Hq, 1, D) in the cache's dtype.

        ``active`` masks the slots to step: an inactive slot's state is left exactly as it is, its
        rows of the inputs are never read into the state (they may hold anything, NaN included)
        and its output is zeros. A mask rather than "evicted slots are skipped" because the caller
        already builds the batch row by row and knows which rows are real; an evicted slot holds an
        empty sequence, which a step without a mask starts from its token.

        Outside torch.compile and CUDA graph capture the soft set grows first if this step could
        need it (the reference path reads the sizes back every step; the CUDA path only when its
        host-side bound runs out). A compiled or captured step runs its operator
        (``sparsek::decode_step``, ``sparsek_cuda::decode_step``) with the soft set's size fixed
        (see ``reserve``).
        """
        B, H, D = self.batch, self.kv_heads, self.head_dim
        if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != B or q.shape[2] != 1 or q.shape[3] != D:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            _fail(f"q must be (B={B}, Hq, 1, D={D}), got {shape}")
        Hq = q.shape[1]
        if Hq < H or Hq % H:
            _fail(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={H}")
        _check_tensor("q", q, (B, Hq, 1, D), self.dtype, self.device, "(B, Hq, 1, D)")
        _check_tensor("k_new", k_new, (B, H, 1, D), self.dtype, self.device, "(B, Hkv, 1, D)")
        _check_tensor("v_new", v_new, (B, H, 1, D), self.dtype, self.device, "(B, Hkv, 1, D)")
        if isinstance(score_new, Tensor) and score_new.dim() == 3:
            _check_tensor("score_new", score_new, (B, H, 1), self.score_dtype, self.device, "(B, Hkv, 1)")
            score_new = score_new[..., 0]
        _check_tensor("score_new", score_new, (B, H), self.score_dtype, self.device, "(B, Hkv, 1) or (B, Hkv)")
        if active is not None:
            _check_tensor("active", active, (B,), torch.bool, self.device, "(B,)")
        q, k_new, v_new, score_new = _detached("step", q, k_new, v_new, score_new)
        if self.backend == "cuda":
            return self._cuda_step(q, k_new, v_new, score_new, active)
        if active is None:
            active = torch.ones(B, dtype=torch.bool, device=self.device)
        if not torch.compiler.is_compiling():  # both read values back; a compiled step cannot
            self.check()  # a failed cache stays failed
            self._make_room(self.state.soft_count.long() + 1)  # a step adds at most one
        st = self.state
        return decode_step_op(q, k_new, v_new, score_new, active, st.k_slots, st.v_slots, st.slot_score, st.slot_pos,
                              st.spare, st.win_score, st.soft, st.soft_count, st.tau, st.lengths, self.topk, self.window,
                              self.scale)

    def _cuda_step(self, q: Tensor, k_new: Tensor, v_new: Tensor, score_new: Tensor, active: Tensor | None) -> Tensor:
        """The kernels' step (they take the mask: inactive rows keep their state and answer zeros).

        The soft set must have room for one more entry per sequence before the step. The host keeps
        an upper bound on its size (each step adds at most one entry) and reads the sizes back only
        when that bound reaches the room (or after steps it did not see); then the room doubles
        while less than 1/SOFT_HEADROOM of it is free, so such reads are at least that many steps
        apart. Compiled and captured steps cannot read or grow anything: they run on the room that
        ``reserve`` made (an overflow there refuses the step and sets the status, see ``check``).
        """
        op = self._step_op if self._step_op is not None else self._cuda_ops().decode_step
        compiling = torch.compiler.is_compiling()
        capturing = not compiling and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            if self._soft_bound is None or self._soft_bound >= self.soft_allocated:
                raise SparseKCacheError(f"{_FN}: call cache.reserve(steps) before capturing a step in a CUDA graph: "
                                        f"the soft set cannot grow during a capture or its replays, and the cache "
                                        f"does not know that it has room")
            self._graphed = True
        if compiling or capturing:
            self._soft_bound = None  # the host does not see these steps (replays, compiled calls)
        else:
            if self._graphed or self._soft_bound is None or self._soft_bound >= self.soft_allocated:
                self._read_room()
            self._soft_bound += 1
        st = self.state
        out = op(_rows16(q), _rows16(k_new), _rows16(v_new), score_new.contiguous(), *st.tensors(),
                 self._counters_for(q.shape[1]), self.topk, self.window, self.scale, self.num_splits,
                 None if active is None else active.contiguous())
        if not (compiling or capturing):
            self._steps += 1
            if self.check_interval and self._steps % self.check_interval == 0:
                self.check()
        return out

    def _read_room(self) -> None:
        """CUDA path: read the largest soft set back (a host synchronisation), make room for the next
        step with headroom (doubling while less than 1/SOFT_HEADROOM is free) and reset the bound."""
        largest = int(self.state.soft_count.max())
        self._make_room(largest + max(1, self.soft_allocated // SOFT_HEADROOM))
        self._soft_bound = largest

    def check(self) -> None:
        """Raise SparseKCacheError if any sequence failed (reads the status: a host sync on CUDA).
        The same read refreshes the CUDA path's bound on the soft set's size (not after a capture:
        a graph's replays stay invisible, so eager steps then read the sizes themselves)."""
        code = self.state.status[..., 0]
        failed, largest = torch.stack([(code != STATUS_OK).any().to(torch.int32), self.state.soft_count.max()]).tolist()
        self._soft_bound = largest
        if not failed:
            return
        b, h = (code != STATUS_OK).nonzero()[0].tolist()
        c, detail = (int(x) for x in self.state.status[b, h].tolist())
        if c == STATUS_SOFT_OVERFLOW:
            raise SparseKCacheError(_overflow_message(b, h, detail, self.soft_allocated))
        if c == STATUS_NONFINITE_SCORE:
            raise SparseKCacheError(f"{_FN}: score_new must be finite; batch {b}, kv head {h} got a non-finite score "
                                    f"at position {detail}. The sequence's outputs are NaN until the cache is rebuilt or the "
                                    f"slot refilled (evict, prefill_slot).")
        if c == STATUS_POSITION_OVERFLOW:
            raise SparseKCacheError(f"{_FN}: positions are int32 and batch {b}, kv head {h} reached {detail} tokens")
        raise SparseKCacheError(f"{_FN}: internal error (status {c}, detail {detail}) at batch {b}, kv head {h}: "
                                f"the threshold walk did not converge; please report it")

    # -- facts ----------------------------------------------------------------------------------

    @property
    def seq_lens(self) -> Tensor:
        """(B,) int64: tokens seen by each sequence."""
        return self.state.lengths[:, 0].long()

    @property
    def nbytes(self) -> int:
        """Bytes of the whole state now: the key/value slots and every per-slot array are fixed at
        construction; only the soft set can grow (see ``soft_allocated``)."""
        return sum(t.numel() * t.element_size() for t in self.state.tensors()) + sum(
            t.numel() * t.element_size() for t in ([] if self._counters is None else [self._counters]))

    @staticmethod
    def bytes_per_sequence(kv_heads: int, head_dim: int, *, topk: int, window: int, dtype=torch.bfloat16,
                           soft_capacity: int | None = None, score_bytes: int = 4) -> dict:
        """Bytes one sequence's cache holds: {"kv": key/value slots, "total": everything}."""
        elem = torch.empty((), dtype=dtype).element_size()
        C = DEFAULT_SOFT_FACTOR * topk if soft_capacity is None else soft_capacity
        kv = 2 * kv_heads * (topk + 1 + window) * head_dim * elem  # the window, the top-k and the spare slot
        # candidate scores + positions, window scores, soft set, spare + soft count + tau + length + status
        other = kv_heads * ((topk + 1) * (score_bytes + 4) + window * score_bytes + C * score_bytes + 4 + 4 + 8 + 4 + 8)
        return {"kv": kv, "total": kv + other}

    def __repr__(self) -> str:
        return (f"SparseKCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, topk={self.topk}, "
                f"window={self.window}, dtype={self.dtype}, device={self.device}, soft_capacity={self.soft_capacity}, "
                f"soft_allocated={self.soft_allocated}, "
                f"backend={self.backend!r}, nbytes={self.nbytes})")

    # -- the CUDA path --------------------------------------------------------------------------

    def _cuda_reason(self) -> str | None:
        """None when the decode kernels can run this cache, else why not."""
        if self.device.type != "cuda":
            return f"the cache is on {self.device}, not a CUDA device"
        st = self.state
        if self.score_dtype != torch.float32:
            return f"the kernels take float32 scores, got {self.score_dtype}"
        # the op's own support check, with the cache's tensors in the roles of q, k, v, scores
        reason = _cuda.unsupported_reason(st.k_slots, st.k_slots, st.v_slots, st.slot_score)
        if reason is None and not hasattr(self._cuda_ops(), "decode_step"):
            reason = "the CUDA extension was built without the decode kernels"
        return reason

    @staticmethod
    def _cuda_ops():
        ops = _cuda.ops()
        register_cuda_fakes()
        return ops

    def _counters_for(self, q_heads: int) -> Tensor:
        """Split-K arrival counters, one per (batch, kv head, head chunk); zero between launches."""
        chunks = -(-(q_heads // self.kv_heads) // 8)  # kDecodeHeadsPerCta query heads per CTA
        n = self.batch * self.kv_heads * chunks
        # one buffer, allocated with the cache for groups of up to 8 query heads, so a compiled step
        # finds it in place (a dict of buffers per chunk count made torch.compile guard on its keys)
        if self._counters is None or self._counters.numel() < n:
            self._counters = torch.zeros(n, dtype=torch.int32, device=self.device)
        return self._counters[:n]
