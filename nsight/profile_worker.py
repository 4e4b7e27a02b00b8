"""The process that ncu profiles: one case, the chosen implementations, each timed call inside
the harness's NVTX ranges (``case:<case>`` wrapping ``<impl>``, domain ``sparsek``).

    python nsight/profile_worker.py --case long-16k --impl sdpa-cudnn,sparsek [--iters 3] [--warmup 2] [--status PATH]

Warm-up calls run outside the ranges, so one-off work (compilation, autotuning, block masks)
is never profiled; then ``--iters`` calls run inside them, exactly as the runner wraps a timed
call. An implementation that is unavailable for the case is skipped with its reason, one that
raises is recorded as failed; both go to the ``--status`` JSON that the driver reads.

    python nsight/profile_worker.py --case long-16k --impl sdpa-cudnn --overhead [--samples 200] [--output PATH]

measures what the ranges cost instead (no ncu needed): the host time of entering and leaving the
two nested ranges, the latency of the timed call with the ranges on and off, interleaved, and the
harness's own measurement (sparsek.bench.timing.measure, the ranges as its ``around``) in
alternating rounds with the ranges on and off.
Both modes need the ``nvtx`` package: without it the ranges are no-ops and ncu would match nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

# Profile this checkout's sparsek, whatever else is installed: ncu runs this file by path.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

EXIT_SETUP = 3  # nvtx missing, unknown case or implementation: nothing was run


def case_range(case) -> str:
    """The outer range name; the driver's --nvtx-include filters on the inner (impl) range."""
    return f"case:{case.name}"


def run_case(case, inputs, impls, *, iters: int, warmup: int, annotate, sync) -> dict:
    """Warm up and run each implementation; returns {impl id: status record}."""
    results = {}
    for impl in impls:
        reason = impl.available(case)
        if reason:
            results[impl.id] = {"status": "skipped", "reason": str(reason)}
            continue
        try:
            fn = impl.prepare(case, inputs).fn
            for _ in range(warmup):
                fn()
            sync()
            for _ in range(iters):
                with annotate(case_range(case)), annotate(impl.id):
                    fn()
                sync()
            results[impl.id] = {"status": "profiled", "calls": iters}
        except Exception as exc:  # one failing implementation must not hide the others' profiles
            results[impl.id] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            fn = None  # drop this implementation's buffers before the next one allocates its own
    return results


def _percentiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


def range_cost_ns(annotate, set_enabled, names: tuple[str, str], loops: int = 20000) -> dict:
    """Host ns per entry+exit of the two nested ranges, enabled and disabled (the no-op path)."""
    out = {}
    for label, flag in (("enabled", True), ("disabled", False)):
        previous = set_enabled(flag)
        try:
            t0 = time.perf_counter_ns()
            for _ in range(loops):
                with annotate(names[0]), annotate(names[1]):
                    pass
            out[label] = (time.perf_counter_ns() - t0) / loops
        finally:
            set_enabled(previous)
    out["overhead_ns"] = out["enabled"] - out["disabled"]
    return out


def call_latency_us(fn, annotate, set_enabled, names: tuple[str, str], *, samples: int, timer) -> dict:
    """Latency of one wrapped call with ranges on and off, alternating so drift cancels out.

    ``timer(call) -> seconds`` times one call; on a GPU it records CUDA events around the ranges
    (outside them, so the range push and pop fall inside the measured window: the worst case).
    """
    times = {True: [], False: []}
    for i in range(2 * samples):
        flag = i % 2 == 0
        previous = set_enabled(flag)
        try:
            def wrapped():
                with annotate(names[0]), annotate(names[1]):
                    fn()
            times[flag].append(timer(wrapped) * 1e6)
        finally:
            set_enabled(previous)
    on, off = _percentiles(times[True]), _percentiles(times[False])
    delta = on["median"] - off["median"]
    return {"ranges_on": on, "ranges_off": off, "delta_us": delta,
            "delta_pct": 100.0 * delta / off["median"] if off["median"] else None}


def harness_latency_us(fn, device, annotate, set_enabled, names: tuple[str, str], *, rounds: int, measure) -> dict:
    """Median latency as the suite reports it, ranges on and off in alternating rounds."""

    @contextlib.contextmanager
    def ranges():
        with annotate(names[0]), annotate(names[1]):
            yield

    medians = {True: [], False: []}
    for _ in range(rounds):
        for flag in (True, False):
            previous = set_enabled(flag)
            try:
                medians[flag].append(measure(fn, device=device, around=ranges).median * 1e6)
            finally:
                set_enabled(previous)
    on, off = statistics.median(medians[True]), statistics.median(medians[False])
    return {"round_medians_on": medians[True], "round_medians_off": medians[False], "ranges_on": on,
            "ranges_off": off, "delta_us": on - off, "delta_pct": 100.0 * (on - off) / off if off else None}


def _cuda_timer(torch):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timer(call) -> float:
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return timer


def _host_timer(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def measure_overhead(case, inputs, impls, *, samples: int, warmup: int, rounds: int, nvtx_mod, torch) -> dict:
    try:
        from sparsek.bench.timing import measure
    except ImportError as exc:
        measure, missing = None, f"sparsek.bench.timing is not importable: {exc}"
    on_gpu = torch.cuda.is_available()
    timer = _cuda_timer(torch) if on_gpu else _host_timer
    report = {"case": case.name, "timer": "cuda events" if on_gpu else "host perf_counter",
              "device": torch.cuda.get_device_name() if on_gpu else "cpu", "impls": {}}
    for impl in impls:
        names = (case_range(case), impl.id)
        reason = impl.available(case)
        if reason:
            report["impls"][impl.id] = {"status": "skipped", "reason": str(reason)}
            continue
        try:
            fn = impl.prepare(case, inputs).fn
            for _ in range(warmup):
                fn()
            if on_gpu:
                torch.cuda.synchronize()
            report["impls"][impl.id] = {
                "status": "measured",
                "range_pair_host_ns": range_cost_ns(nvtx_mod.annotate, nvtx_mod.set_enabled, names),
                "call_latency_us": call_latency_us(fn, nvtx_mod.annotate, nvtx_mod.set_enabled, names,
                                                   samples=samples, timer=timer),
                "harness_latency_us": (
                    harness_latency_us(fn, case.device, nvtx_mod.annotate, nvtx_mod.set_enabled, names,
                                       rounds=rounds, measure=measure)
                    if measure else {"status": "unavailable", "reason": missing}),
            }
        except Exception as exc:
            report["impls"][impl.id] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            fn = None
    return report


def _write(doc: dict, path: str | None) -> None:
    text = json.dumps(doc, indent=1) + "\n"
    if path:
        Path(path).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile_worker.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True, help="a case name of sparsek.bench.cases")
    parser.add_argument("--impl", required=True, help="comma-separated implementation ids")
    parser.add_argument("--iters", type=int, default=3, help="profiled calls per implementation (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled calls first (default 2)")
    parser.add_argument("--status", help="write the per-implementation status JSON here")
    parser.add_argument("--overhead", action="store_true", help="measure the NVTX range overhead instead")
    parser.add_argument("--samples", type=int, default=200, help="--overhead: timed calls per setting")
    parser.add_argument("--rounds", type=int, default=3, help="--overhead: harness measurements per setting")
    parser.add_argument("--output", help="--overhead: JSON file (default: stdout)")
    args = parser.parse_args(argv)

    import torch

    from sparsek import _nvtx

    status = {"case": args.case, "iters": args.iters, "warmup": args.warmup, "nvtx": _nvtx.available(),
              "torch": torch.__version__, "impls": {}}

    def fail(message: str) -> int:
        status["error"] = message
        print(f"profile_worker: error: {message}", file=sys.stderr)
        if args.status:
            _write(status, args.status)
        return EXIT_SETUP

    if not _nvtx.available():
        return fail("the nvtx package is not importable in this Python, so the harness ranges are no-ops and "
                    "ncu --nvtx-include matches nothing: pip install nvtx (or put its wheel on PYTHONPATH)")
    try:
        from sparsek.bench.cases import get_case, make_inputs
        from sparsek.bench.impls import get_impl
    except ImportError as exc:
        return fail(f"the benchmark registry is not importable ({exc}); it provides the cases and implementations")
    try:
        case = get_case(args.case)
        impls = [get_impl(i) for i in args.impl.split(",") if i]
    except (KeyError, ValueError, LookupError) as exc:
        return fail(f"{type(exc).__name__}: {exc}")
    inputs = make_inputs(case)

    if args.overhead:
        _write(measure_overhead(case, inputs, impls, samples=args.samples, warmup=args.warmup,
                                rounds=args.rounds, nvtx_mod=_nvtx, torch=torch), args.output)
        return 0

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    status["impls"] = run_case(case, inputs, impls, iters=args.iters, warmup=args.warmup,
                               annotate=_nvtx.annotate, sync=sync)
    for impl_id, record in status["impls"].items():
        detail = record.get("reason") or record.get("error") or f"{record['calls']} calls in ranges"
        print(f"profile_worker: {args.case} / {impl_id}: {record['status']} ({detail})", file=sys.stderr)
    if args.status:
        _write(status, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
