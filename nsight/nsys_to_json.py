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
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import csvparse

_UNIT = re.compile(r"^(?P<base>.*?)\s*\((?P<unit>[^)]*)\)$")
_TO_NS = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}
# header base name -> output key (times get a _ns suffix after conversion)
_STATS = {"Time": "time_pct", "Total Time": "total", "Instances": "instances", "Avg": "avg", "Med": "med",
          "Min": "min", "Max": "max", "StdDev": "stddev"}


class NoRowsError(ValueError):
    """No cuda_gpu_kern_sum or nvtx_sum row in the input."""


def _base(cell: str) -> tuple[str, str | None]:
    m = _UNIT.match(cell.strip())
    return (m.group("base"), m.group("unit")) if m else (cell.strip(), None)


def _report(header: list[str]) -> str | None:
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


def convert(texts: list[tuple[str, str]], *, domains: tuple[str, ...] = ("sparsek",)) -> dict:
    """``texts``: (source name, content) pairs. Raises NoRowsError when no report row is found."""
    kernels: list[dict] = []
    ranges: list[dict] = []
    reports: set[str] = set()
    messages: list[str] = []
    for source, text in texts:
        found = csvparse.extract_tables(text, lambda fields: _report(fields) is not None)
        messages += [m["text"] for m in found.messages]
        # nsys explains a skipped report in plain lines ("SKIPPED: ... does not contain ...").
        messages += [line.strip() for line in found.noise if "SKIPPED" in line or "ERROR" in line.upper()]
        for table in found.tables:
            kind = _report(table.header)
            reports.add(kind)
            target = ranges if kind == "nvtx_sum" else kernels
            target += [{**_row(table.header, fields, domains), "source": source} for fields in table.rows]
    if not kernels and not ranges:
        said = ("\nnsys said:\n  " + "\n  ".join(messages)) if messages else ""
        names = ", ".join(s for s, _ in texts)
        raise NoRowsError(f"{names}: no cuda_gpu_kern_sum or nvtx_sum rows found "
                          f"(expected nsys stats --format csv output){said}")
    return {
        "source": {"tool": "nsys", "paths": [s for s, _ in texts], "reports": sorted(reports)},
        "messages": messages,
        "kernels": kernels,
        "ranges": ranges,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsys_to_json.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="nsys stats --format csv files or captured stdout; '-' for stdin")
    parser.add_argument("-o", "--output", default="-", help="JSON file to write (default: stdout)")
    parser.add_argument("--domain", action="append", default=None, metavar="NAME",
                        help="NVTX domain names to split off the Range column (default: sparsek)")
    args = parser.parse_args(argv)
    domains = tuple(args.domain or ("sparsek",))
    try:
        doc = convert([(path, csvparse.read_text(path)) for path in args.inputs], domains=domains)
    except (OSError, NoRowsError) as exc:
        print(f"nsys_to_json: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(doc, indent=1) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
