"""Reading asv's result files (asv 0.6, result api version 2): one place for its column layout.

Each file maps a benchmark name to a row of values in the order of ``result_columns`` (asv drops
trailing None columns); a parametrised benchmark keeps one result and one sample list per
combination of its parameters, in the order of their Cartesian product, with parameter values
written as their repr (``"'long-16k'"``).
"""

from __future__ import annotations

import itertools
from typing import Iterator


def entries(data: dict) -> Iterator[tuple[str, tuple[str, ...], object, object, object]]:
    """(benchmark name, parameter combination as asv writes it, result, samples, version) for every
    combination of every benchmark in one result file; result and samples are None where asv
    recorded nothing (skipped or failed)."""
    columns = data.get("result_columns") or []
    for name, values in (data.get("results") or {}).items():
        row = dict(zip(columns, values))
        params = row.get("params") or []
        combos = list(itertools.product(*params)) if params else [()]
        results = _per_combo(row.get("result"), len(combos))
        samples = _per_combo(row.get("samples"), len(combos))
        for combo, result, combo_samples in zip(combos, results, samples):
            yield name, tuple(combo), result, combo_samples, row.get("version")


def _per_combo(values, n: int) -> list:
    if not isinstance(values, list):
        return [None] * n
    return list(values) + [None] * (n - len(values))
