"""The case presets and their seeded inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsek import selection
from sparsek.bench import cases
from sparsek.bench.cases import CASES, Case, get_case, make_inputs


def test_presets_are_the_design_cases():
    seed = CASES["seed"]
    assert (seed.kind, seed.batch, seed.q_heads, seed.kv_heads, seed.seq_len, seed.head_dim, seed.dtype,
            seed.topk, seed.window, seed.device) == ("prefill", 16, 96, 96, 4096, 128, "float16", 512, 256, "cuda")
    for tag, s in (("16k", 16384), ("32k", 32768), ("64k", 65536), ("128k", 131072)):
        c = CASES[f"long-{tag}"]
        assert (c.batch, c.q_heads, c.kv_heads, c.seq_len, c.head_dim, c.dtype, c.topk, c.window, c.group) == (
            1, 32, 8, s, 128, "bfloat16", 2048, 512, 4)
    decode = sorted(n for n in CASES if n.startswith("decode-"))
    assert decode == sorted(f"decode-{t}-b{b}" for t in ("4k", "32k", "128k") for b in (1, 16, 64))
    d = CASES["decode-128k-b64"]
    assert (d.kind, d.batch, d.seq_len, d.q_heads, d.kv_heads, d.dtype) == ("decode", 64, 131072, 32, 8, "bfloat16")
    assert CASES["cpu-smoke"].device == CASES["cpu-smoke-decode"].device == "cpu"
    assert CASES["cpu-smoke"].kind == "prefill" and CASES["cpu-smoke-decode"].kind == "decode"
    assert len({c.seed for c in CASES.values()}) == len(CASES)
    assert set(cases.DEFAULT_CASES["cuda"]) == {"seed", "long-16k", "long-32k", "long-64k", "long-128k",
                                                "train-seed", "train-16k", "train-64k"}
    assert set(cases.DEFAULT_CASES["cpu"]) == {"cpu-smoke", "train-cpu-smoke"}


def test_cases_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CASES["seed"].batch = 2
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        Case("x", "prefill", 1, 6, 4, 16, 8, "float32", 2, 1, "cpu", 0)
    with pytest.raises(ValueError, match="kind"):
        Case("x", "backward", 1, 4, 4, 16, 8, "float32", 2, 1, "cpu", 0)
    assert CASES["long-16k"].torch_dtype == torch.bfloat16 and CASES["seed"].scale == 128**-0.5


def test_unknown_case_lists_the_valid_ones():
    with pytest.raises(KeyError) as info:
        get_case("sede")
    assert "unknown case 'sede'" in str(info.value) and "seed" in str(info.value) and "cpu-smoke" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prefill_inputs_are_seeded_and_shaped():
    c = CASES["cpu-smoke"]
    a, b = make_inputs(c), make_inputs(c)
    assert a.q.shape == (1, 4, 256, 32) and a.k.shape == a.v.shape == (1, 2, 256, 32)
    assert a.scores.shape == (1, 2, 256) and a.scores.dtype == torch.float32 and a.q.dtype == torch.float32
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name
    assert a.k_new is None
    assert c.input_bytes() == sum(t.numel() * t.element_size() for t in a.tensors().values())


def test_scores_are_realistic():
    c = CASES["cpu-smoke"]
    u = make_inputs(c).scores
    assert u.unique().numel() == u.numel()  # not all equal, no ties
    assert not bool((u.diff(dim=-1) >= 0).all()) and not bool((u.diff(dim=-1) <= 0).all())  # not sorted
    # neighbours differ by O(1), so the threshold's soft band holds keys, as with a trained scorer
    sel = selection.select(u, c.topk, c.window)
    assert int(sel.nsoft.max()) >= 2


def test_decode_inputs_hold_the_context_and_the_new_token():
    c = CASES["cpu-smoke-decode"]
    x = make_inputs(c)
    assert x.q.shape == (2, 4, 1, 32) and x.k.shape == (2, 2, 256, 32) and x.scores.shape == (2, 2, 256)
    assert x.k_new.shape == x.v_new.shape == (2, 2, 1, 32) and x.score_new.shape == (2, 2, 1)
    assert c.input_bytes() == sum(t.numel() * t.element_size() for t in x.tensors().values())


def test_cuda_inputs_without_cuda_fail_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        make_inputs(CASES["seed"])
