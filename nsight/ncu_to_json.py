"""Nsight Compute CSV (raw or details page) -> JSON: kernels, NVTX ranges, targets.

    python nsight/ncu_to_json.py INPUT [-o OUTPUT] [--target NAME=VALUE ...]

INPUT is what ``ncu --csv`` wrote, to ``--log-file`` or to stdout (``-`` reads stdin): the
``--page raw`` table (one row per kernel, a units row under the header) or the
``--page details`` table (one row per kernel and metric). Tool lines (``==PROF==`` ...) and the
application's own output around the CSV are skipped. Exit status 1, with the reason on stderr,
when the input holds no profiled kernel.

Output:
- ``kernels``: one record per profiled kernel: id, name, grid, block, the NVTX push/pop stack
  (outermost first) and start/end ranges as ``{domain, range}``, and ``metrics`` as
  ``{name: {value, unit}}`` under ncu's own names plus the friendly names of FRIENDLY_METRICS.
  Non-numeric values go to ``attributes``; device attributes are hoisted into ``devices``.
- ``ranges``: per innermost NVTX range (kernels grouped by their whole stack, so the same
  implementation under two cases stays two groups): kernel count, total duration, the
  duration-weighted mean of every percentage metric, and pass/fail against the targets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import csvparse

# friendly name -> (raw-page metric, details-page metric name or None).
# The raw names are the ones in the H200 fixtures (Nsight Compute 2025.3.1); the details names
# are the SpeedOfLight / Occupancy / LaunchStats rows that ncu computes from the same metrics.
FRIENDLY_METRICS: dict[str, tuple[str, str | None]] = {
    "duration_ns": ("gpu__time_duration.sum", "Duration"),
    "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "Compute (SM) Throughput"),
    "memory_throughput_pct": (
        "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
        "Memory Throughput",
    ),
    "dram_throughput_pct": ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM Throughput"),
    "l2_throughput_pct": ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "L2 Cache Throughput"),
    # "Achieved Occupancy" on the details page is this metric: active warps / max warps per SM.
    "warps_active_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", "Achieved Occupancy"),
    "tensor_pipe_active_pct": ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", None),
    "dram_bytes": ("dram__bytes.sum", None),
    # Launch statistics come with every raw page; they explain a low warps_active (the
    # theoretical ceiling set by registers and shared memory).
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct", "Theoretical Occupancy"),
    "registers_per_thread": ("launch__registers_per_thread", "Registers Per Thread"),
    "shared_mem_per_block_bytes": ("launch__shared_mem_per_block_allocated", None),
    "waves_per_sm": ("launch__waves_per_multiprocessor", "Waves Per SM"),
}

# What the driver asks ncu for (``--metrics``): duration, SM, memory, DRAM and L2 throughput,
# warps active, tensor pipe active, DRAM bytes.
DEFAULT_METRICS: tuple[str, ...] = tuple(
    FRIENDLY_METRICS[name][0]
    for name in (
        "duration_ns",
        "sm_throughput_pct",
        "memory_throughput_pct",
        "dram_throughput_pct",
        "l2_throughput_pct",
        "warps_active_pct",
        "tensor_pipe_active_pct",
        "dram_bytes",
    )
)

# The brief's targets: a range passes a target when its duration-weighted mean is above it.
DEFAULT_TARGETS: dict[str, float] = {
    "sm_throughput_pct": 85.0,
    "warps_active_pct": 90.0,
    "dram_throughput_pct": 75.0,
    "l2_throughput_pct": 80.0,
}

_TIME_TO_NS = {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6, "s": 1e9, "second": 1e9}
_DEFAULT_DOMAIN = "<default domain>"
_IDENTITY = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
             "Block Size", "Grid Size", "Device", "CC")
_DETAILS = ("Section Name", "Metric Name", "Metric Unit", "Metric Value", "Rule Name", "Rule Type",
            "Rule Description", "Estimated Speedup Type", "Estimated Speedup")
_DEVICE_PREFIX = "device__attribute_"


class NoKernelsError(ValueError):
    """The input holds no profiled kernel (the message says what was found instead)."""


def _is_header(fields: list[str]) -> bool:
    return bool(fields) and fields[0] == "ID" and "Kernel Name" in fields


def _is_row(header: list[str], fields: list[str]) -> bool:
    # A kernel row (or the units row, whose ID is empty) carries at least the launch columns;
    # details-page metric rows stop before the rule columns, so shorter rows are fine.
    first_metric = header.index("Kernel Name") + 1
    return first_metric <= len(fields) <= len(header) and (fields[0] == "" or fields[0].isdigit())


# ---------------------------------------------------------------------------------------------
# NVTX columns. A push/pop cell reads  441  "dom:range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg"  "..."
# (thread id, then one quoted entry per level, outermost first); a start/end cell reads
#  "Id:dom:range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg" . Range names, and in principle
# domains, may contain ':', so an entry is split with the help of what ncu repeats: for a
# registered string the message equals the range name.

def _split_entry(text: str) -> dict:
    parts = text.split(":")
    for d in range(1, len(parts)):
        rest = parts[d:]
        k2 = len(rest) - 5  # range and message (k parts each) around five single-token fields
        if k2 >= 2 and k2 % 2 == 0 and rest[: k2 // 2] == rest[-(k2 // 2):]:
            return _entry(":".join(parts[:d]), ":".join(rest[: k2 // 2]))
    if len(parts) >= 8:  # message differs from the range (e.g. "none"): six plain fields at the end
        return _entry(parts[0], ":".join(parts[1:-6]))
    return _entry(None, text)


def _entry(domain: str | None, name: str) -> dict:
    # The default domain has no name to filter on (ncu: --nvtx-include "range/"): null.
    return {"domain": None if domain in (None, _DEFAULT_DOMAIN) else domain, "range": name}


def parse_push_pop(cell: str) -> tuple[int | None, list[dict]]:
    """(thread id, stack outermost first) from a ``thread Domain:Push/Pop_Range:...`` cell."""
    thread = re.match(r"\s*(\d+)", cell)
    stack = [_split_entry(e) for e in re.findall(r'"([^"]*)"', cell)]
    return (int(thread.group(1)) if thread else None), stack


def parse_start_end(cell: str) -> list[dict]:
    """Start/end ranges from an ``Id:Domain:Start/Stop_Range:...`` cell, each with its id."""
    ranges = []
    for e in re.findall(r'"([^"]*)"', cell):
        rid, _, rest = e.partition(":")
        ranges.append({"id": csvparse.parse_number(rid), **_split_entry(rest)})
    return ranges


# ---------------------------------------------------------------------------------------------
# Kernel records

def _column(header: list[str], marker: str) -> int | None:
    return next((i for i, h in enumerate(header) if marker in h), None)


def _kernel_identity(header: list[str], row: list[str]) -> dict:
    cell = dict(zip(header, row))
    num = csvparse.parse_number
    kernel = {
        "id": num(cell.get("ID", "")),
        "name": cell.get("Kernel Name", ""),
        "process_id": num(cell.get("Process ID", "")),
        "process_name": cell.get("Process Name", ""),
        "device": num(cell.get("Device", "")),
        "cc": cell.get("CC", ""),
        "context": num(cell.get("Context", "")),
        "stream": num(cell.get("Stream", "")),
        "grid": csvparse.parse_triple(cell.get("Grid Size", "")),
        "block": csvparse.parse_triple(cell.get("Block Size", "")),
        "nvtx_thread": None,
        "nvtx_stack": [],
        "nvtx_start_end": [],
    }
    pp, se = _column(header, "Push/Pop_Range"), _column(header, "Start/Stop_Range")
    if pp is not None:
        kernel["nvtx_thread"], kernel["nvtx_stack"] = parse_push_pop(row[pp])
    if se is not None:
        kernel["nvtx_start_end"] = parse_start_end(row[se])
    kernel["metrics"], kernel["attributes"] = {}, {}
    return kernel


def _put(kernel: dict, devices: dict, name: str, text: str, unit: str, section: str | None = None) -> None:
    value = csvparse.parse_number(text)
    if name.startswith(_DEVICE_PREFIX):
        device = devices.setdefault(str(kernel["device"]), {"attributes": {}})
        device["attributes"][name] = value if value is not None else text
        return
    if value is None:
        if text.strip():
            kernel["attributes"][name] = text
        return
    if section is not None and name in kernel["metrics"]:
        name = f"{section}: {name}"  # the details page repeats a few names across sections
    record = {"value": value, "unit": unit}
    if section is not None:
        record["section"] = section
    kernel["metrics"][name] = record


def _raw_kernels(table: csvparse.Table, devices: dict) -> list[dict]:
    header, rows = table.header, table.rows
    units = [""] * len(header)
    if rows and rows[0][0] == "":  # the units row that --print-units writes under the header
        units, rows = rows[0], rows[1:]
    nvtx_columns = (_column(header, "Push/Pop_Range"), _column(header, "Start/Stop_Range"))
    skip = set(_IDENTITY) | {header[i] for i in nvtx_columns if i is not None}
    kernels = []
    for row in rows:
        kernel = _kernel_identity(header, row)
        for name, unit, text in zip(header, units, row):
            if name not in skip:
                _put(kernel, devices, name, text, unit)
        kernels.append(kernel)
    return kernels


def _details_kernels(table: csvparse.Table, devices: dict) -> list[dict]:
    header = table.header
    col = {name: header.index(name) for name in _DETAILS if name in header}
    kernels: dict[tuple, dict] = {}
    for row in table.rows:
        key = (row[0], row[header.index("Process ID")] if "Process ID" in header else "")
        kernel = kernels.get(key)
        if kernel is None:
            kernel = kernels[key] = _kernel_identity(header, row)
            kernel["rules"] = []

        def get(name: str) -> str:
            return row[col[name]] if name in col else ""

        if get("Metric Name"):
            _put(kernel, devices, get("Metric Name"), get("Metric Value"), get("Metric Unit"), get("Section Name"))
        if get("Rule Name"):
            kernel["rules"].append({
                "section": get("Section Name"),
                "name": get("Rule Name"),
                "type": get("Rule Type"),
                "description": get("Rule Description"),
                "estimated_speedup_type": get("Estimated Speedup Type") or None,
                "estimated_speedup_pct": csvparse.parse_number(get("Estimated Speedup")),
            })
    return list(kernels.values())


def _add_friendly(kernel: dict, page: str) -> None:
    for friendly, (raw_name, details_name) in FRIENDLY_METRICS.items():
        source = raw_name if page == "raw" else details_name
        metric = kernel["metrics"].get(source) if source else None
        if metric is None:
            continue
        value, unit = metric["value"], metric["unit"]
        if friendly == "duration_ns" and unit in _TIME_TO_NS:
            value, unit = value * _TIME_TO_NS[unit], "ns"
        kernel["metrics"][friendly] = {"value": value, "unit": unit, "from": source}


def _device_summary(devices: dict, kernels: list[dict]) -> None:
    for index, device in devices.items():
        attrs = device["attributes"]
        device["name"] = attrs.get(_DEVICE_PREFIX + "display_name")
        device["sm_count"] = attrs.get(_DEVICE_PREFIX + "multiprocessor_count")
        device["cc"] = next((k["cc"] for k in kernels if str(k["device"]) == index), None)


# ---------------------------------------------------------------------------------------------
# Ranges and targets

def _label(entries: list[dict]) -> str:
    return " > ".join(e["range"] if e["domain"] is None else f"{e['domain']}:{e['range']}" for e in entries)


def summarize(kernels: list[dict], targets: dict[str, float]) -> dict:
    """Kernel count, total duration, duration-weighted means of the % metrics, target checks."""
    durations = [k["metrics"].get("duration_ns", {}).get("value") for k in kernels]
    total = sum(d for d in durations if d is not None)
    # Weighting by duration makes the mean what the GPU did over the range's time; without a
    # duration for every kernel (a details page without SpeedOfLight) the mean is unweighted.
    weighted = bool(kernels) and all(d is not None for d in durations) and total > 0
    weights = durations if weighted else [1.0] * len(kernels)
    sums: dict[str, list[float]] = {}
    for kernel, w in zip(kernels, weights):
        for name, metric in kernel["metrics"].items():
            if metric["unit"] == "%":
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += w * metric["value"]
                acc[1] += w
    means = {name: round(s / w, 4) for name, (s, w) in sorted(sums.items()) if w > 0}
    checks = {}
    for name, target in targets.items():
        value = means.get(name)
        checks[name] = {"target": target, "value": value, "pass": None if value is None else value > target}
    verdicts = [c["pass"] for c in checks.values()]
    overall = False if False in verdicts else (True if verdicts and None not in verdicts else None)
    return {
        "kernels": len(kernels),
        "duration_ns": total if durations and any(d is not None for d in durations) else None,
        "weighting": "duration" if weighted else "equal",
        "means": means,
        "targets": checks,
        "pass": overall,
    }


def group_ranges(kernels: list[dict], targets: dict[str, float]) -> list[dict]:
    """One record per innermost range, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for kernel in kernels:
        if kernel["nvtx_stack"]:
            key = ("push_pop", tuple((e["domain"], e["range"]) for e in kernel["nvtx_stack"]))
        elif kernel["nvtx_start_end"]:
            key = ("start_end", tuple((e["domain"], e["range"]) for e in kernel["nvtx_start_end"]))
        else:
            key = ("none", ())
        groups.setdefault(key, []).append(kernel)
    records = []
    for (kind, path), members in groups.items():
        entries = [{"domain": d, "range": r} for d, r in path]
        inner = entries[-1] if entries else {"domain": None, "range": None}
        records.append({
            "label": _label(entries) if entries else "(no NVTX range)",
            "kind": kind,
            "domain": inner["domain"],
            "range": inner["range"],
            "stack": entries,
            "kernel_ids": [k["id"] for k in members],
            **summarize(members, targets),
        })
    return records


# ---------------------------------------------------------------------------------------------

def convert(text: str, *, targets: dict[str, float] | None = None, source: str = "<input>") -> dict:
    """The JSON document for one ncu CSV output; raises NoKernelsError when it has no kernel."""
    targets = DEFAULT_TARGETS if targets is None else targets
    found = csvparse.extract_tables(text, _is_header, _is_row)
    devices: dict = {}
    kernels: list[dict] = []
    pages = set()
    for table in found.tables:
        page = "details" if "Metric Name" in table.header and "Metric Value" in table.header else "raw"
        pages.add(page)
        new = _details_kernels(table, devices) if page == "details" else _raw_kernels(table, devices)
        for kernel in new:
            _add_friendly(kernel, page)
        kernels += new
    if not kernels:
        raise NoKernelsError(_why_empty(found, source))
    _device_summary(devices, kernels)
    return {
        "source": {"tool": "ncu", "path": source, "page": "+".join(sorted(pages))},
        "messages": found.messages,
        "targets": targets,
        "devices": devices,
        "kernels": kernels,
        "ranges": group_ranges(kernels, targets),
    }


def _why_empty(found: csvparse.Extracted, source: str) -> str:
    said = [m["text"] for m in found.messages if m["level"] in ("ERROR", "WARNING") or "No kernels" in m["text"]]
    if found.tables:
        why = "the ncu CSV header is there but no kernel rows follow it"
    else:
        why = 'no ncu CSV table (a header starting "ID","Process ID") was found; is this ncu --csv output?'
    if any("No kernels were profiled" in m["text"] for m in found.messages):
        why += ("; ncu profiled no kernel: check that the --nvtx-include filters name ranges the "
                "application pushes (push/pop ranges end in '/': \"domain@range/\") and that --nvtx was given")
    if said:
        why += "\nncu said:\n  " + "\n  ".join(said)
    return f"{source}: no profiled kernels: {why}"


def parse_target(text: str) -> tuple[str, float | None]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--target expects NAME=VALUE (e.g. sm_throughput_pct=85), got {text!r}")
    if value.lower() == "none":
        return name, None
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target {name}: {value!r} is not a number (or 'none' to drop it)")


def targets_from(pairs: list[tuple[str, float | None]]) -> dict[str, float]:
    targets = dict(DEFAULT_TARGETS)
    for name, value in pairs:
        if value is None:
            targets.pop(name, None)
        else:
            targets[name] = value
    return targets


def write_json(doc: dict, output: str) -> None:
    text = json.dumps(doc, indent=1) + "\n"
    if output == "-":
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ncu_to_json.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="ncu --csv output: a --log-file or captured stdout; '-' for stdin")
    parser.add_argument("-o", "--output", default="-", help="JSON file to write (default: stdout)")
    parser.add_argument("--target", action="append", type=parse_target, default=[], metavar="NAME=VALUE",
                        help="override or add a target on a friendly %% metric ('none' drops it); "
                        f"defaults: {', '.join(f'{k}>{v:g}' for k, v in DEFAULT_TARGETS.items())}")
    args = parser.parse_args(argv)
    try:
        doc = convert(csvparse.read_text(args.input), targets=targets_from(args.target), source=args.input)
    except (OSError, NoKernelsError) as exc:
        print(f"ncu_to_json: error: {exc}", file=sys.stderr)
        return 1
    write_json(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
