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

The input is converted as a stream: each kernel record is complete when its row (raw page) or
its last row (details page: ncu writes one kernel's rows together) has been read, goes to a
spool on disk and into the running per-range sums, so memory stays within a few kernels' rows
however long the profile. Each kernel is one line of the output; the file is written atomically.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Iterable, Iterator

import csvparse
import jsonout

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

# The original utilisation targets (nsight/README.md, docs/tiers.md): a range passes a target
# when its duration-weighted mean is above it.
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


# ---------------------------------------------------------------------------------------------
# Ranges and targets

def _label(entries: list[dict]) -> str:
    return " > ".join(e["range"] if e["domain"] is None else f"{e['domain']}:{e['range']}" for e in entries)


class RangeStats:
    """Running sums over the kernels of one range: count, total duration, and the means of the
    % metrics both duration-weighted and plain, for as long as every kernel has a duration."""

    def __init__(self):
        self.kernel_ids: list = []
        self.total = 0
        self.timed = 0  # kernels with a duration
        self.weighted: dict[str, list[float]] = {}
        self.equal: dict[str, list[float]] = {}

    def add(self, kernel: dict) -> None:
        self.kernel_ids.append(kernel["id"])
        duration = kernel["metrics"].get("duration_ns", {}).get("value")
        if duration is not None:
            self.total += duration
            self.timed += 1
        all_timed = self.timed == len(self.kernel_ids)
        for name, metric in kernel["metrics"].items():
            if metric["unit"] == "%":
                if all_timed:
                    acc = self.weighted.setdefault(name, [0.0, 0.0])
                    acc[0] += duration * metric["value"]
                    acc[1] += duration
                acc = self.equal.setdefault(name, [0.0, 0.0])
                acc[0] += 1.0 * metric["value"]
                acc[1] += 1.0

    def summary(self, targets: dict[str, float]) -> dict:
        """Kernel count, total duration, duration-weighted means of the % metrics, target checks."""
        n = len(self.kernel_ids)
        # Weighting by duration makes the mean what the GPU did over the range's time; without a
        # duration for every kernel (a details page without SpeedOfLight) the mean is unweighted.
        weighted = n > 0 and self.timed == n and self.total > 0
        sums = self.weighted if weighted else self.equal
        means = {name: round(s / w, 4) for name, (s, w) in sorted(sums.items()) if w > 0}
        checks = {}
        for name, target in targets.items():
            value = means.get(name)
            checks[name] = {"target": target, "value": value, "pass": None if value is None else value > target}
        verdicts = [c["pass"] for c in checks.values()]
        overall = False if False in verdicts else (True if verdicts and None not in verdicts else None)
        return {
            "kernels": n,
            "duration_ns": self.total if self.timed else None,
            "weighting": "duration" if weighted else "equal",
            "means": means,
            "targets": checks,
            "pass": overall,
        }


def summarize(kernels: Iterable[dict], targets: dict[str, float]) -> dict:
    """RangeStats.summary over any set of kernel records (sparsek.bench.profile groups its own)."""
    stats = RangeStats()
    for kernel in kernels:
        stats.add(kernel)
    return stats.summary(targets)


class RangeGroups:
    """One RangeStats per innermost NVTX range, in order of first appearance."""

    def __init__(self):
        self.groups: dict[tuple, RangeStats] = {}

    def add(self, kernel: dict) -> None:
        if kernel["nvtx_stack"]:
            key = ("push_pop", tuple((e["domain"], e["range"]) for e in kernel["nvtx_stack"]))
        elif kernel["nvtx_start_end"]:
            key = ("start_end", tuple((e["domain"], e["range"]) for e in kernel["nvtx_start_end"]))
        else:
            key = ("none", ())
        self.groups.setdefault(key, RangeStats()).add(kernel)

    def records(self, targets: dict[str, float]) -> list[dict]:
        records = []
        for (kind, path), stats in self.groups.items():
            entries = [{"domain": d, "range": r} for d, r in path]
            inner = entries[-1] if entries else {"domain": None, "range": None}
            records.append({
                "label": _label(entries) if entries else "(no NVTX range)",
                "kind": kind,
                "domain": inner["domain"],
                "range": inner["range"],
                "stack": entries,
                "kernel_ids": stats.kernel_ids,
                **stats.summary(targets),
            })
        return records


# ---------------------------------------------------------------------------------------------
# Conversion

class Conversion:
    """One ncu output, read as a stream: ``kernels(lines)`` yields each kernel record as soon as
    it is complete; afterwards ``document(kernels)`` is the JSON document around them."""

    def __init__(self, targets: dict[str, float] | None = None, source: str = "<input>"):
        self.targets = DEFAULT_TARGETS if targets is None else targets
        self.source = source
        self.messages: list[dict] = []
        self.devices: dict = {}
        self.pages: set[str] = set()
        self.tables = 0
        self.count = 0
        self.ranges = RangeGroups()
        self._cc: dict[str, str] = {}  # device index -> CC of its first kernel

    def kernels(self, lines: Iterable[str]) -> Iterator[dict]:
        table = None
        for kind, value in csvparse.scan(lines, _is_header, _is_row):
            if kind == csvparse.MESSAGE:
                self.messages.append(value)
            elif kind == csvparse.HEADER:
                if table is not None:
                    yield from self._done(table.finish())
                table = (_DetailsTable if "Metric Name" in value.header and "Metric Value" in value.header
                         else _RawTable)(value.header, self.devices)
                self.pages.add(table.page)
                self.tables += 1
            elif kind == csvparse.ROW:
                yield from self._done(table.add(value))
        if table is not None:
            yield from self._done(table.finish())

    def _done(self, kernels: list[dict]) -> Iterator[dict]:
        for kernel in kernels:
            _add_friendly(kernel, "details" if "rules" in kernel else "raw")
            self.count += 1
            self.ranges.add(kernel)
            self._cc.setdefault(str(kernel["device"]), kernel["cc"])
            yield kernel

    def document(self, kernels) -> dict:
        """The document with ``kernels`` (a list, or a jsonout.Spool) in place; raises
        NoKernelsError when the input held no kernel."""
        if not self.count:
            raise NoKernelsError(self._why_empty())
        for index, device in self.devices.items():
            attrs = device["attributes"]
            device["name"] = attrs.get(_DEVICE_PREFIX + "display_name")
            device["sm_count"] = attrs.get(_DEVICE_PREFIX + "multiprocessor_count")
            device["cc"] = self._cc.get(index)
        return {
            "source": {"tool": "ncu", "path": self.source, "page": "+".join(sorted(self.pages))},
            "messages": self.messages,
            "targets": self.targets,
            "devices": self.devices,
            "kernels": kernels,
            "ranges": self.ranges.records(self.targets),
        }

    def _why_empty(self) -> str:
        said = [m["text"] for m in self.messages if m["level"] in ("ERROR", "WARNING") or "No kernels" in m["text"]]
        if self.tables:
            why = "the ncu CSV header is there but no kernel rows follow it"
        else:
            why = 'no ncu CSV table (a header starting "ID","Process ID") was found; is this ncu --csv output?'
        if any("No kernels were profiled" in m["text"] for m in self.messages):
            why += ("; ncu profiled no kernel: check that the --nvtx-include filters name ranges the "
                    "application pushes (push/pop ranges end in '/': \"domain@range/\") and that --nvtx was given")
        if said:
            why += "\nncu said:\n  " + "\n  ".join(said)
        return f"{self.source}: no profiled kernels: {why}"


class _RawTable:
    """The raw page: one row per kernel, the units row (--print-units) first."""

    page = "raw"

    def __init__(self, header: list[str], devices: dict):
        self.header, self.devices = header, devices
        self.units: list[str] | None = None
        nvtx_columns = (_column(header, "Push/Pop_Range"), _column(header, "Start/Stop_Range"))
        skip = set(_IDENTITY) | {header[i] for i in nvtx_columns if i is not None}
        self.metric_columns = [i for i, name in enumerate(header) if name not in skip]

    def add(self, row: list[str]) -> list[dict]:
        if self.units is None:
            self.units = [""] * len(self.header)
            if row[0] == "":  # the units row that --print-units writes under the header
                self.units = row
                return []
        kernel = _kernel_identity(self.header, row)
        for i in self.metric_columns:
            _put(kernel, self.devices, self.header[i], row[i], self.units[i])
        return [kernel]

    def finish(self) -> list[dict]:
        return []


class _DetailsTable:
    """The details page: one row per kernel and metric (or rule), each kernel's rows together."""

    page = "details"

    def __init__(self, header: list[str], devices: dict):
        self.header, self.devices = header, devices
        self.col = {name: header.index(name) for name in _DETAILS if name in header}
        self.pid = header.index("Process ID") if "Process ID" in header else None
        self.kernel: dict | None = None
        self.key: tuple | None = None

    def add(self, row: list[str]) -> list[dict]:
        done = []
        key = (row[0], row[self.pid] if self.pid is not None else "")
        if key != self.key:
            done = self.finish()
            self.kernel, self.key = _kernel_identity(self.header, row), key
            self.kernel["rules"] = []

        def get(name: str) -> str:
            return row[self.col[name]] if name in self.col else ""

        kernel = self.kernel
        if get("Metric Name"):
            _put(kernel, self.devices, get("Metric Name"), get("Metric Value"), get("Metric Unit"), get("Section Name"))
        if get("Rule Name"):
            kernel["rules"].append({
                "section": get("Section Name"),
                "name": get("Rule Name"),
                "type": get("Rule Type"),
                "description": get("Rule Description"),
                "estimated_speedup_type": get("Estimated Speedup Type") or None,
                "estimated_speedup_pct": csvparse.parse_number(get("Estimated Speedup")),
            })
        return done

    def finish(self) -> list[dict]:
        kernel, self.kernel, self.key = self.kernel, None, None
        return [kernel] if kernel is not None else []


def convert(text: str, *, targets: dict[str, float] | None = None, source: str = "<input>") -> dict:
    """The JSON document for one ncu CSV output; raises NoKernelsError when it has no kernel."""
    conversion = Conversion(targets, source)
    kernels = list(conversion.kernels(text.splitlines()))
    return conversion.document(kernels)


def convert_file(path: str, output: str, *, targets: dict[str, float] | None = None) -> None:
    """Convert the file ``path`` ("-": stdin) to ``output`` ("-": stdout) as a stream."""
    conversion = Conversion(targets, path)
    with jsonout.Spool() as kernels:
        for kernel in conversion.kernels(csvparse.iter_lines(path)):
            kernels.add(kernel)
        jsonout.write_document(conversion.document(kernels), output)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ncu_to_json.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="ncu --csv output: a --log-file or captured stdout; '-' for stdin")
    parser.add_argument("-o", "--output", default="-", help="JSON file to write (default: stdout)")
    parser.add_argument("--target", action="append", type=parse_target, default=[], metavar="NAME=VALUE",
                        help="override or add a target on a friendly %% metric ('none' drops it); "
                        f"defaults: {', '.join(f'{k}>{v:g}' for k, v in DEFAULT_TARGETS.items())}")
    args = parser.parse_args(argv)
    try:
        convert_file(args.input, args.output, targets=targets_from(args.target))
    except (OSError, NoKernelsError) as exc:
        print(f"ncu_to_json: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
