"""SparseK selection alone (tau per query, end per key): the reference and the CUDA kernel.

The prefill cases' scores, (B, Hkv, S) float32, from the same seeded inputs as every other front
end. Selection has no FLOP model and no dense peer; what matters is its time, its share of the
forward (compare with bench_prefill), and that the kernel agrees with the reference exactly
(``end``) or to rounding (``tau``). Measured once per asv run in setup_cache, like the attention
classes.
"""

import torch

from sparsek.bench import timing
from sparsek.bench.cases import CASES, make_inputs
from sparsek.bench.impls.base import first_line
from sparsek.bench.impls.sparsek_impls import cuda_path_reason

from . import _common


def _reference(case, scores):
    from sparsek import selection

    def fn():
        sel = selection.select(scores, case.topk, case.window)
        return sel.tau, sel.end

    return fn


def _cuda(case, scores):
    from sparsek import _cuda

    ops = _cuda.ops()
    # The per-block key lists too: the selection exactly as the forward pass launches it.
    block_q = _cuda.block_q_for(case.q_heads, case.kv_heads)

    def fn():
        tau, end, _, _ = ops.select(scores, case.topk, case.window, block_q)
        return tau, end

    return fn


# id -> (why it cannot run the case or None, factory of the timed call returning (tau, end))
SELECTORS = {
    "reference": (lambda case: None, _reference),
    "cuda": (cuda_path_reason, _cuda),
}
assert tuple(SELECTORS) == _common.SELECTION_IDS, "SPARSEK_ASV_IMPLS validates against SELECTION_IDS"


def _errors(got, want) -> dict:
    """max |tau - tau_ref| where both are finite (inf when the -inf entries differ), keys whose
    ``end`` differs."""
    tau, end = got
    tau_ref, end_ref = want
    tau, tau_ref = tau.double(), tau_ref.double()
    finite = torch.isfinite(tau_ref)
    if not torch.equal(finite, torch.isfinite(tau)):
        tau_err = float("inf")
    else:
        tau_err = float((tau - tau_ref)[finite].abs().max()) if finite.any() else 0.0
    return {"tau_error": tau_err, "end_mismatches": int((end.long() != end_ref.long()).sum())}


def _measure_one(case, scores, impl, want, profile) -> dict:
    reason, factory = SELECTORS[impl]
    why = reason(case)
    if why:
        return {"status": "skipped", "reason": why}
    cuda = case.device == "cuda"
    try:
        fn = factory(case, scores)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rec = {"status": "ok", "reason": None, **_errors(fn(), want)}
        if cuda:
            torch.cuda.synchronize()
            rec["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        m = timing.measure(fn, device=case.device, **profile)
        rec.update(samples=list(m.samples), median=m.median)
        return rec
    except Exception as exc:
        return {"status": "failed", "reason": first_line(exc, limit=500)}


def _measure():
    from sparsek.bench.runner import TIMING_PROFILES

    profile = TIMING_PROFILES["quick" if _common.quick() else "normal"]
    impls = _common.planned_impls("selection")
    records = {}
    for name in _common.planned_cases("prefill"):
        case = CASES[name]
        if case.device == "cuda" and not torch.cuda.is_available():
            records.update({(name, i): {"status": "skipped", "reason": "CUDA is not available"} for i in impls})
            continue
        scores = make_inputs(case).scores  # (B, Hkv, S) float32; q, k, v are dropped here
        with torch.no_grad():
            want = _reference(case, scores)()
            for impl in impls:
                records[(name, impl)] = _measure_one(case, scores, impl, want, profile)
        del scores, want
        if case.device == "cuda":
            torch.cuda.empty_cache()
    for (name, impl), rec in records.items():
        ref = records.get((name, "reference"), {})
        if rec.get("median") and ref.get("median"):
            rec["speedup"] = ref["median"] / rec["median"]
    return {"kind": "selection", "records": records}


class Selection:
    params = [_common.case_names("prefill"), list(SELECTORS)]
    param_names = ["case", "impl"]
    version = _common.VERSION
    setup_cache = staticmethod(_measure)

    def setup(self, cache, case, impl):
        self.rec = _common.record_for(cache, case, impl)

    def track_time(self, cache, case, impl):
        return {"samples": self.rec["samples"], "number": 1}

    track_time.unit = "seconds"

    def track_speedup(self, cache, case, impl):
        return _common._value(self.rec, "speedup", "the reference did not run in this run")

    track_speedup.unit = "x over the reference"

    def track_error(self, cache, case, impl):
        return self.rec["tau_error"]

    track_error.unit = "max abs tau error"

    def track_end_mismatches(self, cache, case, impl):
        return self.rec["end_mismatches"]

    track_end_mismatches.unit = "keys"

    def track_peak_memory(self, cache, case, impl):
        return _common._value(self.rec, "peak_bytes", "peak memory is measured on CUDA only")

    track_peak_memory.unit = "bytes"
