"""One table of tolerances per dtype, for comparisons against a float64 reference.

Low-precision results are judged against what PyTorch's own attention makes in the same dtype
on the same inputs (see test_kernels_gpu); these absolute floors cover rounding of the inputs.
"""

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# Backward kernels (tests/test_backward_gpu.py) against a float64 reference: the tensor-core
# products round P and dS to the input type (as FlashAttention's backward does), so a gradient
# carries about one rounding of the input type per element. Judged as the relative Frobenius
# error and the largest element error relative to the largest reference element.
BWD_NORM = {torch.bfloat16: 1.5e-2, torch.float16: 2.5e-3}
BWD_MAX = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
