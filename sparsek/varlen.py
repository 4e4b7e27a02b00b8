"""SparseK attention on packed variable-length sequences, laid out as FlashAttention's
``flash_attn_varlen_func`` lays them out: the tokens of every sequence one after another along
dim 0, with ``cu_seqlens`` marking where each sequence starts."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import FLOAT_DTYPES, _fail, check_int, check_topk_window
from .ops import sparsek_attention

_FN = "sparsek_attention_varlen"


def _check_varlen_args(q, k, v, scores, cu_seqlens, max_seqlen, topk, window) -> list[int]:
    """Shapes, dtypes and devices of the packed call; returns cu_seqlens as host ints."""
    for name, t in (("q", q), ("k", k), ("v", v), ("scores", scores), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, Tensor):
            _fail(_FN, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if q.dim() != 3:
        _fail(_FN, f"q must be 3-D (total_tokens, Hq, D), got shape {tuple(q.shape)}")
    if k.dim() != 3:
        _fail(_FN, f"k must be 3-D (total_tokens, Hkv, D), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        _fail(_FN, f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    total, Hq, D = q.shape
    if k.shape[0] != total or k.shape[2] != D:
        _fail(_FN, f"k must be (total_tokens={total}, Hkv, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if scores.dim() != 2 or tuple(scores.shape) != (total, Hkv):
        _fail(_FN, f"scores must be (total_tokens, Hkv) = {(total, Hkv)}, got {tuple(scores.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        _fail(_FN, f"q must be float16, bfloat16, float32 or float64, got {q.dtype}", TypeError)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(_FN, f"{name} must have q's dtype {q.dtype}, got {t.dtype}", TypeError)
    allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if scores.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        _fail(_FN, f"scores must be {want} for q of dtype {q.dtype}, got {scores.dtype}", TypeError)
    for name, t in (("k", k), ("v", v), ("scores", scores), ("cu_seqlens", cu_seqlens)):
        if t.device != q.device:
            _fail(_FN, f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail(_FN, f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}", TypeError)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(_FN, f"cu_seqlens must be 1-D (num_seqs + 1,), got shape {tuple(cu_seqlens.shape)}")
    check_int(_FN, "max_seqlen", max_seqlen, 0)
    # The op checks topk and window per sequence; checked here too so a call whose sequences are
    # all empty still refuses them.
    check_topk_window(_FN, topk, window)
    offsets = cu_seqlens.tolist()  # the one host synchronisation of the call
    if offsets[0] != 0:
        _fail(_FN, f"cu_seqlens must start at 0, got {offsets[0]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            _fail(_FN, f"cu_seqlens must be non-decreasing, got {offsets[i - 1]} then {offsets[i]} at index {i}")
    if offsets[-1] != total:
        _fail(_FN, f"cu_seqlens must end at total_tokens={total} (q.shape[0]), got {offsets[-1]}")
    longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
    if max_seqlen < longest:
        _fail(_FN, f"max_seqlen must be >= the longest sequence ({longest}), got {max_seqlen}")
    return offsets


def sparsek_attention_varlen(
    q: Tensor,  # (total_tokens, Hq, D)
    k: Tensor,  # (total_tokens, Hkv, D)
    v: Tensor,  # (total_tokens, Hkv, D)
    scores: Tensor,  # (total_tokens, Hkv) float32 (float64 allowed with float64 q)
    cu_seqlens: Tensor,  # (num_seqs + 1,) int32 or int64, 0 .. total_tokens
    max_seqlen: int,
    *,
    topk: int,
    window: int = 0,
    scale: float | None = None,
) -> Tensor:
    """SparseK attention over packed sequences; returns (total_tokens, Hq, D).

    Sequence ``i`` is the tokens ``cu_seqlens[i] : cu_seqlens[i + 1]``. Each sequence is selected
    and attended on its own, exactly as ``sparsek_attention`` on that sequence alone would: its
    own top-k, its own window, causal positions counted from 0; no token sees another sequence.
    Sequences of length 0 give no rows. Differentiable in q, k, v and scores (through
    ``sparsek_attention``'s autograd).

    ``cu_seqlens`` is read to the host once, to split the batch: that is a host synchronisation
    (on a GPU the call waits for ``cu_seqlens`` to be ready), which FlashAttention's kernel avoids
    by taking ``max_seqlen`` on the host and reading ``cu_seqlens`` on the device. Here
    ``max_seqlen`` is only checked. Each non-empty sequence is its own ``sparsek_attention`` call
    (on supported CUDA tensors, its own selection and attention launches); one packed launch over
    all sequences is future work.
    """
    offsets = _check_varlen_args(q, k, v, scores, cu_seqlens, max_seqlen, topk, window)
    pieces = []
    for start, stop in zip(offsets, offsets[1:]):
        if stop == start:
            continue
        # (L, H, D) -> (1, H, L, D): the layout sparsek_attention takes; contiguous for the kernels.
        out = sparsek_attention(
            q[start:stop].transpose(0, 1).unsqueeze(0).contiguous(),
            k[start:stop].transpose(0, 1).unsqueeze(0).contiguous(),
            v[start:stop].transpose(0, 1).unsqueeze(0).contiguous(),
            scores[start:stop].transpose(0, 1).unsqueeze(0).contiguous(),
            topk=topk,
            window=window,
            scale=scale,
        )
        pieces.append(out[0].transpose(0, 1))  # (L, Hq, D)
    if not pieces:
        return q.new_empty(q.shape)
    return torch.cat(pieces, dim=0)
