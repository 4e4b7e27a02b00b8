"""CUDA backward kernels against the float64 reference (run on the GPU machine; skipped without a GPU).

Gradients of all four inputs (q, k, v, scores) through the public op, compared with
``reference.backward_dense`` in float64 on the same inputs; the tolerances per dtype are in
tolerances.py (BWD_NORM, BWD_MAX). Configurations cover ties and constant scores, window 0,
topk >= every prefix, GQA 1 to 16, S not a multiple of the block, D 64 and 128, fp16 and bf16,
B > 1. The deterministic mode must give bitwise-identical gradients on repeated calls, and the
step must not allocate anything of size S x (topk + window).
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings

import pytest
import torch

import sparsek
from conftest import assert_sanitizer_clean, cuda_kernels
from sparsek import _cuda
from sparsek import reference as ref
from sparsek import selection as sel_mod
from tolerances import BWD_MAX, BWD_NORM

pytestmark = pytest.mark.gpu

NAMES = ("dq", "dk", "dv", "dscores")


@pytest.fixture(autouse=True)
def _backward_kernels_on(monkeypatch):
    """These tests are what decides the default: they always run the kernels (children too)."""
    monkeypatch.setenv("SPARSEK_CUDA_BACKWARD", "1")


@contextlib.contextmanager
def _deterministic(flag):
    """torch.use_deterministic_algorithms(flag) inside the block, the previous setting after it."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _inputs(seed, B, Hq, Hkv, S, D, dtype, score_scale=1.0, ties=False, constant=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=gen).to("cuda", dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to("cuda", dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to("cuda", dtype)
    walk = torch.randn(B, Hkv, S, generator=gen).cumsum(-1) * 0.05
    u = (walk + torch.randn(B, Hkv, S, generator=gen)) * score_scale
    if ties:
        u = torch.round(u * 4) / 4
    if constant:
        u = torch.zeros_like(u)
    grad = torch.randn(B, Hq, S, D, generator=gen).to("cuda", dtype)
    return q, k, v, u.float().cuda(), grad


def _kernel_grads(q, k, v, u, grad, topk, window):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, u)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference warns
        out = sparsek.sparsek_attention(*leaves, topk=topk, window=window)
    return torch.autograd.grad(out, leaves, grad)


class Reference(tuple):
    """The float64 reference gradients (dq, dk, dv, dscores) of the output the forward stored.

    The backward takes D_i = dO_i . out_i from the output as the forward stored it, rounded to
    the input dtype (as FlashAttention does), so the reference does the same: it is the exact
    backward given that output. Against the exact math of an unrounded output the gradients
    differ further by the output's rounding, which cancellation can amplify: in one fp16 sweep
    configuration (constant scores, topk 1, window 1) dq then differed by 2.8e-3 (norm), all of
    it from D (an emulation of the kernel on the CPU, float64 with out and dS rounded to fp16,
    reproduced the kernel's 2.77e-3 to three digits; given the rounded output the same emulation
    is 2.4e-4 off). ``exact`` keeps the exact-math gradients for the failure message.

    ``zero_atol``: for each gradient, how far from 0 the kernel may be where the reference is
    exactly 0. dS = P (dP - D) is exactly 0 when dP = D; the kernel forms dP - D in float32 from
    products of dtype values, so it can leave a residue of the order eps(dtype) |dO| |out|. dq and
    dk carry that times scale |k| or scale |q| (summed over at most Hq/Hkv x S rows for dk and
    dscores); dv has no such term and must be exactly 0."""

    zero_atol: dict
    exact: tuple


def _reference_grads(q, k, v, u, grad, topk, window):
    scale = q.shape[-1] ** -0.5
    sel = sel_mod.select(u, topk, window)
    q64, k64, v64, u64 = q.double(), k.double(), v.double(), u.double()
    out, lse = ref.attention_dense(q64, k64, v64, u64, topk, window, scale, sel)
    stored = out.to(q.dtype).double()  # what the forward hands the backward
    want = Reference(ref.backward_dense(grad.double(), q64, k64, v64, u64, stored, lse, sel, scale))
    want.exact = ref.backward_dense(grad.double(), q64, k64, v64, u64, out, lse, sel, scale)
    c = torch.finfo(q.dtype).eps * (grad.double().norm(dim=-1) * out.norm(dim=-1)).max().item()
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    want.zero_atol = {
        "dq": c * scale * k64.norm(dim=-1).max().item(),
        "dk": c * scale * q64.norm(dim=-1).max().item() * rows,
        "dv": 0.0,
        "dscores": c * rows,
    }
    return want


def _check(got, want, dtype, where=""):
    for name, x, y in zip(NAMES, got, want):
        assert x.shape == y.shape, f"{where}{name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        x = x.double()
        assert torch.isfinite(x).all(), f"{where}{name}: non-finite gradient elements"
        ref_norm, ref_max = y.norm().item(), y.abs().max().item()
        if ref_max == 0.0:
            atol = getattr(want, "zero_atol", {}).get(name, 0.0)
            assert x.abs().max().item() <= atol, (
                f"{where}{name}: reference is 0, got {x.abs().max().item():.3g} (limit {atol:.3g}, rounding of D)")
            continue
        norm_err = (x - y).norm().item() / ref_norm
        max_err = (x - y).abs().max().item() / ref_max
        exact = getattr(want, "exact", None)
        vs_exact = "" if exact is None else (
            f"; against the exact math of the unrounded output {(x - exact[NAMES.index(name)]).norm().item() / ref_norm:.3g}")
        assert norm_err <= BWD_NORM[dtype] and max_err <= BWD_MAX[dtype], (
            f"{where}{name}: relative error {norm_err:.3g} (limit {BWD_NORM[dtype]}), "
            f"largest element error {max_err:.3g} of the largest element (limit {BWD_MAX[dtype]}){vs_exact}"
        )


SHAPES = [  # B, Hq, Hkv, S, D, topk, window
    (1, 4, 1, 200, 64, 16, 8),  # GQA 4, S not a multiple of the block
    (2, 8, 1, 333, 128, 32, 0),  # GQA 8, window 0, B > 1
    (1, 2, 2, 100, 64, 500, 4),  # topk > S: every candidate selected, no soft keys
    (1, 4, 4, 257, 128, 20, 300),  # window > S
    (2, 16, 4, 520, 128, 64, 33),  # GQA 4, odd window
    (1, 1, 1, 1, 64, 1, 0),  # a single token
    (1, 16, 1, 300, 128, 40, 16),  # GQA 16
    (1, 8, 8, 640, 64, 100, 64),  # GQA 1
]


# The warpgroup-MMA kernels whose whole path the sweep, the long sequence, determinism and the
# sanitizers run (indirect parameter): v2.9 (the default), v2.12, v2.12b, v2.13 and v2.14 (whose
# deterministic modes are v2.9's).
@pytest.fixture
def wg_kernel(request, monkeypatch):
    """SPARSEK_BWD_KERNEL for the test and any child process it starts."""
    monkeypatch.setenv("SPARSEK_BWD_KERNEL", request.param)
    return request.param


WG_KERNELS = pytest.mark.parametrize(
    "wg_kernel", ["2", "3", "4", "5", "6"], ids=["v2.9", "v2.12", "v2.12b", "v2.13", "v2.14"], indirect=True
)


@pytest.mark.parametrize(
    "kernel", ["2", "3", "4", "5", "6", "1"], ids=["wgmma", "wgmma-v2.12", "wgmma-v2.12b", "wgmma-v2.13", "wgmma-v2.14", "mma-sync"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-S{}-D{}-K{}-W{}".format(*s))
def test_gradients_match_reference(shape, dtype, kernel, monkeypatch):
    """Every backward kernel: the warpgroup-MMA one (the default, v2.9), v2.12, v2.12b, v2.13, v2.14 and the mma.sync one."""
    monkeypatch.setenv("SPARSEK_BWD_KERNEL", kernel)
    cuda_kernels()
    B, Hq, Hkv, S, D, topk, window = shape
    q, k, v, u, grad = _inputs(sum(shape), B, Hq, Hkv, S, D, dtype)
    _check(_kernel_grads(q, k, v, u, grad, topk, window), _reference_grads(q, k, v, u, grad, topk, window), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_constant_scores(dtype):
    """Every candidate is soft (what a zero-initialised scorer gives): the tau term is everywhere."""
    cuda_kernels()
    q, k, v, u, grad = _inputs(11, 1, 8, 2, 400, 128, dtype, constant=True)
    _check(_kernel_grads(q, k, v, u, grad, 30, 10), _reference_grads(q, k, v, u, grad, 30, 10), dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_accumulator_chunks(deterministic, monkeypatch):
    """With an accumulator budget of one byte every (batch, kv head) pair runs as its own launch
    (bh_offset > 0, the accumulators reused): the gradients still match, bitwise so in the
    deterministic mode, where the chunking must not change a single sum."""
    cuda_kernels()
    q, k, v, u, grad = _inputs(17, 2, 6, 3, 333, 128, torch.bfloat16)
    with _deterministic(deterministic):
        whole = _kernel_grads(q, k, v, u, grad, 40, 24)
        monkeypatch.setattr(_cuda, "BACKWARD_ACC_BUDGET", 1)
        chunked = _kernel_grads(q, k, v, u, grad, 40, 24)
    _check(chunked, _reference_grads(q, k, v, u, grad, 40, 24), torch.bfloat16, "one pair per launch: ")
    if deterministic:
        for name, a, b in zip(NAMES, whole, chunked):
            assert torch.equal(a, b), f"{name}: chunked launches changed a deterministic gradient"


@pytest.mark.parametrize("streams", ["1", "2", "3", "8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_accumulator_streams(streams, dtype, monkeypatch):
    """One pair per chunk, the chunks taking turns over 1, 2, 3 or 8 streams (each with its own
    accumulators, converted and zeroed for the stream's next chunk): every pair's dk and dv, and
    everything the current stream computes from them at once, match the reference."""
    cuda_kernels()
    monkeypatch.setenv("SPARSEK_BWD_STREAMS", streams)
    monkeypatch.setenv("SPARSEK_BWD_ACC_MIB", "1")  # < one pair of 2 x 1000 x 128 x 4 B: one pair per chunk
    q, k, v, u, grad = _inputs(23 + int(streams), 3, 8, 4, 1000, 128, dtype)
    got = _kernel_grads(q, k, v, u, grad, 70, 33)
    got = [g.clone() for g in got]  # read on the current stream right after the op returns
    _check(got, _reference_grads(q, k, v, u, grad, 70, 33), dtype, f"{streams} streams: ")


@WG_KERNELS
def test_random_sweep(wg_kernel):
    """At least 200 seeded random configurations: gradients of all four inputs match."""
    cuda_kernels()
    rng = random.Random(int(os.environ.get("SPARSEK_SWEEP_SEED", "20261207")))
    cases, failures = int(os.environ.get("SPARSEK_BWD_SWEEP_CASES", "210")), []
    for case in range(cases):
        Hkv = rng.choice([1, 2, 3])
        group = rng.choice([1, 2, 4, 8, 16])
        S = rng.randint(1, 600)
        D = rng.choice([64, 128])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        topk = rng.choice([1, 2, 7, 31, 64, 129, 900])
        window = rng.choice([0, 1, 5, 64, 200, 1000])
        score_scale = rng.choice([1e-3, 0.1, 1.0, 30.0])
        ties = rng.random() < 0.3
        constant = rng.random() < 0.05
        B = rng.choice([1, 2])
        where = (f"case {case}: B={B} Hq={Hkv * group} Hkv={Hkv} S={S} D={D} {dtype} topk={topk} window={window} "
                 f"score_scale={score_scale} ties={ties} constant={constant}: ")
        q, k, v, u, grad = _inputs(case, B, Hkv * group, Hkv, S, D, dtype, score_scale, ties, constant)
        try:  # every configuration runs: the report lists all that fail, not only the first
            _check(_kernel_grads(q, k, v, u, grad, topk, window), _reference_grads(q, k, v, u, grad, topk, window),
                   dtype, where)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    assert not failures, f"{len(failures)} of {cases} configurations fail:\n" + "\n".join(failures)


@WG_KERNELS
def test_long_sequence_against_float32_reference(wg_kernel):
    """S = 65536 (the long-64k selection, fewer heads): every gradient element against the
    blocked reference in float32 on the GPU."""
    cuda_kernels()
    S, topk, window = 65536, 2048, 512
    q, k, v, u, grad = _inputs(64, 1, 8, 2, S, 128, torch.bfloat16)
    got = _kernel_grads(q, k, v, u, grad, topk, window)
    scale = 128**-0.5
    sel = sel_mod.select(u, topk, window)
    qf, kf, vf = q.float(), k.float(), v.float()
    out, lse = ref.attention_blocked(qf, kf, vf, u, topk, window, scale, sel)
    # D from the output as the forward stored it (bf16), as the kernel takes it; see Reference.
    want = ref.backward_blocked(grad.float(), qf, kf, vf, u, out.bfloat16().float(), lse, sel, scale)
    _check(got, [w.double() for w in want], torch.bfloat16, "S=65536: ")


@WG_KERNELS
def test_deterministic_mode_is_bitwise_repeatable(wg_kernel):
    cuda_kernels()
    q, k, v, u, grad = _inputs(5, 2, 8, 2, 1000, 128, torch.bfloat16)
    with _deterministic(True):
        first = _kernel_grads(q, k, v, u, grad, 64, 32)
        second = _kernel_grads(q, k, v, u, grad, 64, 32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic calls"
    _check(first, _reference_grads(q, k, v, u, grad, 64, 32), torch.bfloat16, "deterministic: ")


def test_training_step_allocates_nothing_of_size_s_times_budget():
    """Peak memory of forward + backward beyond the inputs stays under one float32 tensor of
    S x (topk + window) per kv head (the reference's blocked path would need far more)."""
    cuda_kernels()
    B, Hq, Hkv, S, D, topk, window = 1, 32, 8, 16384, 128, 2048, 512
    q, k, v, u, grad = _inputs(9, B, Hq, Hkv, S, D, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q, k, v, u)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = sparsek.sparsek_attention(*leaves, topk=topk, window=window)
    grads = torch.autograd.grad(out, leaves, grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    limit = Hkv * S * (topk + window) * 4
    assert extra < limit, f"peak extra memory {extra / 2**20:.0f} MiB >= {limit / 2**20:.0f} MiB"
    assert all(torch.isfinite(g).all() for g in grads)


@WG_KERNELS
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool, wg_kernel):
    cuda_kernels()  # build once outside the sanitizer
    code = (
        "import torch, warnings, sparsek\n"
        "from sparsek import _cuda\n"
        "_cuda.BACKWARD_ACC_BUDGET = 1  # one pair per chunk: both accumulator streams run\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(1, 8, 203, 64, generator=g).cuda().bfloat16().requires_grad_()\n"
        "k = torch.randn(1, 2, 203, 64, generator=g).cuda().bfloat16().requires_grad_()\n"
        "v = torch.randn(1, 2, 203, 64, generator=g).cuda().bfloat16().requires_grad_()\n"
        "u = torch.randn(1, 2, 203, generator=g).cuda().requires_grad_()\n"
        "o = sparsek.sparsek_attention(q, k, v, u, topk=17, window=9)\n"
        "gs = torch.autograd.grad(o, (q, k, v, u), torch.randn_like(o))\n"
        "torch.cuda.synchronize()\n"
        "print('backward ran', sum(float(x.float().abs().sum()) for x in gs))\n"
    )
    assert_sanitizer_clean(tool, code, done="backward ran")
