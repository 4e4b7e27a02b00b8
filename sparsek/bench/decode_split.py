"""Where a decode step's time goes: the step, its two kernels alone, and how they overlap.

    python -m sparsek.bench.decode_split --case decode-32k-b16 --json out/split.json

On a CUDA device, for one decode case: the median (cold L2, CUDA events) of the whole step
(``SparseKCache.step``), of the attention kernel alone and of the update kernel alone; the DRAM
floor of reading the K + W slots at the copy rate measured in the same run; and, from a
torch.profiler (CUPTI) kernel timeline of a few steps, when the update starts relative to the
attention and how long each runs beside the other. With a window the update runs beside the
attention (docs/decode.md), so "step - attention" is what the update costs.

Timed steps replay context tokens, as the ``sparsek-decode`` benchmark does, so the selection keeps
changing. The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from .results import write_json_atomic

ATTENTION_KERNEL = "decode_attention_kernel"
UPDATE_KERNEL = "decode_update_kernel"


def step_overlap(events: list[dict]) -> list[dict]:
    """Pair the attention and update kernels of each step in a chrome trace (torch.profiler).

    events: trace events (``ts``/``dur`` in us, ``cat`` "kernel"). The two kernels of one step are
    launched inside one ``decode_step`` op, so they share ``args["External id"]``; without that id,
    kernels are paired in launch order. Returns one dict per step: ``update_start`` (us after the
    attention's start; negative when the update ran first, window 0), ``attention``, ``update``
    (durations) and ``span`` (first start to last end).
    """
    kernels = sorted((e for e in events if e.get("cat") == "kernel"
                      and (ATTENTION_KERNEL in e.get("name", "") or UPDATE_KERNEL in e.get("name", ""))),
                     key=lambda e: e["ts"])
    groups: dict = {}
    for n, e in enumerate(kernels):
        key = (e.get("args") or {}).get("External id")
        groups.setdefault(("op", key) if key is not None else ("order", n // 2), []).append(e)
    steps = []
    for group in groups.values():
        kinds = {("attention" if ATTENTION_KERNEL in e["name"] else "update"): e for e in group}
        if len(group) != 2 or len(kinds) != 2:  # a step cut by the trace, or an op of its own
            continue
        a, u = kinds["attention"], kinds["update"]
        start = min(a["ts"], u["ts"])
        end = max(a["ts"] + a["dur"], u["ts"] + u["dur"])
        steps.append({"update_start": u["ts"] - a["ts"], "attention": a["dur"], "update": u["dur"], "span": end - start})
    return steps


def summarize_overlap(steps: list[dict], skip: int = 2) -> dict:
    """Medians over the steps after the first ``skip`` (the first launches pay one-time costs)."""
    kept = steps[skip:] if len(steps) > skip else steps
    if not kept:
        return {}
    return {key: statistics.median(s[key] for s in kept) for key in kept[0]} | {"steps": len(kept)}


def _closures(case):
    """(step, attention, update) callables over one cache built from the case's context."""
    from sparsek import SparseKCache
    from sparsek.bench.cases import make_inputs
    from sparsek.bench.impls.decode import STEP_STREAM  # the same token replay as the sparsek-decode benchmark

    x = make_inputs(case)
    cache = SparseKCache.from_prefill(x.k, x.v, x.scores, topk=case.topk, window=case.window, scale=case.scale,
                                      backend="cuda", check_interval=0)
    st, ops = cache.state, cache._cuda_ops()
    counters = cache._counters_for(case.q_heads)
    K, W = case.topk, case.window
    n = min(STEP_STREAM, case.seq_len)
    stream = x.scores[..., :n].permute(2, 0, 1).contiguous()  # (n, B, Hkv): token j's scores
    j = [0]

    def token():
        i = j[0] % n
        j[0] += 1
        return x.k[:, :, i : i + 1], x.v[:, :, i : i + 1], stream[i]

    def step():
        return cache.step(x.q, *token())

    def attention():  # the state's query, without the update (the cache does not change)
        k_new, v_new, u_new = token()
        return ops.decode_attention(x.q, k_new, v_new, u_new, st.k_slots, st.v_slots, st.slot_score, st.spare,
                                    st.tau, st.lengths, st.status, counters, K, W, case.scale, 0)

    def update():
        k_new, v_new, u_new = token()
        ops.decode_update(k_new, v_new, u_new, st.k_slots, st.v_slots, st.slot_score, st.slot_pos, st.spare,
                          st.win_score, st.soft, st.soft_count, st.tau, st.lengths, st.status, K, W)

    return cache, step, attention, update


def _timeline(step, steps: int = 12) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import timing

    flush = timing.l2_flush_buffer("cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            flush.zero_()  # cold L2, as the timed medians
            step()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return step_overlap(json.load(f)["traceEvents"])
    finally:
        os.unlink(path)


def measure(case_name: str, max_time_s: float = 2.0) -> dict:
    from . import metrics, timing
    from .cases import CASES

    case = CASES[case_name]
    cache, step, attention, update = _closures(case)
    kw = dict(device="cuda", cold=True, max_time_s=max_time_s, min_samples=20)
    res: dict = {"case": case_name}
    for name, fn in (("step", step), ("attention", attention), ("update", update)):
        res[name] = timing.measure(fn, **kw).median * 1e6
    res["update_exposed"] = res["step"] - res["attention"]
    res["timeline"] = summarize_overlap(_timeline(step))
    cache.check()  # a failed sequence would make every figure meaningless
    gbps = metrics.measure_peaks("cuda", quick=True)["copy"]["gbps"]
    slot_bytes = metrics.kv_bytes(case, "decode-sparsek")
    res["copy_gbps"] = gbps
    res["slot_bytes"] = slot_bytes
    res["dram_floor"] = slot_bytes / (gbps * 1e9) * 1e6
    return res


def format_table(res: dict) -> str:
    tl = res.get("timeline") or {}
    lines = [
        f"{res['case']}: us, medians (cold L2)",
        f"  step (attention + update)   {res['step']:8.1f}",
        f"    attention alone           {res['attention']:8.1f}",
        f"    update alone              {res['update']:8.1f}",
        f"    update exposed            {res['update_exposed']:8.1f}  (step - attention: "
        f"{res['update_exposed'] / res['step']:.0%} of the step)",
        f"  DRAM floor of the K+W slots {res['dram_floor']:8.1f}  ({res['slot_bytes'] / 2**20:.0f} MiB at the measured "
        f"copy rate {res['copy_gbps']:.0f} GB/s)",
        f"  step / floor                {res['step'] / res['dram_floor']:8.2f}x",
    ]
    if tl:
        lines.append(f"  timeline ({tl['steps']} steps): update starts {tl['update_start']:+.1f} us after the attention, "
                     f"runs {tl['update']:.1f} us; attention {tl['attention']:.1f} us; step span {tl['span']:.1f} us")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsek.bench.decode_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="decode-32k-b16", help="a decode case of the registry")
    p.add_argument("--json", metavar="PATH", help="write the figures here (atomically)")
    p.add_argument("--max-time", type=float, default=2.0, help="seconds per timed quantity")
    args = p.parse_args(argv)
    from .cases import CASES

    case = CASES.get(args.case)
    if case is None or case.kind != "decode" or case.device != "cuda":
        decode = sorted(n for n, c in CASES.items() if c.kind == "decode" and c.device == "cuda")
        p.error(f"--case must be a CUDA decode case ({', '.join(decode)}), got {args.case!r}")
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA device (the decode kernels are CUDA only)")
    res = measure(args.case, args.max_time)
    if args.json:
        write_json_atomic(args.json, res)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
