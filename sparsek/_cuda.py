"""The CUDA kernels of csrc/: when they apply, and how they are built and called.

The extension is the one built ahead of time with the package when there is one (setup.py with
SPARSEK_BUILD_CUDA=1), else compiled just in time on first use (cached by torch.utils.cpp_extension
under TORCH_EXTENSIONS_DIR, in a directory named by a hash of the sources and flags), for sm_90a
either way. Every reason it cannot run is returned as a sentence so the op can warn once and fall
back to the reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import torch

from . import selection as sel_mod
from ._flags import CUDA_FLAGS, CXX_FLAGS
from ._nvtx import annotate

# The kernel sources: sparsek/csrc/ in a wheel or non-editable install (setup.py copies them
# there), the repository's csrc/ in a source checkout or an editable install.
_PACKAGED, _CHECKOUT = Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc"
CSRC = _PACKAGED if (_PACKAGED / "binding.cpp").exists() else _CHECKOUT
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
ATTN_ROWS = 128  # rows (query x head of a GQA group) per attention CTA: kAttnRows in csrc


# An ahead-of-time build (setup.py with SPARSEK_BUILD_CUDA=1) puts the extension next to this file.
PREBUILT_GLOB = "_C*.so"


# What the just-in-time build compiles: a change to any of these files must rebuild.
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def source_digest(csrc: Path = CSRC) -> str:
    """A short hash of the kernel sources' contents and the build flags. The JIT build directory is
    named by it: ninja decides what to rebuild from file times, so sources whose times are older
    than the last build (an unpacked archive, a reinstalled older-dated wheel) would otherwise load
    the stale binary."""
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.suffix in SOURCE_SUFFIXES):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr((CXX_FLAGS, CUDA_FLAGS, torch.__version__)).encode())
    return h.hexdigest()[:12]


def prebuilt() -> Path | None:
    """The extension built ahead of time with the package, if any."""
    found = sorted(Path(__file__).resolve().parent.glob(PREBUILT_GLOB))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def _build() -> tuple[object | None, str | None]:
    """Load the prebuilt extension, else build it just in time (once, cached by torch); returns
    (torch.ops.sparsek_cuda or None, reason)."""
    if os.environ.get("SPARSEK_DISABLE_CUDA") == "1":
        return None, "SPARSEK_DISABLE_CUDA=1"
    binary, load_error = prebuilt(), None
    if binary is not None:
        try:
            torch.ops.load_library(str(binary))
            return torch.ops.sparsek_cuda, None
        except Exception as exc:  # e.g. built against another torch: the JIT build still works
            load_error = f"the prebuilt {binary.name} did not load ({str(exc).strip().splitlines()[0]})"
            print(f"sparsek: {load_error}; building the kernels just in time instead", file=sys.stderr, flush=True)
    sources = [CSRC / "binding.cpp", *sorted(CSRC.glob("*.cu"))]
    if not (CSRC / "binding.cpp").exists():
        return None, load_error or f"the CUDA sources are not in {CSRC} (installed without csrc/)"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # One directory per version of the sources (under torch's own, in TORCH_EXTENSIONS_DIR).
        build_dir = Path(_get_build_directory("sparsek_cuda", verbose=False)) / source_digest()
        build_dir.mkdir(parents=True, exist_ok=True)
        built = build_dir / "sparsek_cuda.so"
        if not built.exists():
            print(f"sparsek: building the CUDA kernels for sm_90a from {CSRC} (once; a few minutes, "
                  f"then cached under {built.parent})", file=sys.stderr, flush=True)
        load(
            name="sparsek_cuda",
            sources=[str(s) for s in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=CUDA_FLAGS,
            build_directory=str(build_dir),
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


# Whether the backward kernels run when the forward ran on the kernels: on by default (they pass
# tests/test_backward_gpu.py on an H100). SPARSEK_CUDA_BACKWARD=0 runs the reference backward
# instead (the block lists go unused), e.g. to rule the kernels out when a gradient looks wrong.
BACKWARD_DEFAULT = "1"


def backward_reason() -> str | None:
    """None when the backward kernels are on, else why not (the forward kernels ran)."""
    flag = os.environ.get("SPARSEK_CUDA_BACKWARD", BACKWARD_DEFAULT)
    if flag == "1":
        return None
    return f"SPARSEK_CUDA_BACKWARD={flag} (1 runs the CUDA backward kernels)"


def ops():
    """torch.ops.sparsek_cuda; call only after unsupported_reason returned None."""
    module, reason = _build()
    if module is None:
        raise RuntimeError(reason)
    return module


def block_q_for(q_heads: int, kv_heads: int) -> int:
    """Queries per attention block: the CTA's ATTN_ROWS rows hold every head of a GQA group."""
    return ATTN_ROWS // (q_heads // kv_heads)


def list_shape(q, k, v, scores, topk: int) -> tuple[int, int]:
    """(n_blocks, cap) of the per-block key lists the forward keeps for the backward, (0, 0) when
    the kernels do not run this call (the reference needs no lists)."""
    if not q.is_cuda or unsupported_reason(q, k, v, scores) is not None:
        return 0, 0
    S = q.shape[2]
    block_q = block_q_for(q.shape[1], k.shape[1])
    return (S + block_q - 1) // block_q, min(topk, S) + block_q - 1


def forward(q, k, v, scores, topk: int, window: int, scale: float):
    """(out, lse, tau, end, block_keys, block_count) from the selection and attention kernels.

    q (B, Hq, S, D), k and v (B, Hkv, S, D) float16/bfloat16, scores (B, Hkv, S) float32.
    block_keys (B, Hkv, n_blocks, cap) and block_count (B, Hkv, n_blocks) are the selection's
    per-block key lists, kept for the backward. Non-finite scores are not an error here: the
    rows (batch, kv head) that hold one get NaN in out, lse and tau. No host synchronisation, so
    the call can be captured in a CUDA graph.
    """
    cuda = ops()
    B, Hkv = k.shape[:2]
    block_q = block_q_for(q.shape[1], Hkv)
    with annotate("selection"):
        tau, end, keys, count = cuda.select(scores, topk, window, block_q)
    with annotate("attention"):
        out, lse = cuda.attention_fwd(q, k, v, scores, tau, end, keys, count, window, scale, block_q)
        # Rows whose scores hold a NaN or an infinity come out of select with tau = NaN; this puts
        # NaN over their out and lse on the device (no host sync): never a finite wrong answer.
        cuda.poison_rows(tau, out, lse)
    return out, lse, tau, end, keys.view(B, Hkv, *keys.shape[1:]), count.view(B, Hkv, -1)


def backward(grad_out, q, k, v, scores, out, lse, tau, end, keys, count, window: int, scale: float):
    """(dq, dk, dv, dscores) from the backward kernel and a few O(S) tensor ops.

    Arguments as the forward's inputs and outputs; grad_out (B, Hq, S, D). Under
    ``torch.use_deterministic_algorithms(True)`` every sum runs in a fixed order or in integers,
    so two calls give bitwise-identical gradients.
    """
    cuda = ops()
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    block_q = block_q_for(Hq, Hkv)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fixed = _fixed_point_scales(grad_out, q, v, Hq // Hkv, S) if deterministic else None
    with annotate("attention_bwd"):
        dq, dk, dv, du_key, gamma_rows = cuda.attention_bwd(
            grad_out, q, k, v, out, lse, scores, tau, end, keys.view(B * Hkv, *keys.shape[2:]), count.view(B * Hkv, -1),
            window, scale, block_q, deterministic, fixed, kernel=backward_kernel(),
            acc_budget=accumulator_budget(k, deterministic, block_q=block_q, sms=_sm_count(q.device)),
            streams=backward_streams(k, deterministic),
        )
    if deterministic:
        du_key = _sum_list_places(du_key, keys, count, S)
    du = du_key.double() - tau_term(gamma_rows, scores, tau, window, Hkv)
    return dq, dk, dv, du.to(scores.dtype)


# The backward's float32 dk/dv accumulators (int64 when deterministic) are allocated per launch:
# the (batch, kv head) pairs run in chunks whose accumulators fit a budget (csrc/binding.cpp), so
# the step's extra memory does not grow with B * Hkv. BACKWARD_ACC_BUDGET is the ceiling.
# Float32 chunks take turns over BACKWARD_STREAMS streams, each chunk just enough pairs to give
# every SM a block (seed: 4 pairs of 4 MiB; long-16k and long-64k: 1 pair of 16 or 64 MiB): one
# stream's launch fills the SMs the other's last wave leaves idle, a chunk's conversion runs beside
# the other stream's launch, and the accumulators are a fraction of the single-stream chunks'
# (docs/perf-notes.md, backward v2.8). SPARSEK_BWD_ACC_MIB and SPARSEK_BWD_STREAMS fix the two instead (for measuring them).
BACKWARD_ACC_BUDGET = 256 << 20
BACKWARD_ACC_FLOOR = 64 << 20
BACKWARD_STREAMS = 2


def _env_whole(name: str, low: int, high: int, what: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip().isdigit() or not low <= int(value) <= high:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def backward_streams(k: torch.Tensor, deterministic: bool = False) -> int:
    """How many streams the backward's accumulator chunks take turns over: BACKWARD_STREAMS, or 1
    when deterministic (int64 sums, converted by tensor operations in a fixed order)."""
    fixed = _env_whole("SPARSEK_BWD_STREAMS", 1, 8, "a whole number of streams in [1, 8]")
    if deterministic:
        return 1
    return BACKWARD_STREAMS if fixed is None else fixed


def accumulator_budget(k: torch.Tensor, deterministic: bool = False, *, block_q: int | None = None,
                       sms: int | None = None) -> int:
    """Bytes of dk/dv accumulators per backward launch for keys k (B, Hkv, S, D).

    With several streams (backward_streams) and the launch geometry known (block_q queries per
    block, sms SMs): the fewest pairs whose blocks cover the SMs, at least one, at most
    BACKWARD_ACC_BUDGET. Otherwise (one stream, or the geometry not given) half of what all the
    pairs need, within [64 MiB, BACKWARD_ACC_BUDGET]: each launch then ends in a partly empty
    wave, about 0.1-0.2 ms on an H100 (docs/perf-notes.md, v2.4).
    """
    fixed = _env_whole("SPARSEK_BWD_ACC_MIB", 1, 1 << 30, "a positive whole number of MiB")
    if fixed is not None:
        return fixed << 20
    B, Hkv, S, D = k.shape
    pair = 2 * S * D * (8 if deterministic else 4)
    if backward_streams(k, deterministic) > 1 and block_q is not None and sms is not None:
        blocks_per_pair = max(1, -(-S // block_q))
        return min(BACKWARD_ACC_BUDGET, max(1, sms // blocks_per_pair) * pair)
    return min(BACKWARD_ACC_BUDGET, max(BACKWARD_ACC_FLOOR, B * Hkv * pair // 2))


def backward_kernel() -> int:
    """2: the warpgroup-MMA backward kernel v2.9 (default); 3: v2.12, the same kernel with the
    second half of its dK/dV reductions moved under the dQ product, 4: v2.12b, all but the first
    slice moved; 5: v2.13, v2.12 with a third warpgroup that issues the reductions; 6: v2.14, v2.13
    with the CTAs of two neighbouring query blocks paired in a cluster, sending each tile's dK/dV
    rows once for both (the deterministic mode of 5 and 6 is v2.9's) (docs/perf-notes.md); 1: the
    mma.sync one. The others are kept so that they can be timed against the default in one run."""
    value = os.environ.get("SPARSEK_BWD_KERNEL", "2")
    if value not in ("1", "2", "3", "4", "5", "6"):
        raise ValueError(f"SPARSEK_BWD_KERNEL must be 1, 2, 3, 4, 5 or 6, got {value!r}")
    return int(value)


def _fixed_point_scales(grad_out, q, v, group: int, S: int):
    """Scales (2,) float64 on the device for the int64 accumulators of dk (without the softmax
    scale) and dv: 2**62 over a power of two above the largest sum the kernel can form, so no sum
    overflows and the resolution is 2**-62 of that bound.

    |dS_ij| = P_ij |dO_i.v_j - dO_i.o_i| <= 2 P_ij |dO_i| |v| (o_i averages rows of v), each key
    gets at most group * S rows with P <= 1, and a factor 2 covers the rounding of P and dS to
    the input type before the tensor-core products. Computed on the device: no host sync.
    A non-finite input gives a NaN scale, so the gradients come out NaN rather than wrong.
    """
    rows = float(group * S)

    def amax(x):
        lo, hi = torch.aminmax(x)
        return torch.maximum(lo.abs(), hi.abs()).double()

    def max_row_norm(x):
        return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).amax().double()

    bound_k = 4.0 * rows * max_row_norm(grad_out) * max_row_norm(v) * amax(q)
    bound_v = 2.0 * rows * amax(grad_out)
    bounds = torch.stack([bound_k, bound_v]).clamp(min=1e-300)
    scales = torch.exp2(62.0 - torch.ceil(torch.log2(bounds)))
    return torch.where(torch.isfinite(bounds), scales, torch.full_like(scales, float("nan")))


def _sum_list_places(du_part, keys, count, S: int):
    """Deterministic sum of the per-block column sums (B*Hkv, n_blocks, cap) into (B, Hkv, S):
    each block wrote the term of key keys[..., p] at place p < count."""
    B, Hkv, n_blocks, cap = keys.shape
    valid = torch.arange(cap, device=keys.device) < count.unsqueeze(-1)  # (B, Hkv, n_blocks, cap)
    row = torch.arange(B * Hkv, device=keys.device).view(B, Hkv, 1, 1) * S
    index = torch.where(valid, keys.long() + row, row)  # unused places add 0 to key 0 of the row
    du = torch.zeros(B * Hkv * S, dtype=du_part.dtype, device=du_part.device)
    du.index_add_(0, index.flatten(), du_part.flatten())
    return du.view(B, Hkv, S)


def tau_term(gamma_rows, scores, tau, window: int, kv_heads: int):
    """sum_i [l in F_i] Gamma_i / |F_i| for every key l: (B, Hkv, S) float64.

    gamma_rows (B, Hq, S): per query row, gamma summed over its soft selected keys; the heads of a
    GQA group add up to Gamma_i. {i : l in F_i} is one range of queries (selection.soft_ranges), so
    the sum over it is a difference of prefix sums.
    """
    B, Hq, S = gamma_rows.shape
    big_gamma = gamma_rows.view(B, kv_heads, Hq // kv_heads, S).sum(2, dtype=torch.float64)
    lo, hi, nsoft = sel_mod.soft_ranges(scores, tau, window)
    c = big_gamma / nsoft.clamp(min=1)
    prefix = torch.cat([c.new_zeros(B, kv_heads, 1), c.cumsum(-1)], -1)
    return prefix.gather(-1, hi) - prefix.gather(-1, lo)
