"""Kernel A/B in one process: one CUDA op timed under the values of a kernel switch, in turn.

    python -m sparsek.bench.kernel_ab --op attention_fwd --switch SPARSEK_FWD_KERNEL=7,5 \
        --cases seed,long-16k,long-64k --rounds 2 --json OUT.json
    python -m sparsek.bench.kernel_ab --op select --switch SPARSEK_SELECT_BAND=9216,rule --cases seed --scores flat
    python -m sparsek.bench.kernel_ab --op backward --switch SPARSEK_BWD_KERNEL=2,1 --cases long-64k

The switches are environment variables the binding reads on every call (docs/kernels.md), so one
process, one set of inputs and one selection serve every value (``rule`` unsets the variable).
The values are timed in turn, round after round (A B C A B C ...), so that a drift of the clocks
shows as a spread between rounds rather than as a difference between values. Every value's
outputs are compared with the first value's bit for bit; for ``select`` that means the same tau,
end, block lists and counts; the backward's float32 atomics sum in no fixed order, so there the
largest difference of each gradient, relative to its largest magnitude, is reported instead.
Each time is the median of ``measure`` (the suite's timer: CUDA events, L2 flushed before every
call) for one op call, in milliseconds.

This is the lab book's instrument (docs/perf-notes.md) for "v(n+1) against v(n) in one process";
the suite (``sparsek-bench run``) measures the whole op against the baselines.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

RULE = "rule"  # a switch value that unsets the variable: the binding's default
OPS = ("attention_fwd", "select", "backward")

Outputs = Sequence  # tensors (or anything with torch.equal semantics) one call returns


def parse_switch(text: str) -> tuple[str, list[str]]:
    """'NAME=a,b,c' -> ('NAME', ['a', 'b', 'c']); a clear error for anything else."""
    name, sep, values = text.partition("=")
    vals = [v for v in values.split(",") if v]
    if not sep or not name.startswith("SPARSEK_") or len(vals) < 2 or len(set(vals)) != len(vals):
        raise ValueError(f"--switch must be SPARSEK_NAME=v1,v2[,...] with at least two different values, got {text!r}")
    return name, vals


def set_switch(name: str, value: str) -> None:
    if value == RULE:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def bitwise(a: Outputs, b: Outputs) -> dict:
    """Every output equal, bit for bit."""
    import torch

    return {"bitwise_equal_to_first": len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))}


def selection_compare(a: Outputs, b: Outputs) -> dict:
    """ops.select's (tau, end, block keys, block counts): tau bitwise, and the integers: end, the
    counts and each block's keys up to its count (the list's tail past the count is never written,
    so it holds whatever the allocation held). A chunk that walks serially sums tau in another
    order than a segmented one, so its last bit may differ; the integers never may."""
    import torch

    (tau_a, end_a, keys_a, count_a), (tau_b, end_b, keys_b, count_b) = a, b
    listed = torch.arange(keys_a.shape[-1], device=keys_a.device) < count_a.unsqueeze(-1)
    same_lists = torch.equal(count_a, count_b) and torch.equal(keys_a[listed], keys_b[listed])
    return {"tau_bitwise_equal_to_first": torch.equal(tau_a, tau_b),
            "integers_equal_to_first": torch.equal(end_a, end_b) and same_lists}


def relative_difference(a: Outputs, b: Outputs) -> dict:
    """The backward's gradients: max |a - b| / max |b| per output (0 for equal outputs)."""
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(y.float().abs().max()) if y.numel() else 0.0
        diff = float((x.float() - y.float()).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return {"max_rel_diff_to_first": worst}


def run_ab(name: str, values: list[str], rounds: int, call: Callable[[], Outputs], time_ms: Callable[[Callable], float],
           compare: Callable[[Outputs, Outputs], dict] = bitwise) -> dict:
    """Time ``call`` under each value of switch ``name``, ``rounds`` times in turn. Returns, per
    value, its medians in round order and how its first outputs compare with the first value's.
    The switch is restored to what it was, whatever happens."""
    before = os.environ.get(name)
    out: dict = {v: {"ms": []} for v in values}
    reference = None
    try:
        for _ in range(rounds):
            for v in values:
                set_switch(name, v)
                if len(out[v]) == 1:  # outputs not compared yet
                    got = call()
                    if reference is None:
                        reference = got
                    out[v].update(compare(got, reference))
                out[v]["ms"].append(time_ms(call))
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    return out


SCORES = ("case", "flat", "constant")


def shaped_scores(u, kind: str):
    """The case's scores (``case``), squeezed to within 0.01 of each other (``flat``: what a scorer
    near its initialisation gives, every key in every chunk's band) or all zero (``constant``)."""
    if kind == "case":
        return u
    if kind == "flat":
        return u * 1e-3
    if kind == "constant":
        return u.new_zeros(u.shape)
    raise ValueError(f"--scores must be one of {SCORES}, got {kind!r}")


def op_call(op: str, case_name: str, scores: str = "case") -> Callable[[], Outputs]:
    """One call of the op on the case's inputs (built once, on the GPU)."""
    import torch

    from .. import _cuda
    from .cases import get_case, make_inputs

    case = get_case(case_name)
    inp = make_inputs(case, "cuda")
    q, k, v, u = inp.q, inp.k, inp.v, shaped_scores(inp.scores, scores)
    ops = _cuda.ops()
    block_q = _cuda.block_q_for(q.shape[1], k.shape[1])
    if op == "select":
        return lambda: ops.select(u, case.topk, case.window, block_q)
    scale = q.shape[-1] ** -0.5
    if op == "attention_fwd":
        sel = ops.select(u, case.topk, case.window, block_q)  # once, under the default selection
        torch.cuda.synchronize()
        return lambda: ops.attention_fwd(q, k, v, u, *sel, case.window, scale, block_q)
    if op == "backward":  # the op's backward (dot, attention kernel, conversion, score-gradient tail)
        fwd = _cuda.forward(q, k, v, u, case.topk, case.window, scale)  # once, under the default kernels
        gen = torch.Generator(device=q.device).manual_seed(case.seed + 1)
        grad = torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)
        torch.cuda.synchronize()
        return lambda: _cuda.backward(grad, q, k, v, u, *fwd, case.window, scale)
    raise ValueError(f"--op must be one of {OPS}, got {op!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=OPS, default="attention_fwd")
    ap.add_argument("--switch", required=True, help="SPARSEK_NAME=v1,v2[,...]; 'rule' unsets it (the default)")
    ap.add_argument("--cases", default="seed,long-16k,long-64k", help="prefill cases (default seed,long-16k,long-64k)")
    ap.add_argument("--rounds", type=int, default=2, help="times each value is timed, in turn (default 2)")
    ap.add_argument("--max-time", type=float, default=1.0, help="seconds of samples per timing (default 1)")
    ap.add_argument("--scores", choices=SCORES, default="case",
                    help="the case's scores (default), 'flat' (within 0.01 of each other) or 'constant' (zeros)")
    ap.add_argument("--json", help="write the results here (atomically)")
    args = ap.parse_args(argv)
    name, values = parse_switch(args.switch)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")

    import torch

    if not torch.cuda.is_available():
        print("kernel_ab needs a CUDA GPU", file=sys.stderr)
        return 2
    from .device import git_state
    from .results import write_json_atomic
    from .timing import measure

    def time_ms(fn):
        return measure(fn, device="cuda", max_time_s=args.max_time).median * 1e3

    result = {"command": "python -m sparsek.bench.kernel_ab " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "git": git_state(), "op": args.op,
              "switch": name, "values": values, "scores": args.scores, "rounds": args.rounds, "timer": "sparsek.bench.timing.measure, cold L2, median",
              "cases": []}
    for case_name in args.cases.split(","):
        try:
            compare = {"select": selection_compare, "backward": relative_difference}.get(args.op, bitwise)
            per_value = run_ab(name, values, args.rounds, op_call(args.op, case_name, args.scores), time_ms, compare)
            row = {"case": case_name, "per_value": per_value}
        except Exception as exc:  # one failing case never loses the others
            row = {"case": case_name, "error": f"{type(exc).__name__}: {exc}"}
        result["cases"].append(row)
        print(row, flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    base = values[0]
    for row in result["cases"]:
        if "error" in row:
            print(f"{row['case']:10s} failed: {row['error']}")
            continue
        ref = min(row["per_value"][base]["ms"])
        cells = []
        for v, d in row["per_value"].items():
            agrees = all(x for x in d.values() if isinstance(x, bool))
            extra = "".join(f" {k} {x:.2g}" for k, x in d.items() if isinstance(x, float))
            cells.append(f"{v}: {min(d['ms']):8.3f} ms ({min(d['ms']) / ref:5.3f}x){'' if agrees else ' DIFFERS'}{extra}")
        print(f"{row['case']:10s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
