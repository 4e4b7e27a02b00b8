"""Is head slower than base? The one statistics module behind `sparsek-bench compare` and ci/gate.py.

Each benchmark key maps to raw timing samples (seconds, lower is better) from two runs on the same
machine. A key is a regression only when both hold:

- the samples differ significantly: a two-sided Mann-Whitney U test (rank based, so the heavy right
  tail of GPU timings - a clock dip, a preempted launch - cannot fake a shift) gives p < alpha;
- the shift matters: median(head) / median(base) > 1 + threshold.

The first guards against noise, the second against reporting a real but negligible 0.3% change on
a run with thousands of samples. Improvement is the mirror image, ratio < 1 / (1 + threshold), so a
5% threshold means the same distance in log space both ways.

The comparison fails closed: a benchmark measured in base that failed, timed out or is missing in
head is a failure too (FAILING), unless base failed it as well: a change that makes a kernel hang
must not pass because the hung kernel left no samples to be slow with.

Small, tie-free samples get the exact U distribution; otherwise the normal approximation with the
tie correction and a continuity correction. CUDA events tick in about 0.5 us, so ties are common
for short kernels and the correction matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

REGRESSION = "regression"
FAILED_IN_HEAD = "failed-in-head"  # measured in base; head's run of it failed, ran out of memory or timed out
MISSING_IN_HEAD = "missing-in-head"  # measured in base; head has no samples and no failure (absent, skipped)
FAILED_IN_BOTH = "failed-in-both"
FAILED_IN_BASE = "failed-in-base"
IMPROVEMENT = "improvement"
UNCHANGED = "unchanged"
MISSING_IN_BASE = "missing-in-base"
TOO_FEW_SAMPLES = "too-few-samples"
# Worst news first: the order of the report.
VERDICTS = (REGRESSION, FAILED_IN_HEAD, MISSING_IN_HEAD, FAILED_IN_BOTH, FAILED_IN_BASE, IMPROVEMENT, UNCHANGED,
            MISSING_IN_BASE, TOO_FEW_SAMPLES)
# The verdicts that fail a gate.
FAILING = (REGRESSION, FAILED_IN_HEAD, MISSING_IN_HEAD)

# Below this many samples on either side a median is not worth comparing, whatever the test says.
MIN_SAMPLES = 3
# Exact U distribution while n_base * n_head stays under this (a polynomial of that length).
EXACT_MAX_CELLS = 2500


@dataclass(frozen=True)
class Row:
    """The comparison of one benchmark key. Medians in the samples' unit (seconds)."""

    key: str
    verdict: str
    base_median: float | None
    head_median: float | None
    ratio: float | None  # head / base; > 1 is slower
    p_value: float | None  # two-sided Mann-Whitney U
    n_base: int
    n_head: int
    detail: str | None = None  # why a side has no samples: "head timeout: exceeded ..."


def compare_samples(
    base: Mapping[str, Sequence[float]],
    head: Mapping[str, Sequence[float]],
    *,
    threshold: float = 0.05,
    alpha: float = 0.01,
    base_failed: Mapping[str, str] | None = None,
    head_failed: Mapping[str, str] | None = None,
) -> list[Row]:
    """One Row per key of base, head, base_failed or head_failed, sorted by key.

    ``*_failed`` map a key whose run failed on that side (in any round) to a one-line reason.
    Missing and non-finite samples (None, NaN, inf) are dropped before anything else.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold={threshold!r}: expected a finite relative change >= 0, e.g. 0.05")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r}: expected a significance level in (0, 1), e.g. 0.01")
    base_failed, head_failed = base_failed or {}, head_failed or {}
    rows = []
    for key in sorted(set(base) | set(head) | set(base_failed) | set(head_failed)):
        a = _finite(key, "base", base.get(key))
        b = _finite(key, "head", head.get(key))
        rows.append(_compare_one(key, a, b, threshold, alpha, base_failed.get(key), head_failed.get(key)))
    return rows


def has_regression(rows: Sequence[Row]) -> bool:
    return any(row.verdict == REGRESSION for row in rows)


def failures(rows: Sequence[Row]) -> list[Row]:
    """The rows that fail a gate: regressions, and benchmarks of base that head broke or lost."""
    return [row for row in rows if row.verdict in FAILING]


def to_markdown(rows: Sequence[Row]) -> str:
    """A GitHub-flavoured markdown table, worst news first, under a one-line count by verdict."""
    counts = {v: sum(row.verdict == v for row in rows) for v in VERDICTS}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no benchmarks"
    lines = [
        f"**{summary}**",
        "",
        "| benchmark | base median | head median | head/base | p-value | samples (base/head) | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    order = {v: i for i, v in enumerate(VERDICTS)}
    for row in sorted(rows, key=lambda r: (order[r.verdict], r.key)):
        verdict = f"**{row.verdict}**" if row.verdict in FAILING else row.verdict
        if row.detail:
            verdict += f": {_escape(row.detail)}"
        lines.append(
            f"| {_escape(row.key)} | {_seconds(row.base_median)} | {_seconds(row.head_median)} "
            f"| {_ratio(row.ratio)} | {_p(row.p_value)} | {row.n_base}/{row.n_head} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that x and y come from one distribution."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError(f"mann_whitney_u: got {n1} and {n2} samples, expected at least one on each side")
    ranks, tie_sizes = _midranks(list(x) + list(y))
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    if not tie_sizes and n1 * n2 <= EXACT_MAX_CELLS:
        return _exact_p(int(round(u1)), n1, n2)
    n = n1 + n2
    tie_term = sum(t**3 - t for t in tie_sizes) / (n * (n - 1))
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:  # every sample identical
        return 1.0
    z = max(abs(u1 - n1 * n2 / 2) - 0.5, 0.0) / math.sqrt(variance)
    return min(1.0, math.erfc(z / math.sqrt(2)))


def min_p_value(n1: int, n2: int) -> float:
    """The smallest two-sided p any outcome can reach with these sample counts (complete separation)."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _compare_one(key: str, a: list[float], b: list[float], threshold: float, alpha: float,
                 base_failure: str | None, head_failure: str | None) -> Row:
    med_a = median(a) if a else None
    med_b = median(b) if b else None
    ratio = None
    if med_a is not None and med_b is not None:
        ratio = med_b / med_a if med_a > 0 else (1.0 if med_b == med_a else math.inf)

    def row(verdict: str, p: float | None = None, detail: str | None = None) -> Row:
        return Row(key, verdict, med_a, med_b, ratio, p, len(a), len(b), detail)

    said = "; ".join(f"{side} {why}" for side, why in (("base", base_failure), ("head", head_failure)) if why)
    if base_failure and head_failure:
        return row(FAILED_IN_BOTH, detail=said)
    if head_failure and a:
        return row(FAILED_IN_HEAD, detail=said)
    if not a:
        return row(FAILED_IN_BASE if base_failure else MISSING_IN_BASE, detail=said or None)
    if not b:
        return row(MISSING_IN_HEAD)
    # With too few samples even complete separation cannot reach alpha: say so rather than
    # calling the key unchanged.
    if min(len(a), len(b)) < MIN_SAMPLES or min_p_value(len(a), len(b)) >= alpha:
        return row(TOO_FEW_SAMPLES)
    p = mann_whitney_u(a, b)
    if p < alpha and ratio > 1 + threshold:
        return row(REGRESSION, p)
    if p < alpha and ratio < 1 / (1 + threshold):
        return row(IMPROVEMENT, p)
    return row(UNCHANGED, p)


def _finite(key: str, side: str, samples: Sequence[float] | None) -> list[float]:
    if samples is None:
        return []
    out = []
    for s in samples:
        if s is None:
            continue
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"{side}[{key!r}] contains {s!r}: expected numbers (seconds)")
        if math.isfinite(s):
            out.append(float(s))
    return out


def _midranks(values: list[float]) -> tuple[list[float], list[int]]:
    """Ranks 1..n with ties given their average rank, and the size of every tie group."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def _exact_p(u: int, n1: int, n2: int) -> float:
    """Exact two-sided p for U = u without ties."""
    counts = _u_counts(n1, n2)
    total = math.comb(n1 + n2, n1)
    lower = sum(counts[: u + 1])
    upper = sum(counts[u:])
    return min(1.0, 2 * min(lower, upper) / total)


@lru_cache(maxsize=64)
def _u_counts(n1: int, n2: int) -> tuple[int, ...]:
    """How many of the C(n1 + n2, n1) arrangements give U = k, for k = 0..n1*n2.

    The coefficients of the Gaussian binomial [n1 + n2 choose n1]_q =
    prod_{i=1..n1} (1 - q^(n2 + i)) / (1 - q^i), built one factor at a time.
    """
    size = n1 * n2 + 1
    counts = [0] * size
    counts[0] = 1
    for i in range(1, n1 + 1):
        step = n2 + i
        for k in range(size - 1, step - 1, -1):  # multiply by (1 - q^step)
            counts[k] -= counts[k - step]
        for k in range(i, size):  # divide by (1 - q^i): a running sum with stride i
            counts[k] += counts[k - i]
    return tuple(counts)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value / 1e-9:.4g} ns"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"
