"""A tiny causal model for the retrieval task, in four attention variants of equal key budget.

Every variant is the same network: token embedding plus an embedding of the previous token
(a token shift), then ``num_layers`` pre-norm blocks of attention and MLP, then a head. Only
the set of keys each query may attend to differs; with ``topk = K`` and ``window = W``:

* ``sparsek``: SparseK attention, the last W keys plus the top-K earlier keys of a learned
  scorer (``SparseKSelfAttention`` as shipped).
* ``window``: a sliding window of the last K + W keys, the structured-sparse peer.
* ``dense``: full causal attention, the ceiling (its budget is the whole prefix).
* ``sparsek-frozen``: SparseK whose scorer keeps its random initial weights and gets no
  gradient, not even through its input: selection without learning.

Why the token shift: a fact is two tokens (key, value). Folding the previous token into each
position makes the value position carry its key, so one attention layer can match a query's
key against the facts. Without it the first layer has to learn a previous-token head before
any retrieval can be learned, which costs steps that the CPU setting cannot afford and says
nothing about key selection. The shift reaches one token back, so it adds no long-range path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsek import SparseKScorer, SparseKSelfAttention

VARIANTS = ("sparsek", "window", "dense", "sparsek-frozen")


class MaskedSelfAttention(SparseKSelfAttention):
    """The projections of ``SparseKSelfAttention`` with plain causal attention over the last
    ``budget`` keys (``None``: every earlier key).

    Subclassing keeps the parameter layout and initialisation order identical to the SparseK
    layer, so every variant starts from the same weights for a seed. The inherited scorer is
    never called and gets no gradient.
    """

    def __init__(self, d_model: int, num_heads: int, *, budget: int | None, num_kv_heads: int | None = None):
        # topk/window of the parent are unused; budget decides the mask.
        super().__init__(d_model, num_heads, topk=1, window=0, num_kv_heads=num_kv_heads)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"MaskedSelfAttention: budget must be an int >= 1 or None, got {budget!r}")
        self.budget = budget

    def forward(self, x: Tensor) -> Tensor:  # x: (B, S, d_model) -> (B, S, d_model)
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        if self.budget is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            d = torch.arange(S, device=x.device).view(-1, 1) - torch.arange(S, device=x.device).view(1, -1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=(d >= 0) & (d < self.budget))
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class FrozenScorer(nn.Module):
    """A scorer that keeps its weights and passes no gradient to them or to its input."""

    def __init__(self, scorer: SparseKScorer):
        super().__init__()
        self.inner = scorer.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:  # (B, S, d_model) -> (B, Hkv, S)
        with torch.no_grad():
            return self.inner(x.detach())


def make_attention(variant: str, d_model: int, num_heads: int, num_kv_heads: int, topk: int, window: int) -> nn.Module:
    if variant in ("sparsek", "sparsek-frozen"):
        layer = SparseKSelfAttention(d_model, num_heads, topk=topk, window=window, num_kv_heads=num_kv_heads)
        if variant == "sparsek-frozen":
            layer.scorer = FrozenScorer(layer.scorer)
        return layer
    if variant == "window":
        return MaskedSelfAttention(d_model, num_heads, budget=topk + window, num_kv_heads=num_kv_heads)
    if variant == "dense":
        return MaskedSelfAttention(d_model, num_heads, budget=None, num_kv_heads=num_kv_heads)
    raise ValueError(f"make_attention: variant must be one of {VARIANTS}, got {variant!r}")


class Block(nn.Module):
    def __init__(self, attn: nn.Module, d_model: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = attn
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:  # (B, S, d_model)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RetrievalModel(nn.Module):
    """Tokens (B, S) -> logits (B, S, vocab). No position embedding: retrieval is by content,
    and the causal mask, the window and the scorer's position slope are the only sense of order."""

    def __init__(
        self,
        vocab_size: int,
        *,
        variant: str,
        topk: int,
        window: int,
        d_model: int = 32,
        num_heads: int = 2,
        num_kv_heads: int = 1,
        num_layers: int = 1,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"RetrievalModel: variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.topk, self.window = variant, topk, window
        self.embed = nn.Embedding(vocab_size, d_model)
        self.embed_prev = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            Block(make_attention(variant, d_model, num_heads, num_kv_heads, topk, window), d_model) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, S) int64 -> (B, S, vocab)
        prev = self.embed_prev(tokens[:, :-1])
        x = self.embed(tokens) + F.pad(prev, (0, 0, 1, 0))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def scorers(self) -> list[nn.Module]:
        """The SparseK scorers of the layers (empty for the window and dense variants)."""
        return [b.attn.scorer for b in self.blocks if type(b.attn) is SparseKSelfAttention]
