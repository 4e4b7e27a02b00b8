"""The CUDA kernels of csrc/: when they apply, and how they are built and called.

The extension is compiled just in time on first use (cached by torch.utils.cpp_extension under
TORCH_EXTENSIONS_DIR) for sm_90a. Every reason it cannot run is returned as a sentence so the
op can warn once and fall back to the reference.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from ._nvtx import annotate

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
ATTN_ROWS = 128  # rows (query x head of a GQA group) per attention CTA: kAttnRows in csrc


@functools.lru_cache(maxsize=None)
def _build() -> tuple[object | None, str | None]:
    """Build and load the extension once; returns (torch.ops.sparsek_cuda or None, reason)."""
    if os.environ.get("SPARSEK_DISABLE_CUDA") == "1":
        return None, "SPARSEK_DISABLE_CUDA=1"
    sources = [CSRC / "binding.cpp", *sorted(CSRC.glob("*.cu"))]
    if not (CSRC / "binding.cpp").exists():
        return None, f"the CUDA sources are not in {CSRC} (installed without csrc/)"
    # One device code target (sm_90a) instead of torch's default list: half the build time.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    try:
        from torch.utils.cpp_extension import load

        load(
            name="sparsek_cuda",
            sources=[str(s) for s in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=[
                "-O3",
                "-std=c++17",
                "-gencode=arch=compute_90a,code=sm_90a",
                "--use_fast_math",
                "-lineinfo",
                "-Xptxas=-v",
            ],
            is_python_module=False,
            verbose=os.environ.get("SPARSEK_BUILD_VERBOSE") == "1",
        )
    except Exception as exc:  # a failed build must not break the reference path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"the CUDA extension failed to build: {first}"
    return torch.ops.sparsek_cuda, None


def unsupported_reason(q, k, v, scores) -> str | None:
    """None when the kernels can run this call, else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(q.device)
    if (major, minor) != (9, 0):
        return f"the kernels are built for sm_90a (H100/H200); this GPU is sm_{major}{minor}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the kernels take float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"the kernels take head dim 64 or 128, got {q.shape[-1]}"
    if scores.dtype != torch.float32:
        return f"the kernels take float32 scores, got {scores.dtype}"
    group = q.shape[1] // k.shape[1]
    if ATTN_ROWS % group:
        return f"the kernels pack a GQA group into {ATTN_ROWS} rows; group size {group} does not divide it"
    ops, reason = _build()
    return reason if ops is None else None


def ops():
    """torch.ops.sparsek_cuda; call only after unsupported_reason returned None."""
    module, reason = _build()
    if module is None:
        raise RuntimeError(reason)
    return module


def block_q_for(q_heads: int, kv_heads: int) -> int:
    """Queries per attention block: the CTA's ATTN_ROWS rows hold every head of a GQA group."""
    return ATTN_ROWS // (q_heads // kv_heads)


def forward(q, k, v, scores, topk: int, window: int, scale: float):
    """(out, lse, tau, end) from the selection and attention kernels.

    q (B, Hq, S, D), k and v (B, Hkv, S, D) float16/bfloat16, scores (B, Hkv, S) float32.
    """
    cuda = ops()
    block_q = block_q_for(q.shape[1], k.shape[1])
    with annotate("selection"):
        tau, end, keys, count = cuda.select(scores, topk, window, block_q)
    with annotate("attention"):
        out, lse = cuda.attention_fwd(q, k, v, scores, tau, end, keys, count, window, scale, block_q)
    return out, lse, tau, end
