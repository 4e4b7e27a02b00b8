"""SparseKScorer: hidden states -> one score per key per kv head, without seeing the query."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SparseKScorer(nn.Module):
    """``u[b, h, j] = w_h . x[b, j] + slope_h * j / position_scale``.

    A linear map per kv head rates every key from its own hidden state; the learned position
    slope lets a head prefer recent (slope > 0) or early (slope < 0) keys. The slope starts at
    0 so the scorer begins position-neutral. There is no bias: adding a constant to every
    score of a head shifts tau by the same constant and leaves every gate unchanged, so a bias
    would receive exactly zero gradient.
    """

    def __init__(self, d_model: int, num_kv_heads: int, *, position_scale: float = 1024.0):
        super().__init__()
        if d_model < 1 or num_kv_heads < 1:
            raise ValueError(f"SparseKScorer: d_model and num_kv_heads must be >= 1, got {d_model}, {num_kv_heads}")
        if not position_scale > 0:
            raise ValueError(f"SparseKScorer: position_scale must be > 0, got {position_scale}")
        self.num_kv_heads = num_kv_heads
        self.position_scale = float(position_scale)
        self.proj = nn.Linear(d_model, num_kv_heads, bias=False)
        self.slope = nn.Parameter(torch.zeros(num_kv_heads))

    def forward(self, x: Tensor) -> Tensor:  # x: (B, S, d_model) -> (B, Hkv, S)
        if x.dim() != 3 or x.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"SparseKScorer: x must be (B, S, d_model={self.proj.in_features}), got {tuple(x.shape)}"
            )
        S = x.shape[1]
        # Scores are float32 (float64 for a float64 model): the threshold search compares
        # them exactly, and half precision would create ties that are not in the model.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        pos = torch.arange(S, device=x.device, dtype=dtype) / self.position_scale
        u = self.proj(x).to(dtype).transpose(1, 2)  # (B, Hkv, S)
        return u + self.slope.to(dtype).view(1, -1, 1) * pos.view(1, 1, -1)
