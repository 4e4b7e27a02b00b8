"""Small, valid sparsek-bench results documents for the tests of the readers (gate, compare, report)."""

from __future__ import annotations

from sparsek.bench.results import new_results
from sparsek.bench.timing import summarize


def ok(case: str, impl: str, samples: list[float]) -> dict:
    """A measured record: the samples and the summary the runner writes beside them."""
    return {"case": case, "impl": impl, "status": "ok",
            "timing": {"samples": list(samples), **summarize(samples), "count": len(samples)}}


def broken(case: str, impl: str, status: str, reason: str) -> dict:
    """A record that produced no samples: failed, oom, timeout or skipped."""
    return {"case": case, "impl": impl, "status": status, "reason": reason}


def results_doc(records: list[dict], *, device: str = "NVIDIA H200", finished: bool = True) -> dict:
    """A whole results file; ``finished=False`` is the checkpoint of a run that never finished."""
    doc = new_results({"started": "2026-12-01T00:00:00+00:00",
                       "finished": "2026-12-01T00:10:00+00:00" if finished else None,
                       "device": {"name": device}})
    doc["records"] = list(records)
    return doc
