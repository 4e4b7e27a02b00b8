"""Print asv --bench regular expressions that select only the planned parameter combinations.

    python ci/asv_select.py Prefill PrefillTiers      # one regular expression per line
    python ci/asv_select.py --methods track_time,track_speedup Prefill   # only these methods

asv runs every parameter combination of a benchmark in a process of its own (its default launch
method spawns, and each process imports torch), even a combination whose ``setup`` only raises
NotImplementedError because SPARSEK_ASV_CASES / SPARSEK_ASV_IMPLS did not plan it. The parameter
grid stays the whole registry on every machine (asv publish drops results whose parameters the
benchmark does not list), so a narrow run pays for ~80 processes per benchmark method. asv
matches --bench against ``module.Class.method(param0, param1)`` with each parameter as its
repr, so these expressions keep only the (case, impl) or (case, tier) combinations that
benchmarks/_common.py plans from the same environment variables:

    mapfile -t sel < <(python ci/asv_select.py Prefill PrefillTiers)
    ci/asv_history.sh SHA1 SHA2 -- "${sel[@]/#/--bench=}"

Spaces in the expressions are written as \\s, so the lines survive word splitting. Each kept
combination still costs one process per method; --methods narrows a history run to the methods
it needs (track_time and track_speedup, say).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# asv class -> (case kind, what its second parameter lists)
CLASSES = {
    "Prefill": ("prefill", "impl"),
    "PrefillTiers": ("prefill", "tier"),
    "Train": ("train", "impl"),
    "TrainTiers": ("train", "tier"),
    "Decode": ("decode", "impl"),
    "DecodeTiers": ("decode", "tier"),
    "Selection": ("prefill", "selection"),
}


def _alternatives(values) -> str:
    return "(" + "|".join(re.escape(repr(v)).replace(" ", r"\s") for v in values) + ")"


def selection_regex(cls: str, methods=None) -> str:
    """The --bench expression for asv class ``cls``: its planned cases x planned impls (or every
    tier of the kind, for a tiers class); of every method, or of ``methods`` only."""
    if cls not in CLASSES:
        raise ValueError(f"unknown asv class {cls!r}; valid classes: {', '.join(CLASSES)}")
    from benchmarks import _common  # imports torch and asv_runner: only for a known class
    kind, second = CLASSES[cls]
    cases = _common.planned_cases(kind)
    if second == "tier":
        others = _common.tier_names(kind)
    else:
        others = _common.planned_impls("selection" if second == "selection" else kind)
    if not cases or not others:
        raise ValueError(f"{cls}: nothing planned (cases {cases}, {second}s {others}); "
                         f"see {_common.ENV_CASES} / {_common.ENV_IMPLS}")
    method = r"\w+" if not methods else "(" + "|".join(re.escape(m) for m in methods) + ")"
    return rf"^\w+\.{cls}\.{method}\({_alternatives(cases)},\s{_alternatives(others)}\)$"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("classes", nargs="+", help=f"asv classes: {', '.join(CLASSES)}")
    ap.add_argument("--methods", default="",
                    help="comma-separated benchmark methods to keep (e.g. track_time,track_speedup; default all)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if not re.fullmatch(r"track_\w+", m)]
    if bad:
        ap.error(f"--methods: {bad[0]!r} is not an asv track_* method name")
    try:
        for cls in args.classes:
            print(selection_regex(cls, methods))
    except ValueError as exc:
        print(f"asv_select: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
