"""What the asv classes share: which cases run here, one measurement per class, the track methods.

Each attention class measures once per ``asv run``, in ``setup_cache``: sparsek.bench.runner
runs the planned cases x every implementation of the class's kind in one process, exactly as
``sparsek-bench run`` does (same inputs, device timing, error check, tier rules). Speedups and
tiers therefore compare implementations timed in one process on one device, never across runs.
The processes asv spawns per combination only read the pickled result; ``setup`` raises
NotImplementedError for a combination that was skipped (asv shows it as skipped, with the
reason on stderr) and RuntimeError for one that failed (asv shows a failure).

setup_cache cannot see asv's ``--bench`` selection, so the work is chosen here:
    SPARSEK_ASV_CASES   comma-separated case names (default: DEFAULT_CASES for this device)
    SPARSEK_ASV_IMPLS   comma-separated implementation ids (default: every one of the kind)
    SPARSEK_ASV_QUICK   1 / 0: the quick timing profile (default 1 on a CPU, 0 on a GPU)

Names here start with ``_`` where asv must not take them for benchmarks: asv imports every
module of benchmarks/ and collects public classes with ``track_*`` methods.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from asv_runner.benchmarks.mark import SkipNotImplemented

from sparsek.bench import runner, tiers
from sparsek.bench.cases import CASES, DEFAULT_CASES as _CLI_DEFAULTS
from sparsek.bench.impls import IMPLS

# Bump when what a track method measures changes: asv then starts a new history for it (and the
# gate refuses to compare across the change) instead of joining incomparable numbers.
VERSION = "1"


def _cli_defaults(kind: str) -> dict[str, tuple[str, ...]]:
    return {dev: tuple(n for n in names if CASES[n].kind == kind) for dev, names in _CLI_DEFAULTS.items()}


# Cases measured when SPARSEK_ASV_CASES is unset: the CLI's defaults for prefill and train; for
# decode the batch-16 contexts (T3's, docs/tiers.md); on a CPU the smoke cases.
DEFAULT_CASES = {
    "prefill": _cli_defaults("prefill"),
    "decode": {"cuda": ("decode-4k-b16", "decode-32k-b16", "decode-128k-b16"), "cpu": ("cpu-smoke-decode",)},
    "train": _cli_defaults("train"),
}
# The patterns whose fastest implementation is "the best dense baseline" of a case.
DENSE_PATTERNS = {"prefill": "dense-causal", "decode": "decode-full", "train": "dense-causal"}

# bench_selection's selectors: not attention implementations, so not in the registry.
SELECTION_IDS = ("reference", "cuda")

ENV_CASES = "SPARSEK_ASV_CASES"
ENV_IMPLS = "SPARSEK_ASV_IMPLS"
ENV_QUICK = "SPARSEK_ASV_QUICK"


def case_names(kind: str) -> list[str]:
    """Every registered case of a kind: asv's parameter list, the same on every machine (asv
    publish drops results whose parameters the discovered benchmark does not list)."""
    return [name for name, case in CASES.items() if case.kind == kind]


def impl_ids(kind: str) -> list[str]:
    """Implementations that run cases of ``kind`` (train: those with a backward)."""
    return [impl.id for impl in IMPLS.values() if kind in impl.kinds]


def _env_list(var: str) -> list[str] | None:
    raw = os.environ.get(var, "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] if raw else None


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def planned_cases(kind: str) -> list[str]:
    """Cases of ``kind`` this run measures: SPARSEK_ASV_CASES (names of other kinds ignored,
    unknown names refused) or the device's defaults."""
    wanted = _env_list(ENV_CASES)
    if wanted is None:
        return list(DEFAULT_CASES[kind][device_type()])
    # learn-* cases belong to benchmarks/bench_learn.py (sparsek.learn), not to this registry.
    wanted = [n for n in wanted if not n.startswith("learn-")]
    unknown = [n for n in wanted if n not in CASES]
    if unknown:
        raise ValueError(f"{ENV_CASES}: unknown case(s) {unknown}; valid cases: {', '.join(CASES)}")
    return [n for n in wanted if CASES[n].kind == kind]


def planned_impls(kind: str) -> list[str]:
    """Implementations of ``kind`` ("prefill", "decode", "train" or "selection") this run measures."""
    wanted = _env_list(ENV_IMPLS)
    if wanted is None:
        return list(SELECTION_IDS) if kind == "selection" else impl_ids(kind)
    known = [*IMPLS, *SELECTION_IDS]
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise ValueError(f"{ENV_IMPLS}: unknown implementation(s) {unknown}; valid ids: {', '.join(known)}")
    if kind == "selection":
        return [i for i in wanted if i in SELECTION_IDS]
    return [i for i in wanted if i in IMPLS and kind in IMPLS[i].kinds]


def quick() -> bool:
    """The quick timing profile: asked for, or a CPU run (smoke numbers, CI minutes)."""
    value = os.environ.get(ENV_QUICK)
    if value is not None:
        return value.strip() not in ("", "0")
    return device_type() == "cpu"


def not_planned(what: str) -> str:
    return (f"{what} was not measured in this run (see {ENV_CASES} / {ENV_IMPLS}; "
            f"default on {device_type()}: the DEFAULT_CASES of benchmarks/_common.py)")


def slim(record: dict) -> dict:
    """What the track methods read from one sparsek-bench record (picklable, small)."""
    timing = record.get("timing") or {}
    metrics = record.get("metrics") or {}
    error = record.get("error") or {}
    return {
        "status": record.get("status"),
        "reason": record.get("reason"),
        "pattern": record.get("pattern"),
        "samples": list(timing.get("samples") or []),
        "median": timing.get("median"),
        "tflops": metrics.get("tflops_effective"),
        "gbps": metrics.get("gbps"),
        "max_abs_error": error.get("max_abs"),
        "error_passed": error.get("passed"),
        "peak_bytes": (record.get("memory") or {}).get("peak_bytes"),
        "speedup": None,
    }


def _usable(rec: dict) -> bool:
    """Timed, and its output did not fail the error check (the tier rules' condition)."""
    return rec["status"] == "ok" and rec["median"] and rec["error_passed"] is not False


def add_speedups(records: dict[tuple[str, str], dict], kind: str) -> None:
    """speedup = median of the fastest usable dense implementation of the case / this median."""
    for case in {c for c, _ in records}:
        dense = [r["median"] for (c, _), r in records.items()
                 if c == case and r["pattern"] == DENSE_PATTERNS[kind] and _usable(r)]
        if not dense:
            continue
        for (c, _), rec in records.items():
            if c == case and rec["status"] == "ok" and rec["median"]:
                rec["speedup"] = min(dense) / rec["median"]


def measure_kind(kind: str) -> dict:
    """Run the planned cases x implementations of ``kind``; the cache every class of that kind reads.

    {"kind", "device", "records": {(case, impl): slim record}, "tiers": {(case, tier): tier row}}
    """
    cases, ids = planned_cases(kind), planned_impls(kind)
    options = runner.RunOptions(quick=quick(), peaks=False)
    with tempfile.TemporaryDirectory(prefix="sparsek-asv-") as tmp:
        doc = runner.run(cases, ids, options=options, json_path=Path(tmp) / "run.json",
                         progress=runner.stderr_progress, argv=["asv", kind])
    records = {(r["case"], r["impl"]): slim(r) for r in doc["records"]}
    add_speedups(records, kind)
    tier_rows = {(row["case"], row["tier"]): row for row in doc.get("tiers", []) if row.get("case")}
    device = doc["run"]["device"]
    return {"kind": kind, "device": {k: device.get(k) for k in ("name", "source", "driver")},
            "records": records, "tiers": tier_rows}


def record_for(cache: dict, case: str, impl: str) -> dict:
    """The record of one combination, or the asv skip/failure that stands for it."""
    rec = cache["records"].get((case, impl))
    if rec is None:
        raise NotImplementedError(not_planned(f"{impl} on {case}"))
    if rec["status"] == "skipped":
        raise NotImplementedError(f"{impl} on {case}: {rec['reason']}")
    if rec["status"] != "ok":
        # A failure must read as one in asv, not as a skip: the implementation is expected here.
        raise RuntimeError(f"{impl} on {case}: {rec['status']}: {rec['reason']}")
    return rec


def _value(rec: dict, key: str, why: str):
    value = rec.get(key)
    if value is None:
        print(f"asv: skipped: {why}", file=sys.stderr)
        raise SkipNotImplemented(why)
    return value


class _AttentionFamily:
    """Case x implementation of one kind; subclasses set ``params`` and ``setup_cache``."""

    param_names = ["case", "impl"]
    version = VERSION

    def setup(self, cache, case, impl):
        self.rec = record_for(cache, case, impl)

    def track_time(self, cache, case, impl):
        # Device-timed samples (CUDA events, L2 flushed; the host clock on a CPU): asv reports
        # their median with the IQR and a 99% confidence interval, and keeps them for ci/gate.py
        # with --record-samples.
        return {"samples": self.rec["samples"], "number": 1}

    track_time.unit = "seconds"

    def track_tflops(self, cache, case, impl):
        # The pattern's own work (metrics.py): sparse patterns are not credited with dense FLOPs.
        return _value(self.rec, "tflops", "no FLOP count")

    track_tflops.unit = "TFLOP/s"

    def track_speedup(self, cache, case, impl):
        return _value(self.rec, "speedup", f"no dense implementation ran on {case} in this run")

    track_speedup.unit = "x over the best dense"

    def track_error(self, cache, case, impl):
        # max |out - reference| on the checked rows, reference in float32/float64.
        return _value(self.rec, "max_abs_error", "the output was not checked")

    track_error.unit = "max abs error"

    def track_peak_memory(self, cache, case, impl):
        # Beyond the inputs: the prepared state plus one call's workspace and output.
        return _value(self.rec, "peak_bytes", "peak memory is measured on CUDA only")

    track_peak_memory.unit = "bytes"


class _TierFamily:
    """Case x tier: the tier's speedup (bar / sparsek) measured in the same run."""

    param_names = ["case", "tier"]
    version = VERSION

    def setup(self, cache, case, tier):
        row = cache["tiers"].get((case, tier))
        if row is None:
            raise NotImplementedError(not_planned(f"{tier} on {case}"))
        if row.get("speedup") is None:
            raise NotImplementedError(f"{tier} on {case}: {row.get('status')}: {row.get('reason')}")
        self.row = row

    def track_speedup(self, cache, case, tier):
        # Pass when above the tier's required_speedup (sparsek.bench.tiers; 1.0 for all three).
        return self.row["speedup"]

    track_speedup.unit = "x over the tier's bar"


def tier_names(kind: str) -> list[str]:
    return [t.name for t in tiers.TIERS if t.kind == kind]
