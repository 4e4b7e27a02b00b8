"""sparsek_attention_varlen: packed sequences give, row for row, what each sequence gives alone
through sparsek_attention (outputs and the gradients of q, k, v and scores), and every bad
argument is refused with a message naming it."""

from __future__ import annotations

import pytest
import torch

from sparsek import sparsek_attention, sparsek_attention_varlen
from conftest import seed_for

_SHORT = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16"}


def packed_inputs(lengths, Hq, Hkv, D, dtype, device="cpu"):
    """q (T, Hq, D), k, v (T, Hkv, D), scores (T, Hkv) float32 (float64 for float64 q), cu_seqlens."""
    g = torch.Generator().manual_seed(seed_for(tuple(lengths), Hq, Hkv, D, str(dtype)))
    T = sum(lengths)
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(T, Hq, D, generator=g, dtype=torch.float64).to(device, dtype)
    k = torch.randn(T, Hkv, D, generator=g, dtype=torch.float64).to(device, dtype)
    v = torch.randn(T, Hkv, D, generator=g, dtype=torch.float64).to(device, dtype)
    scores = (2 * torch.randn(T, Hkv, generator=g, dtype=torch.float64)).to(device, score_dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    grad_out = torch.randn(T, Hq, D, generator=g, dtype=torch.float64).to(device, dtype)
    return q, k, v, scores, cu, grad_out


def _to_bhsd(x):
    """(L, H, ...) -> (1, H, L, ...), contiguous, as the varlen op hands it to sparsek_attention."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def per_sequence(q, k, v, scores, lengths, grad_out, **kw):
    """Output and (dq, dk, dv, dscores) of every sequence run alone, on its own leaves, concatenated."""
    outs, grads, start = [], [[], [], [], []], 0
    for L in lengths:
        leaves = [t[start:start + L].detach().clone().requires_grad_() for t in (q, k, v, scores)]
        if L > 0:
            out = sparsek_attention(*(_to_bhsd(t) for t in leaves), **kw)[0].transpose(0, 1)  # (L, Hq, D)
            dq, dk, dv, ds = torch.autograd.grad(out, leaves, grad_out[start:start + L])
        else:
            out = q.new_empty(0, *q.shape[1:])
            dq, dk, dv, ds = (torch.zeros_like(t) for t in leaves)
        outs.append(out.detach())
        for acc, d in zip(grads, (dq, dk, dv, ds)):
            acc.append(d)
        start += L
    return torch.cat(outs), [torch.cat(g) for g in grads]


def varlen(q, k, v, scores, cu, grad_out, max_seqlen, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, scores)]
    out = sparsek_attention_varlen(*leaves, cu, max_seqlen, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


CASES = [
    # lengths, Hq, Hkv, D, topk, window
    ([5, 1, 17, 0, 9], 4, 2, 16, 3, 4),  # several lengths, one empty, GQA
    ([1], 2, 2, 8, 2, 3),  # a single token
    ([3, 2, 6], 4, 2, 8, 2, 8),  # every sequence shorter than the window
    ([0, 12, 0], 2, 1, 8, 4, 0),  # empty sequences around one, no window
    ([20, 33], 4, 4, 16, 5, 6),  # the top-k binds in both
]


def _case_id(case, dtype):
    lengths, Hq, Hkv, D, topk, window = case
    return f"varlen-{_SHORT[dtype]}-L{'_'.join(map(str, lengths))}-Hq{Hq}-Hkv{Hkv}-D{D}-K{topk}-W{window}"


@pytest.mark.parametrize(
    "case,dtype",
    [(c, dt) for dt in (torch.float64, torch.float32) for c in CASES],
    ids=[_case_id(c, dt) for dt in (torch.float64, torch.float32) for c in CASES],
)
def test_varlen_matches_each_sequence_alone(case, dtype):
    lengths, Hq, Hkv, D, topk, window = case
    q, k, v, scores, cu, grad_out = packed_inputs(lengths, Hq, Hkv, D, dtype)
    kw = dict(topk=topk, window=window)
    out, grads = varlen(q, k, v, scores, cu, grad_out, max(lengths), **kw)
    ref_out, ref_grads = per_sequence(q, k, v, scores, lengths, grad_out, **kw)
    assert out.shape == (sum(lengths), Hq, D)
    assert torch.equal(out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv", "dscores"), grads, ref_grads):
        assert torch.equal(g, r), name


def test_varlen_int64_cu_seqlens_and_larger_max_seqlen():
    lengths = [4, 7]
    q, k, v, scores, cu, _ = packed_inputs(lengths, 2, 1, 8, torch.float64)
    a = sparsek_attention_varlen(q, k, v, scores, cu, 7, topk=2, window=2)
    b = sparsek_attention_varlen(q, k, v, scores, cu.long(), 100, topk=2, window=2)
    assert torch.equal(a, b)


def test_varlen_all_empty():
    q, k, v, scores, _, _ = packed_inputs([0], 2, 1, 8, torch.float64)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    out = sparsek_attention_varlen(q, k, v, scores, cu, 0, topk=1)
    assert out.shape == (0, 2, 8)


def _bad_calls():
    """(id, change to the good call, exception, text the message must contain)."""
    q, k, v, scores, cu, _ = packed_inputs([3, 5], 4, 2, 8, torch.float32)
    good = dict(q=q, k=k, v=v, scores=scores, cu_seqlens=cu, max_seqlen=5, topk=2, window=1)
    i32 = torch.int32
    return good, [
        ("q-not-tensor", dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
        ("cu-not-tensor", dict(cu_seqlens=[0, 3, 8]), TypeError, "cu_seqlens must be a torch.Tensor"),
        ("q-rank", dict(q=q[None]), ValueError, "q must be 3-D (total_tokens, Hq, D)"),
        ("k-rank", dict(k=k[None], v=v[None]), ValueError, "k must be 3-D (total_tokens, Hkv, D)"),
        ("v-shape", dict(v=v[:, :1]), ValueError, "v must have the shape of k"),
        ("k-tokens", dict(k=k[:7], v=v[:7]), ValueError, "k must be (total_tokens=8, Hkv, D=8)"),
        ("k-head-dim", dict(k=k[..., :4], v=v[..., :4]), ValueError, "k must be (total_tokens=8, Hkv, D=8)"),
        ("scores-shape", dict(scores=scores[:, :1]), ValueError, "scores must be (total_tokens, Hkv) = (8, 2)"),
        ("scores-rank", dict(scores=scores[None]), ValueError, "scores must be (total_tokens, Hkv)"),
        ("q-dtype", dict(q=q.to(torch.int32)), TypeError, "q must be float16, bfloat16, float32 or float64"),
        ("k-dtype", dict(k=k.double()), TypeError, "k must have q's dtype torch.float32"),
        ("scores-dtype", dict(scores=scores.double()), TypeError, "scores must be torch.float32 for q of dtype"),
        ("gqa", dict(q=q[:, :3]), ValueError, "Hq=3 must be a multiple of kv heads Hkv=2"),
        ("cu-dtype", dict(cu_seqlens=cu.float()), TypeError, "cu_seqlens must be int32 or int64, got torch.float32"),
        ("cu-rank", dict(cu_seqlens=cu[None]), ValueError, "cu_seqlens must be 1-D (num_seqs + 1,), got shape (1, 3)"),
        ("cu-empty", dict(cu_seqlens=cu[:0]), ValueError, "cu_seqlens must be 1-D (num_seqs + 1,), got shape (0,)"),
        ("cu-start", dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=i32)), ValueError, "cu_seqlens must start at 0, got 1"),
        ("cu-decreasing", dict(cu_seqlens=torch.tensor([0, 6, 3, 8], dtype=i32)), ValueError,
         "cu_seqlens must be non-decreasing, got 6 then 3 at index 2"),
        ("cu-end", dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=i32)), ValueError,
         "cu_seqlens must end at total_tokens=8 (q.shape[0]), got 7"),
        ("max-seqlen-small", dict(max_seqlen=4), ValueError, "max_seqlen must be >= the longest sequence (5), got 4"),
        ("max-seqlen-type", dict(max_seqlen=5.0), TypeError, "max_seqlen must be an int"),
        ("max-seqlen-negative", dict(max_seqlen=-1), ValueError, "max_seqlen must be >= 0, got -1"),
        ("topk", dict(topk=0), ValueError, "topk must be >= 1, got 0"),
        ("window", dict(window=-1), ValueError, "window must be >= 0, got -1"),
        ("scale", dict(scale=-1.0), ValueError, "scale must be a finite float > 0 or None"),
    ]


_GOOD, _BAD = _bad_calls()


@pytest.mark.parametrize("change,exc,text", [b[1:] for b in _BAD], ids=[b[0] for b in _BAD])
def test_varlen_validation(change, exc, text):
    kwargs = {**_GOOD, **change}
    with pytest.raises(exc) as info:
        sparsek_attention_varlen(
            kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("scores"),
            kwargs.pop("cu_seqlens"), kwargs.pop("max_seqlen"), **kwargs,
        )
    assert text in str(info.value)
    assert "sparsek" in str(info.value)


@pytest.mark.gpu
def test_varlen_device_mismatch():
    q, k, v, scores, cu, _ = packed_inputs([3, 5], 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens is on cuda:0 but q is on cpu"):
        sparsek_attention_varlen(q, k, v, scores, cu.cuda(), 5, topk=2)
    with pytest.raises(ValueError, match="k is on cuda:0 but q is on cpu"):
        sparsek_attention_varlen(q, k.cuda(), v, scores, cu, 5, topk=2)


@pytest.mark.gpu
def test_varlen_matches_each_sequence_alone_cuda_bf16():
    # Head dim 64 and GQA group 2: shapes the CUDA forward kernels take, so each sequence runs them.
    lengths, Hq, Hkv, D, topk, window = [300, 1, 129, 0, 64, 7], 4, 2, 64, 16, 32
    q, k, v, scores, cu, grad_out = packed_inputs(lengths, Hq, Hkv, D, torch.bfloat16, device="cuda")
    kw = dict(topk=topk, window=window)
    out, grads = varlen(q, k, v, scores, cu, grad_out, max(lengths), **kw)
    ref_out, ref_grads = per_sequence(q, k, v, scores, lengths, grad_out, **kw)
    # The forward is deterministic (README, "Determinism"): the same call per sequence, the same bits.
    assert torch.equal(out, ref_out)
    # The backward sums dk, dv and d(scores) with float atomics or scatter_add_, whose order varies.
    for name, g, r in zip(("dq", "dk", "dv", "dscores"), grads, ref_grads):
        tol = dict(rtol=2e-2, atol=2e-2) if g.dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g, r, **tol, msg=name)
