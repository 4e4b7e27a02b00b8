"""Reference gradients of a training step on a bounded subset of the case (the check; never timed).

The subset is one slice: batch element 0 and kv head 0 with its query heads 0..G-1. Nothing
outside a (batch, kv group) slice reaches its gradients (attention never mixes batch elements or
kv groups, and SparseK selects per kv head), so the slice's gradients are exactly those of the
whole step. Within the slice:

* sparsek: every row and key. The q, k, v and scores gradients come from sparsek.reference:
  the selection by sparsek.selection from the case's own float32 scores (the tau the op
  stores), then ``attention_blocked`` and the analytic ``backward_blocked`` in the compute
  dtype. Its work is S·(K+W) per head, so even a 64k slice takes seconds on a GPU.
* window (the last K+W keys) and dense causal: every row and key while the slice attends at
  most GRAD_MAX_PAIRS (query, key) pairs. Beyond that, dk and dv at chosen key blocks, with
  every query that attends those keys computed (a key's gradient sums over all of them), and dq
  at those queries plus the checked rows (base.check_rows: the pattern's edges and a seeded
  sample; a query's dq needs only its own row):
    window: KEY_BLOCK keys at the start, the middle and the end (each block needs
      KEY_BLOCK + K + W - 1 queries);
    dense causal: the last keys, as many as the budget allows (key j needs queries j..S-1, so
      the tail is the only place where exact key gradients are affordable at 64k).
  Attention there is a masked dense formulation in row chunks, differentiated by autograd.

Compute dtype: float32 on a GPU, float64 on the CPU (and for float64 cases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cases import Case, Inputs
from ..metrics import attended_pairs
from .base import check_rows

# (query, key) pairs of the slice above which dense/window gradients are checked on a subset.
# Autograd through the masked formulation costs about 12·D FLOPs per pair (forward QK^T and PV,
# backward four matmuls), so this is about 0.4 TFLOP of float32 work at D = 128: an estimate of
# seconds to tens of seconds on an H100/H200, not a measurement.
GRAD_MAX_PAIRS = 1 << 28
KEY_BLOCK = 128  # keys per checked block (one tile of the block-sparse adapters)
CHUNK_ROWS = 64  # query rows per autograd chunk of the masked formulation
GRAD_NAMES = ("q", "k", "v", "scores")


def compute_dtype(case: Case) -> torch.dtype:
    return torch.float64 if case.device == "cpu" or case.dtype == "float64" else torch.float32


@dataclass(frozen=True)
class GradSubset:
    """Where a case's gradients are checked.

    rows: query rows where dq is checked, sorted (None: all); key_ranges: [start, stop) ranges
    of keys where dk, dv and dscores are checked (None: all).
    """

    batch: int
    kv_head: int
    group: int  # query heads kv_head * group .. (kv_head + 1) * group - 1
    rows: tuple[int, ...] | None
    key_ranges: tuple[tuple[int, int], ...] | None

    @property
    def q_heads(self) -> slice:
        return slice(self.kv_head * self.group, (self.kv_head + 1) * self.group)

    def keys(self, device=None) -> Tensor | None:
        if self.key_ranges is None:
            return None
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.key_ranges])

    def describe(self) -> dict:
        """JSON for the record: which slice and which rows and keys were compared."""
        h = self.q_heads
        return {"batch": self.batch, "kv_head": self.kv_head, "q_heads": [h.start, h.stop],
                "dq_rows": "all" if self.rows is None else len(self.rows),
                "dkv_keys": "all" if self.key_ranges is None else [list(r) for r in self.key_ranges]}


def grad_subset(case: Case, pattern: str) -> GradSubset:
    """The bounded subset of ``case`` checked for an implementation of ``pattern``."""
    S, G = case.seq_len, case.group
    whole = GradSubset(batch=0, kv_head=0, group=G, rows=None, key_ranges=None)
    if pattern == "sparsek" or G * attended_pairs(case, pattern) <= GRAD_MAX_PAIRS:
        return whole
    block = min(KEY_BLOCK, S)
    if pattern == "window":
        span = case.key_budget
        starts = sorted({0, (S // 2) // block * block, S - block})
        key_ranges = tuple((a, a + block) for a in starts)
        row_ranges = [(a, min(S, a + block + span - 1)) for a in starts]
    elif pattern == "dense-causal":
        tail = min(S, max(block, GRAD_MAX_PAIRS // (G * S) // block * block))
        key_ranges = ((S - tail, S),)
        row_ranges = [(S - tail, S)]
    else:
        raise ValueError(f"grad_subset: pattern={pattern!r}, expected one of sparsek, window, dense-causal")
    rows = set(check_rows(case).tolist())
    for a, b in row_ranges:
        rows.update(range(a, b))
    return GradSubset(batch=0, kv_head=0, group=G, rows=tuple(sorted(rows)), key_ranges=key_ranges)


def expected_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    """Gradient shapes in the inputs' layouts."""
    B, Hq, Hkv, S, D = case.batch, case.q_heads, case.kv_heads, case.seq_len, case.head_dim
    return {"q": (B, Hq, S, D), "k": (B, Hkv, S, D), "v": (B, Hkv, S, D), "scores": (B, Hkv, S)}


def take(case: Case, grads: dict[str, Tensor], subset: GradSubset) -> dict[str, Tensor]:
    """An implementation's gradients (inputs' layouts) at the subset, shaped like the reference's:
    q (G, R, D), k and v (J, D), scores (J,). Raises ValueError on an unknown name or a wrong shape."""
    shapes = expected_shapes(case)
    out = {}
    for name, g in grads.items():
        if name not in shapes:
            raise ValueError(f"gradient {name!r}: expected names {tuple(shapes)}")
        if tuple(g.shape) != shapes[name]:
            raise ValueError(f"gradient {name!r} has shape {tuple(g.shape)}, expected {shapes[name]}")
        if name == "q":
            x = g[subset.batch, subset.q_heads]  # (G, S, D)
            out[name] = x if subset.rows is None else x[:, torch.tensor(subset.rows, device=g.device)]
        else:
            x = g[subset.batch, subset.kv_head]  # (S, D) or (S,)
            keys = subset.keys(g.device)
            out[name] = x if keys is None else x[keys]
    return out


def reference_grads(case: Case, inputs: Inputs, pattern: str, subset: GradSubset) -> dict[str, Tensor]:
    """Reference gradients at ``subset`` (shapes as ``take`` returns), in the compute dtype."""
    if inputs.grad_out is None:
        raise ValueError(f"case {case.name!r} has no grad_out: reference gradients need a train case")
    if pattern == "sparsek":
        return _sparsek_grads(case, inputs, subset)
    if pattern in ("window", "dense-causal"):
        return _masked_grads(case, inputs, subset, case.key_budget if pattern == "window" else None)
    raise ValueError(f"reference_grads: pattern={pattern!r}, expected one of sparsek, window, dense-causal")


def _sparsek_grads(case: Case, inputs: Inputs, subset: GradSubset) -> dict[str, Tensor]:
    from sparsek import reference, selection

    if subset.rows is not None or subset.key_ranges is not None:
        raise ValueError("sparsek gradients are checked on whole slices")
    ct = compute_dtype(case)
    b, h, heads = subset.batch, subset.kv_head, subset.q_heads
    q = inputs.q[b : b + 1, heads].to(ct)  # (1, G, S, D)
    k = inputs.k[b : b + 1, h : h + 1].to(ct)  # (1, 1, S, D)
    v = inputs.v[b : b + 1, h : h + 1].to(ct)
    do = inputs.grad_out[b : b + 1, heads].to(ct)  # (1, G, S, D)
    u = inputs.scores[b : b + 1, h : h + 1]  # (1, 1, S) float32, as the op sees it
    sel = selection.select(u, case.topk, case.window)  # tau rounded to float32, as the op stores it
    u_ct = u.to(ct)  # exact; the score gradient comes back in the compute dtype
    out, lse = reference.attention_blocked(q, k, v, u_ct, case.topk, case.window, case.scale, sel)
    dq, dk, dv, du = reference.backward_blocked(do, q, k, v, u_ct, out, lse, sel, case.scale)
    return {"q": dq[0], "k": dk[0, 0], "v": dv[0, 0], "scores": du[0, 0]}


def _masked_grads(case: Case, inputs: Inputs, subset: GradSubset, span: int | None) -> dict[str, Tensor]:
    """Causal attention over keys j <= i (and i - j < span when set) for the subset's rows, in
    chunks of rows, each differentiated by autograd; key gradients accumulate over the chunks."""
    ct = compute_dtype(case)
    dev = inputs.q.device
    S, D, G = case.seq_len, case.head_dim, case.group
    b, h, heads = subset.batch, subset.kv_head, subset.q_heads
    q = inputs.q[b, heads]  # (G, S, D)
    do = inputs.grad_out[b, heads]  # (G, S, D)
    k = inputs.k[b, h].to(ct)  # (S, D)
    v = inputs.v[b, h].to(ct)
    rows = torch.arange(S, device=dev) if subset.rows is None else torch.tensor(subset.rows, device=dev)
    dq = torch.empty(G, len(rows), D, dtype=ct, device=dev)
    dk = torch.zeros(S, D, dtype=ct, device=dev)
    dv = torch.zeros(S, D, dtype=ct, device=dev)
    for c0 in range(0, len(rows), CHUNK_ROWS):
        r = rows[c0 : c0 + CHUNK_ROWS]  # ascending
        lo = 0 if span is None else max(0, int(r[0]) - span + 1)
        hi = int(r[-1]) + 1
        j = torch.arange(lo, hi, device=dev)
        allowed = j.view(1, -1) <= r.view(-1, 1)  # (R, L)
        if span is not None:
            allowed &= j.view(1, -1) > r.view(-1, 1) - span
        qq = q[:, r].to(ct).requires_grad_()  # (G, R, D), a copy
        kk = k[lo:hi].detach().requires_grad_()  # (L, D)
        vv = v[lo:hi].detach().requires_grad_()
        with torch.enable_grad():
            logits = (case.scale * qq @ kk.T).masked_fill(~allowed, float("-inf"))  # (G, R, L)
            out = torch.softmax(logits, -1) @ vv
            gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), do[:, r].to(ct))
        dq[:, c0 : c0 + len(r)] = gq
        dk[lo:hi] += gk
        dv[lo:hi] += gv
    keys = subset.keys(dev)
    if keys is not None:
        dk, dv = dk[keys], dv[keys]
    return {"q": dq, "k": dk, "v": dv}
