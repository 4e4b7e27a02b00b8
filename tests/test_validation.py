"""Bad input gets a ValueError/TypeError that names the argument, the value and what was expected."""

import pytest
import torch

import sparsek


def _good(B=1, Hq=4, Hkv=2, S=8, D=8):
    return dict(
        q=torch.randn(B, Hq, S, D), k=torch.randn(B, Hkv, S, D), v=torch.randn(B, Hkv, S, D), scores=torch.randn(B, Hkv, S)
    )


def _call(topk=2, window=0, scale=None, **over):
    a = _good()
    a.update(over)
    return sparsek.sparsek_attention(a["q"], a["k"], a["v"], a["scores"], topk=topk, window=window, scale=scale)


BAD = [
    ("q rank", dict(q=torch.randn(4, 8, 8)), ValueError, r"q must be 4-D .*\(4, 8, 8\)"),
    ("k rank", dict(k=torch.randn(2, 8, 8)), ValueError, r"k must be 4-D"),
    ("v shape", dict(v=torch.randn(1, 2, 7, 8)), ValueError, r"v must have the shape of k"),
    ("k seq", dict(k=torch.randn(1, 2, 9, 8), v=torch.randn(1, 2, 9, 8)), ValueError, r"k must be \(B=1, Hkv, S=8"),
    ("head dim", dict(k=torch.randn(1, 2, 8, 4), v=torch.randn(1, 2, 8, 4)), ValueError, r"head dim of k \(4\) must equal head dim of q \(8\)"),
    ("gqa", dict(k=torch.randn(1, 3, 8, 8), v=torch.randn(1, 3, 8, 8), scores=torch.randn(1, 3, 8)), ValueError, r"Hq=4 must be a multiple of kv heads Hkv=3"),
    ("dtype mismatch", dict(k=torch.randn(1, 2, 8, 8, dtype=torch.float64)), TypeError, r"k must have q's dtype torch.float32, got torch.float64"),
    ("int q", dict(q=torch.ones(1, 4, 8, 8, dtype=torch.int32)), TypeError, r"q must be float16, bfloat16, float32 or float64, got torch.int32"),
    ("scores shape", dict(scores=torch.randn(1, 4, 8)), ValueError, r"scores must be \(B, Hkv, S\) = \(1, 2, 8\), got \(1, 4, 8\)"),
    ("scores dtype", dict(scores=torch.randn(1, 2, 8).half()), TypeError, r"scores must be torch.float32 .* got torch.float16"),
    ("scores nan", dict(scores=torch.tensor([[[0.0] * 7 + [float("nan")], [0.0] * 8]])), ValueError, r"scores must be finite, got nan at index \(0, 0, 7\)"),
    ("scores inf", dict(scores=torch.tensor([[[0.0] * 8, [float("-inf")] + [0.0] * 7]])), ValueError, r"scores must be finite, got -inf at index \(0, 1, 0\)"),
    ("empty S", dict(q=torch.randn(1, 4, 0, 8), k=torch.randn(1, 2, 0, 8), v=torch.randn(1, 2, 0, 8), scores=torch.randn(1, 2, 0)), ValueError, r"sequence length S must be >= 1, got 0"),
    ("D too large", dict(q=torch.randn(1, 4, 2, 300), k=torch.randn(1, 2, 2, 300), v=torch.randn(1, 2, 2, 300), scores=torch.randn(1, 2, 2)), ValueError, r"head dim D must be in \[1, 256\], got 300"),
    ("not a tensor", dict(v=[1, 2]), TypeError, r"v must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_tensors(name, over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        (dict(topk=0), ValueError, r"topk must be >= 1, got 0"),
        (dict(topk=2.5), TypeError, r"topk must be an int, got float 2.5"),
        (dict(topk=True), TypeError, r"topk must be an int, got bool"),
        (dict(window=-1), ValueError, r"window must be >= 0, got -1"),
        (dict(scale=0.0), ValueError, r"scale must be a finite float > 0 or None, got 0.0"),
        (dict(scale=float("nan")), ValueError, r"scale must be a finite float > 0"),
    ],
    ids=["topk0", "topk-float", "topk-bool", "window-neg", "scale0", "scale-nan"],
)
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"scores is on cuda:0 but q is on cpu"):
        _call(scores=torch.randn(1, 2, 8, device="cuda"))


def test_device_mismatch_meta():
    """Runs without a GPU: a meta tensor is another device."""
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu; all inputs must share one device"):
        _call(k=torch.randn(1, 2, 8, 8, device="meta"))


def test_selection_validates():
    with pytest.raises(ValueError, match=r"scores must be a 3-D tensor \(B, H, S\), got \(8,\)"):
        sparsek.sparsek_selection(torch.randn(8), topk=2)
    with pytest.raises(ValueError, match=r"topk must be >= 1, got 0"):
        sparsek.sparsek_selection(torch.randn(1, 1, 8), topk=0)


# ------------------------------------------------------------------------------------------------
# topk/window beyond the kernels' int32 range; selection scores of a floating dtype


@pytest.mark.parametrize("kw, msg", [
    (dict(topk=2**31), r"sparsek_attention: topk must be <= 2147483647 \(2\*\*31 - 1, the int32 range of the kernels\), got 2147483648"),
    (dict(topk=2**63), r"topk must be <= 2147483647 .*, got 9223372036854775808"),
    (dict(window=2**63 - 2), r"window must be <= 2147483647 .*, got 9223372036854775806"),
], ids=["topk-2^31", "topk-2^63", "window-2^63"])
def test_attention_topk_window_beyond_int32(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _call(**kw)


def test_attention_topk_window_at_int32_max_pass_validation():
    from sparsek._validate import INT32_MAX, check_topk_window

    check_topk_window("f", INT32_MAX, INT32_MAX)  # the largest values the kernels can hold


@pytest.mark.parametrize("scores, kw, exc, msg", [
    (torch.ones(1, 1, 8, dtype=torch.int64), {}, TypeError,
     r"f: scores must be a floating-point tensor \(float16, bfloat16, float32 or float64\), got torch.int64"),
    (torch.ones(1, 1, 8, dtype=torch.bool), {}, TypeError, r"scores must be a floating-point tensor .* got torch.bool"),
    (torch.ones(1, 1, 8, dtype=torch.complex64), {}, TypeError, r"got torch.complex64"),
    (torch.randn(8), {}, ValueError, r"f: scores must be a 3-D tensor \(B, H, S\), got \(8,\)"),
    ([1.0, 2.0], {}, ValueError, r"scores must be a 3-D tensor \(B, H, S\), got list"),
    (torch.randn(1, 1, 8), dict(topk=2**63), ValueError, r"f: topk must be <= 2147483647 .*, got 9223372036854775808"),
    (torch.randn(1, 1, 8), dict(window=2**62), ValueError, r"f: window must be <= 2147483647"),
    (torch.randn(1, 1, 8), dict(topk=1.5), TypeError, r"f: topk must be an int, got float 1.5"),
    (torch.randn(1, 1, 8), dict(window=-1), ValueError, r"f: window must be >= 0, got -1"),
    (torch.tensor([[[0.0, float("nan")]]]), {}, ValueError, r"f: scores must be finite, got nan at index \(0, 0, 1\)"),
], ids=["int64", "bool", "complex", "rank", "list", "topk-2^63", "window-2^62", "topk-float", "window-neg", "nan"])
def test_selection_validator(scores, kw, exc, msg):
    from sparsek._validate import check_selection_args

    args = dict(topk=2, window=0)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        check_selection_args("f", scores, args["topk"], args["window"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_selection_validator_accepts_float_scores(dtype):
    from sparsek._validate import check_selection_args

    check_selection_args("f", torch.randn(1, 2, 8).to(dtype), 2, 0)
