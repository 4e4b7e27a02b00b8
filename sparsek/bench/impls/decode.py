"""Decode adapters: one new token against a long context (tier T3).

Placeholder until the decode issue (#7) lands: every decode id is registered, so tables and tier
T3 list it as skipped with the reason below instead of forgetting it. The decode issue replaces
this file; the interface it keeps is ``IMPLS``, a tuple of ``base.Impl`` objects with
``kind="decode"``, these ids, and ``pattern`` "decode-sparsek" (sparsek-decode) or
"decode-full" (the full-context baselines). ``prepare`` gets ``cases.Inputs`` with the context
k, v, scores (B, Hkv, S, ...) and the new token's q (B, Hq, 1, D), k_new, v_new, score_new; its
output is (B, Hq, 1, D), checked against the pattern's reference in base.REFERENCES.
"""

from __future__ import annotations

from .base import Unavailable

REASON = "decode adapters arrive with the decode issue (#7)"

IMPLS = (
    Unavailable("sparsek-decode", family="sparsek", kind="decode", pattern="decode-sparsek", reason=REASON,
                description="SparseK decode step over the K + W cache slots"),
    Unavailable("sdpa-decode", family="decode", kind="decode", pattern="decode-full", reason=REASON,
                description="PyTorch SDPA over the full contiguous cache"),
    Unavailable("vllm-paged", family="decode", kind="decode", pattern="decode-full", reason=REASON,
                description="vLLM paged decode over the full context (block size 16)"),
    Unavailable("xformers-splitk-paged", family="decode", kind="decode", pattern="decode-full", reason=REASON,
                description="xFormers split-K decode with a paged bias"),
    Unavailable("flex-paged", family="decode", kind="decode", pattern="decode-full", reason=REASON,
                description="FlexAttention over a paged cache"),
)
