"""Every registered figure of the docs is read from the committed file it names.

docs/figures.json lists each published figure once: where it stands (a cell of a markdown table,
or a phrase of prose with `{}` where the figure goes), the committed JSON it comes from, a selector
into that JSON and how it is printed. This test reads the value, prints it and fails when the
document shows anything else, and it fails on a cell of a registered table that no figure
accounts for. How to add a figure or a table: docs/figures.md.

Selector: dotted keys; `key[field=value,...]` keeps the list items whose (dotted) field equals
one of the `|`-separated values, or the one value in double quotes (which may hold `,` and `|`:
`impl="backward (op, deterministic)"`; `!=` for the opposite; booleans and null as in JSON), and a key
after such a filter applies to every kept item. `A / B` divides two selectors. A selector that
ends with several values needs `reduce`: min, max, mean (lists flattened: a kernel_ab file's
rounds), count, set (sorted distinct values, ", ", lists flattened), fraction ("k/n" of true values). Printing: `scale` multiplies a number, then
`format` is a Python format string with `!u` (upper case) and `!j` (JSON: true/false/null) added.
"""

from __future__ import annotations

import json
import re
import string
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "docs" / "figures.json"
_MISSING = object()


# ------------------------------------------------------------------------------------------------
# Selectors


def _split_path(path: str) -> list[str]:
    """'a.b[c.d=1].e' -> ['a', 'b[c.d=1]', 'e'] (dots inside brackets stay)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(path):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "." and depth == 0:
            parts.append(path[start:i])
            start = i + 1
    parts.append(path[start:])
    return parts


def _as_text(value) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _get(obj, dotted: str):
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _matches(item, filters: str) -> bool:
    # Conditions are split at commas outside double quotes: impl="backward (op, deterministic)".
    for cond in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', filters):
        m = re.fullmatch(r"\s*([\w.-]+)\s*(!=|=)\s*(.*?)\s*", cond)
        assert m, f"bad filter {cond!r}"
        field, op, wanted = m.groups()
        value = _get(item, field)
        options = [wanted[1:-1]] if len(wanted) >= 2 and wanted[0] == wanted[-1] == '"' else wanted.split("|")
        hit = value is not _MISSING and _as_text(value) in options
        if hit != (op == "="):
            return False
    return True


def select(doc, path: str):
    """The value at `path`, or a list of values where a filter kept several items."""
    many, values = False, [doc]
    for part in _split_path(path.strip()):
        m = re.fullmatch(r"([\w.-]+)(?:\[(.*)\])?", part)
        assert m, f"bad selector step {part!r} in {path!r}"
        key, filters = m.groups()
        out = []
        for value in values:
            assert isinstance(value, dict) and key in value, f"{path!r}: no key {key!r}"
            value = value[key]
            if filters is not None:
                assert isinstance(value, list), f"{path!r}: {key!r} is not a list"
                out.extend(item for item in value if _matches(item, filters))
                many = True
            else:
                out.append(value)
        values = out
    return values if many else values[0]


def _flat(values):
    for v in values:
        yield from (v if isinstance(v, list) else [v])


REDUCERS = {
    "min": lambda vs: min(_flat(vs)),
    "max": lambda vs: max(_flat(vs)),
    "mean": lambda vs: sum(_flat(vs)) / len(list(_flat(vs))),
    "count": len,
    "set": lambda vs: ", ".join(sorted({_as_text(v) for v in _flat(vs)})),
    "fraction": lambda vs: f"{sum(1 for v in vs if v is True)}/{len(vs)}",
}


def value_of(fig: dict, source: dict):
    parts = fig["value"].split(" / ")
    assert len(parts) in (1, 2), f"{fig['value']!r}: at most one ' / '"
    values = []
    for part in parts:
        v = select(source, part)
        if isinstance(v, list):
            if "reduce" in fig:
                assert v or fig["reduce"] in ("count", "fraction"), f"{part!r} selects nothing"
                v = REDUCERS[fig["reduce"]](v)
            else:
                assert len(v) == 1, f"{part!r} selects {len(v)} values: add a reduce or narrow the filter"
                v = v[0]
        values.append(v)
    return values[0] / values[1] if len(values) == 2 else values[0]


class _Formatter(string.Formatter):
    def convert_field(self, value, conversion):
        if conversion == "u":
            return str(value).upper()
        if conversion == "j":
            return json.dumps(value)
        return super().convert_field(value, conversion)


def render(fig: dict, source: dict) -> str:
    value = value_of(fig, source)
    if fig.get("scale", 1) != 1:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{fig['value']!r}: not a number"
        value *= fig["scale"]
    return _Formatter().format(fig.get("format", "{}"), value)


# ------------------------------------------------------------------------------------------------
# Documents


def _squash(text: str) -> str:
    return " ".join(text.split())


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_table(doc_text: str, header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table whose header line starts with `header`: its column names and its rows
    by first cell."""
    lines = doc_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"{len(starts)} tables start with {header!r}"
    i = starts[0]
    columns = _cells(lines[i])
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(columns), f"row {line!r} has {len(cells)} cells, the header {len(columns)}"
        assert cells[0] not in rows, f"two rows named {cells[0]!r}"
        rows[cells[0]] = cells
    return columns, rows


def load_registry(path: Path = REGISTRY) -> dict:
    """The registry with each figure's table defaults (source, scale, format) filled in."""
    reg = json.loads(path.read_text())
    for i, fig in enumerate(reg["figures"]):
        table = reg["tables"].get(fig.get("table"), {})
        reg["figures"][i] = {**{k: table[k] for k in ("source", "scale", "format") if k in table}, **fig}
    return reg


class Files:
    """The documents and sources under one root, each read once."""

    def __init__(self, root: Path, reg: dict):
        self.root, self.reg = root, reg

    @cache
    def text(self, name: str) -> str:
        return (self.root / name).read_text()

    @cache
    def source(self, name: str) -> dict:
        return json.loads(self.text(self.reg["sources"][name]))


def table_mismatches(reg: dict, files: Files, table: str) -> list[str]:
    """Each cell outside the label columns must read exactly its figures, printed and joined by
    spaces: a number that no figure accounts for fails as surely as a wrong one."""
    spec = reg["tables"][table]
    text = files.text(spec["doc"])
    columns, rows = read_table(text, spec["header"])
    expected: dict[tuple[str, str], list[str]] = {}
    for fig in (f for f in reg["figures"] if f.get("table") == table):
        assert fig["row"] in rows, f"{table}: no row {fig['row']!r}"
        assert fig["column"] in columns, f"{table}: no column {fig['column']!r}"
        expected.setdefault((fig["row"], fig["column"]), []).append(render(fig, files.source(fig["source"])))
    wrong = []
    for row, cells in rows.items():
        for column, cell in list(zip(columns, cells))[spec.get("labels", 1):]:
            want = " ".join(expected.get((row, column), ["<no figure registered>"]))
            if cell != want:
                wrong.append(f"{row} / {column}: the document shows {cell!r}, the source gives {want!r}")
    return wrong


REG = load_registry()
FILES = Files(REPO, REG)


def figure_id(fig: dict) -> str:
    where = f"{fig['table']}:{fig['row']}:{fig['column']}" if "table" in fig else f"{fig['doc']}:{fig['text']}"
    return where[:90]


# ------------------------------------------------------------------------------------------------
# Tests


def test_sources_are_committed_files():
    listed = subprocess.run(["git", "ls-files", *REG["sources"].values()], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for name, path in REG["sources"].items():
        assert path in listed, f"source {name}: {path} is not a committed file"
        assert FILES.source(name), path


def test_every_figure_is_placed_and_sourced():
    for fig in REG["figures"]:
        assert fig.get("source") in REG["sources"], figure_id(fig)
        assert ("table" in fig) != ("text" in fig), f"{figure_id(fig)}: a table cell or a phrase, not both"
        if "text" in fig:
            assert fig["text"].count("{}") == 1, f"{figure_id(fig)}: a phrase holds one figure, where `{{}}` stands"
        else:
            assert fig["table"] in REG["tables"], figure_id(fig)


@pytest.mark.parametrize("fig", [f for f in REG["figures"] if "text" in f], ids=figure_id)
def test_prose_figure_matches_its_source(fig):
    shown = _squash(fig["text"].replace("{}", render(fig, FILES.source(fig["source"]))))
    assert shown in _squash(FILES.text(fig["doc"])), (
        f"{fig['doc']} should read {shown!r} ({fig['value']} in {REG['sources'][fig['source']]})")


@pytest.mark.parametrize("table", sorted(REG["tables"]))
def test_table_cells_match_their_sources(table):
    spec = REG["tables"][table]
    assert REG["sources"][spec["source"]] in FILES.text(spec["doc"]), f"{spec['doc']} must name the file of {table}"
    wrong = table_mismatches(REG, FILES, table)
    assert not wrong, f"{spec['doc']}, table {table}:\n" + "\n".join(wrong)


# ------------------------------------------------------------------------------------------------
# The selector language itself

RUN = {"run": {"throttled": True},
       "records": [{"case": "a", "impl": "x", "t": {"m": 2.0}, "ok": True},
                   {"case": "a", "impl": "y", "t": {"m": 4.0}, "ok": False},
                   {"case": "b", "impl": "x", "t": {"m": 8.0}, "ok": True}],
       "cases": [{"case": "a", "ms": [3.0, 1.0, 2.0]}]}  # a kernel_ab file: one list of rounds


@pytest.mark.parametrize("fig, shown", [
    ({"value": "records[case=a,impl=y].t.m", "scale": 1000, "format": "{:,.1f}"}, "4,000.0"),
    ({"value": "records[case=a,impl=y].t.m / records[case=a,impl=x].t.m", "format": "{:.2f}x"}, "2.00x"),
    ({"value": "records[impl=x].t.m", "reduce": "max"}, "8.0"),
    ({"value": "records[impl=x].t.m / records[case=a].t.m", "reduce": "mean", "format": "{:.2f}"}, "1.67"),
    ({"value": "records[case=a|b,impl!=y].t.m", "reduce": "count"}, "2"),
    ({"value": "records[ok=false].impl", "reduce": "set"}, "y"),
    ({"value": "records[case=a].ok", "reduce": "fraction"}, "1/2"),
    ({"value": "cases[case=a].ms", "reduce": "min"}, "1.0"),
    ({"value": "cases[case=a].ms", "reduce": "mean"}, "2.0"),
    ({"value": "run.throttled", "format": "{!j}"}, "true"),
    ({"value": "records[case=b].impl", "format": "{!u}"}, "X"),
])
def test_selectors(fig, shown):
    assert render(fig, RUN) == shown


def test_a_selector_that_picks_several_values_needs_a_reducer():
    with pytest.raises(AssertionError, match="selects 2 values"):
        render({"value": "records[impl=x].t.m"}, RUN)


def test_a_wrong_or_unregistered_cell_fails(tmp_path):
    (tmp_path / "DOC.md").write_text("| case | x |\n|---|---:|\n| a | 2.0 |\n| b | 9.9 |\n| c | 4.0 |\n")
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    (tmp_path / "figures.json").write_text(json.dumps({
        "sources": {"r": "run.json"},
        "tables": {"t": {"doc": "DOC.md", "header": "| case | x |", "source": "r", "format": "{:.1f}"}},
        "figures": [{"table": "t", "row": "a", "column": "x", "value": "records[case=a,impl=x].t.m"},
                    {"table": "t", "row": "c", "column": "x", "value": "records[case=b,impl=x].t.m"}]}))
    reg = load_registry(tmp_path / "figures.json")
    assert table_mismatches(reg, Files(tmp_path, reg), "t") == [
        "b / x: the document shows '9.9', the source gives '<no figure registered>'",
        "c / x: the document shows '4.0', the source gives '8.0'"]
