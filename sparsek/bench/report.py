"""Plain-text report of a results document: header, one table per case, the training steps beside
the forwards of the same shape, the TIER ASSESSMENT.

Only formatting lives here; every number comes from the results (timing, metrics, tiers).
"""

from __future__ import annotations

from tabulate import tabulate

from .cases import TRAIN_SHAPES, Case


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
             f"xformers {sw.get('xformers')}, vllm {sw.get('vllm')} | commit {commit} | started {run.get('started')}"]
    opts = run.get("options", {})
    timing = run.get("timing", {})
    cold = "cold (L2 flushed before every CUDA sample)" if opts.get("cold") else "warm (no L2 flush)"
    lines.append(f"timing: CUDA events, {cold}; CPU cases: host timer"
                 f"{', CUDA graph replay' if opts.get('cuda_graph') else ''}; stop at IQR/median <= "
                 f"{timing.get('target_rel_iqr', 0):.0%} after {timing.get('min_samples')} samples, or "
                 f"{timing.get('max_samples')} samples, or {timing.get('max_time_s')} s")
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
        reasons = sorted({w for r in doc.get("records", []) if r.get("clocks") for w in r["clocks"].get("throttle_reasons", [])})
        lines.append(f"clocks during timed loops: {'THROTTLED (' + '; '.join(reasons) + ')' if throttled else 'not throttled'}")
    return "\n".join(lines)


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


def train_case_table(records: list[dict]) -> str:
    """One training-step case: ms per step, step TFLOP/s, gradient errors, memory."""
    rows, below, subsets = [], [], {}
    for r in records:
        if r["status"] != "ok":
            below.append(f"  - {r['impl']}: {r['status']}: {r.get('reason')}")
            continue
        t, m, mem = r["timing"], r.get("metrics", {}), r.get("memory") or {}
        implausible = bool(m.get("implausible"))
        rows.append([r["impl"], _num(t["median"] * 1e3, "{:,.3f}"), f"{t['iqr'] * 1e3:,.3f} ({t['rel_iqr']:.1%})",
                     t["count"], _rate(m.get("tflops_effective")) + ("!" if implausible else ""),
                     _rate(m.get("tflops_dense_equivalent")), _num(m.get("pct_peak_tflops"), "{:.0f}%"),
                     _grad_error_cell(r.get("error")), _bytes(mem.get("peak_bytes")), _bytes(mem.get("step_peak_bytes"))])
        for note in r.get("notes", []):
            below.append(f"  * {r['impl']}: {note}")
        for flag in m.get("implausible", []):
            below.append(f"  ! {r['impl']}: implausible: {flag}")
        line = _subset_line(r.get("error"))
        if line:
            subsets.setdefault(r.get("pattern"), line)
    below += [f"  gradients of the {pattern} pattern checked on {line}" for pattern, line in subsets.items()]
    convention = next((r["metrics"].get("flop_convention") for r in records if r.get("metrics")), None)
    if convention:
        below.append(f"  FLOPs: {convention}")
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


def case_table(records: list[dict]) -> str:
    """The table of one case's records plus the skipped/failed ones and notes underneath."""
    spec = records[0].get("case_spec")
    if spec and spec.get("kind") == "train":
        return train_case_table(records)
    decode = spec and spec.get("kind") == "decode"
    rows, below = [], []
    for r in records:
        if r["status"] != "ok":
            below.append(f"  - {r['impl']}: {r['status']}: {r.get('reason')}")
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
        for note in r.get("notes", []):
            below.append(f"  * {r['impl']}: {note}")
        for flag in m.get("implausible", []):
            below.append(f"  ! {r['impl']}: implausible: {flag}")
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
    parts = [header(doc)]
    for name, records in by_case.items():
        spec = records[0].get("case_spec")
        title = Case(**spec).describe() if spec else records[0].get("kind", "")
        parts.append(f"\n== {name}: {title} ==")
        if spec:
            parts.append(case_table(records))
        else:  # learn-* records: whatever the learn module reported
            for r in records:
                extra = {k: v for k, v in r.items() if k not in ("case", "impl", "family", "kind", "notes", "traceback")}
                parts.append(f"  {r['impl']}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    beside = train_vs_forward(doc)
    if beside:
        parts += ["", beside]
    return "\n".join(parts)


def format_tiers(rows: list[dict]) -> str:
    table, reasons, brief = [], [], []
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        table.append([
            r["tier"], r.get("case") or "-", _num(r.get("subject_us")),
            f"{_num(r.get('sdpa_floor_us'))} ({r['sdpa_floor']})" if r.get("sdpa_floor") else "-",
            f"{_num(r.get('baseline_us'))} ({r['baseline']})" if r.get("baseline") else "-",
            speedup, _num(r.get("us_per_head"), "{:,.3f}"), r["status"].upper(),
        ])
        if r["status"] == "not measurable":
            reasons.append(f"  {r['tier']} {r.get('case') or ''}: {r['reason']}")
        for impl, why in (r.get("excluded") or {}).items():
            if r["status"] != "not measurable" and why != "not run":
                reasons.append(f"  {r['tier']} {r.get('case')}: bar excludes {impl}: {why}")
        b = r.get("brief")
        if b:
            met = {True: "met", False: "not met", None: "not measurable"}
            op = "<" if b["strict"] else "<="
            sp = f"{b['speedup_over_sdpa']:.2f}x" if b.get("speedup_over_sdpa") else "-"
            brief.append(f"  {r['tier']} at {r['case']}: us/head {op} {b['target_us_per_head']}: {met[b['met']]}; "
                         f"speedup over the SDPA floor {sp} vs the brief's {b['speedup_target']}x: {met[b['speedup_met']]}")
    out = ["TIER ASSESSMENT (ratios measured in this run, on this device; pass = faster than the bar)",
           tabulate(table, headers=["tier", "case", "sparsek us/iter", "SDPA floor us/iter", "bar us/iter",
                                    "speedup", "sparsek us/head", "result"], tablefmt="simple", disable_numparse=True)]
    if reasons:
        out += ["", *reasons]
    if brief:
        out += ["", "The original brief's absolute targets (configuration; see `sparsek-bench tiers --explain`):", *brief]
    return "\n".join(out)


def format_explain(rows: list[dict]) -> str:
    table = []
    for r in rows:
        peak = r.get("peak_tflops")
        x = (lambda v: f"{v:,.1f}x" if v is not None else "no GPU peak measured")
        table.append([r["tier"], r["target"], f"{r['us_per_iter']:,.2f}", f"{r['sparsek_tflops']:,.0f}",
                      x(r.get("sparsek_x_peak")), f"{peak:,.0f}" if peak else "-"])
    out = ["The brief's absolute targets at its configuration (seed: B16 H96 S4096 D128 fp16, topk 512, window 256)",
           tabulate(table, headers=["tier", "brief target", "= us/iter", "SparseK work at that time (TFLOP/s)",
                                    "x measured peak", "measured bf16 matmul peak (TFLOP/s)"],
                    tablefmt="simple", disable_numparse=True)]
    for r in rows:
        if "sdpa_causal_tflops" in r:
            x = (lambda v: f"{v:,.1f}x the measured peak" if v is not None else "(no GPU peak measured)")
            out.append(f"T1's figure is the brief's dense SDPA time ({r['us_per_iter']:,.2f} us): dense causal attention "
                       f"in that time is {r['sdpa_causal_tflops']:,.0f} TFLOP/s {x(r['sdpa_causal_x_peak'])}; counting "
                       f"the full S x S matrix, {r['sdpa_full_matrix_tflops']:,.0f} TFLOP/s "
                       f"{x(r['sdpa_full_matrix_x_peak'])}.")
    multiples = [v for r in rows for k, v in r.items() if k.endswith("x_peak") and v is not None]
    if multiples:
        out.append(f"These rates are {min(multiples):,.1f}x to {max(multiples):,.1f}x the matmul peak measured in the "
                   "same run, so the tiers are judged by speedups measured side by side instead.")
    else:
        out.append("Give a GPU results file (or run on a GPU) to set these next to a measured matmul peak; the tiers "
                   "are judged by speedups measured side by side, not by these figures.")
    return "\n".join(out)
