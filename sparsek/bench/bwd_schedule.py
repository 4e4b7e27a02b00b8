"""How much work a key-major backward schedule would visit, from a case's real selection (CPU).

A key-major dK/dV pass owns a tile of keys and walks the queries that attend them, keeping dK and
dV in registers (no atomics). Key j is attended by its window, queries [j, j + W), and by the one
run of queries that select it, [j + W, end_j). A tile visits every query from its first to its
last, so the schedule wastes work where a tile's keys have runs of different lengths. This tool
counts, for the case's own scores and selection, the pairs a schedule visits over the pairs
attended:

* ``consecutive``: tiles of consecutive keys over their whole range [j, max(j + W, end_j)) (the
  plain FlashAttention-2 key-major order);
* ``window band``: the same tiles over the window only, [j, j + W) (a band: tiles of consecutive keys
  waste only the band's corner);
* ``selected, by start`` / ``selected, by end``: only the keys selected beyond their window,
  compacted and sorted by j or by end_j, over their runs [j + W, end_j).

It also counts the query-major plan the kernels run, and that plan with two neighbouring query
blocks per thread-block cluster walking the union of their tiles (``pair``): the reduced dK/dV
rows per attended pair say what sharing list tiles would save in the float32 reductions.

    python -m sparsek.bench.bwd_schedule --case long-16k --kv-heads 2 --json OUT.json

Scores are the suite's (``realistic_scores``, the case's seed); the selection is the reference's,
so a 64k case takes minutes on a CPU. docs/perf-notes.md reads the results.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .. import selection as sel_mod
from .cases import get_case, realistic_scores


def visits(end: torch.Tensor, window: int, tile: int) -> dict:  # end: (S,) int64 of one kv head
    """Visited pairs over attended pairs of each schedule, for one kv head's selection."""
    S = end.numel()
    j = torch.arange(S)
    reach = torch.clamp(torch.maximum(j + window, end), max=S)  # queries of key j: [j, reach_j)
    n = S // tile * tile
    tiles_j, tiles_reach = j[:n].view(-1, tile), reach[:n].view(-1, tile)
    out = {"attended_pairs": int((reach - j).sum()),
           "consecutive": float((tile * (tiles_reach.max(1).values - tiles_j[:, 0])).sum() / (reach[:n] - j[:n]).sum())}
    band = torch.clamp(j + window, max=S) - j
    band_t = torch.clamp(tiles_j[:, -1] + window, max=S) - tiles_j[:, 0]
    out["window band"] = float((tile * band_t).sum() / band[:n].sum())
    runs = (end - (j + window)).clamp(min=0)
    live = (runs > 0).nonzero().squeeze(1)
    out["keys selected beyond the window"] = live.numel() / S
    for order, key in (("by start", live), ("by end", live[end[live].argsort(stable=True)])):
        m = key.numel() // tile * tile
        if m == 0:
            out[f"selected, {order}"] = None
            continue
        t = key[:m].view(-1, tile)
        visited = tile * (end[t].max(1).values - (t + window).min(1).values)
        out[f"selected, {order}"] = float(visited.sum() / runs[key[:m]].sum())
    return out


def query_major(end: torch.Tensor, window: int, topk: int, block_q: int, group: int, tile: int = 64,
                pair: int = 1) -> dict:
    """The query-major plan the kernels run (csrc/tile_plan.h), for one kv head's selection
    (end: (S,) int64): each block of block_q queries x group heads (block_q * group = 128 rows)
    walks its window tiles over keys [i0 - W + 1, i1) and its list: the top-k candidates of its
    first query plus the keys whose run starts inside the block (block_lists_kernel), tile keys
    per tile. Visited pairs (every row of every tile, padding included) over attended pairs.

    pair > 1 counts the plan in which `pair` CTAs of neighbouring blocks (a thread-block cluster)
    walk the tiles of their union, the list and window of the pair * block_q queries, and
    combine their dK/dV partials before one reduction per tile: every CTA visits every union
    tile, and a tile's keys are reduced once per cluster instead of once per CTA.
    "reduced key rows / attended pair" is the dK/dV rows sent to the float32 accumulators per
    attended pair (times 8 * head_dim bytes: dK and dV, float32)."""
    S = end.numel()
    j = torch.arange(S)
    attended_q = torch.clamp(torch.arange(S) + 1, max=window).sum() + (end - (j + window)).clamp(min=0).sum()
    span = block_q * pair  # queries whose tiles one cluster walks
    starts = torch.arange(0, S, span)
    i1 = torch.clamp(starts + span, max=S)
    w0 = (starts - window + 1).clamp(min=0) if window > 0 else i1  # window 0: no window tiles
    n_win = (i1 - w0 + tile - 1) // tile
    n = (starts - window + 1).clamp(min=0)  # candidates of the span's first query
    runs_start = (end > j + window).long().cumsum(0)  # keys up to j whose run is non-empty
    lo, hi = n, torch.clamp(i1 - window, min=0, max=S)
    before = lambda x: torch.where(x > 0, runs_start[(x - 1).clamp(min=0)], torch.zeros_like(x))
    late = torch.where(hi > lo, before(hi) - before(lo), torch.zeros_like(lo))
    count = torch.clamp(n, max=topk) + late
    n_list = (count + tile - 1) // tile
    rows = block_q * group * pair  # every CTA of the cluster visits every tile of the span
    tiles = (n_win + n_list).sum()
    visited = rows * tile * tiles
    attended = attended_q * group
    return {"attended_pairs": int(attended), "visited_pairs": int(visited),
            "visited / attended": float(visited / attended),
            "tiles per block": float((n_win + n_list).float().mean()),
            "window tiles per block": float(n_win.float().mean()), "blocks": int(starts.numel()),
            "reduced key rows / attended pair": float(tile * tiles / attended)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="long-16k", help="a prefill or train case (default long-16k)")
    ap.add_argument("--kv-heads", type=int, default=2, help="kv heads to select (default 2; the statistics are per head)")
    ap.add_argument("--tiles", default="16,64", help="key tile sizes (default 16,64)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    case = get_case(args.case)
    scores = realistic_scores(case.batch, args.kv_heads, case.seq_len, torch.Generator().manual_seed(case.seed),
                              torch.device("cpu"))
    sel = sel_mod.select(scores[:1], case.topk, case.window)
    rows = []
    group = case.q_heads // case.kv_heads
    for h in range(args.kv_heads):
        for pair in (1, 2):
            name = "query-major (the kernels' plan)" if pair == 1 else "query-major, two blocks per cluster"
            row = {"case": case.name, "kv_head": h, "schedule": name, "tile": 64,
                   **query_major(sel.end[0, h].long(), case.window, case.topk, 128 // group, group, pair=pair)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for tile in (int(t) for t in args.tiles.split(",")):
            row = {"case": case.name, "kv_head": h, "tile": tile, **visits(sel.end[0, h].long(), case.window, tile)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m sparsek.bench.bwd_schedule " + " ".join(argv or sys.argv[1:]),
                       "case": case.name, "seq_len": case.seq_len, "topk": case.topk, "window": case.window,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
