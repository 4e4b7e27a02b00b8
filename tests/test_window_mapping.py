"""sparsek's `window` against the sliding windows of FlashAttention, FlexAttention and SDPA masks
(docs/semantics.md), and `return_lse` against the reference."""

import pytest
import torch
import torch.nn.functional as F

from conftest import attention_inputs
import sparsek
from sparsek import reference as ref
from sparsek import selection as sel_mod


def _flash_window(S, left, right):
    """FlashAttention's causal sliding window: query i sees i - left <= j <= i + right, j <= i."""
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    return (j >= i - left) & (j <= i + right) & (j <= i)


def _flex_window(W):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    return mask_mod


@pytest.mark.parametrize("W", [1, 2, 7, 40])
def test_window_equals_flash_flex_and_sdpa_masks(W):
    S = 37
    want = sel_mod.window_mask(S, W)
    assert torch.equal(_flash_window(S, W - 1, 0), want)
    i, j = torch.arange(S).view(-1, 1), torch.arange(S).view(1, -1)
    assert torch.equal(_flex_window(W)(0, 0, i, j), want)
    d = i - j
    assert torch.equal((d >= 0) & (d < W), want)


def test_window_zero_is_empty():
    assert not sel_mod.window_mask(20, 0).any()


@pytest.mark.parametrize("W", [0, 3])
def test_every_candidate_selected_is_causal_sdpa(W):
    """topk >= S: window plus selection cover every earlier key with gate 1, so the output is causal
    attention whatever the window."""
    q, k, v, u = attention_inputs(1, 4, 2, 23, 8)
    out = sparsek.sparsek_attention(q, k, v, u, topk=64, window=W)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_return_lse_matches_reference_and_carries_no_gradient():
    q, k, v, u = attention_inputs(2, 4, 2, 31, 8, requires_grad=True)
    out, lse = sparsek.sparsek_attention(q, k, v, u, topk=5, window=3, return_lse=True)
    want_out, want_lse = ref.attention_dense(q, k, v, u, 5, 3, 8**-0.5)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        sparsek.sparsek_attention(q, k, v, u, topk=5, return_lse="yes")
