"""One table of tolerances per dtype, for comparisons against a float64 reference.

Low-precision results are judged against what PyTorch's own attention makes in the same dtype
on the same inputs (see test_kernels_gpu); these absolute floors cover rounding of the inputs.
"""

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
