"""A tiny serving loop on the CPU: one SparseK attention layer, greedy decoding, two cache slots.

Requests of different prompt lengths arrive, take a free slot (``prefill_slot``), decode beside each
other (``step`` with an ``active`` mask: a free slot is skipped) and leave (``evict``). Each finished
sequence is checked against the prefill op run over its whole text: the constant-size cache gives
the same attention outputs. Then the cache's memory per sequence against a full KV cache.

    python examples/serve_tiny.py
"""

from __future__ import annotations

import torch
from torch import nn

import sparsek
from sparsek import SparseKCache, SparseKScorer

VOCAB, D_MODEL, HQ, HKV, HEAD_DIM, TOPK, WINDOW = 97, 64, 4, 2, 16, 8, 4


class TinyLM(nn.Module):
    """Embedding, one SparseK attention layer (GQA) with a residual, and a language-model head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.q_proj = nn.Linear(D_MODEL, HQ * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(D_MODEL, HKV * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(D_MODEL, HKV * HEAD_DIM, bias=False)
        self.scorer = SparseKScorer(D_MODEL, HKV)
        self.o_proj = nn.Linear(HQ * HEAD_DIM, D_MODEL, bias=False)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def qkvu(self, tokens: torch.Tensor, start: int = 0):
        """tokens (B, S) at positions [start, start + S) -> q (B, Hq, S, Dh), k, v (B, Hkv, S, Dh), u (B, Hkv, S)."""
        B, S = tokens.shape
        x = self.embed(tokens)
        q = self.q_proj(x).view(B, S, HQ, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(B, S, HKV, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(B, S, HKV, HEAD_DIM).transpose(1, 2)
        # the scorer's position term at the tokens' true positions (it rates keys by position too)
        pos = torch.arange(start, start + S, dtype=torch.float32) / self.scorer.position_scale
        u = self.scorer.proj(x).transpose(1, 2) + self.scorer.slope.view(1, -1, 1) * pos
        return q, k, v, u, x

    def logits(self, attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # attn (B, Hq, S, Dh), x (B, S, d)
        B, _, S, _ = attn.shape
        return self.head(x + self.o_proj(attn.transpose(1, 2).reshape(B, S, HQ * HEAD_DIM)))


def serve(model: TinyLM, requests: list[tuple[list[int], int]], slots: int = 2):
    """Greedy decoding of (prompt, new tokens) requests through a cache of ``slots`` sequences."""
    cache = SparseKCache(slots, HKV, HEAD_DIM, topk=TOPK, window=WINDOW, dtype=torch.float32)
    waiting = list(range(len(requests)))
    texts, owner, outputs = {}, [None] * slots, {}
    while waiting or any(o is not None for o in owner):
        for b in range(slots):  # admit: the prompt fills the slot, its last token is stepped below
            if owner[b] is None and waiting:
                i = waiting.pop(0)
                prompt = torch.tensor([requests[i][0]])
                _, k, v, u, _ = model.qkvu(prompt[:, :-1])
                cache.prefill_slot(b, k[0], v[0], u[0])
                owner[b], texts[i], outputs[i] = i, prompt[0].tolist(), []
        active = torch.tensor([o is not None for o in owner])
        last = torch.tensor([[texts[i][-1] if i is not None else 0] for i in owner])
        pos = cache.seq_lens  # the stepped token's position in each slot
        q, k, v, u, x = zip(*(model.qkvu(last[b : b + 1], int(pos[b])) for b in range(slots)))
        attn = cache.step(torch.cat(q), torch.cat(k), torch.cat(v), torch.cat(u), active=active)
        nxt = model.logits(attn, torch.cat(x)).argmax(-1)[:, 0]
        for b, i in enumerate(owner):
            if i is None:
                continue
            outputs[i].append(attn[b])
            if len(texts[i]) == len(requests[i][0]) + requests[i][1]:  # its last attention is in
                owner[b] = None
                cache.evict(b)
            else:
                texts[i].append(int(nxt[b]))
    return texts, outputs, cache


def check_against_prefill(model: TinyLM, requests, texts, outputs) -> float:
    """The largest difference between the decoded attention rows and the prefill op's."""
    worst = 0.0
    for i, (prompt, _) in enumerate(requests):
        q, k, v, u, _ = model.qkvu(torch.tensor([texts[i]]))
        full = sparsek.sparsek_attention(q, k, v, u, topk=TOPK, window=WINDOW)  # (1, Hq, S, Dh)
        decoded = torch.cat(outputs[i], 1)  # (Hq, n, Dh): the rows from the last prompt token on
        worst = max(worst, float((full[0, :, len(prompt) - 1 :] - decoded).abs().max()))
    return worst


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, VOCAB, (n,), generator=g).tolist(), new) for n, new in ((40, 12), (7, 20), (25, 5))]
    with torch.inference_mode():
        texts, outputs, cache = serve(model, requests)
        worst = check_against_prefill(model, requests, texts, outputs)
    for i, (prompt, new) in enumerate(requests):
        print(f"request {i}: prompt of {len(prompt)} tokens -> {texts[i][len(prompt):]}")
    print(f"decode vs prefill op, largest difference over every decoded row: {worst:.2e}")
    print(f"this tiny cache: {cache.nbytes:,} bytes for {cache.batch} slots (the key/value slots never grow)\n")

    # one attention layer of a Llama-3-8B-like model (8 kv heads of 128, bf16) with topk 2048, window 512
    per_seq = SparseKCache.bytes_per_sequence(8, 128, topk=2048, window=512, dtype=torch.bfloat16)
    print("memory per sequence and layer (Hkv 8, D 128, bf16; SparseK topk 2048, window 512):")
    for context in (32 * 1024, 128 * 1024):
        full = 2 * 8 * context * 128 * 2  # keys and values of every token
        print(f"  {context // 1024:>3}k tokens: full KV cache {full / 2**20:7.1f} MiB, SparseKCache "
              f"{per_seq['total'] / 2**20:5.1f} MiB ({per_seq['kv'] / 2**20:.1f} MiB of it key/value slots), "
              f"{full / per_seq['total']:.0f}x smaller")


if __name__ == "__main__":
    main()
