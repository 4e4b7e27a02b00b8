// The one torch binding of the CUDA kernels: schemas (TORCH_LIBRARY), tensor checks, params
// structs filled from tensors, and the CUDA implementations (TORCH_LIBRARY_IMPL). The kernel
// .cu files include only CUDA headers and the params headers, so they build without torch.

#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>

// ---- prefill: selection + attention (owned by the prefill kernels) ----

// ---- decode (owned by the decode kernels) ----
