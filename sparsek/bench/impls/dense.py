"""Dense causal attention: PyTorch SDPA backends (forced one at a time), FlexAttention with a causal
block mask, and xFormers' dense operators with a causal bias.

Also home of the two adapter kinds the structured and SparseK baselines reuse: ``FlexImpl``
(compiled FlexAttention over a block mask built directly from the pattern) and ``XFormersImpl``
(``memory_efficient_attention_forward`` with a chosen operator and bias).

Availability is decided by a tiny real call with the case's dtype, head dim and GQA group (a
forward and a backward for train cases): an installed library whose kernels refuse to run
(xFormers built for another torch/CUDA prints "xFormers wasn't build with CUDA support") is
reported with its own message.

Every adapter here has a backward, so each also runs training steps (``_prepare_train``, see
impls/train.py) with the same layout and GQA handling as its forward.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..cases import Case, Inputs
from . import train
from .base import Impl, Prepared, cached_probe, call_reason, cuda_reason, first_line, free_memory_reason
from .train import TrainStep, leaf

# ---------------------------------------------------------------------------------------------
# SDPA


class SdpaImpl(Impl):
    """``scaled_dot_product_attention(is_causal=True)`` with one backend forced by ``sdpa_kernel``.

    GQA goes through ``enable_gqa=True``. A backend that rejects ``enable_gqa`` still runs GQA
    the way users run it on such a backend: k and v repeated to Hq heads, in ``prepare`` (not
    timed) for the forward, inside the timed step for training (the gradients must reach the
    Hkv heads, through the repeat's backward); the record's notes say so.
    """

    def __init__(self, id: str, backend: str, description: str):
        super().__init__(id, family="dense", kind="prefill", pattern="dense-causal", description=description,
                         train=True)
        self.backend_name = backend

    @property
    def backend(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, self.backend_name)

    def _call(self, q, k, v, scale, gqa):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)

    def _mode(self, case: Case) -> tuple[str | None, str | None]:
        """('native' | 'expand' | None, reason or note), probed once per dtype/head dim/GQA and
        kind (a train probe runs the backward too)."""
        train_step = case.kind == "train"

        def probe(expand: bool):
            dev, dt, D, G = case.device, case.torch_dtype, case.head_dim, case.group
            q = torch.randn(1, 2 * G, 256, D, device=dev, dtype=dt, requires_grad=train_step)
            k = torch.randn(1, 2, 256, D, device=dev, dtype=dt, requires_grad=train_step)

            def call():
                with torch.enable_grad():
                    kv = k.repeat_interleave(G, 1) if expand else k
                    out = self._call(q, kv, kv, D**-0.5, G > 1 and not expand)
                    if train_step:
                        torch.autograd.grad(out, (q, k), torch.ones_like(out))

            return call_reason(call)

        key = (self.id, case.device, case.dtype, case.head_dim, case.group > 1, train_step)
        native = cached_probe(key + ("native",), lambda: probe(False))
        if native is None:
            return "native", None
        if case.group == 1:
            return None, native
        expanded = cached_probe(key + ("expand",), lambda: probe(True))
        if expanded is None:
            where = ("inside the step (timed: training on this backend pays for the copy and for summing the "
                     "repeated heads' gradients)" if train_step else "in prepare (not timed)")
            return "expand", f"kv heads repeated to Hq={case.q_heads} {where}: {native}"
        return None, native

    def _available(self, case: Case) -> str | None:
        if case.device == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        if self.backend_name == "MATH":
            elem = 4  # the math backend materialises scores and probabilities, in float32 at worst
            # a training step also keeps both for the backward and makes their gradients
            matrices, what = (4, "four") if case.kind == "train" else (2, "two")
            need = matrices * case.batch * case.q_heads * case.seq_len**2 * elem
            reason = free_memory_reason(case, need, f"the math backend's {what} S x S matrices")
            if reason:
                return reason
        mode, reason = self._mode(case)
        if mode is None and case.device == "cpu" and self.backend_name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            return f"PyTorch has no CPU kernel for SDPA backend {self.backend_name} ({reason})"
        if mode is None:
            return f"SDPA backend {self.backend_name} refuses this case: {reason}"
        return None

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        mode, note = self._mode(case)
        q, k, v = inputs.q, inputs.k, inputs.v
        gqa = case.group > 1
        notes = []
        if mode == "expand":
            k, v = k.repeat_interleave(case.group, 1), v.repeat_interleave(case.group, 1)
            gqa = False
            notes.append(note)
        scale = case.scale
        return Prepared(fn=lambda: self._call(q, k, v, scale, gqa), notes=notes)

    def _prepare_train(self, case: Case, inputs: Inputs) -> Prepared:
        mode, note = self._mode(case)
        scale, G = case.scale, case.group
        if mode == "expand":
            def forward(q, k, v):
                return self._call(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), scale, False)
        else:
            gqa = G > 1

            def forward(q, k, v):
                return self._call(q, k, v, scale, gqa)

        leaves = {"q": leaf(inputs.q), "k": leaf(inputs.k), "v": leaf(inputs.v)}
        return train.prepared(TrainStep(leaves=leaves, forward=forward, grad_out=inputs.grad_out,
                                        notes=[note] if mode == "expand" else []))


# ---------------------------------------------------------------------------------------------
# FlexAttention

FLEX_BLOCK = 128  # FlexAttention's default sparsity block; masks are built at this granularity
_compiled_flex = None


def compiled_flex():
    """``torch.compile(flex_attention)``, once per process.

    fullgraph=True and failing on the recompile limit make a compile problem an error in the
    record instead of a silent fall back to the unfused eager path (which materialises S x S
    scores and would time something nobody deploys). Each case shape compiles once, so the
    limit is raised above the number of cases x flex adapters.
    """
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
        _compiled_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled_flex


def window_block_tables(seq_len: int, span: int | None, block: int = FLEX_BLOCK, device=None):
    """Which (query block, key block) tiles a causal window of ``span`` keys (None: all causal
    keys) touches at all, and which it fills completely. Both (nq, nk) bool."""
    n = -(-seq_len // block)
    a = torch.arange(n, device=device).view(-1, 1)  # query block
    c = torch.arange(n, device=device).view(1, -1)  # key block
    any_ = c <= a
    full = c < a
    if span is not None:
        # some key of block c lies in [first query - span + 1, last query]
        any_ &= (c + 1) * block - 1 >= a * block - span + 1
        # every key of block c lies in the window of every query of block a
        full &= c * block >= (a + 1) * block - span
    return any_, full


def block_mask_from_tables(any_blocks, full_blocks, mask_mod, seq_len: int, block: int = FLEX_BLOCK):
    """A BlockMask from tile tables (B, H, nq, nk) bool: full tiles skip mask_mod, partial ones
    apply it. Built directly, so a 128k mask costs a few table ops instead of evaluating
    mask_mod on S x S points."""
    from torch.nn.attention.flex_attention import BlockMask

    partial = any_blocks & ~full_blocks

    def to_kv(table):
        counts = table.sum(-1, dtype=torch.int32)
        # a stable sort of "not in table" lists the table's key blocks first, ascending
        order = torch.sort((~table).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return counts.contiguous(), order.contiguous()

    kv_num, kv_idx = to_kv(partial)
    full_num, full_idx = to_kv(full_blocks)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


class FlexImpl(Impl):
    """Compiled FlexAttention; subclasses say which block mask and score_mod the pattern needs.

    Training steps differentiate the same compiled call (torch.compile builds its backward);
    the block mask and score_mod are constants of the step.
    """

    # facts about a training step of this adapter (notes of its records)
    train_notes: tuple[str, ...] = ()

    def __init__(self, id: str, *, family: str, pattern: str, description: str):
        super().__init__(id, family=family, kind="prefill", pattern=pattern, description=description, train=True)

    def _available(self, case: Case) -> str | None:
        reason = cuda_reason(case, "FlexAttention (timed compiled, through Triton)")
        if reason:
            return reason
        if case.seq_len % FLEX_BLOCK:
            return f"block masks here are built for S a multiple of {FLEX_BLOCK}; S={case.seq_len}"
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as exc:
            return f"this torch has no FlexAttention: {first_line(exc)}"
        return None

    def build(self, case: Case, inputs: Inputs):
        """(block_mask, score_mod or None, notes, compare_with)."""
        raise NotImplementedError

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        block_mask, score_mod, notes, compare_with = self.build(case, inputs)
        flex = compiled_flex()
        q, k, v = inputs.q, inputs.k, inputs.v
        scale, gqa = case.scale, case.group > 1

        def fn():
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        return Prepared(fn=fn, notes=notes, compare_with=compare_with)

    def _prepare_train(self, case: Case, inputs: Inputs) -> Prepared:
        block_mask, score_mod, notes, _ = self.build(case, inputs)  # forward outputs to compare: not for a step
        flex = compiled_flex()
        scale, gqa = case.scale, case.group > 1

        def forward(q, k, v):
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        leaves = {"q": leaf(inputs.q), "k": leaf(inputs.k), "v": leaf(inputs.v)}
        return train.prepared(TrainStep(leaves=leaves, forward=forward, grad_out=inputs.grad_out,
                                        notes=[*notes, *self.train_notes]))


class FlexWindow(FlexImpl):
    """FlexAttention over the causal window of ``span(case)`` keys (None: dense causal)."""

    def __init__(self, id: str, *, family: str, pattern: str, span, description: str):
        super().__init__(id, family=family, pattern=pattern, description=description)
        self.span = span

    def build(self, case, inputs):
        span = self.span(case)
        any_, full = window_block_tables(case.seq_len, span, device=inputs.q.device)

        if span is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < span)

        bm = block_mask_from_tables(any_[None, None], full[None, None], mask_mod, case.seq_len)
        return bm, None, [], {}


# ---------------------------------------------------------------------------------------------
# xFormers

XFORMERS_HINT = "xFormers is not installed (pip install 'sparsek[xformers]')"


def xformers_refusal(exc: BaseException) -> str:
    """xFormers' "No operator found" error, condensed to the operators and their reasons.

    The raw message starts with the full description of every input; what matters comes after
    each "`<op>` is not supported because:" line (e.g. "xFormers wasn't build with CUDA support").
    """
    lines = str(exc).splitlines()
    reasons, op = {}, None
    for line in lines:
        text = line.strip()
        if text.endswith("is not supported because:"):
            op = text.split(" is not supported")[0].strip("`")
            reasons[op] = []
        elif op is not None and text and not text.startswith("`"):
            reasons[op].append(text)
    if not reasons:
        return first_line(exc, limit=500)
    head = lines[0].rstrip(":").strip() if lines else type(exc).__name__
    body = "; ".join(f"{name}: {', '.join(dict.fromkeys(why)) or '?'}" for name, why in reasons.items())
    text = f"{type(exc).__name__}: {head} ({body})"
    return text if len(text) <= 500 else text[:497] + "..."


class XFormersImpl(Impl):
    """``xformers.ops.memory_efficient_attention_forward`` with operator ``op`` (a module of
    xformers.ops.fmha, or None to let xFormers dispatch) and a causal or local-window bias.
    Training steps call ``memory_efficient_attention`` with that module's (FwOp, BwOp).

    Layout: xFormers takes (B, S, H, D); GQA as 5-D (B, S, Hkv, G, D) with k and v expanded
    along G with stride 0 (no copy). The layout change happens in prepare; in a training step
    the expand is inside the step (a view; its backward sums the group's gradients into Hkv).
    """

    def __init__(self, id: str, *, op: str | None, bias: str, family: str, pattern: str, description: str):
        super().__init__(id, family=family, kind="prefill", pattern=pattern, description=description, train=True)
        self.op_name = op
        self.bias_kind = bias  # "causal" | "local"

    def _modules(self, train_step: bool = False):
        """(xformers.ops, fmha, op): op is FwOp, or (FwOp, BwOp) for a training step, or None."""
        import xformers.ops as xops
        from xformers.ops import fmha

        op = None
        if self.op_name is not None:
            module = getattr(fmha, self.op_name)
            op = (module.FwOp, module.BwOp) if train_step else module.FwOp
        return xops, fmha, op

    def _bias(self, fmha, case: Case):
        if self.bias_kind == "causal":
            return fmha.attn_bias.LowerTriangularMask()
        # query i sees keys i - (K + W - 1) .. i: the same K + W key budget as SparseK
        return fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=case.key_budget - 1, window_right=0)

    @staticmethod
    def layout(case: Case, q, k, v):
        """q (B, Hq, S, D), k, v (B, Hkv, S, D) -> xFormers' (B, S, [Hkv, G,] D), stored in that
        order (as an xFormers model holds them), k and v broadcast over G without a copy."""
        return XFormersImpl.group(case, *(t.transpose(1, 2).contiguous() for t in (q, k, v)))

    @staticmethod
    def group(case: Case, qs, ks, vs):
        """qs (B, S, Hq, D), ks, vs (B, S, Hkv, D) -> (B, S, Hkv, G, D) views for GQA (unchanged
        for MHA); k and v broadcast over G with stride 0."""
        if case.group == 1:
            return qs, ks, vs
        B, S, D = qs.shape[0], qs.shape[1], qs.shape[3]
        q5 = qs.view(B, S, case.kv_heads, case.group, D)
        k5 = ks.unsqueeze(3).expand(B, S, case.kv_heads, case.group, D)
        v5 = vs.unsqueeze(3).expand(B, S, case.kv_heads, case.group, D)
        return q5, k5, v5

    @staticmethod
    def unlayout(case: Case, out):
        """xFormers' output (B, S, [Hkv, G,] D) -> (B, Hq, S, D)."""
        B, S, D = out.shape[0], out.shape[1], out.shape[-1]
        return out.reshape(B, S, case.q_heads, D).transpose(1, 2)

    def probe(self, case: Case, device: str) -> str | None:
        """Import xFormers and run the operator once on tiny inputs shaped like the case (forward
        and backward for a train case)."""
        train_step = case.kind == "train"
        try:
            xops, fmha, op = self._modules(train_step)
        except ImportError as exc:
            return f"{XFORMERS_HINT}: {first_line(exc)}" if "xformers" in str(exc) else first_line(exc)
        except AttributeError as exc:
            return f"this xFormers has no fmha.{self.op_name}: {first_line(exc)}"
        except Exception as exc:  # a build for another torch can fail at import with anything
            return f"importing xFormers failed: {first_line(exc)}"
        small = Case("probe", "prefill", 1, 2 * case.group, 2, 256, case.head_dim, case.dtype, 16,
                     min(case.window, 16), device, 0)
        x = torch.randn(1, 2 * case.group, 256, case.head_dim, device=device, dtype=case.torch_dtype)
        kv = torch.randn(1, 2, 256, case.head_dim, device=device, dtype=case.torch_dtype)
        try:
            if train_step:
                qs, ks = (leaf(t.transpose(1, 2).contiguous()) for t in (x, kv))
                with torch.enable_grad():
                    q_, k_, v_ = self.group(small, qs, ks, ks)
                    out = xops.memory_efficient_attention(q_, k_, v_, attn_bias=self._bias(fmha, small),
                                                          scale=case.scale, op=op)
                    torch.autograd.grad(out, (qs, ks), torch.ones_like(out))
            else:
                q_, k_, v_ = self.layout(small, x, kv, kv)
                xops.memory_efficient_attention_forward(q_, k_, v_, attn_bias=self._bias(fmha, small),
                                                        scale=case.scale, op=op)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            return xformers_refusal(exc)
        return None

    def _available(self, case: Case) -> str | None:
        reason = cuda_reason(case, "xFormers' attention")
        if reason:
            return reason
        key = (self.id, case.dtype, case.head_dim, case.group > 1, case.kind == "train")
        return cached_probe(key, lambda: self.probe(case, "cuda"))

    def _prepare(self, case: Case, inputs: Inputs) -> Prepared:
        xops, fmha, op = self._modules()
        q, k, v = self.layout(case, inputs.q, inputs.k, inputs.v)
        bias = self._bias(fmha, case)
        scale = case.scale

        def fn():
            return xops.memory_efficient_attention_forward(q, k, v, attn_bias=bias, scale=scale, op=op)

        notes = [] if op is not None else ["operator chosen by xFormers' dispatcher"]
        return Prepared(fn=fn, output_fn=lambda: self.unlayout(case, fn()), notes=notes)

    def _prepare_train(self, case: Case, inputs: Inputs) -> Prepared:
        xops, fmha, op = self._modules(train_step=True)
        bias = self._bias(fmha, case)
        scale = case.scale
        leaves = {name: leaf(getattr(inputs, name).transpose(1, 2).contiguous()) for name in ("q", "k", "v")}  # (B, S, H, D)
        B, S, Hq, D = leaves["q"].shape
        grad_out = inputs.grad_out.transpose(1, 2).contiguous()  # (B, S, Hq, D)
        if case.group > 1:
            grad_out = grad_out.view(B, S, case.kv_heads, case.group, D)

        def forward(q, k, v):
            q_, k_, v_ = self.group(case, q, k, v)
            return xops.memory_efficient_attention(q_, k_, v_, attn_bias=bias, scale=scale, op=op)

        notes = [] if op is not None else ["operator chosen by xFormers' dispatcher"]
        if case.group > 1:
            notes.append("GQA: k and v broadcast over the group inside the step (a view; its backward sums the "
                         "group's gradients)")
        to_sdpa = {name: (lambda g: g.transpose(1, 2)) for name in leaves}  # (B, S, H, D) -> (B, H, S, D)
        return train.prepared(TrainStep(leaves=leaves, forward=forward, grad_out=grad_out, to_sdpa=to_sdpa,
                                        notes=notes))


# ---------------------------------------------------------------------------------------------

IMPLS = (
    SdpaImpl("sdpa-flash", "FLASH_ATTENTION", "PyTorch SDPA, FlashAttention-2 backend"),
    SdpaImpl("sdpa-cudnn", "CUDNN_ATTENTION", "PyTorch SDPA, cuDNN backend"),
    SdpaImpl("sdpa-efficient", "EFFICIENT_ATTENTION", "PyTorch SDPA, memory-efficient (CUTLASS) backend"),
    SdpaImpl("sdpa-math", "MATH", "PyTorch SDPA, math backend (materialises S x S)"),
    FlexWindow("flex-causal", family="dense", pattern="dense-causal", span=lambda case: None,
               description="FlexAttention (compiled), causal block mask"),
    XFormersImpl("xformers-cutlass", op="cutlass", bias="causal", family="dense", pattern="dense-causal",
                 description="xFormers CUTLASS forward, causal bias"),
    XFormersImpl("xformers-flash", op="flash", bias="causal", family="dense", pattern="dense-causal",
                 description="xFormers FlashAttention-2 forward, causal bias"),
    XFormersImpl("xformers-flash3", op="flash3", bias="causal", family="dense", pattern="dense-causal",
                 description="xFormers FlashAttention-3 forward, causal bias"),
)
