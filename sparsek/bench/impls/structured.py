"""Structured-sparse peers with SparseK's key budget: each query attends its last K + W keys.

A sliding window of K + W keys does the same amount of attention work per query as SparseK
(top-K plus a window of W) without any selection, so it is the bar SparseK has to clear to be
worth its selection step (tier T2). The identical-pattern peer, flex-sparsek, lives with the
SparseK adapters.
"""

from __future__ import annotations

from .dense import FlexWindow, XFormersImpl

IMPLS = (
    FlexWindow("flex-window", family="structured", pattern="window", span=lambda case: case.key_budget,
               description="FlexAttention (compiled), causal sliding window of topk + window keys"),
    XFormersImpl("xformers-local", op=None, bias="local", family="structured", pattern="window",
                 description="xFormers, LocalAttentionFromBottomRightMask of topk + window keys"),
)
