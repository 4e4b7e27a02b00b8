"""Plain-text report of a results document: header, one table per case, the training steps beside
the forwards of the same shape, the reasons and notes said once, the TIER ASSESSMENT.

Only formatting lives here; every number comes from the results (timing, metrics, tiers). Under
each table, an implementation that did not run and a note get one short line: the first sentence
of the reason, without the exception text a library appended (the results file keeps it whole).
A line that repeats, across cases or implementations, is said once in NOT RUN or NOTES at the end.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from tabulate import tabulate

from .cases import TRAIN_SHAPES, Case

# Lines of prose (reasons, notes) wrap at this width; only the tables may be wider.
WIDTH = 100
# A reason's first sentence is cut to this many characters.
REASON_LIMIT = 120
# How sparsek.bench.device words a timed loop whose SM clock readings fell low (one per loop).
LOW_CLOCK_PREFIX = "SM clock under"
# Where a library's exception text starts inside a reason: "(RuntimeError: ...", ": ValueError: ...".
_EXCEPTION = re.compile(r"[:(]\s*(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Warning)\b")
_EXCEPTION_NAME = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Warning)$")


def _num(value, fmt="{:,.1f}", missing="-"):
    if value is None or isinstance(value, str):
        return missing if value is None else value
    return fmt.format(value)


def _rate(value) -> str:
    """TFLOP/s or GB/s with sensible precision from a CPU (0.05) to an H200 (775)."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def first_sentence(text: str) -> str:
    """Up to the first ". " or "; " outside parentheses."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif depth == 0 and i + 1 < len(text) and text[i + 1] == " " and (ch == ";" or (ch == "." and i > 0)):
            return text[:i + 1] if ch == "." else text[:i]
    return text


def short_reason(text, limit: int = REASON_LIMIT) -> str:
    """One line of a reason: the text before any library exception text appended to it (unless
    the reason is that exception), its first sentence, at most ``limit`` characters."""
    text = " ".join(str(text or "no reason recorded").split())
    m = _EXCEPTION.search(text)
    if m and m.start() > 0 and not _EXCEPTION_NAME.match(text[:m.start()].strip()):
        text = text[:m.start()].rstrip(" :(")
    text = first_sentence(text)
    return text if len(text) <= limit else textwrap.shorten(text, limit, placeholder=" ...")


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "    ",
                         break_long_words=False, break_on_hyphens=False) or [indent]


def _this_case(text: str, case: str) -> str:
    """The case's own name in a reason, as "this case", so the same reason reads the same everywhere."""
    return re.sub(rf"(?<![\w-]){re.escape(case)}(?![\w-])", "this case", text)


@dataclass(frozen=True)
class Remark:
    """One line under a case table: an implementation that did not run, or a note."""

    mark: str  # "-": did not run, "*": a note, "!": an implausible figure
    text: str  # "skipped: <first sentence>" or the note


def remarks(record: dict) -> list[Remark]:
    case = record.get("case") or ""
    if record.get("status") != "ok":
        return [Remark("-", f"{record.get('status')}: {short_reason(_this_case(str(record.get('reason')), case))}")]
    out = [Remark("*", short_reason(_this_case(note, case))) for note in record.get("notes", [])]
    out += [Remark("!", f"implausible: {short_reason(flag)}") for flag in (record.get("metrics") or {}).get("implausible", [])]
    return out


class Folded:
    """Remarks that repeat (across cases or implementations), said once at the end of the report."""

    def __init__(self, records: list[dict]):
        self.where: dict[Remark, dict[str, list[str]]] = {}  # remark -> impl -> cases
        for r in records:
            if not r.get("case_spec"):
                continue
            for remark in remarks(r):
                cases = self.where.setdefault(remark, {}).setdefault(r["impl"], [])
                if r["case"] not in cases:
                    cases.append(r["case"])

    def folds(self, remark: Remark) -> bool:
        if remark.mark == "!":  # an implausible figure is said where it was measured
            return False
        impls = self.where.get(remark, {})
        return len(impls) > 1 or any(len(cases) > 1 for cases in impls.values())

    def section(self, mark: str, title: str) -> list[str]:
        lines = []
        for remark, impls in self.where.items():
            if remark.mark != mark or not self.folds(remark):
                continue
            cases = list(dict.fromkeys(c for cs in impls.values() for c in cs))
            lines += _wrap(f"{', '.join(impls)}: {remark.text} [{', '.join(cases)}]")
        return [title, *lines] if lines else []


def below_table(records: list[dict], folded: Folded | None) -> list[str]:
    """The lines under one case's table: each remark once, folded ones named only."""
    lines, not_run, noted = [], [], []
    for r in records:
        for remark in remarks(r):
            if folded is not None and folded.folds(remark):
                (not_run if remark.mark == "-" else noted).append(r["impl"])
            else:
                lines += _wrap(f"{remark.mark} {r['impl']}: {remark.text}")
    if not_run:
        lines += _wrap(f"- not run, reasons under NOT RUN: {', '.join(dict.fromkeys(not_run))}")
    if noted:
        lines += _wrap(f"* notes under NOTES: {', '.join(dict.fromkeys(noted))}")
    return lines


def _timers(doc: dict) -> str:
    """The clocks the records were really timed with, per device."""
    used: dict[str, list[str]] = {}
    for r in doc.get("records", []):
        t = r.get("timing")
        if not t:
            continue
        device = (r.get("case_spec") or {}).get("device") or "?"
        mode = t.get("mode") or ""
        what = f"{t.get('timer')}, " + ("cold (L2 flushed before every sample)" if mode.startswith("cold") else
                                         "no cache flush" if device == "cpu" else "warm (no L2 flush)")
        what += ", CUDA graph replay" if mode.endswith("+graph") else ""
        if what not in used.setdefault(device, []):
            used[device].append(what)
    if not used:
        return "nothing timed"
    return "; ".join(f"{'CPU' if dev == 'cpu' else 'GPU' if dev == 'cuda' else dev} cases: {' / '.join(w)}"
                     for dev, w in used.items())


def header(doc: dict) -> str:
    run = doc.get("run", {})
    dev = run.get("device", {})
    sw = dev.get("software", {})
    git = dev.get("git", {})
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    parts = [dev.get("name") or "unknown device"]
    if dev.get("driver"):
        parts.append(f"driver {dev['driver']}, CUDA driver {dev.get('cuda_driver')}, sm_{(dev.get('compute_capability') or '?').replace('.', '')}")
    lines = [f"sparsek-bench | {' | '.join(parts)}",
             f"torch {sw.get('torch')} (CUDA {sw.get('cuda_runtime')}), triton {sw.get('triton')}, "
             f"xformers {sw.get('xformers')}, vllm {sw.get('vllm')}",
             f"commit {commit} | started {run.get('started')}"]
    timing = run.get("timing", {})
    lines.append(f"timing: {_timers(doc)}")
    lines.append(f"stopping: IQR/median <= {timing.get('target_rel_iqr', 0):.0%} after {timing.get('min_samples')} "
                 f"samples, or {timing.get('max_samples')} samples, or {timing.get('max_time_s')} s per case x impl")
    if _cpu_only(doc):
        lines.append("CPU only: a pipeline check of the suite (docs/tiers.md), not a performance measurement")
    for dev_type, peak in (run.get("peaks") or {}).items():
        if "error" in peak:
            lines.append(f"peaks ({dev_type}): not measured: {peak['error']}")
            continue
        mm, cp = peak["matmul"], peak["copy"]
        lines.append(f"peaks ({dev_type}, this run): {mm['dtype']} matmul {mm['n']}^3 {_rate(mm['tflops'])} TFLOP/s; "
                     f"copy {_bytes(cp['bytes'])} {_rate(cp['gbps'])} GB/s (read + write)")
    throttled = run.get("throttled")
    if throttled is None:
        lines.append("clocks: not sampled (no NVML or no GPU case)")
    else:
        lines.append(f"clocks during timed loops: {_throttle_summary(doc) if throttled else 'not throttled'}")
    return "\n".join(lines)


def _throttle_summary(doc: dict) -> str:
    """One short line for a throttled run: in how many timed loops, the NVML reasons named once,
    and in how many loops the SM clock itself fell low (per-loop counts are in the records)."""
    timed = [r for r in doc.get("records", []) if r.get("clocks")]
    flagged = [r for r in timed if r["clocks"].get("throttled")]
    reasons = [w for r in flagged for w in r["clocks"].get("throttle_reasons", [])]
    named = sorted({w for w in reasons if not w.startswith(LOW_CLOCK_PREFIX)})
    low = sum(1 for r in flagged if any(w.startswith(LOW_CLOCK_PREFIX) for w in r["clocks"].get("throttle_reasons", [])))
    parts = named + ([f"SM clock low in {low}"] if low else [])
    return f"THROTTLED in {len(flagged)} of {len(timed)} timed loops" + (f" ({'; '.join(parts)})" if parts else "")


def _error_cell(err: dict | None) -> str:
    if not err:
        return "-"
    if err.get("passed") is None:
        return "unchecked"
    mark = "ok" if err["passed"] else "FAIL"
    cell = f"{err['max_abs']:.1e} {mark}" if isinstance(err.get("max_abs"), float) else f"{err.get('max_abs')} {mark}"
    for name, extra in (err.get("extra") or {}).items():
        cell += f"; vs {name} {extra['max_abs']:.1e}" if isinstance(extra.get("max_abs"), float) else ""
    return cell


def _grad_error_cell(err: dict | None) -> str:
    """Max abs error per gradient (dq dk dv du) and the verdict over all of them."""
    if not err:
        return "-"
    if err.get("passed") is None:
        return "unchecked"
    short = {"q": "dq", "k": "dk", "v": "dv", "scores": "du"}
    parts = [f"{short.get(n, n)} {e['max_abs']:.1e}" if isinstance(e.get("max_abs"), float) else f"{short.get(n, n)} {e.get('max_abs')}"
             for n, e in (err.get("grads") or {}).items()]
    return " ".join(parts) + (" ok" if err["passed"] else " FAIL")


def _subset_line(err: dict | None) -> str | None:
    """Where the gradients were compared (grad_reference.GradSubset.describe)."""
    sub = (err or {}).get("subset")
    if not sub:
        return None
    keys = sub["dkv_keys"] if sub["dkv_keys"] == "all" else ", ".join(f"[{a}, {b})" for a, b in sub["dkv_keys"])
    return (f"batch {sub['batch']}, kv head {sub['kv_head']} (query heads {sub['q_heads'][0]}-{sub['q_heads'][1] - 1}): "
            f"dq at {sub['dq_rows']} rows, key gradients at {keys} keys")


def train_case_table(records: list[dict], folded: Folded | None = None) -> str:
    """One training-step case: ms per step, step TFLOP/s, gradient errors, memory."""
    rows, below, subsets = [], below_table(records, folded), {}
    for r in records:
        if r["status"] != "ok":
            continue
        t, m, mem = r["timing"], r.get("metrics", {}), r.get("memory") or {}
        implausible = bool(m.get("implausible"))
        rows.append([r["impl"], _num(t["median"] * 1e3, "{:,.3f}"), f"{t['iqr'] * 1e3:,.3f} ({t['rel_iqr']:.1%})",
                     t["count"], _rate(m.get("tflops_effective")) + ("!" if implausible else ""),
                     _rate(m.get("tflops_dense_equivalent")), _num(m.get("pct_peak_tflops"), "{:.0f}%"),
                     _grad_error_cell(r.get("error")), _bytes(mem.get("peak_bytes")), _bytes(mem.get("step_peak_bytes"))])
        line = _subset_line(r.get("error"))
        if line:
            subsets.setdefault(r.get("pattern"), line)
    for pattern, line in subsets.items():
        below += _wrap(f"gradients of the {pattern} pattern checked on {line}")
    convention = next((r["metrics"].get("flop_convention") for r in records if r.get("metrics")), None)
    if convention:
        below += _wrap(f"FLOPs: {convention}")
    head = ["impl", "ms/step", "IQR ms", "n", "step TFLOP/s", "dense-eq TFLOP/s", "% peak", "grad max abs err",
            "extra mem", "step mem"]
    out = tabulate(rows, headers=head, tablefmt="simple", disable_numparse=True) if rows else "  (nothing ran)"
    return out + ("\n" + "\n".join(below) if below else "")


def train_vs_forward(doc: dict) -> str | None:
    """Training step beside the forward of the same shape, per implementation, from one document
    (None when no training step ran)."""
    ok = {(r["case"], r["impl"]): r for r in doc.get("records", []) if r.get("status") == "ok" and r.get("timing")}
    rows = []
    for (case, impl), r in ok.items():
        if r.get("kind") != "train":
            continue
        step = r["timing"]["median"]
        fwd = ok.get((TRAIN_SHAPES.get(case), impl))
        fwd_s = fwd["timing"]["median"] if fwd else None
        rows.append([case, TRAIN_SHAPES.get(case) or "-", impl, _num(step * 1e3, "{:,.3f}"),
                     _num(fwd_s * 1e3 if fwd_s else None, "{:,.3f}"),
                     f"{step / fwd_s:.2f}x" if fwd_s else "-", _rate((r.get("metrics") or {}).get("tflops_effective"))])
    if not rows:
        return None
    return "\n".join(["TRAINING STEP beside the FORWARD (same shape, same run; '-': the forward case was not run)",
                      tabulate(rows, headers=["train case", "forward case", "impl", "step ms", "forward ms",
                                              "step / forward", "step TFLOP/s"],
                               tablefmt="simple", disable_numparse=True)])


def case_table(records: list[dict], folded: Folded | None = None) -> str:
    """The table of one case's records plus the skipped/failed ones and notes underneath (those
    in ``folded`` only by name)."""
    spec = records[0].get("case_spec")
    if spec and spec.get("kind") == "train":
        return train_case_table(records, folded)
    decode = spec and spec.get("kind") == "decode"
    rows, below = [], below_table(records, folded)
    for r in records:
        if r["status"] != "ok":
            continue
        t, m = r["timing"], r.get("metrics", {})
        implausible = bool(m.get("implausible"))
        row = [r["impl"], _num(t["median"] * 1e6), f"{t['iqr'] * 1e6:,.1f} ({t['rel_iqr']:.1%})", t["count"],
               _num(m.get("us_per_head"), "{:,.2f}"), _rate(m.get("tflops_effective")) + ("!" if implausible else ""),
               _rate(m.get("tflops_dense_equivalent"))]
        if decode:
            row.append(_rate(m.get("gbps")))
        pct = m.get("pct_peak_gbps") if decode else m.get("pct_peak_tflops")
        row += [_num(pct, "{:.0f}%"), _error_cell(r.get("error")), _bytes((r.get("memory") or {}).get("peak_bytes"))]
        rows.append(row)
    head = ["impl", "us/iter", "IQR us", "n", "us/head", "TFLOP/s", "dense-eq TFLOP/s"]
    if decode:
        head.append("GB/s")
    head += ["% peak", "max abs err", "extra mem"]
    out = tabulate(rows, headers=head, tablefmt="simple", disable_numparse=True) if rows else "  (nothing ran)"
    return out + ("\n" + "\n".join(below) if below else "")


def format_report(doc: dict) -> str:
    by_case: dict[str, list[dict]] = {}
    for r in doc.get("records", []):
        by_case.setdefault(r["case"], []).append(r)
    folded = Folded(doc.get("records", []))
    parts = [header(doc)]
    for name, records in by_case.items():
        spec = records[0].get("case_spec")
        title = Case(**spec).describe() if spec else records[0].get("kind", "")
        parts.append(f"\n== {name}: {title} ==")
        if spec:
            parts.append(case_table(records, folded))
        else:  # learn-* records: whatever the learn module reported
            for r in records:
                extra = {k: v for k, v in r.items() if k not in ("case", "impl", "family", "kind", "notes", "traceback")}
                parts.append(f"  {r['impl']}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    beside = train_vs_forward(doc)
    if beside:
        parts += ["", beside]
    for mark, title in (("-", "NOT RUN (each reason once, [the cases]; the results file has every reason in full)"),
                        ("*", "NOTES (each once, [the cases])")):
        section = folded.section(mark, title)
        if section:
            parts += ["", *section]
    return "\n".join(parts)


# Record statuses of an implementation that produced no timing (results_schema.py).
NOT_RUN_STATUSES = ("skipped", "failed", "oom", "timeout")


def _cpu_only(doc: dict) -> bool:
    devices = {(r.get("case_spec") or {}).get("device") for r in doc.get("records", []) if r.get("case_spec")}
    return devices == {"cpu"}


def format_tiers(rows: list[dict]) -> str:
    table, reasons, brief = [], {}, []
    pipeline_check = False
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        result = r["status"].upper()
        if r.get("pipeline_check"):
            pipeline_check = True
            result += " (pipeline check)"
        subject = r.get("subject")
        table.append([
            r["tier"], r.get("case") or "-",
            _num(r.get("subject_us")) + (f" ({subject})" if subject and subject != "sparsek" and r.get("subject_us") else ""),
            f"{_num(r.get('sdpa_floor_us'))} ({r['sdpa_floor']})" if r.get("sdpa_floor") else "-",
            f"{_num(r.get('baseline_us'))} ({r['baseline']})" if r.get("baseline") else "-",
            speedup, _num(r.get("us_per_head"), "{:,.3f}"), result,
        ])
        # One line per reason, the cases it holds for listed at its end. Implementations that did
        # not run are only named: the report above says why.
        case = r.get("case") or ""
        excluded = r.get("excluded") or {}
        not_run = [i for i, why in excluded.items() if why.split(":")[0] in NOT_RUN_STATUSES]
        if r["status"] == "not measurable" and r.get("baseline") is None and excluded and r.get("subject_us"):
            key = f"{r['tier']}: none of the bar's implementations ran ({', '.join(excluded)})"
            reasons.setdefault(key, []).append(case)
        elif r["status"] == "not measurable":
            key = f"{r['tier']}: {short_reason(_this_case(r.get('reason') or '', case))}"
            reasons.setdefault(key, []).append(case)
        elif not_run:
            reasons.setdefault(f"{r['tier']}: bar chosen among those that ran (not run: {', '.join(not_run)})", []).append(case)
        for impl, why in excluded.items():
            if r["status"] != "not measurable" and why != "not run" and impl not in not_run:
                key = f"{r['tier']}: the bar leaves out {impl}: {short_reason(_this_case(why, case))}"
                reasons.setdefault(key, []).append(case)
        b = r.get("brief")
        if b:
            met = {True: "met", False: "not met", None: "not measurable"}
            op = "<" if b["strict"] else "<="
            sp = f"{b['speedup_over_sdpa']:.2f}x" if b.get("speedup_over_sdpa") else "-"
            brief += _wrap(f"{r['tier']} at {r['case']}: us/head {op} {b['target_us_per_head']}: {met[b['met']]}; "
                           f"speedup over the SDPA floor {sp} vs {b['speedup_target']}x: {met[b['speedup_met']]}")
    out = ["TIER ASSESSMENT (docs/tiers.md; ratios from this run on this device; pass = faster than the bar)",
           tabulate(table, headers=["tier", "case", "sparsek us/iter", "SDPA floor us/iter", "bar us/iter",
                                    "speedup", "sparsek us/head", "result"], tablefmt="simple", disable_numparse=True)]
    if pipeline_check:
        out += [""] + _wrap("pipeline check: on a CPU case the op runs its PyTorch reference, timed as sparsek-ref; "
                            "these rows show that the suite works end to end, not how fast SparseK is", indent="")
    if reasons:
        out.append("")
        for key, cases in reasons.items():
            where = [c for c in cases if c]
            out += _wrap(key + (f" [{', '.join(where)}]" if where else ""))
    if brief:
        out += ["", "Original absolute targets (docs/tiers.md; why they cannot be met: sparsek-bench tiers --explain):",
                *brief]
    return "\n".join(out)


def format_explain(rows: list[dict]) -> str:
    table = []
    for r in rows:
        peak = r.get("peak_tflops")
        x = (lambda v: f"{v:,.1f}x" if v is not None else "no GPU peak measured")
        table.append([r["tier"], r["target"], f"{r['us_per_iter']:,.2f}", f"{r['sparsek_tflops']:,.0f}",
                      x(r.get("sparsek_x_peak")), f"{peak:,.0f}" if peak else "-"])
    out = [*_wrap("The original absolute targets (docs/tiers.md) at their configuration (seed: B16 H96 S4096 D128 "
                  "fp16, topk 512, window 256)", indent=""),
           tabulate(table, headers=["tier", "target", "= us/iter", "SparseK work at that time (TFLOP/s)",
                                    "x measured peak", "measured bf16 matmul peak (TFLOP/s)"],
                    tablefmt="simple", disable_numparse=True)]
    for r in rows:
        if "sdpa_causal_tflops" in r:
            x = (lambda v: f"{v:,.1f}x the measured peak" if v is not None else "(no GPU peak measured)")
            out += _wrap(f"T1's figure is the original dense SDPA time ({r['us_per_iter']:,.2f} us): dense causal "
                         f"attention in that time is {r['sdpa_causal_tflops']:,.0f} TFLOP/s "
                         f"{x(r['sdpa_causal_x_peak'])}; counting the full S x S matrix, "
                         f"{r['sdpa_full_matrix_tflops']:,.0f} TFLOP/s {x(r['sdpa_full_matrix_x_peak'])}.", indent="")
    multiples = [v for r in rows for k, v in r.items() if k.endswith("x_peak") and v is not None]
    if multiples:
        out += _wrap(f"These rates are {min(multiples):,.1f}x to {max(multiples):,.1f}x the matmul peak measured in "
                     "the same run, so the tiers are judged by speedups measured side by side instead.", indent="")
    else:
        out += _wrap("Give a GPU results file (or run on a GPU) to set these next to a measured matmul peak; the "
                     "tiers are judged by speedups measured side by side, not by these figures.", indent="")
    return "\n".join(out)
