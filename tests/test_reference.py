"""The three forward paths agree, and SparseK reduces to known attention in its limits."""

import pytest
import torch
import torch.nn.functional as F

from conftest import attention_inputs, shape_id
from sparsek import reference as ref
from sparsek import selection as sel_mod

SHAPES = [  # B, Hq, Hkv, S, D, topk, window
    (1, 1, 1, 1, 8, 1, 0),
    (2, 2, 1, 37, 16, 5, 4),
    (1, 4, 1, 64, 8, 100, 0),  # topk > every prefix
    (2, 8, 2, 70, 16, 9, 0),
    (1, 4, 4, 50, 32, 3, 50),  # window covers the sequence
    (2, 6, 3, 45, 8, 1, 1),
]


def _id(shape):
    B, Hq, Hkv, S, D, K, W = shape
    return shape_id(B, Hq, Hkv, S, D) + f"-K{K}-W{W}"


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_dense_blocked_rows_agree(shape):
    B, Hq, Hkv, S, D, K, W = shape
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, D)
    sel = sel_mod.select(u, K, W)
    o_d, l_d = ref.attention_dense(q, k, v, u, K, W, D**-0.5, sel)
    for block in (1, 7, 64):  # the result must not depend on the internal block size
        o_b, l_b = ref.attention_blocked(q, k, v, u, K, W, D**-0.5, sel, block=block)
        torch.testing.assert_close(o_b, o_d, atol=1e-12, rtol=0)
        torch.testing.assert_close(l_b, l_d, atol=1e-12, rtol=0)
    o_r = ref.attention_rows(q, k, v, u, K, W, D**-0.5, torch.arange(S))
    torch.testing.assert_close(o_r, o_d, atol=1e-10, rtol=0)


def _sdpa_causal(q, k, v):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


@pytest.mark.parametrize("topk,window", [(64, 0), (1000, 0), (1, 64), (5, 100)], ids=["K=S", "K>S", "W=S", "W>S"])
def test_limits_equal_causal_attention(topk, window):
    q, k, v, u = attention_inputs(2, 4, 2, 64, 16)
    out, _ = ref.attention_dense(q, k, v, u, topk, window, 16**-0.5)
    torch.testing.assert_close(out, _sdpa_causal(q, k, v), atol=1e-12, rtol=0)


@pytest.mark.parametrize("topk,window", [(4, 0), (4, 3), (30, 2)])
def test_rows_are_convex_combinations_over_the_pattern(topk, window):
    S = 24
    q, k, _, u = attention_inputs(1, 2, 1, S, S, score_scale=0.5)  # D = S: v can be the identity
    v = torch.eye(S, dtype=torch.float64).view(1, 1, S, S)  # output row = attention weights
    weights, _ = ref.attention_blocked(q, k, v, u, topk, window, 0.3, block=5)
    sel = sel_mod.select(u, topk, window)
    pattern = sel_mod.selected_mask(sel)[0, 0] | sel_mod.window_mask(S, window)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, S, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (weights[0, :, ~pattern] == 0).all()


@pytest.mark.slow
def test_lean_path_handles_4096_tokens():
    """B=1, H=8, S=4096, D=64 on the CPU through the blocked path, spot-checked by rows."""
    q, k, v, u = attention_inputs(1, 8, 8, 4096, 64, dtype=torch.float32)
    out, lse = ref.attention_blocked(q, k, v, u, 512, 256, 0.125)
    assert out.shape == q.shape and torch.isfinite(out).all() and torch.isfinite(lse).all()
    rows = torch.tensor([0, 255, 256, 767, 768, 2049, 4095])
    torch.testing.assert_close(out[:, :, rows], ref.attention_rows(q, k, v, u, 512, 256, 0.125, rows), atol=2e-5, rtol=2e-5)
