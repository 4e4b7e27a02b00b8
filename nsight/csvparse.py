"""Pull CSV tables out of Nsight tool output, and turn its cells into numbers.

Nsight Compute and Nsight Systems both print CSV mixed with other lines: ``==PROF==`` /
``==WARNING==`` / ``==ERROR==`` messages (ncu writes them into ``--log-file`` too), the
profiled application's own stdout when the CSV goes to stdout, and ``Processing [...]`` lines
between the reports of ``nsys stats``. So a table is found by its header row, and after it
every line that parses to exactly as many fields as the header is a row; everything else is
kept aside as noise (and the tool's messages are classified, so a caller can quote an
``==ERROR==`` when a run produced no data).

Imported by its siblings as a plain module: the scripts in nsight/ are run as files
(``python nsight/ncu_to_json.py``), so they are not a package; a package named ``nsight``
would also shadow NVIDIA's ``nsight-python``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

# ncu prints "==LEVEL== text"; INFO appears with --print-summary and friends.
_TOOL_LINE = re.compile(r"^==(PROF|WARNING|ERROR|INFO)==\s?(.*)$")
# Digit grouping as ncu prints it ("103,424", "11,796,480"): only well-formed groups of three,
# so "1,5" or "12,34" are never read as one number. The C locale (LC_ALL=C, which the driver
# sets) makes "." the decimal point.
_GROUPED = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
# A row of a quoted field that spans lines (rule descriptions can) is joined with the next
# lines, but never with more than this many: an unbalanced quote in application output must
# not swallow the rest of the file.
_MAX_JOINED_LINES = 64


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    first_line: int = 0  # 1-based line of the header, for error messages


@dataclass
class Extracted:
    tables: list[Table]
    messages: list[dict]  # {"level": "ERROR", "text": "..."} in input order
    noise: list[str]  # other lines that were not part of any table


def read_text(path: str) -> str:
    """The whole input: a file, or stdin for ``-``. Undecodable bytes never stop a conversion."""
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def _parse_one(text: str) -> list[str] | None:
    """The fields of ``text`` if it is exactly one CSV record, else None."""
    records = list(csv.reader(io.StringIO(text, newline="")))
    return records[0] if len(records) == 1 else None


def _record_at(lines: list[str], i: int) -> tuple[list[str] | None, int]:
    """Parse the record that starts at line i; returns (fields, number of lines used)."""
    text, used = lines[i], 1
    while text.count('"') % 2 == 1 and used < _MAX_JOINED_LINES and i + used < len(lines):
        text += "\n" + lines[i + used]
        used += 1
    if text.count('"') % 2 == 1:
        return None, 1
    return _parse_one(text), used


def same_width(header: list[str], fields: list[str]) -> bool:
    return len(fields) == len(header)


def extract_tables(
    text: str,
    is_header: Callable[[list[str]], bool],
    is_row: Callable[[list[str], list[str]], bool] = same_width,
) -> Extracted:
    """Every table whose header satisfies ``is_header``, with the lines that were not rows.

    ``is_row(header, fields)`` accepts a record as a row of the current table; rows shorter
    than the header are padded with empty fields (ncu's details page ends metric rows early).
    """
    lines = text.splitlines()
    tables: list[Table] = []
    messages: list[dict] = []
    noise: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        tool = _TOOL_LINE.match(line)
        if tool:
            messages.append({"level": tool.group(1), "text": tool.group(2).strip()})
            i += 1
            continue
        if not line.strip():
            i += 1
            continue
        fields, used = _record_at(lines, i)
        if fields is not None and is_header(fields):
            tables.append(Table(header=fields, first_line=i + 1))
        elif fields is not None and tables and is_row(tables[-1].header, fields):
            width = len(tables[-1].header)
            tables[-1].rows.append(fields + [""] * (width - len(fields)))
        else:
            noise.append(line)
            used = 1  # a failed join must not hide the lines it tried to join
        i += used
    return Extracted(tables=tables, messages=messages, noise=noise)


def parse_number(text: str) -> int | float | None:
    """ "103,424" -> 103424, "27.30" -> 27.3, "n/a" / "" / "nan" -> None."""
    s = text.strip()
    if not s:
        return None
    if _GROUPED.match(s):
        s = s.replace(",", "")
    try:
        return int(s)
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        return None
    # JSON has no NaN or infinity; a missing measurement is None, not a number.
    return value if math.isfinite(value) else None


def parse_triple(text: str) -> list[int] | None:
    """ "(16, 2, 8)" -> [16, 2, 8], the way ncu prints grid and block sizes."""
    parts = [p for p in re.split(r"[(),\s]+", text) if p]
    values = [parse_number(p) for p in parts]
    if len(values) != 3 or not all(isinstance(v, int) for v in values):
        return None
    return values


def error_lines(messages: Iterable[dict]) -> list[str]:
    return [m["text"] for m in messages if m["level"] == "ERROR"]
