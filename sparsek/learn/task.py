"""Synthetic long-range retrieval: key/value facts scattered in filler, then queries.

One sequence of ``seq_len`` tokens reads

    f f f k3 v7 f f f f k1 v2 f ... f k5 v0 f f   Q k1 Q k5 ...
    |------------- context: facts in filler ----| |- num_queries x (Q k) -|

* ``num_facts`` facts, each a key token followed by its value token, at random
  non-overlapping positions of the context; the keys of one sequence are distinct.
* filler tokens drawn uniformly from their own vocabulary.
* ``num_queries`` queries at the end: the marker ``Q`` and the key of one of the facts
  (distinct per query). The model must predict the fact's value at the key position of each
  query, so the answer needs the one fact, wherever it sits in the context. The answers are
  never fed back as tokens: a value token after a query would be one more fact-like position
  competing for the query-independent top-k.

Keys, values and filler use disjoint token ranges. A fact is therefore recognisable from its
own tokens, without the query: a query-independent scorer *can* learn to keep every fact,
while which fact is needed depends on the query. This is the situation SparseK is designed
for; docs/learn.md discusses what the task does and does not show.

Everything is a function of the seed: ``sample(batch, seed)`` returns the same tensors on
every machine (the generator runs on the CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100  # targets at positions that are not answers (cross_entropy's default)


@dataclass(frozen=True)
class RetrievalBatch:
    tokens: Tensor  # (B, S) int64 input tokens
    targets: Tensor  # (B, S) int64: the value at each query's key position, IGNORE_INDEX elsewhere
    answer_pos: Tensor  # (B, Q) int64: positions whose prediction is scored
    fact_pos: Tensor  # (B, Q) int64: position of the value token that answers each query
    distance: Tensor  # (B, Q) int64: answer_pos - fact_pos (how far back the answer is)

    def to(self, device) -> "RetrievalBatch":
        return RetrievalBatch(*(t.to(device) for t in (self.tokens, self.targets, self.answer_pos, self.fact_pos, self.distance)))


@dataclass(frozen=True)
class RetrievalTask:
    """Sizes of the retrieval task; ``vocab_size`` and the token ranges follow from them."""

    seq_len: int = 128
    num_facts: int = 8
    num_queries: int = 4
    num_keys: int = 16
    num_values: int = 16
    num_filler: int = 16

    def __post_init__(self):
        for name in ("seq_len", "num_facts", "num_queries", "num_keys", "num_values", "num_filler"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalTask: {name} must be an int >= 1, got {value!r}")
        if self.num_queries > self.num_facts:
            raise ValueError(
                f"RetrievalTask: num_queries={self.num_queries} must be <= num_facts={self.num_facts} (one fact per query)"
            )
        if self.num_facts > self.num_keys:
            raise ValueError(f"RetrievalTask: num_facts={self.num_facts} must be <= num_keys={self.num_keys} (distinct keys)")
        if self.context_len < 2 * self.num_facts:
            raise ValueError(
                f"RetrievalTask: seq_len={self.seq_len} leaves a context of {self.context_len} tokens, "
                f"too short for {self.num_facts} two-token facts"
            )

    # Token ranges: [QUERY] [filler] [keys] [values].
    QUERY = 0

    @property
    def filler_start(self) -> int:
        return 1

    @property
    def key_start(self) -> int:
        return 1 + self.num_filler

    @property
    def value_start(self) -> int:
        return 1 + self.num_filler + self.num_keys

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_filler + self.num_keys + self.num_values

    @property
    def context_len(self) -> int:
        return self.seq_len - 2 * self.num_queries

    def as_dict(self) -> dict:
        return {**asdict(self), "vocab_size": self.vocab_size, "context_len": self.context_len}

    def sample(self, batch: int, seed: int) -> RetrievalBatch:
        """``batch`` sequences, a pure function of (task, batch, seed)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"RetrievalTask.sample: batch must be an int >= 1, got {batch!r}")
        gen = torch.Generator().manual_seed(int(seed))
        B, F, Q, L = batch, self.num_facts, self.num_queries, self.context_len
        rows = torch.arange(B).unsqueeze(1)

        tokens = torch.randint(self.filler_start, self.key_start, (B, self.seq_len), generator=gen)

        # Uniform over non-overlapping placements: F sorted distinct slots out of L - F, then
        # shifting the f-th by f leaves at least one token between fact starts.
        slots = torch.rand(B, L - F, generator=gen).argsort(-1)[:, :F].sort(-1).values
        key_pos = slots + torch.arange(F)  # (B, F)
        keys = torch.rand(B, self.num_keys, generator=gen).argsort(-1)[:, :F] + self.key_start  # distinct per row
        values = torch.randint(self.value_start, self.vocab_size, (B, F), generator=gen)
        tokens[rows, key_pos] = keys
        tokens[rows, key_pos + 1] = values

        asked = torch.rand(B, F, generator=gen).argsort(-1)[:, :Q]  # which facts the queries ask for
        q0 = L + 2 * torch.arange(Q)  # position of each query's marker
        tokens[:, q0] = self.QUERY
        tokens[rows, q0 + 1] = keys.gather(1, asked)

        answer_pos = (q0 + 1).expand(B, Q).contiguous()
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[rows, answer_pos] = values.gather(1, asked)
        fact_pos = key_pos.gather(1, asked) + 1
        return RetrievalBatch(tokens, targets, answer_pos, fact_pos, answer_pos - fact_pos)
