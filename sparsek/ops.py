"""The public op: ``sparsek_attention`` as ``torch.library`` custom ops.

``sparsek::attention_fwd`` returns (out, lse, tau, end, block_keys, block_count);
``sparsek::attention_bwd`` returns (dq, dk, dv, dscores). Both have fake implementations (so
``torch.compile`` traces them) and the pair is tied together with ``register_autograd``. On CUDA
tensors the kernels of csrc/ run when they support the call, forward and backward alike (the
block lists are the selection's per-block key lists, kept for the backward; empty when the
reference runs); otherwise the reference runs, with a one-time warning that names the reason
when a GPU user falls back.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import _cuda
from . import reference as ref
from . import selection as sel_mod
from ._validate import check_attention_args, check_bool, check_finite_scores

_FN = "sparsek_attention"
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sparsek: using the PyTorch reference on CUDA tensors: {reason}", RuntimeWarning, stacklevel=3)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("sparsek::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,  # (B, Hq, S, D)
    k: Tensor,  # (B, Hkv, S, D)
    v: Tensor,  # (B, Hkv, S, D)
    scores: Tensor,  # (B, Hkv, S)
    topk: int,
    window: int,
    scale: float,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """out (B, Hq, S, D), lse (B, Hq, S), tau (B, Hkv, S), end (B, Hkv, S) int32,
    block_keys (B, Hkv, n_blocks, cap) int32 and block_count (B, Hkv, n_blocks) int32.

    Non-finite scores: see ``sparsek_attention``'s ``check_finite``."""
    if _host_check(scores, check_finite):
        check_finite_scores(_FN, scores)
    if q.is_cuda:
        reason = _cuda.unsupported_reason(q, k, v, scores)
        if reason is None:
            return _cuda.forward(q, k, v, scores, topk, window, scale)  # poisons non-finite rows itself
        _warn_once(reason)
    # The reference on a CUDA fallback without the host check: solve on finite scores, then put
    # NaN over the rows (batch, kv head) that had a non-finite one, as the kernels do.
    bad = None if scores.device.type == "cpu" or _host_check(scores, check_finite) else ~torch.isfinite(scores).all(-1)
    u = scores if bad is None else torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    sel = sel_mod.select(u, topk, window)
    out, lse = ref.attention_blocked(q, k, v, u, topk, window, scale, sel)
    tau = sel.tau
    if bad is not None:
        group = q.shape[1] // k.shape[1]
        rows = bad.repeat_interleave(group, 1)  # (B, Hq)
        out = out.masked_fill(rows[:, :, None, None], float("nan"))
        lse = lse.masked_fill(rows[:, :, None], float("nan"))
        tau = tau.masked_fill(bad[:, :, None], float("nan"))
    B, Hkv = k.shape[:2]
    keys = torch.empty(B, Hkv, 0, 0, dtype=torch.int32, device=q.device)
    count = torch.empty(B, Hkv, 0, dtype=torch.int32, device=q.device)
    return out, lse.to(_lse_dtype(q)), tau, sel.end, keys, count


def _host_check(scores: Tensor, check_finite: bool) -> bool:
    """Whether the op checks the scores on the host (a clear error, one host sync on a GPU).

    Always on the CPU (no device to wait for, and the reference's result on non-finite scores is
    undefined). On a GPU: unless check_finite=False, SPARSEK_SKIP_FINITE_CHECK=1 (the older
    switch) or a CUDA graph is being captured (a capture cannot synchronise); the device-side
    check then puts NaN over the affected rows instead.
    """
    if scores.device.type == "cpu":
        return True
    if not check_finite or os.environ.get("SPARSEK_SKIP_FINITE_CHECK") == "1":
        return False
    return not (scores.is_cuda and torch.cuda.is_current_stream_capturing())


@attention_fwd.register_fake
def _(q, k, v, scores, topk, window, scale, check_finite=True):
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    n_blocks, cap = _cuda.list_shape(q, k, v, scores, topk)
    return (
        q.new_empty(B, Hq, S, D),
        q.new_empty(B, Hq, S, dtype=_lse_dtype(q)),
        scores.new_empty(B, Hkv, S),
        scores.new_empty(B, Hkv, S, dtype=torch.int32),
        scores.new_empty(B, Hkv, n_blocks, cap, dtype=torch.int32),
        scores.new_empty(B, Hkv, n_blocks, dtype=torch.int32),
    )


@torch.library.custom_op("sparsek::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: Tensor,  # (B, Hq, S, D)
    q: Tensor,  # (B, Hq, S, D)
    k: Tensor,  # (B, Hkv, S, D)
    v: Tensor,  # (B, Hkv, S, D)
    scores: Tensor,  # (B, Hkv, S)
    out: Tensor,  # (B, Hq, S, D)
    lse: Tensor,  # (B, Hq, S)
    tau: Tensor,  # (B, Hkv, S)
    end: Tensor,  # (B, Hkv, S) int32
    block_keys: Tensor,  # (B, Hkv, n_blocks, cap) int32, empty when the forward ran the reference
    block_count: Tensor,  # (B, Hkv, n_blocks) int32
    topk: int,
    window: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, dscores: the kernels when the forward ran on them, else the reference."""
    if q.is_cuda:
        # The forward's own test: the kernels ran there exactly when they run here.
        reason = _cuda.unsupported_reason(q, k, v, scores) or _cuda.backward_reason()
        if reason is None:
            return _cuda.backward(grad_out, q, k, v, scores, out, lse, tau, end, block_keys, block_count, window, scale)
        _warn_once(reason)
    sel = sel_mod.Selection(topk=topk, window=window, tau=tau, nsoft=None, end=end)
    return ref.backward_blocked(grad_out, q, k, v, scores, out, lse, sel, scale)


@attention_bwd.register_fake
def _(grad_out, q, k, v, scores, out, lse, tau, end, block_keys, block_count, topk, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(scores)


def _setup_context(ctx, inputs, output):
    q, k, v, scores, topk, window, scale, _check_finite = inputs
    out, lse, tau, end, block_keys, block_count = output
    ctx.mark_non_differentiable(lse, tau, end, block_keys, block_count)
    ctx.save_for_backward(q, k, v, scores, out, lse, tau, end, block_keys, block_count)
    ctx.params = (topk, window, scale)


def _backward(ctx, grad_out, _grad_lse, _grad_tau, _grad_end, _grad_keys, _grad_count):
    q, k, v, scores, out, lse, tau, end, block_keys, block_count = ctx.saved_tensors
    topk, window, scale = ctx.params
    dq, dk, dv, du = attention_bwd(
        grad_out.contiguous(), q, k, v, scores, out, lse, tau, end, block_keys, block_count, topk, window, scale
    )
    return dq, dk, dv, du, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def sparsek_attention(
    q: Tensor,  # (B, Hq, S, D)
    k: Tensor,  # (B, Hkv, S, D)
    v: Tensor,  # (B, Hkv, S, D)
    scores: Tensor,  # (B, Hkv, S) float32
    *,
    topk: int,
    window: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    check_finite: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """SparseK attention: each query attends to its last ``window`` positions and to the
    ``topk`` highest-scoring earlier keys, weighted by the SparseK gate. Returns (B, Hq, S, D).

    With ``return_lse=True`` returns ``(out, lse)``: lse (B, Hq, S) is the natural log of each
    row's softmax normaliser, gates included (``log sum_j g_ij exp(scale q_i . k_j)``), float32
    (float64 for float64 inputs), as FlashAttention's ``return_softmax_lse`` gives it; it carries
    no gradient. Differentiable in q, k, v and scores. See docs/semantics.md for the definition.

    ``check_finite``: scores with a NaN or an infinity have no SparseK threshold. With ``True``
    (the default) such scores raise a ValueError naming the value and its index; on a GPU that
    check waits for the device (one host synchronisation per call). With ``False`` the CUDA path
    checks on the device instead: each (batch, kv head) whose scores hold a non-finite value gets
    NaN in its output rows (all query heads of the group) and lse, never a finite wrong answer,
    and the call has no host synchronisation. Pass ``False`` to capture the forward in a CUDA
    graph (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``); during a capture the
    host check is skipped whatever the argument, since a capture cannot synchronise. On the CPU
    the check always runs (it costs no synchronisation there).
    """
    check_bool(_FN, "return_lse", return_lse)
    check_bool(_FN, "check_finite", check_finite)
    scale = check_attention_args(_FN, q, k, v, scores, topk, window, scale)
    outputs = attention_fwd(q, k, v, scores, topk, window, scale, check_finite)
    return (outputs[0], outputs[1]) if return_lse else outputs[0]


def sparsek_selection(scores: Tensor, *, topk: int, window: int = 0) -> sel_mod.Selection:
    """The selection alone (tau, |F|, end) for scores (B, H, S), by the reference."""
    from ._validate import check_selection_args

    check_selection_args("sparsek_selection", scores, topk, window)
    return sel_mod.select(scores, topk, window)
