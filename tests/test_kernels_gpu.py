"""CUDA prefill kernels against the reference (run on the GPU machine; skipped without a GPU).

Selection must match bit for bit (end positions, block lists) and tau to float rounding;
attention is judged against a float32 reference with an error no worse than twice what
PyTorch's own low-precision attention makes on the same inputs, plus a small floor. Outputs are
poisoned with NaN before each launch, so an element the kernel forgot to write fails.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsek
from conftest import assert_sanitizer_clean, cuda_kernels
from sparsek import _cuda
from sparsek import reference as ref
from sparsek import selection as sel_mod

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, params=["5", "7"], ids=["fwd-v5", "fwd-v7"])
def forward_kernel(request, monkeypatch):
    """Every test runs both forward attention kernels: v5 and the warp-specialised v7.2, the
    default (SPARSEK_FWD_KERNEL; children such as the sanitizer's inherit the setting)."""
    monkeypatch.setenv("SPARSEK_FWD_KERNEL", request.param)
    return request.param


def _floor(dtype, ref):
    """One unit in the last place of the output: the kernel rounds P to the input dtype before
    P @ V (as FlashAttention does) and rounds the output, so even a one-key row can be off by an
    ulp where PyTorch's math path, normalising first, is exact."""
    return torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


def _scores(gen, B, H, S, scale, ties, device="cuda"):
    # A smooth walk plus noise: neighbouring keys correlate, as a learned scorer's would.
    walk = torch.randn(B, H, S, generator=gen).cumsum(-1) * 0.05
    u = (walk + torch.randn(B, H, S, generator=gen)) * scale
    if ties:
        u = torch.round(u * 4) / 4
    return u.float().to(device)


def _inputs(seed, B, Hq, Hkv, S, D, dtype, scale=1.0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=gen).to("cuda", dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to("cuda", dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to("cuda", dtype)
    return q, k, v, _scores(gen, B, Hkv, S, scale, ties)


def _run_kernels(q, k, v, u, topk, window):
    cuda = cuda_kernels()
    block_q = _cuda.block_q_for(q.shape[1], k.shape[1])
    tau, end, keys, count = cuda.select(u, topk, window, block_q, True)
    out, lse = cuda.attention_fwd(q, k, v, u, tau, end, keys, count, window, q.shape[-1] ** -0.5, block_q, True)
    torch.cuda.synchronize()
    return tau, end, keys, count, out, lse, block_q


def _check_selection(u, topk, window, tau, end, keys, count, block_q):
    sel = sel_mod.select(u, topk, window)
    assert torch.equal(end, sel.end), "end positions differ from the reference"
    finite = torch.isfinite(sel.tau)
    assert torch.equal(torch.isfinite(tau), finite)
    torch.testing.assert_close(tau[finite], sel.tau[finite], rtol=2e-6, atol=1e-6)
    S = u.shape[-1]
    B, H = u.shape[:2]
    for blk in range(count.shape[1]):
        i0, i1 = blk * block_q, min(S, blk * block_q + block_q)
        want, valid = sel_mod.block_union(sel, i0, i1)
        for r in range(B * H):
            b, h = divmod(r, H)
            n = int(count[r, blk])
            got = sorted(keys[r, blk, :n].tolist())
            assert got == want[b, h][valid[b, h]].tolist(), (blk, r)
    return sel


def _check_attention(q, k, v, u, topk, window, out, lse, sel):
    D = q.shape[-1]
    want, want_lse = ref.attention_dense(q.float(), k.float(), v.float(), u, topk, window, D**-0.5, sel)
    # PyTorch's own low-precision attention with the same pattern (bias in the input dtype).
    Hq = q.shape[1]
    bias = ref._gate_bias(ref._expand_heads(sel_mod.gates(sel, u), Hq).float()).to(q.dtype)
    g = Hq // k.shape[1]
    low = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=bias)
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    err = (out.float() - want).abs().max().item()
    low_err = (low.float() - want).abs().max().item()
    assert err <= 2 * low_err + _floor(q.dtype, want), f"kernel error {err:.3g} vs PyTorch low-precision {low_err:.3g}"
    torch.testing.assert_close(lse, want_lse.float(), atol=2e-2, rtol=2e-3)


SHAPES = [  # B, Hq, Hkv, S, D, topk, window
    (1, 4, 1, 200, 64, 16, 8),  # GQA 4, S not a multiple of the block
    (2, 8, 1, 333, 128, 32, 0),  # GQA 8, window 0, B > 1
    (1, 2, 2, 100, 64, 500, 4),  # S < topk
    (1, 4, 4, 257, 128, 20, 300),  # window > S
    (2, 16, 4, 520, 128, 64, 33),  # GQA 4, odd window
    (1, 1, 1, 1, 64, 1, 0),  # a single token
    (1, 8, 8, 640, 64, 100, 64),  # GQA 1
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-S{}-D{}-K{}-W{}".format(*s))
def test_kernel_matches_reference(shape, dtype):
    B, Hq, Hkv, S, D, topk, window = shape
    q, k, v, u = _inputs(hash(shape) % 10_000, B, Hq, Hkv, S, D, dtype)
    tau, end, keys, count, out, lse, block_q = _run_kernels(q, k, v, u, topk, window)
    sel = _check_selection(u, topk, window, tau, end, keys, count, block_q)
    _check_attention(q, k, v, u, topk, window, out, lse, sel)


@pytest.mark.parametrize("logit_scale", [4.0, 16.0])
@pytest.mark.parametrize("shape", [(1, 4, 1, 700, 128, 64, 40), (2, 8, 8, 300, 64, 30, 0)],
                         ids=lambda s: "B{}-Hq{}-Hkv{}-S{}-D{}-K{}-W{}".format(*s))
def test_kernel_matches_reference_on_peaky_logits(shape, logit_scale):
    """Logits of standard deviation 4 and 16 (q scaled): a row's running max jumps far and often,
    tile after tile, so the online softmax rescales O many times per row (the suite's inputs
    rescale by small factors only)."""
    B, Hq, Hkv, S, D, topk, window = shape
    q, k, v, u = _inputs(int(logit_scale) * 31 + S, B, Hq, Hkv, S, D, torch.bfloat16)
    q = (q.float() * logit_scale).to(q.dtype)
    tau, end, keys, count, out, lse, block_q = _run_kernels(q, k, v, u, topk, window)
    sel = _check_selection(u, topk, window, tau, end, keys, count, block_q)
    _check_attention(q, k, v, u, topk, window, out, lse, sel)


def test_public_op_uses_the_kernel():
    cuda_kernels()
    q, k, v, u = _inputs(7, 1, 8, 2, 300, 128, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference warns
        out = sparsek.sparsek_attention(q, k, v, u, topk=40, window=16)
    want = ref.attention_blocked(q.float(), k.float(), v.float(), u, 40, 16, 128**-0.5)[0]
    assert (out.float() - want).abs().max().item() < 3e-2


def test_random_sweep():
    """At least 200 seeded random configurations: no fault, no mismatch."""
    rng = random.Random(int(os.environ.get("SPARSEK_SWEEP_SEED", "20261126")))
    for case in range(int(os.environ.get("SPARSEK_SWEEP_CASES", "220"))):
        Hkv = rng.choice([1, 2, 4])
        group = rng.choice([1, 2, 4, 8])
        S = rng.randint(1, 700)
        D = rng.choice([64, 128])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        topk = rng.choice([1, 2, 7, 31, 64, 129, 900])
        window = rng.choice([0, 1, 5, 64, 200, 1000])
        scale = rng.choice([1e-3, 0.1, 1.0, 30.0])
        ties = rng.random() < 0.3
        B = rng.choice([1, 2])
        q, k, v, u = _inputs(case, B, Hkv * group, Hkv, S, D, dtype, scale, ties)
        tau, end, keys, count, out, lse, block_q = _run_kernels(q, k, v, u, topk, window)
        try:
            sel = _check_selection(u, topk, window, tau, end, keys, count, block_q)
            _check_attention(q, k, v, u, topk, window, out, lse, sel)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: B={B} Hq={Hkv*group} Hkv={Hkv} S={S} D={D} {dtype} "
                                 f"topk={topk} window={window} scale={scale} ties={ties}: {exc}") from exc


@pytest.mark.parametrize("S", [65536])
def test_long_sequence_sampled_rows(S):
    """long-64k shape: the selection in full, attention on a random sample of rows."""
    topk, window = 2048, 512
    q, k, v, u = _inputs(64, 1, 32, 8, S, 128, torch.bfloat16)
    tau, end, keys, count, out, lse, block_q = _run_kernels(q, k, v, u, topk, window)
    sel = sel_mod.select(u, topk, window)
    assert torch.equal(end, sel.end)
    finite = torch.isfinite(sel.tau)
    torch.testing.assert_close(tau[finite], sel.tau[finite], rtol=2e-6, atol=1e-6)
    assert not torch.isnan(out).any()
    gen = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.tensor([0, 1, window - 1, window, topk + window - 1, topk + window, S - 1]),
                      torch.randint(0, S, (57,), generator=gen)]).unique()
    want = ref.attention_rows(q.float(), k.float(), v.float(), u, topk, window, 128**-0.5, rows.tolist())
    err = (out[:, :, rows.cuda()].float() - want).abs().max().item()
    assert err < 2e-2, err


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    """Selection (the segmented walk's eight walkers share the band in shared memory) and attention,
    at a short sequence and at one whose blocks wrap the forward's ring of K/V stages."""
    cuda_kernels()  # build once outside the sanitizer
    # The child must run the kernels, not the reference: a build that fails inside the sanitizer
    # falls back with a RuntimeWarning, and "0 errors" would then be about PyTorch's kernels.
    code = (
        "import torch, warnings, sparsek\n"
        "from sparsek import _cuda\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(1, 8, 203, 64, generator=g).cuda().bfloat16()\n"
        "k = torch.randn(1, 2, 203, 64, generator=g).cuda().bfloat16(); v = torch.randn_like(k)\n"
        "u = torch.randn(1, 2, 203, generator=g).cuda()\n"
        "reason = _cuda.unsupported_reason(q, k, v, u)\n"
        "assert reason is None, f'the CUDA kernels would not run: {reason}'\n"
        "o = sparsek.sparsek_attention(q, k, v, u, topk=17, window=9); torch.cuda.synchronize()\n"
        "s = float(o.float().abs().sum())\n"
        # long enough that a block has more tiles than v7.2's ring has stages (4), so the producer
        # refills stages the consumers have read: the empty barrier's ordering is what is checked
        "q = torch.randn(1, 4, 1100, 64, generator=g).cuda().half()\n"
        "k = torch.randn(1, 2, 1100, 64, generator=g).cuda().half(); v = torch.randn_like(k)\n"
        "u = torch.randn(1, 2, 1100, generator=g).cuda()\n"
        "o = sparsek.sparsek_attention(q, k, v, u, topk=300, window=200); torch.cuda.synchronize()\n"
        "print('kernels ran', s + float(o.float().abs().sum()))\n"
    )
    assert_sanitizer_clean(tool, code, done="kernels ran", timeout=600)
