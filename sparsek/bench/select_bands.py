"""Band sizes of the segmented selection walk, from a case's own scores (CPU).

A segmented-walk CTA (csrc/selection.cu) keeps in shared memory, 24 bytes each, the keys that
matter for its chunk of prefix lengths [n0, n0 + chunk): those present by the chunk's end (index
< n0 + chunk) whose score lies above the floor u_(K+1)(n0) - 1, where u_(K+1)(n0) is the
(K+1)-th best score of the keys present at n0. The band's size sets how many CTAs share an SM; a
chunk whose band exceeds the first launch's band is deferred to a second launch (selection v3.2),
and one past 9,216 keys walks serially in global memory, much slower. This tool prints the
distribution of band sizes over a case's chunks, so a band can be chosen from the scores the
suite uses:

    python -m sparsek.bench.select_bands --case seed --rows 256 --chunk 1024 --json OUT.json

Scores are the suite's (``realistic_scores``, the case's seed + 1 so that the rows are fresh
draws, not the timed ones); only the band is computed, not the selection, so it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .cases import get_case, realistic_scores
from .results import write_json_atomic


def band_sizes(scores: torch.Tensor, topk: int, window: int, chunk: int) -> torch.Tensor:  # scores: (R, S)
    """Band size of every chunk of every row: (R * n_chunks,) int64."""
    R, S = scores.shape
    n_max = max(0, S - window)
    j = torch.arange(S)
    sizes = []
    for r in range(R):
        u = scores[r].double()
        for n0 in range(topk + 1, n_max + 1, chunk):
            n_end = min(n0 + chunk, n_max + 1)
            floor = torch.topk(u[:n0], topk + 1).values[-1].item() - 1.0
            sizes.append(int(((u > floor) & (j < n_end)).sum()))
    return torch.tensor(sizes, dtype=torch.int64)


def summary(sizes: torch.Tensor, caps: list[int]) -> dict:
    x = sizes.double()
    out = {"chunks": int(x.numel()), "mean": float(x.mean()), "p50": float(x.quantile(0.5)),
           "p99": float(x.quantile(0.99)), "max": int(sizes.max())}
    for cap in caps:
        out[f"over {cap}"] = float((sizes > cap).double().mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="seed", help="a prefill or train case (default seed)")
    ap.add_argument("--rows", type=int, default=256, help="rows of scores (one per batch x kv head) to draw (default 256)")
    ap.add_argument("--chunk", type=int, default=1024, help="prefix lengths per CTA (default 1024, the rule at seed and long-64k)")
    ap.add_argument("--caps", default="2048,2816,4096,9216", help="caps to report the share of chunks above")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    case = get_case(args.case)
    scores = realistic_scores(1, args.rows, case.seq_len, torch.Generator().manual_seed(case.seed + 1), torch.device("cpu"))[0]
    caps = [int(c) for c in args.caps.split(",")]
    result = {"case": case.name, "seq_len": case.seq_len, "topk": case.topk, "window": case.window, "chunk": args.chunk,
              "rows": args.rows, **summary(band_sizes(scores, case.topk, case.window, args.chunk), caps)}
    print(json.dumps(result), flush=True)
    if args.json:
        write_json_atomic(args.json, {"command": "python -m sparsek.bench.select_bands " + " ".join(argv or sys.argv[1:]),
                                      **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
