"""Compiler flags of the CUDA extension, shared by the just-in-time build (sparsek._cuda) and the
ahead-of-time build (setup.py with SPARSEK_BUILD_CUDA=1). No imports: setup.py loads this file
before torch or sparsek can be imported."""

CXX_FLAGS = ["-O3"]
# No -std flag: torch.utils.cpp_extension adds the standard its own headers need (C++17 up to
# torch 2.13, C++20 from 2.14, whose ATen refuses anything older).
CUDA_FLAGS = [
    "-O3",
    # One device target, sm_90a. An arch flag here also stops torch from adding its own list (from
    # TORCH_CUDA_ARCH_LIST or the GPU), so the user's environment is untouched.
    "-gencode=arch=compute_90a,code=sm_90a",
    "--use_fast_math",
    "-lineinfo",
    "-Xptxas=-v",
]
