"""Nsight Systems ``nsys stats --format csv`` reports -> JSON: kernels and NVTX ranges.

    python nsight/nsys_to_json.py INPUT [INPUT ...] [-o OUTPUT] [--domain NAME ...]

Each INPUT is a CSV file that ``nsys stats --report cuda_gpu_kern_sum --report nvtx_sum
--format csv --output PREFIX`` wrote (one file per report), or the captured stdout of the same
command without ``--output``, where the reports follow each other between ``Processing [...]``
lines (``-`` reads stdin). Reports are recognised by their header, not by file name:

- ``cuda_gpu_kern_sum``: Time (%), Total Time, Instances, Avg, Med, Min, Max, StdDev, Name
  (older versions add GridXYZ and BlockXYZ before Name) -> ``kernels``, one per kernel name.
- ``nvtx_sum``: Time (%), Total Time, Instances, Avg, Med, Min, Max, StdDev, Style, Range
  -> ``ranges``. These are host-side (CPU) durations of the ranges, not GPU time.

Times are converted to nanoseconds from the unit in the header (``--timeunit`` changes it).
Exit status 1 when no input holds a row of either report.

Inputs are converted as streams: each row becomes a record that goes straight to a spool on disk
(nsight/jsonout.py), so memory does not grow with the report; each record is one line of the
output, which is written atomically.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from typing import Iterable

import csvparse
import jsonout

_UNIT = re.compile(r"^(?P<base>.*?)\s*\((?P<unit>[^)]*)\)$")
_TO_NS = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}
# header base name -> output key (times get a _ns suffix after conversion)
_STATS = {"Time": "time_pct", "Total Time": "total", "Instances": "instances", "Avg": "avg", "Med": "med",
          "Min": "min", "Max": "max", "StdDev": "stddev"}


class NoRowsError(ValueError):
    """No cuda_gpu_kern_sum or nvtx_sum row in the input."""


@functools.lru_cache(maxsize=1024)  # called for every cell of every row, with a table's few header cells
def _base(cell: str) -> tuple[str, str | None]:
    m = _UNIT.match(cell.strip())
    return (m.group("base"), m.group("unit")) if m else (cell.strip(), None)


def _report(header: list[str]) -> str | None:
    if not any(h.strip() == "Instances" for h in header):
        return None  # every row is asked: most are data rows, rejected here cheaply
    bases = {_base(h)[0] for h in header}
    if not {"Total Time", "Instances"} <= bases:
        return None
    if {"Style", "Range"} <= bases:
        return "nvtx_sum"
    if "Name" in bases:
        return "cuda_gpu_kern_sum"
    return None


def split_range(text: str, domains: tuple[str, ...]) -> tuple[str | None, str]:
    """(domain, range) of an nvtx_sum Range cell.

    nsys writes a range of a named domain with the domain in front ("sparsek:case:long-16k"),
    and some versions write default-domain ranges with an empty one (":step"). A prefix is only
    taken as a domain when it is one of ``domains``: range names contain ':' themselves.
    """
    if text.startswith(":"):
        return None, text[1:]
    for domain in domains:
        if text.startswith(domain + ":"):
            return domain, text[len(domain) + 1:]
    return None, text


def _row(header: list[str], fields: list[str], domains: tuple[str, ...]) -> dict:
    record: dict = {}
    for cell, text in zip(header, fields):
        base, unit = _base(cell)
        if base in _STATS:
            value = csvparse.parse_number(text)
            key = _STATS[base]
            if unit in _TO_NS and value is not None:
                value, key = value * _TO_NS[unit], key + "_ns"
                value = int(value) if float(value).is_integer() else value
            record[key] = value
        elif base in ("GridXYZ", "BlockXYZ"):
            record["grid" if base == "GridXYZ" else "block"] = csvparse.parse_triple(text)
        elif base == "Name":
            record["name"] = text
        elif base == "Style":
            record["style"] = text
        elif base == "Range":
            record["domain"], record["range"] = split_range(text, domains)
            record["raw_range"] = text
    return record


class Conversion:
    """Several nsys stats outputs, read as streams: ``records(source, lines)`` yields
    ("kernels" | "ranges", record) for every report row; ``document`` wraps them afterwards."""

    def __init__(self, domains: tuple[str, ...] = ("sparsek",)):
        self.domains = domains
        self.sources: list[str] = []
        self.reports: set[str] = set()
        self.messages: list[str] = []
        self.count = 0

    def records(self, source: str, lines: Iterable[str]):
        self.sources.append(source)
        header, target = None, None
        for kind, value in csvparse.scan(lines, lambda fields: _report(fields) is not None):
            if kind == csvparse.MESSAGE:
                self.messages.append(value["text"])
            elif kind == csvparse.NOISE:
                # nsys explains a skipped report in plain lines ("SKIPPED: ... does not contain ...").
                if "SKIPPED" in value or "ERROR" in value.upper():
                    self.messages.append(value.strip())
            elif kind == csvparse.HEADER:
                header = value.header
                report = _report(header)
                self.reports.add(report)
                target = "ranges" if report == "nvtx_sum" else "kernels"
            else:
                self.count += 1
                yield target, {**_row(header, value, self.domains), "source": source}

    def document(self, kernels, ranges) -> dict:
        """The document with ``kernels`` and ``ranges`` (lists, or jsonout.Spools) in place;
        raises NoRowsError when no input held a report row."""
        if not self.count:
            said = ("\nnsys said:\n  " + "\n  ".join(self.messages)) if self.messages else ""
            raise NoRowsError(f"{', '.join(self.sources)}: no cuda_gpu_kern_sum or nvtx_sum rows found "
                              f"(expected nsys stats --format csv output){said}")
        return {
            "source": {"tool": "nsys", "paths": self.sources, "reports": sorted(self.reports)},
            "messages": self.messages,
            "kernels": kernels,
            "ranges": ranges,
        }


def convert(texts: list[tuple[str, str]], *, domains: tuple[str, ...] = ("sparsek",)) -> dict:
    """``texts``: (source name, content) pairs. Raises NoRowsError when no report row is found."""
    conversion = Conversion(domains)
    out: dict[str, list[dict]] = {"kernels": [], "ranges": []}
    for source, text in texts:
        for target, record in conversion.records(source, text.splitlines()):
            out[target].append(record)
    return conversion.document(out["kernels"], out["ranges"])


def convert_files(paths: list[str], output: str, *, domains: tuple[str, ...] = ("sparsek",)) -> None:
    """Convert the files ``paths`` ("-": stdin) to ``output`` ("-": stdout) as streams."""
    conversion = Conversion(domains)
    with jsonout.Spool() as kernels, jsonout.Spool() as ranges:
        spools = {"kernels": kernels, "ranges": ranges}
        for path in paths:
            for target, record in conversion.records(path, csvparse.iter_lines(path)):
                spools[target].add(record)
        jsonout.write_document(conversion.document(kernels, ranges), output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsys_to_json.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="nsys stats --format csv files or captured stdout; '-' for stdin")
    parser.add_argument("-o", "--output", default="-", help="JSON file to write (default: stdout)")
    parser.add_argument("--domain", action="append", default=None, metavar="NAME",
                        help="NVTX domain names to split off the Range column (default: sparsek)")
    args = parser.parse_args(argv)
    domains = tuple(args.domain or ("sparsek",))
    try:
        convert_files(args.inputs, args.output, domains=domains)
    except (OSError, NoRowsError) as exc:
        print(f"nsys_to_json: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
