"""Decode adapters: one new token against a long context (tier T3).

``prepare`` gets ``cases.Inputs`` with the context k, v (B, Hkv, S, D), scores (B, Hkv, S) and
the new token's q (B, Hq, 1, D), k_new, v_new (B, Hkv, 1, D), score_new (B, Hkv, 1); every
output is (B, Hq, 1, D).

* ``sparsek-decode``: ``SparseKCache`` built from the context in prepare; the timed call is one
  whole step (cache update + attention over the K + W slots). A step advances the cache, so the
  timed calls feed a stream of further tokens (context tokens replayed, so the selection keeps
  churning like a real sequence) and the checked output restores the prepared state and steps
  the case's own new token. CUDA cases run the kernels only (never the reference in their
  place); CPU cases run the reference step, the only path there.
* the full-context baselines attend all S + 1 keys; the new token is written into their cache in
  prepare (not timed), which flatters them by one append per step, so a T3 pass is conservative:
  ``sdpa-decode`` (contiguous cache, SDPA), ``vllm-paged`` (vLLM's FlashAttention backend over
  a block table, block size 16), ``xformers-splitk-paged`` (xFormers' Triton split-K operator
  with a paged causal bias), ``flex-paged`` (compiled FlexAttention over a page pool, the
  logical-to-physical map in the block mask).

Paged caches place each sequence's pages at seeded random physical pages, as an allocator that
has served many requests would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cases import Case, Inputs
from .base import Impl, Prepared, cached_probe, call_reason, cuda_reason, first_line, free_memory_reason

VLLM_BLOCK = 16  # vLLM's default block size
XFORMERS_PAGE = 256  # pages of whole split-K tiles for xFormers' paged Triton kernel
FLEX_PAGE = 128  # FlexAttention's sparse block: one block-mask entry per page
# Distinct tokens the sparsek-decode timed steps cycle through (each one a real context token).
STEP_STREAM = 1024
SDPA_DECODE_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def full_cache(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous cache after the new token: k, v (B, Hkv, S + 1, D)."""
    return torch.cat([inputs.k, inputs.k_new], 2), torch.cat([inputs.v, inputs.v_new], 2)


def page_table(case: Case, page: int, device) -> torch.Tensor:
    """(B, pages per sequence) int32: seeded random physical pages for S + 1 tokens each."""
    per_seq = -(-(case.seq_len + 1) // page)
    g = torch.Generator().manual_seed(case.seed)
    return torch.randperm(case.batch * per_seq, generator=g).view(case.batch, per_seq).to(device, torch.int32)


def token_major_pages(case: Case, inputs: Inputs, table: torch.Tensor, page: int):
    """Page pools (n_pages, page, Hkv, D) (vLLM's and xFormers' token-major layout) for k and v."""
    B, per_seq = table.shape
    pad = per_seq * page - (case.seq_len + 1)
    pools = []
    for ctx in full_cache(inputs):
        x = F.pad(ctx, (0, 0, 0, pad)).transpose(1, 2)  # (B, per_seq * page, Hkv, D)
        pool = torch.empty(B * per_seq, page, case.kv_heads, case.head_dim, dtype=ctx.dtype, device=ctx.device)
        pool[table.long().flatten()] = x.reshape(B * per_seq, page, case.kv_heads, case.head_dim)
        pools.append(pool)
    return pools


def paged_bytes(case: Case, page: int) -> int:
    """Bytes of a paged copy of the full cache (both pools)."""
    elem = torch.empty((), dtype=case.torch_dtype).element_size()
    pages = case.batch * -(-(case.seq_len + 1) // page)
    return 2 * pages * page * case.kv_heads * case.head_dim * elem


# ---------------------------------------------------------------------------------------------
# sparsek-decode



def _probe_case(case: Case) -> tuple[Case, Inputs]:
    """A tiny decode case (2 sequences of 300 tokens) with the case's head dim, dtype and GQA
    group, and its inputs on the GPU: what an adapter's probe runs to see that its library works."""
    small = Case("probe", "decode", 2, 2 * case.group, 2, 300, case.head_dim, case.dtype, 16, 8, "cuda", 0)
    x = torch.randn(2, 2, 301, case.head_dim, device="cuda", dtype=case.torch_dtype)  # (B, Hkv, S + 1, D)
    tiny = Inputs(q=torch.randn(2, 2 * case.group, 1, case.head_dim, device="cuda", dtype=case.torch_dtype),
                  k=x[:, :, :300], v=x[:, :, :300], scores=None, k_new=x[:, :, 300:], v_new=x[:, :, 300:])
    return small, tiny

class SparseKDecode(Impl):
    def __init__(self):
        super().__init__("sparsek-decode", family="sparsek", kind="decode", pattern="decode-sparsek",
                         description="SparseKCache.step: cache update + attention over the K + W slots "
                                     "(CUDA kernels; the reference on CPU cases)")

    @staticmethod
    def backend(case: Case) -> str:
        return "cuda" if case.device == "cuda" else "reference"

    def _available(self, case: Case) -> str | None:
        if case.device == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        if case.device == "cpu":
            return None

        def probe():
            from sparsek import SparseKCache

            dt, D, G = case.torch_dtype, case.head_dim, case.group
            try:
                cache = SparseKCache(1, 2, D, topk=4, window=2, dtype=dt, device="cuda", backend="cuda",
                                     check_interval=0)
            except Exception as exc:
                return first_line(exc)
            x = torch.randn(1, 2, 1, D, device="cuda", dtype=dt)
            q = torch.randn(1, 2 * G, 1, D, device="cuda", dtype=dt)
            u = torch.zeros(1, 2, device="cuda")
            return call_reason(lambda: [cache.step(q, x, x, u) for _ in range(8)] and cache.check())

        reason = cached_probe((self.id, case.dtype, case.head_dim, case.group), probe)
        return f"sparsek's decode kernels cannot run this case: {reason}" if reason else None

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        from sparsek import SparseKCache

        cache = SparseKCache.from_prefill(inputs.k, inputs.v, inputs.scores, topk=case.topk, window=case.window,
                                          scale=case.scale, backend=self.backend(case), check_interval=0)
        prepared = cache.state.clone()
        q, k, v = inputs.q, inputs.k, inputs.v
        n = min(STEP_STREAM, case.seq_len)
        stream_scores = inputs.scores[..., :n].permute(2, 0, 1).contiguous()  # (n, B, Hkv): step j's scores
        step = [0]

        def fn():
            j = step[0] % n
            step[0] += 1
            return cache.step(q, k[:, :, j : j + 1], v[:, :, j : j + 1], stream_scores[j])

        def output():
            cache.state.copy_(prepared)
            out = cache.step(q, inputs.k_new, inputs.v_new, inputs.score_new)
            cache.check()
            return out

        per_seq = SparseKCache.bytes_per_sequence(case.kv_heads, case.head_dim, topk=case.topk, window=case.window,
                                                  dtype=case.torch_dtype)
        notes = [f"cache per sequence: {per_seq['kv'] / 2**10:,.0f} KiB of K/V slots, {per_seq['total'] / 2**10:,.0f} KiB "
                 f"in all, for any context length",
                 f"timed steps advance the cache with context tokens 0..{n - 1} replayed; the checked step is the "
                 f"case's new token from the prepared state"]
        if case.device == "cpu":
            notes.append("CPU case: the PyTorch reference step (the kernels are CUDA only)")
        return Prepared(fn=fn, output_fn=output, notes=notes)


# ---------------------------------------------------------------------------------------------
# sdpa-decode


class SdpaDecode(Impl):
    """SDPA over the contiguous cache, the first backend of SDPA_DECODE_BACKENDS that runs it."""

    def __init__(self):
        super().__init__("sdpa-decode", family="decode", kind="decode", pattern="decode-full",
                         description="PyTorch SDPA over the full contiguous cache (S + 1 keys)")

    @staticmethod
    def _call(backend, q, k, v, scale, gqa):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)

    def _backend(self, case: Case) -> tuple[str | None, str]:
        """(first backend that runs a tiny decode call shaped like the case, refusals so far)."""
        refusals = []
        for backend in SDPA_DECODE_BACKENDS:
            def probe(backend=backend):
                dev, dt, D, G = case.device, case.torch_dtype, case.head_dim, case.group
                q = torch.randn(2, 2 * G, 1, D, device=dev, dtype=dt)
                k = torch.randn(2, 2, 300, D, device=dev, dtype=dt)
                return call_reason(lambda: self._call(backend, q, k, k, D**-0.5, G > 1))

            reason = cached_probe((self.id, case.device, case.dtype, case.head_dim, case.group > 1, backend), probe)
            if reason is None:
                return backend, "; ".join(refusals)
            refusals.append(f"{backend}: {reason}")
        return None, "; ".join(refusals)

    def _available(self, case: Case) -> str | None:
        if case.device == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        elem = torch.empty((), dtype=case.torch_dtype).element_size()
        reason = free_memory_reason(case, 2 * case.batch * case.kv_heads * (case.seq_len + 1) * case.head_dim * elem,
                                    "the contiguous cache with the new token")
        if reason:
            return reason
        backend, refusals = self._backend(case)
        return None if backend else f"no SDPA backend runs this decode call ({refusals})"

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        backend, refusals = self._backend(case)
        k, v = full_cache(inputs)
        q, scale, gqa = inputs.q, case.scale, case.group > 1
        notes = [f"SDPA backend {backend} (the first of {', '.join(SDPA_DECODE_BACKENDS)} that runs it)",
                 "new token written into the cache in prepare (not timed)"]
        if refusals:
            notes.append(f"refused: {refusals}")
        return Prepared(fn=lambda: self._call(backend, q, k, v, scale, gqa), notes=notes)


# ---------------------------------------------------------------------------------------------
# vllm-paged


class VllmPaged(Impl):
    """vLLM's current decode path on NVIDIA GPUs: the V1 FlashAttention backend's
    ``flash_attn_varlen_func`` over a paged cache (num_blocks, block_size, Hkv, D) with a block
    table, FlashAttention version as vLLM picks it."""

    def __init__(self):
        super().__init__("vllm-paged", family="decode", kind="decode", pattern="decode-full",
                         description=f"vLLM paged decode (V1 FlashAttention backend, block size {VLLM_BLOCK})")

    @staticmethod
    def _modules():
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        try:
            from vllm.vllm_flash_attn.fa_utils import get_flash_attn_version

            version = get_flash_attn_version()
        except Exception:  # older vLLM: the function picks its default
            version = None
        return flash_attn_varlen_func, version

    def _build(self, case: Case, inputs: Inputs, table: torch.Tensor):
        flash, version = self._modules()
        k_pool, v_pool = token_major_pages(case, inputs, table, VLLM_BLOCK)
        B, dev = case.batch, inputs.q.device
        q = inputs.q[:, :, 0].contiguous()  # (B, Hq, D): one token per sequence
        cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev)
        seqused = torch.full((B,), case.seq_len + 1, dtype=torch.int32, device=dev)
        extra = {} if version is None else {"fa_version": version}

        def fn():
            out = flash(q=q, k=k_pool, v=v_pool, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=seqused,
                        max_seqlen_k=case.seq_len + 1, softmax_scale=case.scale, causal=True, block_table=table,
                        **extra)
            return out

        return fn, version

    def _available(self, case: Case) -> str | None:
        reason = cuda_reason(case, "vLLM's paged decode")
        if reason:
            return reason
        try:
            self._modules()
        except ImportError as exc:
            return f"vLLM is not installed (pip install 'sparsek[vllm]'): {first_line(exc)}"
        except Exception as exc:
            return f"importing vLLM's FlashAttention failed: {first_line(exc)}"
        reason = free_memory_reason(case, paged_bytes(case, VLLM_BLOCK), "the paged cache")
        if reason:
            return reason

        def probe():
            small, tiny = _probe_case(case)
            try:
                fn, _ = self._build(small, tiny, page_table(small, VLLM_BLOCK, "cuda"))
            except Exception as exc:
                return first_line(exc)
            return call_reason(fn)

        reason = cached_probe((self.id, case.dtype, case.head_dim, case.group), probe)
        return f"vLLM's paged decode refuses this case: {reason}" if reason else None

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        fn, version = self._build(case, inputs, page_table(case, VLLM_BLOCK, inputs.q.device))
        return Prepared(fn=fn, output_fn=lambda: fn().unsqueeze(2),
                        notes=[f"vllm_flash_attn.flash_attn_varlen_func, fa_version {version or 'default'}, "
                               f"block size {VLLM_BLOCK}, block table of seeded random pages",
                               "new token written into the cache in prepare (not timed)"])


# ---------------------------------------------------------------------------------------------
# xformers-splitk-paged


class XFormersSplitKPaged(Impl):
    """``memory_efficient_attention_forward`` with xFormers' Triton split-K operator and a
    ``PagedBlockDiagonalCausalWithOffsetPaddedKeysMask``: every sequence's one query over its
    pages. Layout (1, tokens, Hkv, G, D), k and v broadcast over G without a copy."""

    def __init__(self):
        super().__init__("xformers-splitk-paged", family="decode", kind="decode", pattern="decode-full",
                         description=f"xFormers Triton split-K decode, paged causal bias (page size {XFORMERS_PAGE})")

    def _build(self, case: Case, inputs: Inputs, table: torch.Tensor):
        import xformers.ops as xops
        from xformers.ops import fmha

        B, Hkv, G, D = case.batch, case.kv_heads, case.group, case.head_dim
        k_pool, v_pool = token_major_pages(case, inputs, table, XFORMERS_PAGE)
        tokens = k_pool.shape[0] * XFORMERS_PAGE
        k = k_pool.view(1, tokens, Hkv, 1, D).expand(1, tokens, Hkv, G, D)
        v = v_pool.view(1, tokens, Hkv, 1, D).expand(1, tokens, Hkv, G, D)
        q = inputs.q.view(B, Hkv, G, D).unsqueeze(0).contiguous()  # (1, B tokens, Hkv, G, D)
        per_seq = table.shape[1] * XFORMERS_PAGE
        bias = fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=[1] * B, kv_padding=per_seq, kv_seqlen=[case.seq_len + 1] * B,
        ).make_paged(block_tables=table, page_size=XFORMERS_PAGE,
                     paged_type=fmha.attn_bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask)
        op = fmha.triton_splitk.FwOp
        scale = case.scale

        def fn():
            return xops.memory_efficient_attention_forward(q, k, v, attn_bias=bias, scale=scale, op=op)

        def output():
            return fn().reshape(B, case.q_heads, 1, D)  # (1, B, Hkv, G, D) -> (B, Hq, 1, D)

        return fn, output

    def _available(self, case: Case) -> str | None:
        reason = cuda_reason(case, "xFormers' split-K decode")
        if reason:
            return reason
        try:
            from xformers.ops import fmha

            fmha.triton_splitk.FwOp, fmha.attn_bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask
        except ImportError as exc:
            return f"xFormers is not installed (pip install 'sparsek[xformers]'): {first_line(exc)}"
        except Exception as exc:  # a build for another torch can fail at import with anything
            return f"xFormers' paged split-K operator is not usable: {first_line(exc)}"
        reason = free_memory_reason(case, paged_bytes(case, XFORMERS_PAGE), "the paged cache")
        if reason:
            return reason

        def probe():
            from .dense import xformers_refusal

            small, tiny = _probe_case(case)
            try:
                fn, _ = self._build(small, tiny, page_table(small, XFORMERS_PAGE, "cuda"))
                fn()
                torch.cuda.synchronize()
            except Exception as exc:
                return xformers_refusal(exc)
            return None

        reason = cached_probe((self.id, case.dtype, case.head_dim, case.group), probe)
        return f"xFormers' paged split-K decode refuses this case: {reason}" if reason else None

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        fn, output = self._build(case, inputs, page_table(case, XFORMERS_PAGE, inputs.q.device))
        return Prepared(fn=fn, output_fn=output,
                        notes=[f"fmha.triton_splitk.FwOp, page size {XFORMERS_PAGE}, block table of seeded random pages",
                               "new token written into the cache in prepare (not timed)"])


# ---------------------------------------------------------------------------------------------
# flex-paged


def flex_paged_layout(case: Case, inputs: Inputs, page: int = FLEX_PAGE):
    """FlexAttention's paged form: pools (1, Hkv, n_pages * page, D) shared by the batch, and
    the (B, n_pages) physical-to-logical page map (-1 where the page is another sequence's)."""
    table = page_table(case, page, inputs.q.device)
    B, per_seq = table.shape
    pools = [p.permute(2, 0, 1, 3).reshape(1, case.kv_heads, -1, case.head_dim).contiguous()
             for p in token_major_pages(case, inputs, table, page)]
    logical = torch.full((B, B * per_seq), -1, dtype=torch.int32, device=table.device)
    logical.scatter_(1, table.long(), torch.arange(per_seq, dtype=torch.int32, device=table.device).expand(B, -1).contiguous())
    return pools[0], pools[1], table, logical


def flex_paged_block_mask(case: Case, table: torch.Tensor, logical: torch.Tensor, page: int = FLEX_PAGE):
    """One query row per sequence over its pages in physical order; all pages but the last are
    full (no mask_mod), the last masks the slots past S + 1 tokens."""
    from torch.nn.attention.flex_attention import BlockMask

    B, per_seq = table.shape
    n_pages = logical.shape[1]
    dev = table.device
    length = case.seq_len + 1

    def mask_mod(b, h, q_idx, kv_idx):
        lp = logical[b, kv_idx // page]  # -1 on another sequence's page
        return (lp >= 0) & (lp * page + kv_idx % page < length)

    def indices(pages: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, 1, 1, n_pages) int32, padded
        out = torch.zeros(B, 1, 1, n_pages, dtype=torch.int32, device=dev)
        out[..., : pages.shape[1]] = pages.view(B, 1, 1, -1)
        return out

    full_num = torch.full((B, 1, 1), per_seq - 1, dtype=torch.int32, device=dev)
    partial_num = torch.ones(B, 1, 1, dtype=torch.int32, device=dev)
    return BlockMask.from_kv_blocks(partial_num, indices(table[:, -1:]), full_num, indices(table[:, :-1]),
                                    BLOCK_SIZE=(FLEX_PAGE, page), mask_mod=mask_mod, seq_lengths=(1, n_pages * page))


class FlexPaged(Impl):
    def __init__(self):
        super().__init__("flex-paged", family="decode", kind="decode", pattern="decode-full",
                         description=f"FlexAttention (compiled) over a paged cache (page size {FLEX_PAGE})")

    def _available(self, case: Case) -> str | None:
        reason = cuda_reason(case, "FlexAttention (timed compiled, through Triton)")
        if reason:
            return reason
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError as exc:
            return f"this torch has no FlexAttention: {first_line(exc)}"
        return free_memory_reason(case, paged_bytes(case, FLEX_PAGE), "the paged cache")

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        from .dense import compiled_flex

        k_pool, v_pool, table, logical = flex_paged_layout(case, inputs)
        block_mask = flex_paged_block_mask(case, table, logical)
        flex = compiled_flex()
        q, scale, gqa = inputs.q, case.scale, case.group > 1
        return Prepared(fn=lambda: flex(q, k_pool, v_pool, block_mask=block_mask, scale=scale, enable_gqa=gqa),
                        notes=[f"page size {FLEX_PAGE} (one block-mask entry per page), pages at seeded random "
                               f"physical positions, k/v pools shared by the batch",
                               "new token written into the cache in prepare (not timed)"])


IMPLS = (SparseKDecode(), SdpaDecode(), VllmPaged(), XFormersSplitKPaged(), FlexPaged())
