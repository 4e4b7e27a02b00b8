"""The results file: a versioned JSON document, validated on every read, never lost on a write.

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
Times are seconds in ``timing`` and microseconds (named so) in ``metrics``. The schema, in JSON
Schema form, is sparsek.bench.results_schema (published as docs/results-schema.json); every reader
goes through ``load_results``/``check_results``, which refuse a file that does not match it with
one line naming the file, the place and the problem.

Writing: a run checkpoints into a sidecar (``checkpoint_path``) after every record and writes the
results file itself once, at the end (``write_final``): a run killed midway never truncates or
replaces an existing results file, and its checkpoint, with ``run.finished`` null, is a *partial*
run that readers mark (``is_partial``) and the comparisons refuse unless told otherwise.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import secrets
from pathlib import Path

from .results_schema import SCHEMA_NAME as SCHEMA
from .results_schema import SCHEMA_VERSION, STATUSES, SchemaError, validate

# Records whose implementation ran and broke; "skipped" means it was never tried.
FAILED_STATUSES = ("failed", "oom", "timeout")
CHECKPOINT_SUFFIX = ".partial"

# Temporary files are named .<file>.<host>.<pid>.<random>.tmp, so that a later write can tell
# the leftovers of a killed writer on this host (its pid is gone) from a write in progress.
_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", platform.node()) or "host"
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class ResultsFileError(ValueError):
    """A results file that cannot be used: unreadable, not JSON, another schema, malformed or partial."""


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
    run killed mid-write) see the old file or the new one, never half of one. The file gets the
    mode a plain open() would give (0644 under the usual umask 022), and a write first removes
    the temp files that killed writers left in the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)
    text = json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n"  # before any file exists
    tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_stale_temps(directory: Path) -> None:
    """Temp files of writers on this host that no longer run (a SIGKILL skips every cleanup)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                os.unlink(directory / name)
            except OSError:
                pass  # another writer removed it first, or it is not ours to remove


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def checkpoint_path(path) -> Path:
    """Where a run keeps its records while it runs: ``<results file>.partial``. Not a *.json
    name, so that directory readers (the gate pools every *.json) never pick it up by accident."""
    path = Path(path)
    return path.with_name(path.name + CHECKPOINT_SUFFIX)


def write_checkpoint(path, doc: dict) -> Path:
    """Save a run in progress beside its results file, leaving the results file untouched."""
    return write_json_atomic(checkpoint_path(path), doc)


def write_final(path, doc: dict) -> Path:
    """Write the finished run to its results file (atomically) and drop its checkpoint."""
    write_json_atomic(path, doc)
    checkpoint_path(path).unlink(missing_ok=True)
    return Path(path)


def check_results(doc, source) -> dict:
    """Validate a parsed results document; returns it with non-finite numbers decoded.

    Raises ResultsFileError with one line: the source, then what is wrong and where.
    """
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise ResultsFileError(f"{source}: not a sparsek-bench results file (schema={found!r})")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsFileError(f"{source}: schema_version {version!r}; this sparsek-bench reads version {SCHEMA_VERSION}")
    try:
        return validate(doc)
    except SchemaError as exc:
        raise ResultsFileError(f"{source}: malformed results file: {exc}") from None


def load_results(path) -> dict:
    """Read and validate a results file (partial runs included: see ``is_partial``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ResultsFileError(f"{path}: is a directory; expected a results file (.json)") from None
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"{path}: cannot read ({exc})") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ResultsFileError(f"{path}: not a JSON results file ({exc})") from None
    return check_results(doc, path)


def is_partial(doc: dict) -> bool:
    """A run that never finished: a checkpoint of a killed or running run (or a merge with one)."""
    return doc["run"].get("finished") is None


def partial_note(doc: dict, source) -> str:
    """One line saying that ``source`` is partial and what that means."""
    n = len(doc.get("records", []))
    started = doc["run"].get("started")
    return (f"{source}: PARTIAL RUN: it never finished (killed, crashed or still running"
            f"{f'; started {started}' if started else ''}); it holds the {n} record{'s' * (n != 1)} "
            "written before it stopped")


def refuse_partial(doc: dict, source) -> None:
    """The comparisons judge whole runs only: raise unless the run finished."""
    if is_partial(doc):
        raise ResultsFileError(f"{partial_note(doc, source)}; pass --allow-partial to use it anyway")


def record_key(record: dict) -> str:
    return f"{record['case']}/{record['impl']}"


def samples_by_key(results: dict) -> dict[str, list[float]]:
    """{"case/impl": timing samples in seconds} for every record with status "ok"."""
    out = {}
    for record in results.get("records", []):
        if record.get("status") == "ok" and record.get("timing"):
            out[record_key(record)] = list(record["timing"]["samples"])
    return out


def failures_by_key(results: dict) -> dict[str, str]:
    """{"case/impl": "timeout: why"} for every record whose implementation ran and broke."""
    return {record_key(r): f"{r['status']}: {r.get('reason') or 'no reason recorded'}"
            for r in results.get("records", []) if r.get("status") in FAILED_STATUSES}


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
    merged["run"]["merged"] = [{"path": p, "started": d["run"].get("started"), "finished": d["run"].get("finished"),
                                "peaks": d["run"].get("peaks"), "git": (d["run"].get("device") or {}).get("git")}
                               for p, d in zip(paths or [None] * len(docs), docs)]
    # A merge with a partial run is partial itself; otherwise it finished when its last run did.
    finished = [d["run"].get("finished") for d in docs]
    merged["run"]["finished"] = None if None in finished else max(finished)
    by_key: dict[str, dict] = {}
    for d in docs:
        for r in d.get("records", []):
            by_key[record_key(r)] = r
    merged["records"] = list(by_key.values())
    flags = [d["run"].get("throttled") for d in docs if d["run"].get("throttled") is not None]
    merged["run"]["throttled"] = any(flags) if flags else None
    merged["run"]["status_counts"] = status_counts(merged)
    return merged
