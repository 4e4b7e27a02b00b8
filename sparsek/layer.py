"""SparseKSelfAttention: a drop-in causal self-attention layer with SparseK key selection."""

from __future__ import annotations

from torch import Tensor, nn

from ._validate import check_int
from .ops import sparsek_attention
from .scorer import SparseKScorer


class SparseKSelfAttention(nn.Module):
    """q/k/v projections, a SparseK scorer, SparseK attention and an output projection.

    ``num_kv_heads < num_heads`` gives grouped-query attention; each kv head has its own
    scores, shared by the query heads of its group.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        topk: int,
        window: int = 0,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        fn = "SparseKSelfAttention"
        check_int(fn, "d_model", d_model, 1)
        check_int(fn, "num_heads", num_heads, 1)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int(fn, "num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"{fn}: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"{fn}: d_model={d_model} must be a multiple of num_heads={num_heads} (or pass head_dim)")
            head_dim = d_model // num_heads
        check_int(fn, "head_dim", head_dim, 1)
        self.topk = check_int(fn, "topk", topk, 1)
        self.window = check_int(fn, "window", window, 0)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.scorer = SparseKScorer(d_model, num_kv_heads)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, S, d_model) -> (B, S, d_model)
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        scores = self.scorer(x)
        o = sparsek_attention(q, k, v, scores, topk=self.topk, window=self.window)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
