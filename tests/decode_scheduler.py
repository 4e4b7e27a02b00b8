"""One continuous-batching scheduler for the decode tests, CPU (tests/test_decode.py) and CUDA
(tests/test_decode_gpu.py): requests arrive, take a free slot with their prompt (prefill_slot),
step beside the others (step with ``active``; free slots' rows hold NaN, which a step must never
read) and leave (evict). Every output is compared with the prefill op in float64 on the CPU, run
on that sequence alone (on its own, possibly low-precision, inputs)."""

from __future__ import annotations

import torch

import sparsek


def serve(cache, requests, seqs, Hq: int, atol: float):
    """``requests``: (arrives at step, prompt length, tokens to generate, score kind) per request;
    ``seqs``: its (q, k, v, scores) of shapes (1, H, L, D) / (1, Hkv, L) on the cache's device."""
    slots, Hkv, D, K, W = cache.batch, cache.kv_heads, cache.head_dim, cache.topk, cache.window
    dev, dt, st = cache.device, cache.dtype, cache.score_dtype
    expected = [sparsek.sparsek_attention(*(t.double().cpu() for t in seq), topk=K, window=W) for seq in seqs]
    waiting = list(range(len(requests)))
    owner, pos = [None] * slots, [0] * slots  # request in each slot, its next position
    step, done = 0, 0
    while done < len(requests):
        for b in range(slots):  # admit
            if owner[b] is None and waiting and requests[waiting[0]][0] <= step:
                i = waiting.pop(0)
                P = requests[i][1]
                q, k, v, u = seqs[i]
                cache.prefill_slot(b, k[0, :, :P], v[0, :, :P], u[0, :, :P])
                owner[b], pos[b] = i, P
        active = torch.tensor([o is not None for o in owner], device=dev)
        q_in = torch.full((slots, Hq, 1, D), float("nan"), device=dev, dtype=dt)
        k_in = torch.full((slots, Hkv, 1, D), float("nan"), device=dev, dtype=dt)
        v_in, u_in = k_in.clone(), torch.full((slots, Hkv), float("nan"), device=dev, dtype=st)
        for b, i in enumerate(owner):
            if i is not None:
                q, k, v, u = seqs[i]
                p = pos[b]
                q_in[b], k_in[b], v_in[b], u_in[b] = q[0, :, p : p + 1], k[0, :, p : p + 1], v[0, :, p : p + 1], u[0, :, p]
        out = cache.step(q_in, k_in, v_in, u_in, active=active).cpu()
        for b, i in enumerate(owner):
            if i is None:
                assert bool((out[b] == 0).all())
                continue
            torch.testing.assert_close(out[b].double(), expected[i][0, :, pos[b] : pos[b] + 1], atol=atol, rtol=atol,
                                       msg=lambda m: f"step {step}, slot {b}, request {i} at {pos[b]}: {m}")
            pos[b] += 1
            if pos[b] == requests[i][1] + requests[i][2]:  # finished: free the slot
                cache.evict(b)
                owner[b] = None
                done += 1
        assert cache.seq_lens.tolist() == [pos[b] if owner[b] is not None else 0 for b in range(slots)]
        step += 1
    return cache
