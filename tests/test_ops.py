"""The torch.library op: opcheck, torch.compile, dtypes, and agreement with the reference."""

import warnings

import pytest
import torch

from conftest import attention_inputs, shape_id
import sparsek
from sparsek import reference as ref
from tolerances import ATOL, RTOL


def test_opcheck_forward():
    q, k, v, u = attention_inputs(2, 4, 2, 29, 8, dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsek.attention_fwd.default, (q, k, v, u, 5, 3, 0.3))


def test_opcheck_backward():
    q, k, v, u = attention_inputs(1, 2, 1, 21, 8, dtype=torch.float32)
    out, lse, tau, end, keys, count = torch.ops.sparsek.attention_fwd(q, k, v, u, 4, 2, 0.3)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.sparsek.attention_bwd.default, (grad, q, k, v, u, out, lse, tau, end, keys, count, 4, 2, 0.3)
    )


def test_compile_fullgraph_forward_and_backward():
    q, k, v, u = attention_inputs(2, 4, 2, 33, 8, dtype=torch.float32, requires_grad=True)
    f = lambda q, k, v, u: sparsek.sparsek_attention(q, k, v, u, topk=6, window=4)
    eager = f(q, k, v, u)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, u)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    (g_eager,) = torch.autograd.grad(eager.sum(), u)
    (g_comp,) = torch.autograd.grad(compiled.sum(), u)
    torch.testing.assert_close(g_comp, g_eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_float64_reference(dtype):
    B, Hq, Hkv, S, D = 2, 4, 2, 57, 16
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, D, dtype=dtype)
    out = sparsek.sparsek_attention(q, k, v, u, topk=7, window=5)
    assert out.dtype == dtype and out.shape == q.shape
    want, _ = ref.attention_dense(q.double(), k.double(), v.double(), u.double(), 7, 5, D**-0.5)
    torch.testing.assert_close(out.double(), want, atol=ATOL[dtype], rtol=RTOL[dtype])


def test_output_and_gradients_follow_the_reference_function():
    q, k, v, u = attention_inputs(2, 2, 1, 19, 8, requires_grad=True, score_scale=0.5)
    out = sparsek.sparsek_attention(q, k, v, u, topk=4, window=2, scale=0.4)
    want = ref.SparseKFunction.apply(q, k, v, u, 4, 2, 0.4, 64)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, (q, k, v, u), g)
    b = torch.autograd.grad(want, (q, k, v, u), g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_cpu_path_is_silent():
    q, k, v, u = attention_inputs(1, 2, 2, 9, 8, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsek.sparsek_attention(q, k, v, u, topk=2)


def test_non_contiguous_inputs():
    q, k, v, u = attention_inputs(1, 4, 2, 23, 8, dtype=torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    torch.testing.assert_close(sparsek.sparsek_attention(qt, k, v, u, topk=3, window=2),
                               sparsek.sparsek_attention(q, k, v, u, topk=3, window=2))
