"""Argument checks at the public boundary: every message names the argument, the value and
what was expected, so a bad call never reaches a kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
# The kernels hold topk, window and key indices in int32 (and the reference's index arithmetic
# overflows int64 near 2**63): larger values are refused here instead of wrapping around.
INT32_MAX = 2**31 - 1


def _fail(fn: str, msg: str, exc=ValueError):
    raise exc(f"{fn}: {msg}")


def check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(fn, f"{name} must be an int, got {type(value).__name__} {value!r}", TypeError)
    if value < minimum:
        _fail(fn, f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(fn, f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}", TypeError)
    return value


def check_topk_window(fn: str, topk, window) -> None:
    """topk >= 1 and window >= 0, both within the int32 range the kernels index with."""
    for name, value, minimum in (("topk", topk, 1), ("window", window, 0)):
        check_int(fn, name, value, minimum)
        if value > INT32_MAX:
            _fail(fn, f"{name} must be <= {INT32_MAX} (2**31 - 1, the int32 range of the kernels), got {value}")


def check_selection_args(fn: str, scores, topk, window) -> None:
    """Validate the arguments of sparsek_selection: scores (B, H, S) of a floating dtype (tau is
    a real threshold: integer scores would give an integer tau), finite, and topk/window."""
    if not isinstance(scores, Tensor) or scores.dim() != 3:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        _fail(fn, f"scores must be a 3-D tensor (B, H, S), got {shape}")
    if scores.dtype not in FLOAT_DTYPES:
        _fail(fn, f"scores must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                  f"got {scores.dtype}", TypeError)
    check_topk_window(fn, topk, window)
    check_finite_scores(fn, scores)


def check_attention_args(fn: str, q, k, v, scores, topk, window, scale) -> float:
    """Validate the arguments of sparsek_attention; returns the effective scale."""
    for name, t in (("q", q), ("k", k), ("v", v), ("scores", scores)):
        if not isinstance(t, Tensor):
            _fail(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if q.dim() != 4:
        _fail(fn, f"q must be 4-D (B, Hq, S, D), got shape {tuple(q.shape)}")
    if k.dim() != 4:
        _fail(fn, f"k must be 4-D (B, Hkv, S, D), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        _fail(fn, f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S:
        _fail(fn, f"k must be (B={B}, Hkv, S={S}, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[3] != D:
        _fail(fn, f"head dim of k ({k.shape[3]}) must equal head dim of q ({D})")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        _fail(fn, f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
    if S < 1:
        _fail(fn, f"sequence length S must be >= 1, got {S}")
    if B < 1:
        _fail(fn, f"batch size B must be >= 1, got {B}")
    if not 1 <= D <= MAX_HEAD_DIM:
        _fail(fn, f"head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    if q.dtype not in FLOAT_DTYPES:
        _fail(fn, f"q must be float16, bfloat16, float32 or float64, got {q.dtype}", TypeError)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(fn, f"{name} must have q's dtype {q.dtype}, got {t.dtype}", TypeError)
    if scores.dim() != 3 or tuple(scores.shape) != (B, Hkv, S):
        _fail(fn, f"scores must be (B, Hkv, S) = {(B, Hkv, S)}, got {tuple(scores.shape)}")
    allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if scores.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        _fail(fn, f"scores must be {want} for q of dtype {q.dtype}, got {scores.dtype}", TypeError)
    for name, t in (("k", k), ("v", v), ("scores", scores)):
        if t.device != q.device:
            _fail(fn, f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
    check_topk_window(fn, topk, window)
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        _fail(fn, f"scale must be a finite float > 0 or None, got {scale!r}")
    return float(scale)


def check_finite_scores(fn: str, scores: Tensor) -> None:
    """Non-finite scores would make tau and the gates undefined. On a GPU this costs one host
    synchronisation; sparsek_attention(..., check_finite=False) checks on the device instead."""
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero()[0].tolist()
        value = scores[tuple(bad)].item()
        _fail(fn, f"scores must be finite, got {value} at index {tuple(bad)}")
