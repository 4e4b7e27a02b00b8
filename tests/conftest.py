"""Shared test helpers: seeded inputs named by their shape, and the GPU marker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_SHORT = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def shape_id(B, Hq, Hkv, S, D, dtype=torch.float64, prefix="sparsek") -> str:
    """Test id like 'sparsek-f64-B2-Hq8-Hkv2-S512-D64'."""
    return f"{prefix}-{_SHORT[dtype]}-B{B}-Hq{Hq}-Hkv{Hkv}-S{S}-D{D}"


def seed_for(*parts) -> int:
    """A seed derived from the test's shape, so each case draws its own inputs."""
    return zlib.crc32(repr(parts).encode())


def attention_inputs(B, Hq, Hkv, S, D, dtype=torch.float64, *, score_scale=1.0, device="cpu", requires_grad=False, ties=False):
    """q (B,Hq,S,D), k, v (B,Hkv,S,D), scores (B,Hkv,S) float32 (float64 for float64 q)."""
    g = torch.Generator().manual_seed(seed_for(B, Hq, Hkv, S, D, str(dtype), score_scale, ties))
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    u = torch.randn(B, Hkv, S, generator=g, dtype=torch.float64) * score_scale
    if ties:  # coarse grid: many exactly equal scores
        u = torch.round(u * 2) / 2
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [u.to(device=device, dtype=sdt)]
    if requires_grad:
        for t in out:
            t.requires_grad_()
    return out


def assert_sanitizer_clean(tool: str, code: str, done: str, timeout: int = 900) -> None:
    """Run ``code`` in a child Python under compute-sanitizer's ``tool`` (memcheck, racecheck);
    fail on any finding, or unless the child printed ``done`` (it got to the end). The tool is
    required on GPU runners (CI=true); elsewhere a missing one skips."""
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        if os.environ.get("CI") == "true":
            pytest.fail("compute-sanitizer is required on GPU runners")
        pytest.skip("compute-sanitizer not installed")
    res = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=timeout)
    clean = "ERROR SUMMARY: 0 errors" in res.stdout or "RACECHECK SUMMARY: 0 hazards displayed (0 errors" in res.stdout
    assert res.returncode == 0 and done in res.stdout and clean, res.stdout[-3000:] + res.stderr[-3000:]


def cuda_kernels():
    """torch.ops.sparsek_cuda for a GPU test: skips without a GPU, fails when the kernels should run
    on this GPU and do not (a failed build must not turn into a pass on the reference)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sparsek import _cuda

    q = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    reason = _cuda.unsupported_reason(q, q, q, torch.empty(1, 1, 1, device="cuda"))
    if reason is not None:
        pytest.fail(f"the CUDA kernels should run on this GPU: {reason}")
    return _cuda.ops()
