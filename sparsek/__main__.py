"""``python -m sparsek``: where the kernels come from and whether they can run here, and why not."""

from __future__ import annotations

import shutil
import sys

import torch

from . import __version__, _cuda


def report() -> list[str]:
    sources = _cuda.CSRC
    present = (sources / "binding.cpp").exists()
    binary = _cuda.prebuilt()
    lines = [
        f"sparsek {__version__} (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
        f"prebuilt kernels: {binary} (built with the package; loaded first)" if binary else
        "prebuilt kernels: none (built just in time from the sources on first use)",
        f"kernel sources: {sources} ({'present' if present else 'missing'})",
        f"nvcc: {shutil.which('nvcc') or 'not on PATH'}",
    ]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor})")
        probe = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
        reason = _cuda.unsupported_reason(probe, probe, probe, torch.empty(1, 1, 1, device="cuda"))
    else:
        lines.append("GPU: none")
        reason = "CUDA is not available"
    lines.append("forward kernels: " + ("run here" if reason is None else f"do not run here: {reason}"))
    backward = reason or _cuda.backward_reason()
    lines.append("backward kernels: " + ("run here" if backward is None else f"do not run here: {backward}"))
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
