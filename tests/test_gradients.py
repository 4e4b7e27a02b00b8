"""Analytic gradients (dq, dk, dv, dscores) against finite differences, in float64."""

import pytest
import torch

from conftest import attention_inputs, shape_id
import sparsek
from sparsek import reference as ref
from sparsek import selection as sel_mod

# B, Hq, Hkv, S, D, topk, window, score scale. The scale decides how many gates are soft:
# 0.5 leaves many candidates with 0 < g < 1, so the tau term of the score gradient is exercised.
CASES = [
    (1, 1, 1, 12, 8, 4, 0, 0.5),  # window 0, topk below the prefix
    (2, 2, 1, 14, 8, 3, 3, 0.5),  # window > 0, GQA 2, B > 1
    (1, 4, 1, 10, 8, 20, 2, 0.5),  # topk above every prefix: no soft gates
    (2, 4, 1, 16, 4, 5, 4, 0.3),  # GQA 4
    (1, 2, 2, 18, 8, 6, 0, 2.0),  # spread scores: mostly saturated gates
]


def _id(c):
    B, Hq, Hkv, S, D, K, W, sc = c
    return shape_id(B, Hq, Hkv, S, D) + f"-K{K}-W{W}-u{sc}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gradcheck_reference_function(case):
    B, Hq, Hkv, S, D, K, W, sc = case
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, D, score_scale=sc, requires_grad=True)
    f = lambda q, k, v, u: ref.SparseKFunction.apply(q, k, v, u, K, W, D**-0.5, 5)
    assert torch.autograd.gradcheck(f, (q, k, v, u), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[:2], ids=_id)
def test_gradcheck_public_op(case):
    B, Hq, Hkv, S, D, K, W, sc = case
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, D, score_scale=sc, requires_grad=True)
    f = lambda q, k, v, u: sparsek.sparsek_attention(q, k, v, u, topk=K, window=W)
    assert torch.autograd.gradcheck(f, (q, k, v, u), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_score_gradient_is_exercised():
    """The cases above include soft gates, so d(scores) is non-trivial."""
    B, Hq, Hkv, S, D, K, W, sc = CASES[0]
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, D, score_scale=sc, requires_grad=True)
    sel = sel_mod.select(u.detach(), K, W)
    assert int(sel.nsoft.max()) > 1
    ref.SparseKFunction.apply(q, k, v, u, K, W, D**-0.5, 5).square().sum().backward()
    assert u.grad.abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_dense_and_blocked_backward_agree(case):
    B, Hq, Hkv, S, D, K, W, sc = case
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, D, score_scale=sc)
    sel = sel_mod.select(u, K, W)
    out, lse = ref.attention_dense(q, k, v, u, K, W, D**-0.5, sel)
    grad = torch.randn_like(out)
    a = ref.backward_dense(grad, q, k, v, u, out, lse, sel, D**-0.5)
    b = ref.backward_blocked(grad, q, k, v, u, out, lse, sel, D**-0.5, block=3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_shifting_scores_changes_nothing():
    """tau moves with a constant shift of the scores, so the output is invariant and the score
    gradient of every (batch, head) sums to zero."""
    q, k, v, u = attention_inputs(2, 4, 2, 30, 8, score_scale=0.5, requires_grad=True)
    out = sparsek.sparsek_attention(q, k, v, u, topk=5, window=3)
    shifted = sparsek.sparsek_attention(q, k, v, u + 3.25, topk=5, window=3)
    torch.testing.assert_close(shifted, out, atol=1e-12, rtol=0)
    (du,) = torch.autograd.grad(out.square().sum(), u)
    assert du.abs().max() > 1e-3
    torch.testing.assert_close(du.sum(-1), torch.zeros(2, 2, dtype=torch.float64), atol=1e-12, rtol=0)
