"""Runs cases x implementations into one results document.

Per record: availability (skipped with the reason), prepare (not timed), one call whose output
is checked against the reference on chosen rows (peak memory measured around it), then the
timed loop with NVML clock sampling. For train cases the call is one training step and the
check compares its gradients with reference gradients on a bounded subset
(impls/grad_reference.py). Any exception, out-of-memory or timeout becomes a record
with that status and the run goes on; a checkpoint beside the results file is rewritten
atomically after every record, so even a run killed mid-way leaves every finished record on disk
(marked partial), and the results file itself is written once, at the end (results.write_final).

NVTX: every timed call runs inside ``case:<case>`` wrapping ``<impl>`` (domain ``sparsek``), and
nothing else is pushed between them or inside the impl range by the harness. ncu's push/pop
filter ``sparsek@<impl>/`` matches the impl range anywhere on the stack, and
``sparsek@case:<name>/<impl>/`` matches it directly inside the case range (``/`` joins adjacent
levels; ``*`` would be needed for levels in between), so both select exactly the timed kernels.
The L2 flush, the spin kernel and the CUDA events are outside both ranges.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sparsek import _nvtx

from . import device as device_mod
from . import metrics, results as results_mod, tiers as tiers_mod, timing
from .cases import CASES, DEFAULT_CASES, Case, get_case, make_inputs
from .impls import Impl, get_impl, impls_for
from .impls import grad_reference
from .impls.base import check_rows, first_line

# Where a run's results go when no file is named: LOCAL_DIR (ignored by git) unless the caller
# saves into RUNS_DIR, the committed GPU runs (benchmarks/runs/README.md).
LOCAL_DIR = Path("benchmarks/local")
RUNS_DIR = Path("benchmarks/runs")
LEARN_PREFIX = "learn-"

TIMING_PROFILES = {
    "normal": {"target_rel_iqr": 0.01, "min_samples": 10, "max_samples": 1000, "max_time_s": 5.0,
               "warmup": 3, "warmup_s": 0.1},
    "quick": {"target_rel_iqr": 0.05, "min_samples": 5, "max_samples": 50, "max_time_s": 1.0,
              "warmup": 1, "warmup_s": 0.02},
}


@dataclass
class RunOptions:
    quick: bool = False
    cold: bool = True
    cuda_graph: bool = False
    timeout_s: float = 300.0  # per record: prepare + check + timing; 0 disables
    check_rows: int = 32
    peaks: bool = True
    timing: dict = field(default_factory=dict)  # overrides of the timing profile

    def timing_kwargs(self) -> dict:
        kwargs = dict(TIMING_PROFILES["quick" if self.quick else "normal"])
        kwargs.update(self.timing)
        return kwargs


class BenchTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise BenchTimeout in the main thread after ``seconds`` (SIGALRM; a no-op elsewhere).

    Python handles the signal between bytecodes, so a call stuck in one long CUDA kernel is
    interrupted when that kernel returns; a Python-heavy prepare is interrupted promptly.
    """
    usable = seconds and seconds > 0 and hasattr(signal, "setitimer") and \
        threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise BenchTimeout(f"exceeded the per-record timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def nvtx_ranges(case: Case, impl: Impl):
    """The harness's two ranges; the impl range is the innermost one around the timed call."""
    with _nvtx.annotate(f"case:{case.name}"):
        with _nvtx.annotate(impl.id):
            yield


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _cleanup(cuda: bool):
    """Return a finished record's GPU memory (cycles, e.g. through a traceback, need the gc)."""
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()


def _base_record(case: Case, impl: Impl) -> dict:
    return {"case": case.name, "impl": impl.id, "family": impl.family, "kind": case.kind, "pattern": impl.pattern,
            "description": impl.description, "case_spec": asdict(case), "status": None, "reason": None, "notes": []}


class CaseContext:
    """One case's inputs, checked rows and the references computed so far (one per pattern)."""

    def __init__(self, case: Case, inputs, rows: int):
        self.case = case
        self.inputs = inputs
        self.rows = check_rows(case, rows)
        self._refs: dict[str, torch.Tensor] = {}
        self._grad_refs: dict[str, tuple[grad_reference.GradSubset, dict]] = {}

    def reference(self, impl: Impl) -> torch.Tensor:
        if impl.pattern not in self._refs:
            self._refs[impl.pattern] = impl.reference_rows(self.case, self.inputs, self.rows)
        return self._refs[impl.pattern]

    def grad_reference(self, impl: Impl) -> tuple[grad_reference.GradSubset, dict]:
        """(subset, reference gradients there) of a train case, once per pattern."""
        if impl.pattern not in self._grad_refs:
            subset = grad_reference.grad_subset(self.case, impl.pattern)
            refs = grad_reference.reference_grads(self.case, self.inputs, impl.pattern, subset)
            self._grad_refs[impl.pattern] = (subset, refs)
        return self._grad_refs[impl.pattern]


def check_grads(ctx: CaseContext, impl: Impl, grads: dict) -> dict:
    """Error of a training step's gradients (name -> tensor, inputs' layouts) against the
    reference gradients of the impl's pattern on the case's bounded subset."""
    case = ctx.case
    if not isinstance(grads, dict):
        raise ValueError(f"{impl.id} returned {type(grads).__name__} from a training step, expected a dict of gradients")
    subset = grad_reference.grad_subset(case, impl.pattern)
    got = grad_reference.take(case, grads, subset)  # validates names and shapes first
    against = f"{impl.pattern} reference gradients"
    try:
        subset, refs = ctx.grad_reference(impl)
    except Exception as exc:
        if _is_oom(exc):
            _cleanup(case.device == "cuda")
        return {"against": against, "subset": subset.describe(), "passed": None,
                "error": f"the reference failed: {first_line(exc)}"}
    err = metrics.grad_error_stats(got, refs, case.dtype)
    err.update(against=against, subset=subset.describe(), not_compared=[n for n in refs if n not in got])
    return err


def check_output(ctx: CaseContext, impl: Impl, out, compare_with: dict) -> dict:
    """Error of ``out`` at the checked rows against the reference (and any extra outputs); for
    a train case ``out`` is the step's gradients (check_grads)."""
    case = ctx.case
    if case.kind == "train":
        return check_grads(ctx, impl, out)
    rows_dim = 1 if case.kind == "decode" else case.seq_len
    expected = (case.batch, case.q_heads, rows_dim, case.head_dim)
    if tuple(out.shape) != expected:
        raise ValueError(f"{impl.id} returned shape {tuple(out.shape)}, expected (B, Hq, S, D) = {expected}")
    rows = ctx.rows.to(out.device)
    try:
        ref = ctx.reference(impl)
    except Exception as exc:
        if _is_oom(exc):
            _cleanup(out.is_cuda)
        return {"against": f"{impl.pattern} reference", "rows": len(rows), "passed": None,
                "error": f"the reference failed: {first_line(exc)}"}
    got = out[:, :, rows]
    err = metrics.error_stats(got, ref, case.dtype)
    err.update(against=f"{impl.pattern} reference", rows=len(rows))
    if compare_with:
        err["extra"] = {name: metrics.error_stats(got, other[:, :, rows].to(ref.dtype), case.dtype)
                        for name, other in compare_with.items()}
    return err


def run_one(ctx: CaseContext, impl: Impl, options: RunOptions, *, peaks: dict | None = None,
            sampler=None, on_start: Callable[[], None] | None = None) -> dict:
    """One case x implementation -> one record (never raises for the implementation's faults)."""
    case = ctx.case
    record = _base_record(case, impl)
    try:
        reason = impl.available(case)
    except Exception as exc:
        reason = None
        record.update(status="failed", reason=f"availability check raised {first_line(exc)}")
        return record
    if reason:
        record.update(status="skipped", reason=reason)
        return record

    if on_start:
        on_start()
    cuda = case.device == "cuda"
    prepared = out = None
    try:
        with deadline(options.timeout_s), torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
                base_bytes = torch.cuda.memory_allocated()
            prepared = impl.prepare(case, ctx.inputs)
            record["notes"] = list(prepared.notes)
            if cuda:  # what the implementation keeps (block masks, layouts), not prepare's scratch
                torch.cuda.synchronize()
                state_bytes = torch.cuda.memory_allocated() - base_bytes
                torch.cuda.reset_peak_memory_stats()
            out = prepared.output()
            if cuda:
                torch.cuda.synchronize()
                call_bytes = torch.cuda.max_memory_allocated() - base_bytes - state_bytes
                record["memory"] = {"peak_bytes": state_bytes + call_bytes, "prepared_bytes": state_bytes,
                                    "call_bytes": call_bytes,
                                    "note": "beyond the inputs: prepared state + one call's workspace and output"}
                if case.kind == "train":
                    record["memory"].update(
                        inputs_bytes=case.input_bytes(), step_peak_bytes=case.input_bytes() + state_bytes + call_bytes,
                        note="peak_bytes: beyond the inputs (prepared state + one step's saved activations, workspace "
                             "and gradients); step_peak_bytes: the same plus the inputs (q, k, v, scores, grad_out)")
            record["error"] = check_output(ctx, impl, out, prepared.compare_with)
            out = None
            with sampler if sampler is not None else contextlib.nullcontext():
                m = timing.measure(prepared.fn, device=case.device, cold=options.cold, cuda_graph=options.cuda_graph,
                                   around=lambda: nvtx_ranges(case, impl), **options.timing_kwargs())
            record["timing"] = m.to_dict()
            record["metrics"] = metrics.derive(case, impl.pattern, m.median, peaks)
            if sampler is not None:
                record["clocks"] = sampler.summary()
            if m.count < options.timing_kwargs()["min_samples"]:
                record["notes"].append(f"only {m.count} samples: the time cap came first")
            record["status"] = "ok"
    except BenchTimeout as exc:
        record.update(status="timeout", reason=str(exc))
    except Exception as exc:
        status = "oom" if _is_oom(exc) else "failed"
        record.update(status=status, reason=first_line(exc, limit=500))
        if status == "failed":
            record["traceback"] = traceback.format_exc(limit=-6).splitlines()[-14:]
    finally:
        prepared = out = None
        _cleanup(cuda)
    return record


def run_learn(name: str, quick: bool) -> dict:
    """A ``learn-*`` case: delegated to sparsek.learn.bench.run_learn_case (another module)."""
    record = {"case": name, "impl": "learn", "family": "learn", "kind": "learn", "status": None, "reason": None,
              "notes": []}
    try:
        from sparsek.learn.bench import run_learn_case
    except ImportError as exc:
        record.update(status="failed", reason=f"learn cases need sparsek.learn.bench.run_learn_case: {first_line(exc)}")
        return record
    try:
        out = run_learn_case(name, quick)
    except Exception as exc:
        record.update(status="failed", reason=first_line(exc, limit=500),
                      traceback=traceback.format_exc(limit=-6).splitlines()[-14:])
        return record
    if not isinstance(out, dict):
        record.update(status="failed", reason=f"run_learn_case returned {type(out).__name__}, expected dict")
        return record
    record.update(status="ok")
    record.update(out)
    record["case"] = name
    return record


# ---------------------------------------------------------------------------------------------


def default_cases() -> list[str]:
    return list(DEFAULT_CASES["cuda" if torch.cuda.is_available() else "cpu"])


def resolve(case_names: list[str], impl_ids: list[str] | None) -> tuple[list[str], list[str] | None]:
    """Validate names (raises UnknownName listing the valid ones); keeps order, drops repeats."""
    cases = []
    for name in case_names:
        if not name.startswith(LEARN_PREFIX):
            get_case(name)
        if name not in cases:
            cases.append(name)
    ids = None
    if impl_ids:
        ids = []
        for i in impl_ids:
            get_impl(i)
            if i not in ids:
                ids.append(i)
    return cases, ids


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "unknown").lower()).strip("-") or "unknown"


def default_json_path(fingerprint: dict, started: _dt.datetime, folder: Path = LOCAL_DIR) -> Path:
    commit = (fingerprint.get("git") or {}).get("commit") or "nocommit"
    return Path(folder) / f"{started:%Y%m%dT%H%M%SZ}-{_slug(fingerprint.get('name'))}-{commit[:7]}.json"


def _planned(case_names, ids) -> list[tuple[str, list[Impl]]]:
    plan = []
    for name in case_names:
        if name.startswith(LEARN_PREFIX):
            plan.append((name, []))
            continue
        case = CASES[name]
        plan.append((name, [i for i in impls_for(case) if ids is None or i.id in ids]))
    return plan


def _say(progress, text):
    if progress:
        progress(text)


def _summary_line(record: dict) -> str:
    if record["status"] == "ok" and record.get("timing"):
        t = record["timing"]
        err = record.get("error") or {}
        check = {True: "ok", False: "ERROR CHECK FAILED", None: "unchecked"}[err.get("passed")]
        return (f"{t['median'] * 1e6:,.1f} us (IQR {t['rel_iqr']:.1%}, n={t['count']}, {t['stop_reason']}), "
                f"output {check}")
    from .report import short_reason  # the reason's first sentence; the record keeps it whole

    return f"{record['status']}: {short_reason(record.get('reason'))}"


def run(case_names: list[str], impl_ids: list[str] | None = None, *, options: RunOptions | None = None,
        json_path=None, progress: Callable[[str], None] | None = None, argv: list[str] | None = None,
        folder: Path = LOCAL_DIR) -> dict:
    """Run the plan; returns the results document (also written to ``json_path``, else to a file
    named after the run in ``folder``)."""
    options = options or RunOptions()
    case_names, ids = resolve(case_names, impl_ids)
    cuda = torch.cuda.is_available()
    wants_cuda = any(CASES[n].device == "cuda" for n in case_names if n in CASES)
    device_index = torch.cuda.current_device() if cuda else 0
    started = _dt.datetime.now(_dt.timezone.utc)
    fp = device_mod.fingerprint(device_index) if (cuda and wants_cuda) else device_mod.fingerprint()
    path = Path(json_path) if json_path else default_json_path(fp, started, folder)
    run_meta = {"started": started.isoformat(timespec="seconds"), "finished": None, "argv": argv,
                "options": asdict(options), "timing": options.timing_kwargs(), "device": fp, "peaks": {},
                "nvtx": _nvtx.available(), "cases": {n: asdict(CASES[n]) for n in case_names if n in CASES},
                "json_path": str(path), "throttled": None}
    doc = results_mod.new_results(run_meta)
    results_mod.write_checkpoint(path, doc)

    plan = _planned(case_names, ids)
    total = sum(max(1, len(impls)) for _, impls in plan)
    t_start = time.perf_counter()

    for dev_type in sorted({CASES[n].device for n in case_names if n in CASES}):
        if not options.peaks or (dev_type == "cuda" and not cuda):
            continue
        _say(progress, f"measuring the {dev_type} peaks (matmul, copy) ...")
        try:
            doc["run"]["peaks"][dev_type] = metrics.measure_peaks(dev_type, quick=options.quick)
        except Exception as exc:
            doc["run"]["peaks"][dev_type] = {"error": first_line(exc)}
        _cleanup(dev_type == "cuda")
    sampler = device_mod.open_sampler(device_index) if (cuda and wants_cuda) else None

    done = 0
    for name, impls in plan:
        if name.startswith(LEARN_PREFIX):
            done += 1
            _say(progress, f"[{done}/{total}] {name}: running the learned-scorer case ...")
            record = run_learn(name, options.quick)
            doc["records"].append(record)
            _say(progress, f"[{done}/{total}] {name}: {record['status']}")
            results_mod.write_checkpoint(path, doc)
            continue
        case = CASES[name]
        peaks = doc["run"]["peaks"].get(case.device)
        skip = None
        if case.device == "cuda" and not cuda:
            skip = ("skipped", "CUDA is not available on this machine")
        elif case.device == "cuda":
            free, _ = torch.cuda.mem_get_info()
            if case.input_bytes() > 0.9 * free:
                skip = ("skipped", f"inputs need {case.input_bytes() / 2**30:.1f} GiB; {free / 2**30:.1f} GiB is free")
        ctx = None
        if skip is None:
            try:
                ctx = CaseContext(case, make_inputs(case), options.check_rows)
            except Exception as exc:
                skip = ("oom" if _is_oom(exc) else "failed", f"making the inputs failed: {first_line(exc)}")
        for impl in impls:
            done += 1
            if skip is not None:
                record = _base_record(case, impl)
                record.update(status=skip[0], reason=skip[1])
            else:
                label = f"[{done}/{total}] {name} / {impl.id}"
                record = run_one(ctx, impl, options, peaks=peaks, sampler=sampler if case.device == "cuda" else None,
                                 on_start=lambda: _say(progress, f"{label}: preparing and timing ..."))
            doc["records"].append(record)
            _say(progress, f"[{done}/{total}] {name} / {impl.id}: {_summary_line(record)} "
                           f"[{time.perf_counter() - t_start:.0f} s]")
            results_mod.write_checkpoint(path, doc)
        ctx = None
        _cleanup(case.device == "cuda" and cuda)

    doc["tiers"] = tiers_mod.assess(doc)
    flags = [r["clocks"]["throttled"] for r in doc["records"] if r.get("clocks")]
    doc["run"]["throttled"] = any(f for f in flags if f is not None) if flags else None
    doc["run"]["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc["run"]["status_counts"] = results_mod.status_counts(doc)
    results_mod.write_final(path, doc)
    return doc


def stderr_progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
