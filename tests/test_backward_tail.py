"""The CPU-side pieces of the CUDA backward, against the reference (no GPU needed).

The kernel returns the score gradient's per-key sums and per-row sums of gamma; sparsek/_cuda.py
finishes it with the tau term over soft-set ranges (selection.soft_ranges), sums per-block terms
in a fixed order when deterministic, and picks fixed-point scales. Each piece is checked here on
fresh random inputs, ties and constant scores included.
"""

import pytest
import torch

from conftest import attention_inputs
from sparsek import _cuda
from sparsek import reference as ref
from sparsek import selection as sel_mod

CONFIGS = [  # B, Hq, Hkv, S, topk, window, score_scale, ties
    (1, 2, 1, 40, 5, 3, 1.0, False),
    (2, 4, 2, 67, 9, 0, 0.3, False),
    (1, 4, 1, 50, 6, 7, 1.0, True),
    (2, 2, 2, 33, 40, 2, 1.0, False),  # topk > every prefix: no soft keys
    (1, 2, 1, 45, 4, 5, 0.0, False),  # constant scores: every candidate soft
    (1, 8, 2, 80, 12, 16, 3.0, True),
]


def _id(c):
    return "B{}-Hq{}-Hkv{}-S{}-K{}-W{}-u{}{}".format(*c[:7], "-ties" if c[7] else "")


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_soft_ranges_match_the_soft_mask(config):
    B, Hq, Hkv, S, topk, window, score_scale, ties = config
    _, _, _, u = attention_inputs(B, Hq, Hkv, S, 8, dtype=torch.float32, score_scale=score_scale, ties=ties)
    sel = sel_mod.select(u, topk, window)
    lo, hi, nsoft = sel_mod.soft_ranges(u, sel.tau, window)
    mask = sel_mod.soft_mask(sel, u)  # (B, Hkv, S queries, S keys)
    i = torch.arange(S).view(1, 1, S, 1)
    assert torch.equal(mask, (i >= lo.unsqueeze(2)) & (i < hi.unsqueeze(2)))
    assert torch.equal(nsoft, mask.sum(-1))


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_per_key_sums_and_tau_term_give_the_reference_score_gradient(config):
    """du = (sum over rows of gamma at soft selected keys) - tau_term(per-row sums): exactly the
    split the kernel and _cuda.backward make, rebuilt from the dense reference's pieces."""
    B, Hq, Hkv, S, topk, window, score_scale, ties = config
    q, k, v, u = attention_inputs(B, Hq, Hkv, S, 8, dtype=torch.float64, score_scale=score_scale, ties=ties)
    scale = 8**-0.5
    sel = sel_mod.select(u, topk, window)
    out, lse = ref.attention_dense(q, k, v, u, topk, window, scale, sel)
    grad = torch.randn_like(out)
    want = ref.backward_dense(grad, q, k, v, u, out, lse, sel, scale)[3]

    kx, vx = ref._expand_heads(k, Hq), ref._expand_heads(v, Hq)
    g = ref._expand_heads(sel_mod.gates(sel, u), Hq)
    e = torch.where(g > 0, torch.exp(scale * q @ kx.transpose(-1, -2) - lse.unsqueeze(-1)), torch.zeros_like(g))
    gamma = e * (grad @ vx.transpose(-1, -2) - (grad * out).sum(-1, keepdim=True))
    active = ref._expand_heads(sel_mod.soft_mask(sel, u) & sel_mod.selected_mask(sel), Hq)
    gamma = torch.where(active, gamma, torch.zeros_like(gamma))
    per_key = ref._sum_groups(gamma.sum(-2), Hkv)
    got = per_key - _cuda.tau_term(gamma.sum(-1), u, sel.tau, window, Hkv)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_list_places_sum_per_key_in_a_fixed_order():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, S, n_blocks, cap = 2, 3, 50, 6, 9
    count = torch.randint(0, cap + 1, (B, Hkv, n_blocks), generator=gen, dtype=torch.int32)
    keys = torch.randint(0, S, (B, Hkv, n_blocks, cap), generator=gen, dtype=torch.int32)
    part = torch.randn(B * Hkv, n_blocks, cap, generator=gen)
    valid = torch.arange(cap) < count.unsqueeze(-1)
    part.view(B, Hkv, n_blocks, cap)[~valid] = 0.0  # the kernel leaves unused places at zero
    keys[~valid] = -7  # and never writes the list beyond count
    want = torch.zeros(B, Hkv, S)
    for b in range(B):
        for h in range(Hkv):
            for blk in range(n_blocks):
                for p in range(int(count[b, h, blk])):
                    want[b, h, keys[b, h, blk, p]] += part[b * Hkv + h, blk, p]
    torch.testing.assert_close(_cuda._sum_list_places(part, keys, count, S), want)


def test_fixed_point_scales_bound_every_sum():
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, S, D = 1, 4, 2, 64, 16
    q = torch.randn(B, Hq, S, D, generator=gen).bfloat16()
    v = torch.randn(B, Hkv, S, D, generator=gen).bfloat16()
    grad = (torch.randn(B, Hq, S, D, generator=gen) * 1e-3).bfloat16()
    scales = _cuda._fixed_point_scales(grad, q, v, Hq // Hkv, S)
    assert scales.dtype == torch.float64 and scales.shape == (2,)
    # powers of two, and the bounds they encode are at least the crude bounds of any sum
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    rows = Hq // Hkv * S
    crude_v = rows * grad.float().abs().max().double()
    assert float(crude_v * scales[1]) <= 2.0**62
    grad[0, 0, 0, 0] = float("inf")
    assert torch.isnan(_cuda._fixed_point_scales(grad, q, v, Hq // Hkv, S)).all()


def test_backward_kernels_switch(monkeypatch):
    monkeypatch.setenv("SPARSEK_CUDA_BACKWARD", "1")
    assert _cuda.backward_reason() is None
    monkeypatch.setenv("SPARSEK_CUDA_BACKWARD", "0")
    assert _cuda.backward_reason().startswith("SPARSEK_CUDA_BACKWARD=0")
    monkeypatch.delenv("SPARSEK_CUDA_BACKWARD")
    assert _cuda.backward_reason() is None  # on by default


@pytest.mark.parametrize(
    "shape, deterministic, mib",
    [
        ((1, 8, 16384, 128), False, 64),  # long-16k: 128 MiB for all pairs, so two launches
        ((1, 8, 65536, 128), False, 256),  # long-64k: 512 MiB, half is the ceiling
        ((1, 8, 32768, 128), False, 128),  # half
        ((1, 8, 32768, 128), True, 256),  # int64 accumulators: twice the bytes
        ((16, 96, 4096, 128), False, 256),  # many pairs: the ceiling
        ((1, 1, 10, 64), False, 64),  # tiny: the floor (one launch)
    ],
)
def test_accumulator_budget_one_stream(shape, deterministic, mib, monkeypatch):
    """One stream (or the launch geometry not given): half of what every pair needs, within
    [64 MiB, 256 MiB], or exactly what SPARSEK_BWD_ACC_MIB says."""
    monkeypatch.delenv("SPARSEK_BWD_ACC_MIB", raising=False)
    monkeypatch.setenv("SPARSEK_BWD_STREAMS", "1")
    k = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    assert _cuda.accumulator_budget(k, deterministic, block_q=32, sms=132) == mib << 20
    monkeypatch.delenv("SPARSEK_BWD_STREAMS")
    assert _cuda.accumulator_budget(k, deterministic) == mib << 20  # no geometry: the same rule
    monkeypatch.setenv("SPARSEK_BWD_ACC_MIB", "7")
    assert _cuda.accumulator_budget(k, deterministic) == 7 << 20
    monkeypatch.delenv("SPARSEK_BWD_ACC_MIB")
    monkeypatch.setattr(_cuda, "BACKWARD_ACC_BUDGET", 1)  # the ceiling wins (one pair per launch)
    assert _cuda.accumulator_budget(k, deterministic) == 1


@pytest.mark.parametrize(
    "shape, block_q, deterministic, mib",
    [
        ((16, 96, 4096, 128), 128, False, 16),  # seed: 32 blocks per 4 MiB pair, 4 pairs cover 132 SMs
        ((1, 8, 16384, 128), 32, False, 16),  # long-16k: 512 blocks per pair, one pair of 16 MiB
        ((1, 8, 65536, 128), 32, False, 64),  # long-64k: one pair of 64 MiB
        ((1, 2, 131072, 128), 32, False, 128),  # one pair of 128 MiB
        ((1, 8, 4096, 64), 64, False, 4),  # 64 blocks per 2 MiB pair: 2 pairs
        ((16, 96, 4096, 128), 128, True, 256),  # deterministic: one stream, the ceiling
    ],
)
def test_accumulator_budget_streams(shape, block_q, deterministic, mib, monkeypatch):
    """Several streams: the fewest pairs whose blocks give each of 132 SMs one (at least one pair)."""
    monkeypatch.delenv("SPARSEK_BWD_ACC_MIB", raising=False)
    monkeypatch.delenv("SPARSEK_BWD_STREAMS", raising=False)
    k = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    assert _cuda.accumulator_budget(k, deterministic, block_q=block_q, sms=132) == mib << 20


@pytest.mark.parametrize("deterministic, streams", [(False, 2), (True, 1)])
def test_backward_streams(deterministic, streams, monkeypatch):
    """Two streams unless deterministic; SPARSEK_BWD_STREAMS fixes the count except then."""
    monkeypatch.delenv("SPARSEK_BWD_STREAMS", raising=False)
    k = torch.empty(16, 96, 4096, 128, dtype=torch.bfloat16, device="meta")
    assert _cuda.backward_streams(k, deterministic) == streams
    monkeypatch.setenv("SPARSEK_BWD_STREAMS", "5")
    assert _cuda.backward_streams(k, deterministic) == (1 if deterministic else 5)


@pytest.mark.parametrize("value", ["0", "9", "-1", "two", ""])
def test_backward_streams_rejects_bad_override(value, monkeypatch):
    monkeypatch.setenv("SPARSEK_BWD_STREAMS", value)
    k = torch.empty(1, 1, 8, 64, device="meta")
    with pytest.raises(ValueError, match=r"SPARSEK_BWD_STREAMS must be a whole number of streams in \[1, 8\], got"):
        _cuda.backward_streams(k)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "lots", ""])
def test_accumulator_budget_rejects_bad_override(value, monkeypatch):
    monkeypatch.setenv("SPARSEK_BWD_ACC_MIB", value)
    k = torch.empty(1, 1, 10, 64, device="meta")
    with pytest.raises(ValueError, match="SPARSEK_BWD_ACC_MIB must be a positive whole number of MiB, got"):
        _cuda.accumulator_budget(k)


def test_backward_kernel_choice(monkeypatch):
    monkeypatch.delenv("SPARSEK_BWD_KERNEL", raising=False)
    assert _cuda.backward_kernel() == 2  # the default
    for value in ("1", "2", "3", "4", "5", "6"):
        monkeypatch.setenv("SPARSEK_BWD_KERNEL", value)
        assert _cuda.backward_kernel() == int(value)
    monkeypatch.setenv("SPARSEK_BWD_KERNEL", "7")
    with pytest.raises(ValueError, match=r"SPARSEK_BWD_KERNEL must be 1, 2, 3, 4, 5 or 6, got '7'"):
        _cuda.backward_kernel()
