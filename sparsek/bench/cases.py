"""Named benchmark cases (shapes) and their seeded inputs: the one list every front end uses.

A case fixes every field explicitly (docs/tiers.md): no defaults hide in adapters. Inputs are
drawn on the case's device from ``case.seed``, so the CLI, asv, pytest-benchmark and the Nsight
worker all time the same tensors on the same kind of device.

Three kinds: ``prefill`` (the forward over a whole sequence), ``decode`` (one new token against a
context) and ``train`` (one training step of attention at a prefill shape: forward + backward
with a fixed upstream gradient, drawn once with the inputs).

Scores imitate what a trained scorer produces: a slow drift along the sequence (some regions
matter more than others) plus per-token noise, scaled so that neighbouring scores differ by
O(1). That keeps the SparseK threshold's soft band (keys with 0 < u - tau < 1) populated, as it
is in a real model; i.i.d. or sorted scores would give an unrealistically easy selection.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

KINDS = ("prefill", "decode", "train")
DEVICES = ("cuda", "cpu")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

# Score model: amplitude of the drift (in units of its own std) and of the per-token noise.
SCORE_DRIFT = 2.0
SCORE_NOISE = 1.0


class UnknownName(KeyError, ValueError):
    """An unknown case or implementation name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "prefill" | "decode" | "train"
    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int  # prefill, train: sequence length; decode: context length before the new token
    head_dim: int
    dtype: str  # "float16" | "bfloat16" | "float32" | "float64"
    topk: int
    window: int
    device: str  # "cuda" | "cpu"
    seed: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Case {self.name!r}: kind={self.kind!r}, expected one of {KINDS}")
        if self.device not in DEVICES:
            raise ValueError(f"Case {self.name!r}: device={self.device!r}, expected one of {DEVICES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Case {self.name!r}: dtype={self.dtype!r}, expected one of {tuple(DTYPES)}")
        if self.kv_heads < 1 or self.q_heads % self.kv_heads:
            raise ValueError(f"Case {self.name!r}: q_heads={self.q_heads} must be a multiple of kv_heads={self.kv_heads}")
        for field in ("batch", "seq_len", "head_dim", "topk"):
            if getattr(self, field) < 1:
                raise ValueError(f"Case {self.name!r}: {field}={getattr(self, field)}, expected >= 1")
        if self.window < 0:
            raise ValueError(f"Case {self.name!r}: window={self.window}, expected >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.q_heads // self.kv_heads

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def key_budget(self) -> int:
        """Keys one SparseK query attends at most: topk + window."""
        return self.topk + self.window

    def input_bytes(self) -> int:
        """Bytes of the tensors make_inputs allocates (the case's floor on device memory)."""
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        kv = 2 * self.batch * self.kv_heads * self.seq_len * self.head_dim * elem
        scores = 4 * self.batch * self.kv_heads * (self.seq_len + (self.kind == "decode"))
        q_rows = 1 if self.kind == "decode" else self.seq_len
        q = self.batch * self.q_heads * q_rows * self.head_dim * elem
        new_kv = 2 * self.batch * self.kv_heads * self.head_dim * elem if self.kind == "decode" else 0
        grad_out = q if self.kind == "train" else 0  # the fixed upstream gradient, shaped like the output
        return kv + scores + q + new_kv + grad_out

    def describe(self) -> str:
        hq = f"Hq{self.q_heads}" if self.q_heads == self.kv_heads else f"Hq{self.q_heads} Hkv{self.kv_heads}"
        s = f"ctx{self.seq_len}" if self.kind == "decode" else f"S{self.seq_len}"
        return f"{self.kind} B{self.batch} {hq} {s} D{self.head_dim} {self.dtype} topk{self.topk} window{self.window} ({self.device})"


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _prefill(name, batch, q_heads, kv_heads, seq_len, head_dim, dtype, topk, window, device="cuda") -> Case:
    return Case(name, "prefill", batch, q_heads, kv_heads, seq_len, head_dim, dtype, topk, window, device, _seed(name))


def _decode(name, batch, q_heads, kv_heads, context, head_dim, dtype, topk, window, device="cuda") -> Case:
    return Case(name, "decode", batch, q_heads, kv_heads, context, head_dim, dtype, topk, window, device, _seed(name))


def _train(name: str, forward: Case) -> Case:
    """One training step at a prefill case's shape (its own seed, so its own inputs)."""
    return dataclasses.replace(forward, name=name, kind="train", seed=_seed(name))


_LONG = {"16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}
_DECODE_CONTEXTS = {"4k": 4096, "32k": 32768, "128k": 131072}
_DECODE_BATCHES = (1, 16, 64)

_FORWARD: dict[str, Case] = {
    c.name: c
    for c in (
        # The configuration of the original absolute targets (docs/tiers.md).
        _prefill("seed", 16, 96, 96, 4096, 128, "float16", topk=512, window=256),
        # Long context, Llama-style GQA.
        *(_prefill(f"long-{tag}", 1, 32, 8, s, 128, "bfloat16", topk=2048, window=512) for tag, s in _LONG.items()),
        *(
            _decode(f"decode-{tag}-b{b}", b, 32, 8, s, 128, "bfloat16", topk=2048, window=512)
            for tag, s in _DECODE_CONTEXTS.items()
            for b in _DECODE_BATCHES
        ),
        # Tiny float32 cases that run anywhere (CI); S is a multiple of 128 so block-sparse
        # adapters accept the same shape on a GPU.
        _prefill("cpu-smoke", 1, 4, 2, 256, 32, "float32", topk=32, window=16, device="cpu"),
        _decode("cpu-smoke-decode", 2, 4, 2, 256, 32, "float32", topk=32, window=16, device="cpu"),
    )
}

# Training-step cases and the prefill case whose shape each one takes.
TRAIN_SHAPES = {"train-seed": "seed", "train-16k": "long-16k", "train-64k": "long-64k",
                "train-cpu-smoke": "cpu-smoke"}

CASES: dict[str, Case] = {**_FORWARD, **{name: _train(name, _FORWARD[shape]) for name, shape in TRAIN_SHAPES.items()}}

# What `sparsek-bench run --default` (and `make bench`) runs on each kind of machine.
DEFAULT_CASES = {
    "cuda": ("seed", "long-16k", "long-32k", "long-64k", "long-128k", "train-seed", "train-16k", "train-64k"),
    "cpu": ("cpu-smoke", "train-cpu-smoke"),
}


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise UnknownName(f"unknown case {name!r}; valid cases: {', '.join(CASES)}") from None


def with_device(case: Case, device: str) -> Case:
    """The same case on another device (e.g. a CPU case on a GPU for a quick kernel test)."""
    return dataclasses.replace(case, device=device)


@dataclass
class Inputs:
    """Tensors of one case.

    prefill: q (B, Hq, S, D), k and v (B, Hkv, S, D), scores (B, Hkv, S) float32.
    train:   the prefill tensors plus grad_out (B, Hq, S, D), the fixed upstream gradient of the
             attention output (random, never zeros: a zero gradient would let a backward skip work).
    decode:  q (B, Hq, 1, D) is the new token's query; k, v (B, Hkv, S, D) and scores (B, Hkv, S)
             are the context; k_new, v_new (B, Hkv, 1, D) and score_new (B, Hkv, 1) the new token.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    k_new: torch.Tensor | None = None
    v_new: torch.Tensor | None = None
    score_new: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in vars(self).items() if t is not None}


def realistic_scores(batch: int, heads: int, length: int, generator: torch.Generator, device) -> torch.Tensor:
    """(batch, heads, length) float32: a normalised random walk (drift) plus i.i.d. noise."""
    steps = torch.randn(batch, heads, length, generator=generator, device=device, dtype=torch.float32)
    walk = steps.cumsum(-1)
    walk = (walk - walk.mean(-1, keepdim=True)) / walk.std(-1, keepdim=True).clamp(min=1e-6)
    noise = torch.randn(batch, heads, length, generator=generator, device=device, dtype=torch.float32)
    return SCORE_DRIFT * walk + SCORE_NOISE * noise


def make_inputs(case: Case, device=None) -> Inputs:
    """Seeded inputs for ``case`` on ``device`` (default: the case's device).

    Drawn directly on the device (a 128k-token decode batch would take minutes and tens of GB on
    the host); the same case on the same kind of device always gives the same tensors.
    """
    dev = torch.device(device if device is not None else case.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"case {case.name!r} needs CUDA, which is not available here")
    g = torch.Generator(device=dev).manual_seed(case.seed)
    dt = case.torch_dtype
    B, Hq, Hkv, S, D = case.batch, case.q_heads, case.kv_heads, case.seq_len, case.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt)

    k = randn(B, Hkv, S, D)
    v = randn(B, Hkv, S, D)
    if case.kind in ("prefill", "train"):
        q = randn(B, Hq, S, D)
        scores = realistic_scores(B, Hkv, S, g, dev)
        grad_out = randn(B, Hq, S, D) if case.kind == "train" else None
        return Inputs(q=q, k=k, v=v, scores=scores, grad_out=grad_out)
    scores = realistic_scores(B, Hkv, S + 1, g, dev)
    return Inputs(
        q=randn(B, Hq, 1, D),
        k=k,
        v=v,
        scores=scores[..., :S].contiguous(),
        k_new=randn(B, Hkv, 1, D),
        v_new=randn(B, Hkv, 1, D),
        score_new=scores[..., S:].contiguous(),
    )
