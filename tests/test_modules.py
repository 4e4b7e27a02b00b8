"""SparseKScorer and SparseKSelfAttention."""

import pytest
import torch

import sparsek


def test_scorer_shape_and_position_slope():
    torch.manual_seed(0)
    scorer = sparsek.SparseKScorer(16, 3, position_scale=10.0)
    x = torch.randn(2, 11, 16)
    u = scorer(x)
    assert u.shape == (2, 3, 11) and u.dtype == torch.float32
    with torch.no_grad():
        scorer.slope.fill_(2.0)
    delta = scorer(x) - u
    torch.testing.assert_close(delta, (2.0 * torch.arange(11) / 10.0).expand(2, 3, 11))


def test_scorer_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x must be \(B, S, d_model=16\), got \(2, 5\)"):
        sparsek.SparseKScorer(16, 2)(torch.randn(2, 5))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
def test_layer_trains_every_parameter(heads, kv_heads):
    torch.manual_seed(0)
    layer = sparsek.SparseKSelfAttention(32, heads, num_kv_heads=kv_heads, topk=4, window=3)
    with torch.no_grad():
        layer.scorer.proj.weight.mul_(0.05)  # small scores: soft gates, so the scorer gets gradient
    x = torch.randn(2, 24, 32)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_layer_gradcheck_float64():
    torch.manual_seed(1)
    layer = sparsek.SparseKSelfAttention(8, 2, num_kv_heads=1, topk=3, window=2).double()
    with torch.no_grad():
        layer.scorer.proj.weight.mul_(0.1)
    x = torch.randn(1, 10, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_layer_rejects_bad_config():
    with pytest.raises(ValueError, match=r"num_heads=6 must be a multiple of num_kv_heads=4"):
        sparsek.SparseKSelfAttention(24, 6, num_kv_heads=4, topk=2)
    with pytest.raises(ValueError, match=r"topk must be >= 1, got 0"):
        sparsek.SparseKSelfAttention(24, 6, topk=0)
