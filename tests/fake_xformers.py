"""A fake ``xformers`` package for CPU tests: xFormers' (B, S, [Hkv, G,] D) attention API over
SDPA, differentiable, with the two biases the adapters use. ``install`` puts it in sys.modules."""

from __future__ import annotations

import dataclasses
import sys
import types

import torch
import torch.nn.functional as F


def install(monkeypatch, *, refuse: str | None = None, calls: list | None = None) -> None:
    """refuse: every call raises NotImplementedError with this message (a library that refuses
    to run). calls: each call appends the operator it was asked for."""

    class LowerTriangularMask:
        pass

    @dataclasses.dataclass
    class LocalAttentionFromBottomRightMask:
        window_left: int
        window_right: int

    def attend(q, k, v, attn_bias=None, scale=None, op=None):
        if refuse:
            raise NotImplementedError(refuse)
        if calls is not None:
            calls.append(op)
        shape = q.shape
        B, M, D = q.shape[0], q.shape[1], q.shape[-1]
        q, k, v = (t.reshape(B, M, -1, D).transpose(1, 2) for t in (q, k, v))
        i, j = torch.arange(M).view(-1, 1), torch.arange(M).view(1, -1)
        if isinstance(attn_bias, LowerTriangularMask):
            mask = j <= i
        else:
            mask = (j >= i - attn_bias.window_left) & (j <= i + attn_bias.window_right)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(shape)

    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.attn_bias = types.SimpleNamespace(LowerTriangularMask=LowerTriangularMask,
                                           LocalAttentionFromBottomRightMask=LocalAttentionFromBottomRightMask)
    for name in ("cutlass", "flash", "flash3"):
        setattr(fmha, name, types.SimpleNamespace(FwOp=f"{name}-fw", BwOp=f"{name}-bw"))
    ops.fmha = fmha
    ops.memory_efficient_attention = attend
    ops.memory_efficient_attention_forward = attend
    xformers.ops = ops
    for name, mod in (("xformers", xformers), ("xformers.ops", ops), ("xformers.ops.fmha", fmha)):
        monkeypatch.setitem(sys.modules, name, mod)
