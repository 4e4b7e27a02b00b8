"""Pull CSV tables out of Nsight tool output, and turn its cells into numbers.

Nsight Compute and Nsight Systems both print CSV mixed with other lines: ``==PROF==`` /
``==WARNING==`` / ``==ERROR==`` messages (ncu writes them into ``--log-file`` too), the
profiled application's own stdout when the CSV goes to stdout, and ``Processing [...]`` lines
between the reports of ``nsys stats``. So a table is found by its header row, and after it
every line that parses to exactly as many fields as the header is a row; everything else is
kept aside as noise (and the tool's messages are classified, so a caller can quote an
``==ERROR==`` when a run produced no data).

Inputs can be large (ncu's raw page of a long run: tens of MB), so the input is read as a stream
of lines (``iter_lines``) and ``scan`` turns it into events one line at a time, holding at most
one quoted record's worth of lines. ``extract_tables`` collects the same events for callers that
have the whole text.

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
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

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


def iter_lines(path: str) -> Iterator[str]:
    """The lines of a file, or of stdin for ``-``, without their ends, split exactly as
    ``str.splitlines`` splits the whole text. Undecodable bytes never stop a conversion."""
    if path == "-":
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="")
        yield from _split(stream)
        return
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        yield from _split(f)


def _split(stream) -> Iterator[str]:
    # Reading with newline="" ends lines at \n, \r and \r\n; splitlines() on each also splits at
    # the rarer boundaries (\f, \x1c, ...), so the lines are those of text.splitlines().
    for chunk in stream:
        yield from chunk.splitlines()


def _parse_one(text: str) -> list[str] | None:
    """The fields of ``text`` if it is exactly one CSV record, else None."""
    records = list(csv.reader(io.StringIO(text, newline="")))
    return records[0] if len(records) == 1 else None


def same_width(header: list[str], fields: list[str]) -> bool:
    return len(fields) == len(header)


# Events of ``scan``: (kind, value)
MESSAGE = "message"  # {"level": "ERROR", "text": "..."}: a tool line
HEADER = "header"  # Table (without rows): a header row starts a new table
ROW = "row"  # list[str]: a row of the current table, padded to the header's width
NOISE = "noise"  # str: a line that belongs to no table


def scan(
    lines: Iterable[str],
    is_header: Callable[[list[str]], bool],
    is_row: Callable[[list[str], list[str]], bool] = same_width,
) -> Iterator[tuple[str, object]]:
    """Events for every line, in input order: tool messages, table headers, rows, noise.

    ``is_row(header, fields)`` accepts a record as a row of the current table; rows shorter
    than the header are padded with empty fields (ncu's details page ends metric rows early).
    """
    numbered = enumerate(lines, start=1)
    pending: deque[tuple[int, str]] = deque()  # lines a failed join read ahead, to be scanned again

    def next_line():
        return pending.popleft() if pending else next(numbered, None)

    header: list[str] | None = None
    while (item := next_line()) is not None:
        number, line = item
        tool = _TOOL_LINE.match(line)
        if tool:
            yield MESSAGE, {"level": tool.group(1), "text": tool.group(2).strip()}
            continue
        if not line.strip():
            continue
        text, joined = line, []
        while text.count('"') % 2 == 1 and len(joined) + 1 < _MAX_JOINED_LINES:
            more = next_line()
            if more is None:
                break
            joined.append(more)
            text += "\n" + more[1]
        fields = None if text.count('"') % 2 == 1 else _parse_one(text)
        if fields is not None and is_header(fields):
            header = fields
            yield HEADER, Table(header=fields, first_line=number)
        elif fields is not None and header is not None and is_row(header, fields):
            yield ROW, fields + [""] * (len(header) - len(fields))
        else:
            yield NOISE, line
            pending.extendleft(reversed(joined))  # a failed join must not hide the lines it tried to join


def extract_tables(
    text: str,
    is_header: Callable[[list[str]], bool],
    is_row: Callable[[list[str], list[str]], bool] = same_width,
) -> Extracted:
    """Every table whose header satisfies ``is_header``, with the lines that were not rows."""
    found = Extracted(tables=[], messages=[], noise=[])
    for kind, value in scan(text.splitlines(), is_header, is_row):
        if kind == MESSAGE:
            found.messages.append(value)
        elif kind == HEADER:
            found.tables.append(value)
        elif kind == ROW:
            found.tables[-1].rows.append(value)
        else:
            found.noise.append(value)
    return found


def parse_number(text: str) -> int | float | None:
    """ "103,424" -> 103424, "27.30" -> 27.3, "n/a" / "" / "nan" -> None."""
    s = text.strip()
    if not s:
        return None
    if "," in s and _GROUPED.match(s):
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
