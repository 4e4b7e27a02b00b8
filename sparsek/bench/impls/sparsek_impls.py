"""SparseK itself (the CUDA path and the reference) and FlexAttention with the identical pattern.

``sparsek`` is only the CUDA kernels: when ``sparsek._cuda`` cannot run a case the adapter is
unavailable with that reason; it never times the reference in its place (the op would fall back
silently, with only a warning).

``flex-sparsek`` attends exactly the keys SparseK attends, with the same gates. Its selection is
sparsek's own (``torch.ops.sparsek.attention_fwd`` in prepare: the CUDA selection when
available, else the reference's), so the two can only differ in the attention arithmetic; its
output is checked against sparsek's reference and against the op's output of that same call.
Pattern: key j is in query i's window when 0 <= i - j < W, and selected when j + W <= i < end[j];
a selected key's logit gets log(clip(u_j - tau_i, 0, 1)).

Training steps (train cases): ``sparsek`` differentiates the public op as a training user calls
it (its registered autograd: ``sparsek::attention_bwd``), ``sparsek-ref`` the reference's
analytic backward (``reference.SparseKFunction``); both give q, k, v and scores gradients.
``flex-sparsek`` gives q, k and v gradients only: to FlexAttention the SparseK mask and gates are
constants, so the scores get none.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..cases import Case, Inputs
from . import train
from .base import Impl, Prepared, cached_probe, call_reason, cuda_reason
from .dense import FLEX_BLOCK, FlexImpl, block_mask_from_tables, window_block_tables
from .train import TrainStep, leaf

# The reference on a GPU is a chain of small launches (a loop over candidate prefixes, a
# bisection per chunk): minutes per call at the long cases. It is timed only on small cases.
REF_MAX_KEYS_PER_CALL = 1 << 22  # B * Hkv * S
REF_MAX_SEQ_CUDA = 4096
REF_BLOCK = 64  # query block of the reference's blocked attention (its default)


def _tiny(case: Case):
    """Small tensors with the case's device, dtype, head dim and GQA group, for probes."""
    dev, dt, D, G = case.device, case.torch_dtype, case.head_dim, case.group
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 2 * G, 256, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, 2, 256, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, 2, 256, D, device=dev, dtype=dt, generator=g)
    u = torch.randn(1, 2, 256, device=dev, dtype=torch.float32, generator=g)
    return q, k, v, u


def cuda_path_reason(case: Case) -> str | None:
    """Why sparsek's CUDA kernels cannot run this case (None: they can)."""
    from sparsek import _cuda

    reason = cuda_reason(case, "sparsek's CUDA path")
    if reason:
        return reason
    return _cuda.unsupported_reason(*_tiny(case))


class SparseKCuda(Impl):
    def __init__(self):
        super().__init__("sparsek", family="sparsek", kind="prefill", pattern="sparsek",
                         description="sparsek.sparsek_attention, CUDA kernels", train=True)

    def _available(self, case: Case) -> str | None:
        reason = cuda_path_reason(case)
        if reason:
            return reason if reason.startswith("sparsek") else f"sparsek's CUDA path cannot run this case: {reason}"

        def probe():
            q, k, v, u = _tiny(case)
            with warnings.catch_warnings():
                # the op falls back to the reference with a RuntimeWarning: here that is a refusal
                warnings.filterwarnings("error", message="sparsek: using the PyTorch reference")
                return call_reason(lambda: torch.ops.sparsek.attention_fwd(q, k, v, u, 16, 8, case.scale))

        reason = cached_probe((self.id, case.dtype, case.head_dim, case.group), probe)
        if reason:
            return f"sparsek's CUDA path failed a probe call: {reason}"
        if case.kind == "train":
            reason = cached_probe((self.id, case.dtype, case.head_dim, case.group, "train"), lambda: _probe_step(case))
            return f"sparsek's training step failed a probe call: {reason}" if reason else None
        return None

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        import sparsek

        q, k, v, u = inputs.q, inputs.k, inputs.v, inputs.scores
        _refuse_reference(q, k, v, u)
        topk, window, scale = case.topk, case.window, case.scale
        return Prepared(fn=lambda: sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window, scale=scale),
                        notes=_finite_check_notes())

    def _prepare_train(self, case: Case, inputs: Inputs) -> Prepared:
        import sparsek

        _refuse_reference(inputs.q, inputs.k, inputs.v, inputs.scores)
        topk, window, scale = case.topk, case.window, case.scale

        def forward(q, k, v, u):
            return sparsek.sparsek_attention(q, k, v, u, topk=topk, window=window, scale=scale)

        leaves = {"q": leaf(inputs.q), "k": leaf(inputs.k), "v": leaf(inputs.v), "scores": leaf(inputs.scores)}
        from sparsek import _cuda

        off = _cuda.backward_reason()
        which = "the CUDA backward kernels" if off is None else f"the PyTorch reference backward ({off})"
        notes = [*_finite_check_notes(),
                 f"backward: the op's registered autograd (sparsek::attention_bwd), as a training user calls it: {which}"]
        return train.prepared(TrainStep(leaves=leaves, forward=forward, grad_out=inputs.grad_out, notes=notes))


def _refuse_reference(q, k, v, u) -> None:
    """The op would run (and be timed as) the reference where the kernels cannot: refuse."""
    from sparsek import _cuda

    reason = _cuda.unsupported_reason(q, k, v, u)
    if reason:
        raise RuntimeError(f"sparsek's CUDA path cannot run these inputs: {reason}")


def _finite_check_notes() -> list[str]:
    if os.environ.get("SPARSEK_SKIP_FINITE_CHECK") == "1":
        return []
    return ["includes the op's finite-scores check (one host sync per call; SPARSEK_SKIP_FINITE_CHECK=1 removes it)"]


def _probe_step(case: Case) -> str | None:
    """A tiny forward + backward through the public op: None when it runs."""
    import sparsek

    q, k, v, u = (leaf(t) for t in _tiny(case))

    def step():
        with torch.enable_grad():
            out = sparsek.sparsek_attention(q, k, v, u, topk=16, window=8, scale=case.scale)
            torch.autograd.grad(out, (q, k, v, u), torch.ones_like(out))

    return call_reason(step)


class SparseKReference(Impl):
    def __init__(self):
        super().__init__("sparsek-ref", family="sparsek", kind="prefill", pattern="sparsek",
                         description="sparsek's PyTorch reference (selection + blocked attention)", train=True)

    def _available(self, case: Case) -> str | None:
        keys = case.batch * case.kv_heads * case.seq_len
        if case.device == "cuda" and (keys > REF_MAX_KEYS_PER_CALL or case.seq_len > REF_MAX_SEQ_CUDA):
            return (f"the reference is a correctness oracle built from Python loops; on a GPU it is timed only for "
                    f"S <= {REF_MAX_SEQ_CUDA} and B*Hkv*S <= {REF_MAX_KEYS_PER_CALL} (here S={case.seq_len}, "
                    f"B*Hkv*S={keys}); outputs are still checked against it row by row")
        if case.device == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        return None

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        from sparsek import reference, selection

        q, k, v, u = inputs.q, inputs.k, inputs.v, inputs.scores
        topk, window, scale = case.topk, case.window, case.scale

        def fn():
            sel = selection.select(u, topk, window)
            return reference.attention_blocked(q, k, v, u, topk, window, scale, sel, REF_BLOCK)[0]

        return Prepared(fn=fn)

    def _prepare_train(self, case: Case, inputs: Inputs) -> Prepared:
        from sparsek import reference

        topk, window, scale = case.topk, case.window, case.scale

        def forward(q, k, v, u):
            return reference.SparseKFunction.apply(q, k, v, u, topk, window, scale, REF_BLOCK)

        leaves = {"q": leaf(inputs.q), "k": leaf(inputs.k), "v": leaf(inputs.v), "scores": leaf(inputs.scores)}
        notes = ["reference.SparseKFunction: selection + blocked attention, then the analytic backward_blocked"]
        return train.prepared(TrainStep(leaves=leaves, forward=forward, grad_out=inputs.grad_out, notes=notes))


# ---------------------------------------------------------------------------------------------
# flex-sparsek


def sparsek_block_tables(end: torch.Tensor, window: int, group: int, block: int = FLEX_BLOCK):
    """Tile tables of the SparseK pattern: any (B, Hq, nq, nk) and full (B, Hq, nq, nk) bool.

    end (B, Hkv, S) int32: key j is selected by queries [j + W, end_j). A key selected over
    queries [s, e) touches query blocks s // block .. (e - 1) // block of its key block: a
    difference array over query blocks per key block, summed, marks every touched tile. Window
    tiles come from window_block_tables; only those can be full (a selected tile mixes gates).
    """
    B, Hkv, S = end.shape
    n = -(-S // block)
    dev = end.device
    j = torch.arange(S, device=dev)
    start = (j + window).expand(B, Hkv, S)
    stop = end.long()
    hit = stop > start
    lo = torch.where(hit, start // block, 0)
    hi = torch.where(hit, (stop - 1) // block + 1, 0)
    kb = (j // block).expand(B, Hkv, S)
    diff = torch.zeros(B, Hkv, n * (n + 1), dtype=torch.int32, device=dev)  # (key block, query block + 1)
    ones = hit.to(torch.int32)
    diff.scatter_add_(-1, kb * (n + 1) + lo, ones)
    diff.scatter_add_(-1, kb * (n + 1) + hi, -ones)
    selected = diff.view(B, Hkv, n, n + 1).cumsum(-1)[..., :n] > 0  # (B, Hkv, key block, query block)
    any_ = selected.transpose(-1, -2)
    full = torch.zeros(n, n, dtype=torch.bool, device=dev)
    if window > 0:
        w_any, full = window_block_tables(S, window, block, device=dev)
        any_ = any_ | w_any
    any_ = any_.repeat_interleave(group, dim=1)
    return any_, full.expand_as(any_)


def sparsek_mods(case: Case, scores: torch.Tensor, tau: torch.Tensor, end: torch.Tensor):
    """mask_mod and score_mod of the SparseK pattern.

    scores (B, Hkv, S) float32, tau (B, Hkv, S) float32 per query, end (B, Hkv, S) int32 per key.
    Query head h reads kv head h // group, as in SDPA's GQA.
    """
    W, G = case.window, case.group

    def mask_mod(b, h, q_idx, kv_idx):
        kvh = h // G
        in_window = (q_idx >= kv_idx) & (q_idx - kv_idx < W)
        selected = (kv_idx + W <= q_idx) & (q_idx < end[b, kvh, kv_idx])
        return in_window | selected

    def score_mod(score, b, h, q_idx, kv_idx):
        kvh = h // G
        # tau = -inf while every candidate is selected: the gate is then 1 and the bias 0
        gate = torch.clamp(scores[b, kvh, kv_idx] - tau[b, kvh, q_idx], 0.0, 1.0)
        return torch.where(kv_idx + W <= q_idx, score + torch.log(gate), score)

    return mask_mod, score_mod


class FlexSparseK(FlexImpl):
    train_notes = ("gradients for q, k and v only: the SparseK mask and gates are constants to FlexAttention, so "
                   "the scores get no gradient (sparsek's step also computes d(scores))",)

    def __init__(self):
        super().__init__("flex-sparsek", family="structured", pattern="sparsek",
                         description="FlexAttention (compiled) with SparseK's exact mask and gates")

    def build(self, case: Case, inputs: Inputs):
        from sparsek import _cuda

        q, k, v, u = inputs.q, inputs.k, inputs.v, inputs.scores
        reason = _cuda.unsupported_reason(q, k, v, u)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback is named in the notes below
            out, _, tau, end, _, _ = torch.ops.sparsek.attention_fwd(q, k, v, u, case.topk, case.window, case.scale)
        source = "sparsek's CUDA selection" if reason is None else f"sparsek's reference selection ({reason})"
        mask_mod, score_mod = sparsek_mods(case, u, tau, end)
        any_, full = sparsek_block_tables(end, case.window, case.group)
        block_mask = block_mask_from_tables(any_, full, mask_mod, case.seq_len)
        n = any_.shape[-1]
        causal_tiles = any_.shape[0] * any_.shape[1] * n * (n + 1) // 2
        notes = [f"selection from {source}, computed in prepare",
                 f"visits {int(any_.sum()) / causal_tiles:.1%} of the causal {FLEX_BLOCK}x{FLEX_BLOCK} tiles"]
        return block_mask, score_mod, notes, {"sparsek-op": out}


IMPLS = (SparseKCuda(), SparseKReference(), FlexSparseK())

