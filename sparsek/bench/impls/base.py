"""What an implementation adapter is, and the references outputs are checked against.

An adapter (TritonBench style) declares ``available(case)`` -> None or a reason sentence, and
``prepare(case, inputs)`` -> ``Prepared``: everything that is not the measured work (layout
changes, block masks, compilation, selection for a baseline) happens there, and ``Prepared.fn``
is a zero-argument callable that does only the timed work.

An adapter of a forward kind (prefill, decode) that has a backward also runs ``train`` cases
(``train=True``): ``prepare`` hands those to ``_prepare_train``, which describes the step with
``train.TrainStep`` (impls/train.py); subclasses write ``_available`` and ``_prepare`` (and
``_prepare_train``), never the dispatch.

The reference an output is checked against follows from the adapter's ``pattern`` (see
metrics.py): dense causal attention, the sliding window of K+W keys, SparseK, or their decode
forms. References are computed in float32 (float64 for float64 cases) for chosen query rows
only, so a 128k-token case is checked without an S x S matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..cases import Case, Inputs
from ..metrics import PATTERNS, PREFILL_PATTERNS

# Rows checked per case when the sequence is too long to check them all.
CHECK_ROWS = 32
# Up to this many rows every row is checked.
CHECK_ALL_ROWS_UP_TO = 512


@dataclass
class Prepared:
    """The timed work of one implementation on one case.

    fn: zero arguments, only the measured work; returns the output (train: the gradients).
    output_fn: the output in SDPA layout, (B, Hq, S, D) for prefill or (B, Hq, 1, D) for decode
        (default: fn itself); adapters whose kernels use another layout convert here. For train
        cases a dict of gradients by input name ("q", "k", "v", and "scores" where the
        implementation has one) in the inputs' layouts.
    compare_with: further outputs of the same layout to compare against besides the reference
        (e.g. flex-sparsek against sparsek's own op), name -> tensor.
    notes: facts a reader of the results needs (a layout change, which op xFormers chose).
    """

    fn: Callable[[], object]
    output_fn: Callable[[], object] | None = None
    compare_with: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def output(self):
        return (self.output_fn or self.fn)()


class Impl:
    """One implementation: id, family, kind ("prefill"/"decode"), pattern (metrics.PATTERNS).

    ``train=True``: it also runs training steps (kind "train") of its pattern; ``kinds`` lists
    every case kind it runs.
    """

    def __init__(self, id: str, *, family: str, kind: str, pattern: str, description: str = "", train: bool = False):
        if pattern not in PATTERNS:
            raise ValueError(f"Impl {id!r}: pattern={pattern!r}, expected one of {PATTERNS}")
        if train and pattern not in PREFILL_PATTERNS:
            raise ValueError(f"Impl {id!r}: train=True needs a prefill pattern {PREFILL_PATTERNS}, got {pattern!r}")
        self.id = id
        self.family = family
        self.kind = kind
        self.kinds = (kind, "train") if train else (kind,)
        self.pattern = pattern
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"

    def available(self, case: Case) -> str | None:
        """None when this implementation can run ``case``, else the reason it cannot."""
        if case.kind not in self.kinds:
            if case.kind == "train":
                return f"{self.id} has no backward here, so it runs no training step ({case.name} is a train case)"
            return f"{self.id} is a {self.kind} implementation and {case.name} is a {case.kind} case"
        return self._available(case)

    def _available(self, case: Case) -> str | None:
        return None

    def prepare(self, case: Case, inputs: Inputs) -> Prepared:
        if case.kind not in self.kinds:
            raise ValueError(f"{self.id}: case {case.name!r} is a {case.kind} case; this implementation runs {self.kinds}")
        if case.kind == "train":
            return self._prepare_train(case, inputs)
        return self._prepare(case, inputs)

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        raise NotImplementedError

    def _prepare_train(self, case: Case, inputs: Inputs) -> Prepared:
        raise NotImplementedError

    def reference_rows(self, case: Case, inputs: Inputs, rows: Tensor) -> Tensor:
        """The reference output at query rows ``rows`` (R,): (B, Hq, R, D) in float32/64."""
        return REFERENCES[self.pattern](case, inputs, rows)


class Unavailable(Impl):
    """A registered id that cannot run in this build, with the reason (e.g. its kernels are not built)."""

    def __init__(self, id: str, *, family: str, kind: str, pattern: str, reason: str, description: str = ""):
        super().__init__(id, family=family, kind=kind, pattern=pattern, description=description)
        self.reason = reason

    def _available(self, case):
        return self.reason

    def _prepare(self, case, inputs):
        raise RuntimeError(f"{self.id}: {self.reason}")


# ---------------------------------------------------------------------------------------------
# availability helpers

_probe_results: dict[tuple, str | None] = {}


def cached_probe(key: tuple, probe: Callable[[], str | None]) -> str | None:
    """Run ``probe`` once per key (a tiny real call); cache its reason (None = it works)."""
    if key not in _probe_results:
        _probe_results[key] = probe()
    return _probe_results[key]


def cuda_reason(case: Case, who: str) -> str | None:
    """A reason when ``who`` (runs on CUDA only) cannot run ``case`` here."""
    if case.device != "cuda":
        return f"{who} runs on CUDA only and {case.name} is a {case.device.upper()} case"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, shortened: for reasons shown in tables."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call_reason(fn: Callable[[], object]) -> str | None:
    """Run a tiny probe call; None when it works, else its error plus any warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        except Exception as exc:
            said = [" ".join(str(w.message).split()) for w in caught]
            reason = first_line(exc)
            return reason + (" (" + "; ".join(dict.fromkeys(said)) + ")" if said else "")


def free_memory_reason(case: Case, needed: int, what: str) -> str | None:
    """A reason when ``needed`` bytes beyond the inputs exceed the GPU's free memory."""
    if case.device != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    if needed > free:
        return f"{what} needs about {needed / 2**30:.1f} GiB; {free / 2**30:.1f} GiB is free"
    return None


# ---------------------------------------------------------------------------------------------
# rows to check and references


def check_rows(case: Case, max_rows: int = CHECK_ROWS) -> Tensor:
    """Query rows whose output is checked: all of a short sequence, else the rows where the
    pattern changes (first window/candidate rows, the top-k filling up, the last row) plus a
    seeded random sample."""
    if case.kind == "decode":
        return torch.zeros(1, dtype=torch.long)
    S, K, W = case.seq_len, case.topk, case.window
    if S <= CHECK_ALL_ROWS_UP_TO:
        return torch.arange(S)
    edges = {0, 1, W - 1, W, W + 1, K + W - 1, K + W, K + W + 1, S // 2, S - 2, S - 1}
    rows = {r for r in edges if 0 <= r < S}
    g = torch.Generator().manual_seed(case.seed)
    for r in torch.randperm(S, generator=g).tolist():
        if len(rows) >= max_rows:
            break
        rows.add(r)
    return torch.tensor(sorted(rows), dtype=torch.long)


def _ct(case: Case) -> torch.dtype:
    return torch.float64 if case.dtype == "float64" else torch.float32


def _grouped_rows(q_rows: Tensor, kv_heads: int) -> Tensor:
    """(Hq, R, D) -> (Hkv, G*R, D): the query rows of each kv head's group, head-major."""
    Hq, R, D = q_rows.shape
    return q_rows.reshape(kv_heads, (Hq // kv_heads) * R, D)


def _ungroup(x: Tensor, q_heads: int) -> Tensor:
    """(Hkv, G*R, D) -> (Hq, R, D)."""
    Hkv, GR, D = x.shape
    return x.reshape(q_heads, GR * Hkv // q_heads, D)


def masked_rows(case: Case, inputs: Inputs, rows: Tensor, span: int | None) -> Tensor:
    """Causal attention of query rows over keys j <= i (and j > i - span when span is set).

    Returns (B, Hq, R, D) in float32 (float64 for float64 cases). One batch at a time, keys in
    place (no S x S matrix, no GQA expansion of k and v).
    """
    ct = _ct(case)
    rows = rows.to(inputs.q.device)
    j = torch.arange(case.seq_len, device=inputs.q.device)
    allowed = j.view(1, -1) <= rows.view(-1, 1)  # (R, S)
    if span is not None:
        allowed &= j.view(1, -1) > rows.view(-1, 1) - span
    outs = []
    for b in range(case.batch):
        q = _grouped_rows(inputs.q[b][:, rows].to(ct), case.kv_heads)  # (Hkv, G*R, D)
        k, v = inputs.k[b].to(ct), inputs.v[b].to(ct)  # (Hkv, S, D)
        logits = case.scale * q @ k.transpose(-1, -2)  # (Hkv, G*R, S)
        logits = logits.view(case.kv_heads, case.group, len(rows), -1)
        logits = logits.masked_fill(~allowed, float("-inf")).view(case.kv_heads, case.group * len(rows), -1)
        outs.append(_ungroup(torch.softmax(logits, -1) @ v, case.q_heads))
    return torch.stack(outs)


def dense_causal_reference(case: Case, inputs: Inputs, rows: Tensor) -> Tensor:
    return masked_rows(case, inputs, rows, span=None)


def window_reference(case: Case, inputs: Inputs, rows: Tensor) -> Tensor:
    return masked_rows(case, inputs, rows, span=case.key_budget)


def sparsek_reference(case: Case, inputs: Inputs, rows: Tensor) -> Tensor:
    """sparsek's own reference: exact dense formulation for short sequences, else row by row
    (``attention_rows`` selects and thresholds each row on its own)."""
    from sparsek import reference

    ct = _ct(case)
    q, k, v = inputs.q.to(ct), inputs.k.to(ct), inputs.v.to(ct)
    scores = inputs.scores if ct == torch.float32 else inputs.scores.to(torch.float64)
    if case.seq_len <= CHECK_ALL_ROWS_UP_TO:
        out, _ = reference.attention_dense(q, k, v, scores, case.topk, case.window, case.scale)
        return out[:, :, rows.to(out.device)]
    return reference.attention_rows(q, k, v, scores, case.topk, case.window, case.scale, rows.tolist())


def _decode_attend(case: Case, inputs: Inputs, key_index: Tensor, log_gate: Tensor) -> Tensor:
    """The new token's output over chosen keys: key_index (B, Hkv, L) into context + new token
    (index S = the new token), log_gate (B, Hkv, L). Returns (B, Hq, 1, D)."""
    ct = _ct(case)
    S, D = case.seq_len, case.head_dim
    ctx = key_index.clamp(max=S - 1).unsqueeze(-1).expand(-1, -1, -1, D)
    is_new = (key_index == S).unsqueeze(-1)
    k = torch.where(is_new, inputs.k_new, inputs.k.gather(2, ctx)).to(ct)  # (B, Hkv, L, D)
    v = torch.where(is_new, inputs.v_new, inputs.v.gather(2, ctx)).to(ct)
    q = inputs.q.to(ct).view(case.batch, case.kv_heads, case.group, D)  # (B, Hkv, G, D)
    logits = case.scale * q @ k.transpose(-1, -2) + log_gate.unsqueeze(2)  # (B, Hkv, G, L)
    out = torch.softmax(logits, -1) @ v  # (B, Hkv, G, D)
    return out.reshape(case.batch, case.q_heads, 1, D)


def decode_full_reference(case: Case, inputs: Inputs, rows: Tensor) -> Tensor:
    """The new token attending to all S context keys and itself: (B, Hq, 1, D).

    One batch at a time, so a 128k-token batch of 64 never exists in float32 at once."""
    ct = _ct(case)
    outs = []
    for b in range(case.batch):
        q = inputs.q[b].to(ct).view(case.kv_heads, case.group, case.head_dim)  # (Hkv, G, D)
        k = torch.cat([inputs.k[b], inputs.k_new[b]], 1).to(ct)  # (Hkv, S + 1, D)
        v = torch.cat([inputs.v[b], inputs.v_new[b]], 1).to(ct)
        p = torch.softmax(case.scale * q @ k.transpose(-1, -2), -1)  # (Hkv, G, S + 1)
        outs.append((p @ v).reshape(case.q_heads, 1, case.head_dim))
    return torch.stack(outs)


def _threshold(c: Tensor, topk: int) -> Tensor:
    """Smallest t with sum clip(c - t, 0, 1) <= topk, by bisection on float64 c (B, H, n)."""
    lo = c.min(-1).values - 1.0
    hi = c.max(-1).values
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if bool(((mid == lo) | (mid == hi)).all()):
            break
        above = (c - mid.unsqueeze(-1)).clamp(0.0, 1.0).sum(-1) > topk
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return hi


def decode_sparsek_reference(case: Case, inputs: Inputs, rows: Tensor) -> Tensor:
    """SparseK for the new token (query position S over keys 0..S), from the definition in
    docs/semantics.md, written independently of sparsek.selection: (B, Hq, 1, D)."""
    dev = inputs.q.device
    S, K, W = case.seq_len, case.topk, case.window
    i = S
    u = torch.cat([inputs.scores, inputs.score_new], -1).to(torch.float64)  # (B, Hkv, S + 1)
    shape = (case.batch, case.kv_heads)
    window = torch.arange(max(0, i - W + 1), i + 1, device=dev).expand(*shape, -1) if W > 0 else \
        torch.empty(*shape, 0, dtype=torch.long, device=dev)
    index, gate = [window], [torch.ones(window.shape, dtype=torch.float64, device=dev)]
    n = max(0, i - W + 1)
    if 0 < n <= K:
        index.append(torch.arange(n, device=dev).expand(*shape, -1))
        gate.append(torch.ones(*shape, n, dtype=torch.float64, device=dev))
    elif n > K:
        c = u[..., :n]
        chosen = torch.sort(c, dim=-1, stable=True).indices[..., -K:]  # ties: the larger index wins
        tau = _threshold(c, K).to(inputs.scores.dtype).to(torch.float64)  # as stored by the op
        index.append(chosen)
        gate.append((c.gather(-1, chosen) - tau.unsqueeze(-1)).clamp(0.0, 1.0))
    g = torch.cat(gate, -1).to(_ct(case))
    log_gate = torch.where(g > 0, g.clamp(min=torch.finfo(g.dtype).tiny).log(), torch.full_like(g, float("-inf")))
    return _decode_attend(case, inputs, torch.cat(index, -1), log_gate)


REFERENCES: dict[str, Callable[[Case, Inputs, Tensor], Tensor]] = {
    "dense-causal": dense_causal_reference,
    "window": window_reference,
    "sparsek": sparsek_reference,
    "decode-full": decode_full_reference,
    "decode-sparsek": decode_sparsek_reference,
}
assert set(REFERENCES) == set(PATTERNS), "every pattern needs a reference"
