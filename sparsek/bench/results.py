"""The results file: a versioned JSON document, written atomically.

    {
      "schema": "sparsek-bench", "schema_version": 1,
      "run":     {started, finished, argv, options, device (fingerprint), peaks, throttled, status_counts},
      "records": [ one per case x implementation:
                   {case, impl, family, kind, pattern, status, reason, case_spec,
                    timing: {samples [s], median, q1, q3, iqr, rel_iqr, cv, count, stop_reason, mode, timer, ...},
                    metrics: {us_per_iter, us_per_head, tflops_*, gbps, pct_peak_*, implausible},
                    error: {against, rows, max_abs, max_rel, atol, rtol, passed, extra: {name: {...}}},
                    memory: {peak_bytes}, clocks: {NVML summary during the timed loop},
                    notes: [...], traceback (failed records)} ],
      "tiers":   [ see tiers.assess ]
    }

``status`` is one of STATUSES. Only "ok" records carry timing; the others carry ``reason``.
Times are seconds in ``timing`` and microseconds (named so) in ``metrics``. Readers check
``schema_version``: a different major version is refused with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

SCHEMA = "sparsek-bench"
SCHEMA_VERSION = 1
STATUSES = ("ok", "skipped", "failed", "oom", "timeout")


def new_results(run: dict) -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "run": run, "records": [], "tiers": []}


def _clean(obj):
    """JSON has no inf/nan: write them as strings so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json_atomic(path, obj) -> Path:
    """Write obj as JSON to a temp file beside ``path``, fsync, then os.replace: readers (and a
    run killed mid-write) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(obj), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_results(path) -> dict:
    """Read a results file, refusing other schemas or versions with a message that says which."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON results file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a sparsek-bench results file (schema={doc.get('schema') if isinstance(doc, dict) else None!r})")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}; this sparsek-bench reads version {SCHEMA_VERSION}")
    return doc


def record_key(record: dict) -> str:
    return f"{record['case']}/{record['impl']}"


def samples_by_key(results: dict) -> dict[str, list[float]]:
    """{"case/impl": timing samples in seconds} for every record with status "ok"."""
    out = {}
    for record in results.get("records", []):
        if record.get("status") == "ok" and record.get("timing"):
            out[record_key(record)] = list(record["timing"]["samples"])
    return out


def status_counts(results: dict) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for record in results.get("records", []):
        counts[record.get("status", "failed")] = counts.get(record.get("status", "failed"), 0) + 1
    return counts


def merge_results(docs: list[dict], paths: list[str] | None = None) -> dict:
    """One document from several runs (e.g. a long suite split over several calls).

    Records are concatenated; a later run's record replaces an earlier one for the same
    case/impl. The run metadata is the first run's, with every run's kept under
    ``run["merged"]``; merging runs from different GPUs is refused, because the tiers compare
    records with each other.
    """
    if not docs:
        raise ValueError("merge_results: no results to merge")
    names = {(d["run"].get("device") or {}).get("name") for d in docs}
    if len(names) > 1:
        raise ValueError(f"refusing to merge runs from different devices: {sorted(map(str, names))}")
    merged = new_results(dict(docs[0]["run"]))
    merged["run"]["merged"] = [{"path": p, "started": d["run"].get("started"), "peaks": d["run"].get("peaks"),
                                "git": (d["run"].get("device") or {}).get("git")}
                               for p, d in zip(paths or [None] * len(docs), docs)]
    by_key: dict[str, dict] = {}
    for d in docs:
        for r in d.get("records", []):
            by_key[record_key(r)] = r
    merged["records"] = list(by_key.values())
    flags = [d["run"].get("throttled") for d in docs if d["run"].get("throttled") is not None]
    merged["run"]["throttled"] = any(flags) if flags else None
    merged["run"]["status_counts"] = status_counts(merged)
    return merged
