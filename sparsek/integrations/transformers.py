"""SparseK as a Hugging Face transformers attention implementation.

    from sparsek.integrations.transformers import attach_scorers, register
    register(topk=64, window=16)                      # name "sparsek"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sparsek")
    attach_scorers(model)                             # before building the optimizer

**The scorer.** SparseK needs one score per key per kv head that does not depend on the query.
transformers' attention interface passes the attention ``module`` and its query/key/value states,
not the hidden states ``SparseKScorer`` reads, so the scores come from the *value* states: a
linear map per kv head (``u[b, h, j] = w_h . v[b, h, j] + slope_h * j / position_scale``), the
same form as ``SparseKScorer`` but on one head's value. Values rather than keys, because the
keys arrive rotated by RoPE: a fixed linear map of a rotated key mixes the token's content with
an oscillation in its position, while the value is the token's content alone. The scorer is a
submodule of the attention module (``module.sparsek_scorer``), so the model's optimizer trains it
and its state dict saves it. ``attach_scorers(model)`` adds one to every attention module up
front; a scorer created lazily on the first forward (with a one-time warning) would miss an
optimizer built before it.

**Masks.** SparseK is causal by construction. ``register`` also registers transformers' SDPA mask
builder under the same name, which returns no mask when the batch has no padding. Padding (left,
as for batched generation, or right, as for training batches) is supported: the mask must be the
causal mask restricted to one contiguous range of real tokens per sequence, and each sequence is
then selected and attended over its real tokens alone, exactly as if it had been passed unpadded
(the padding shifts no position of the selection). Rows of padding queries come out zero (their
outputs are masked out downstream). Any other mask (packed sequences, holes in a sequence) is
refused with a ``ValueError``; so are dropout, ``softcap`` and ``sliding_window``.

**Generation.** With a KV cache the query is shorter than the keys (one token per step), and
``sparsek_attention`` needs them equal. The selection reads only the keys' scores, so the
queries are padded at the front to the key length and only the last rows of the output are kept:
exactly the rows the full-length computation gives, at the cost of a full-length attention per
step. ``generate(use_cache=False)`` and ``generate()`` both work; for constant-memory decoding use
``sparsek.SparseKCache``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._validate import check_int
from ..ops import sparsek_attention

SCORER_ATTR = "sparsek_scorer"
_warned_lazy = False


class SparseKValueScorer(nn.Module):
    """``u[b, h, j] = w_h . v[b, h, j] + slope_h * j / position_scale``: scores (B, Hkv, S) float32.

    No bias, for ``SparseKScorer``'s reason: a constant per head moves tau with it and leaves
    every gate unchanged. The slope starts at 0 (position-neutral).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, *, position_scale: float = 1024.0):
        super().__init__()
        check_int("SparseKValueScorer", "num_kv_heads", num_kv_heads, 1)
        check_int("SparseKValueScorer", "head_dim", head_dim, 1)
        self.position_scale = float(position_scale)
        self.weight = nn.Parameter(torch.empty(num_kv_heads, head_dim).uniform_(-head_dim**-0.5, head_dim**-0.5))
        self.slope = nn.Parameter(torch.zeros(num_kv_heads))

    def forward(self, value: Tensor) -> Tensor:  # value: (B, Hkv, S, D) -> (B, Hkv, S)
        if value.dim() != 4 or tuple(value.shape[1:2] + value.shape[3:]) != tuple(self.weight.shape):
            raise ValueError(
                f"SparseKValueScorer: value must be (B, Hkv={self.weight.shape[0]}, S, D={self.weight.shape[1]}), "
                f"got {tuple(value.shape)}"
            )
        # float32 (float64 for a float64 model): the threshold search compares scores exactly.
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        u = torch.einsum("bhsd,hd->bhs", value.to(dtype), self.weight.to(dtype))
        pos = torch.arange(value.shape[2], device=value.device, dtype=dtype) / self.position_scale
        return u + self.slope.to(dtype).view(1, -1, 1) * pos.view(1, 1, -1)


def _is_attention_module(module: nn.Module) -> bool:
    # Every decoder attention class of transformers' modern models (Llama, Mistral, Qwen, Gemma...)
    # carries these two attributes; the interface calls exactly these modules.
    return hasattr(module, "num_key_value_groups") and hasattr(module, "head_dim")


def attach_scorers(model: nn.Module) -> int:
    """Give every attention module of ``model`` a ``SparseKValueScorer`` (if it has none), on the
    model's device and dtype. Call before building the optimizer. Returns how many were added."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("attach_scorers: model has no .config; pass a transformers PreTrainedModel")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    added = 0
    for module in model.modules():
        if _is_attention_module(module) and not hasattr(module, SCORER_ATTR):
            param = next(module.parameters())
            scorer = SparseKValueScorer(num_kv_heads, module.head_dim).to(device=param.device, dtype=param.dtype)
            module.add_module(SCORER_ATTR, scorer)
            added += 1
    if added == 0 and not any(hasattr(m, SCORER_ATTR) for m in model.modules()):
        raise ValueError(f"attach_scorers: found no attention module (with num_key_value_groups and head_dim) in {type(model).__name__}")
    return added


def _scorer(module: nn.Module, value: Tensor) -> SparseKValueScorer:
    global _warned_lazy
    scorer = getattr(module, SCORER_ATTR, None)
    if scorer is None:
        if not _warned_lazy:
            _warned_lazy = True
            warnings.warn(
                "sparsek: attention module had no scorer; one was created on the fly. An optimizer built "
                "before this call does not train it: call sparsek.integrations.transformers.attach_scorers(model) "
                "before building the optimizer",
                RuntimeWarning,
                stacklevel=3,
            )
        scorer = SparseKValueScorer(value.shape[1], value.shape[3]).to(device=value.device, dtype=value.dtype)
        module.add_module(SCORER_ATTR, scorer)
    return scorer


def _token_ranges(fn: str, attention_mask: Tensor, q_len: int, k_len: int) -> list[tuple[int, int]] | None:
    """None for the plain causal mask (queries aligned to the end of the keys); for a padded batch,
    each sequence's range [lo, hi) of real key positions. Refuses any other mask."""
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:  # an additive float mask: 0 where allowed, a large negative number where not
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    rows = torch.arange(q_len, device=allowed.device).view(-1, 1) + (k_len - q_len)
    causal = torch.arange(k_len, device=allowed.device).view(1, -1) <= rows  # (q_len, k_len)
    refuse = (f"{fn}: got an attention_mask that is neither the causal mask nor the causal mask with padding "
              "(one contiguous range of real tokens per sequence), e.g. packed sequences; SparseK attention "
              "supports left or right padding only")
    if allowed.dim() != 4 or allowed.shape[-2:] != causal.shape:
        raise ValueError(f"{refuse}; shape {tuple(allowed.shape)}, expected (B, 1, {q_len}, {k_len})")
    if bool((allowed == causal).all()):
        return None
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(f"{refuse}; the mask differs between heads")
    allowed = allowed[:, 0]  # (B, q_len, k_len)
    real = allowed.any(dim=1)  # (B, k_len): keys some query sees
    ranges = []
    for b in range(allowed.shape[0]):
        idx = real[b].nonzero().flatten().tolist()
        lo, hi = (idx[0], idx[-1] + 1) if idx else (0, 0)
        if hi - lo != len(idx):
            raise ValueError(f"{refuse}; sequence {b} has masked keys between real ones")
        # The rows of real queries must be exactly causal over the real keys; padding rows are free.
        q_real = (rows.view(-1) >= lo) & (rows.view(-1) < hi)
        in_range = (torch.arange(k_len, device=allowed.device) >= lo) & (torch.arange(k_len, device=allowed.device) < hi)
        want = causal & in_range.view(1, -1)
        if not bool((allowed[b][q_real] == want[q_real]).all()):
            raise ValueError(f"{refuse}; sequence {b} is not causal over its real tokens {lo}..{hi - 1}")
        ranges.append((lo, hi))
    return ranges


def make_attention_forward(topk: int, window: int = 0, name: str = "sparsek"):
    """The attention function (transformers' interface) for SparseK with these ``topk``/``window``."""
    check_int(name, "topk", topk, 1)
    check_int(name, "window", window, 0)

    def sparsek_attention_forward(
        module: nn.Module,
        query: Tensor,  # (B, Hq, Sq, D)
        key: Tensor,  # (B, Hkv, Sk, D)
        value: Tensor,  # (B, Hkv, Sk, D)
        attention_mask: Tensor | None,  # None, or (B, 1, Sq, Sk) bool: causal, possibly with padding
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[Tensor, None]:  # (B, Sq, Hq, D)
        if dropout:
            raise NotImplementedError(f"{name}: attention dropout is not supported (got dropout={dropout}); set attention_dropout=0")
        for unsupported in ("softcap", "sliding_window"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"{name}: {unsupported}={kwargs[unsupported]} is not supported")
        q_len, k_len = query.shape[2], key.shape[2]
        if q_len > k_len:
            raise ValueError(f"{name}: query length {q_len} exceeds key length {k_len}")
        ranges = None if attention_mask is None else _token_ranges(name, attention_mask, q_len, k_len)
        scores = _scorer(module, value)(value)  # (B, Hkv, Sk)
        if q_len < k_len:
            # Decoding against a cache: the selection depends on the keys' scores alone, so the
            # last q_len rows of a full-length call are these queries' exact outputs.
            query = torch.cat([query.new_zeros(*query.shape[:2], k_len - q_len, query.shape[3]), query], dim=2)
        if ranges is None:
            out = sparsek_attention(query, key, value, scores, topk=topk, window=window, scale=scaling)
        else:  # padded: each sequence over its real tokens alone; padding rows stay zero
            out = query.new_zeros(query.shape)
            for b, (lo, hi) in enumerate(ranges):
                if hi > lo:
                    part = (t[b : b + 1, :, lo:hi] for t in (query, key, value, scores))
                    out[b : b + 1, :, lo:hi] = sparsek_attention(*part, topk=topk, window=window, scale=scaling)
        return out[:, :, k_len - q_len :].transpose(1, 2).contiguous(), None

    sparsek_attention_forward.__name__ = f"{name}_attention_forward"
    return sparsek_attention_forward


def register(topk: int, window: int = 0, name: str = "sparsek") -> str:
    """Register SparseK under ``name`` in transformers' attention and mask interfaces; returns
    ``name`` (pass it as ``attn_implementation``). Registering again replaces the parameters."""
    AttentionInterface.register(name, make_attention_forward(topk, window, name))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
