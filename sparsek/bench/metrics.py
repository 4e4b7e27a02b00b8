"""FLOP and byte models, derived rates, device peaks and the error check.

Every implementation declares the attention *pattern* it computes; the pattern alone fixes the
work counted for it (and, in impls/base.py, the reference it is checked against):

    dense-causal    every causal pair:           4·B·Hq·D · S(S+1)/2
    sparsek         window + top-k per query:    4·B·Hq·D · sum_i [min(K, n_i) + min(W, i+1)],
                                                 n_i = max(0, i - W + 1) candidates
    window          sliding window of K+W keys:  4·B·Hq·D · sum_i min(i+1, K+W)
    decode-full     new token over all S+1 keys: 4·B·Hq·D · (S+1)
    decode-sparsek  new token over its K+W keys: 4·B·Hq·D · min(S+1, K+W)

(4 = two matmuls, QK^T and PV, at 2 FLOPs per multiply-add.) "Effective" rates count the work
of the pattern; "dense-equivalent" rates count the dense causal (or full-context decode) work
the pattern replaces, which is what a user compares against but exceeds the hardware peak
whenever sparsity pays off. Decode bytes are the K/V bytes the pattern reads.

A training step (``train`` cases: forward + backward) is counted by the usual convention
(FlashAttention's): the backward is five matmuls per attended pair instead of the forward's
two (QK^T recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q), so backward = 2.5x
forward and step = 3.5x forward = 14·B·Hq·D per attended pair. Elementwise work (softmax,
SparseK's gates and score gradient) is not counted, as in the forward.
"""

from __future__ import annotations

import math

import torch

from .cases import Case

PATTERNS = ("dense-causal", "sparsek", "window", "decode-full", "decode-sparsek")
PREFILL_PATTERNS = ("dense-causal", "sparsek", "window")

# Error tolerance per dtype (torch.allclose semantics: |out - ref| <= atol + rtol·|ref|), against
# a float32 reference. float16 is the original "max diff < 2e-3" (docs/tiers.md); bfloat16 keeps
# 8 mantissa bits, 8x fewer than float16, so about 2x its rounding of O(1) outputs.
TOLERANCES = {
    "float16": {"atol": 2e-3, "rtol": 2e-3},
    "bfloat16": {"atol": 1.6e-2, "rtol": 1.6e-2},
    "float32": {"atol": 1e-4, "rtol": 1e-4},
    "float64": {"atol": 1e-9, "rtol": 1e-9},
}

# Peak probes (docs/tiers.md): one bf16 matmul and one device-to-device copy on the same GPU in
# the same run. On the CPU smaller probes in float32 (bf16 matmul is not a CPU fast path).
PEAK_PROBES = {
    "cuda": {"matmul_n": 8192, "matmul_dtype": "bfloat16", "copy_bytes": 2 << 30},
    "cpu": {"matmul_n": 1024, "matmul_dtype": "float32", "copy_bytes": 64 << 20},
}


def _tri(n: int, cap: int) -> int:
    """sum_{m=1..n} min(cap, m), in closed form."""
    if n <= 0 or cap <= 0:
        return 0
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def attended_pairs(case: Case, pattern: str) -> int:
    """(query, key) pairs per (batch, query head) that the pattern computes."""
    S, K, W = case.seq_len, case.topk, case.window
    if pattern == "dense-causal":
        return S * (S + 1) // 2
    if pattern == "sparsek":
        return _tri(max(0, S - W), K) + _tri(S, W)
    if pattern == "window":
        return _tri(S, K + W)
    if pattern == "decode-full":
        return S + 1
    if pattern == "decode-sparsek":
        return min(S + 1, K + W)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


# FLOPs per attended (query, key) pair, per query head and head-dim element (module docstring).
FORWARD_FLOPS_PER_PAIR = 4  # QK^T and PV
BACKWARD_FLOPS_PER_PAIR = 10  # 2.5x the forward: five matmuls instead of two
STEP_FLOPS_PER_PAIR = FORWARD_FLOPS_PER_PAIR + BACKWARD_FLOPS_PER_PAIR  # 3.5x the forward
STEP_FLOP_CONVENTION = "step = forward 4·D + backward 10·D (2.5x the forward) per attended pair and query head"


def flops_per_pair(case: Case) -> int:
    """FLOPs per attended pair, head and head-dim element of the case's measured work."""
    return STEP_FLOPS_PER_PAIR if case.kind == "train" else FORWARD_FLOPS_PER_PAIR


def flops(case: Case, pattern: str) -> int:
    """FLOPs of the case's measured work: the forward, or the training step for train cases."""
    return flops_per_pair(case) * case.batch * case.q_heads * case.head_dim * attended_pairs(case, pattern)


def dense_equivalent_flops(case: Case) -> int:
    return flops(case, "decode-full" if case.kind == "decode" else "dense-causal")


def kv_bytes(case: Case, pattern: str) -> int | None:
    """K and V bytes a decode step reads (None for prefill patterns, which are compute-bound)."""
    if pattern not in ("decode-full", "decode-sparsek"):
        return None
    keys = attended_pairs(case, pattern)
    elem = torch.empty((), dtype=case.torch_dtype).element_size()
    return 2 * case.batch * case.kv_heads * keys * case.head_dim * elem


def derive(case: Case, pattern: str, seconds: float, peaks: dict | None) -> dict:
    """us/iter, us/head, TFLOP/s (effective, dense-equivalent), GB/s, % of peak, implausible flags.

    us/head divides by the query heads only (the original targets' convention, docs/tiers.md:
    366.72 us / 96 heads = 3.820).
    """
    eff = flops(case, pattern)
    dense = dense_equivalent_flops(case)
    nbytes = kv_bytes(case, pattern)
    out = {
        "us_per_iter": seconds * 1e6,
        "us_per_head": seconds * 1e6 / case.q_heads,
        "flops_effective": eff,
        "flops_dense_equivalent": dense,
        "tflops_effective": eff / seconds / 1e12,
        "tflops_dense_equivalent": dense / seconds / 1e12,
        "bytes": nbytes,
        "gbps": nbytes / seconds / 1e9 if nbytes is not None else None,
        "pct_peak_tflops": None,
        "pct_peak_gbps": None,
        "implausible": [],
    }
    peak_tflops = (peaks or {}).get("matmul", {}).get("tflops")
    peak_gbps = (peaks or {}).get("copy", {}).get("gbps")
    if peak_tflops:
        out["pct_peak_tflops"] = 100.0 * out["tflops_effective"] / peak_tflops
        if out["tflops_effective"] > peak_tflops:
            out["implausible"].append(
                f"effective {out['tflops_effective']:.0f} TFLOP/s exceeds the measured matmul peak {peak_tflops:.0f}")
    if peak_gbps and out["gbps"] is not None:
        out["pct_peak_gbps"] = 100.0 * out["gbps"] / peak_gbps
        if out["gbps"] > peak_gbps:
            out["implausible"].append(f"{out['gbps']:.0f} GB/s exceeds the measured copy peak {peak_gbps:.0f}")
    if case.kind == "train":
        out["ms_per_step"] = seconds * 1e3
        out["flop_convention"] = STEP_FLOP_CONVENTION
    return out


def error_stats(out: torch.Tensor, ref: torch.Tensor, dtype: str, atol_scale: float = 1.0) -> dict:
    """max abs error, max error relative to the reference's largest magnitude, and the verdict.

    out and ref have the same shape (e.g. (B, Hq, R, D) for R checked rows); ref is float32 or
    float64. ``max_rel`` is max|out - ref| / max|ref|, a scale-free figure that does not blow up
    on entries that happen to be near zero. ``atol_scale`` multiplies the dtype's atol (see
    grad_error_stats).
    """
    tol = TOLERANCES[dtype]
    atol = tol["atol"] * atol_scale
    o = out.to(ref.dtype)
    diff = (o - ref).abs()
    finite = bool(torch.isfinite(o).all())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    passed = finite and bool(torch.all(diff <= atol + tol["rtol"] * ref.abs()))
    return {
        "max_abs": max_abs if finite else math.inf,
        "max_rel": (max_abs / scale if scale > 0 else max_abs) if finite else math.inf,
        "atol": atol,
        "rtol": tol["rtol"],
        "passed": passed,
        "finite": finite,
    }


def grad_error_stats(grads: dict[str, torch.Tensor], refs: dict[str, torch.Tensor], dtype: str) -> dict:
    """error_stats per gradient (name -> same-shaped tensors), and the verdict over all of them.

    A gradient is a sum over many queries or keys and has no natural O(1) scale (it scales with
    the upstream gradient), so the dtype's atol is multiplied by max(1, max|ref|) of that
    gradient: never looser than the forward's check on O(1) values, and scale-free beyond.
    Top-level max_abs / max_rel / passed / finite summarise the worst gradient, so readers of
    forward records (tiers, asv, report) read a training record the same way.
    """
    per = {}
    for name, got in grads.items():
        ref = refs[name]
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        per[name] = error_stats(got, ref, dtype, atol_scale=max(1.0, scale))
    return {
        "max_abs": max((e["max_abs"] for e in per.values()), default=0.0),
        "max_rel": max((e["max_rel"] for e in per.values()), default=0.0),
        "atol": TOLERANCES[dtype]["atol"],
        "rtol": TOLERANCES[dtype]["rtol"],
        "passed": all(e["passed"] for e in per.values()),
        "finite": all(e["finite"] for e in per.values()),
        "grads": per,
    }


def _matmul_peak(dev: torch.device, n: int, dtype: str, kwargs: dict) -> dict:
    from . import timing

    a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
    c = torch.empty_like(a)
    m = timing.measure(lambda: torch.matmul(a, b, out=c), device=dev, **kwargs)
    return {"n": n, "dtype": dtype, "median_s": m.median, "rel_iqr": m.rel_iqr, "tflops": 2 * n**3 / m.median / 1e12}


def _copy_peak(dev: torch.device, nbytes: int, kwargs: dict) -> dict:
    from . import timing

    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    m = timing.measure(lambda: dst.copy_(src), device=dev, **kwargs)
    return {"bytes": nbytes, "median_s": m.median, "rel_iqr": m.rel_iqr, "gbps": 2 * nbytes / m.median / 1e9}


def measure_peaks(device, *, quick: bool = False, timing_kwargs: dict | None = None) -> dict:
    """Matmul TFLOP/s and copy GB/s (read + write bytes) measured now, on ``device``, warm."""
    dev = torch.device(device)
    probe = PEAK_PROBES[dev.type]
    kwargs = {"cold": False, "target_rel_iqr": 0.02, "min_samples": 5 if quick else 10,
              "max_time_s": 0.5 if quick else 5.0, "warmup_s": 0.05 if quick else 0.2}
    kwargs.update(timing_kwargs or {})
    nbytes = probe["copy_bytes"]
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        nbytes = min(nbytes, free // 4)  # two buffers, with room to spare
    return {"device": str(dev), "matmul": _matmul_peak(dev, probe["matmul_n"], probe["matmul_dtype"], kwargs),
            "copy": _copy_peak(dev, nbytes, kwargs)}
