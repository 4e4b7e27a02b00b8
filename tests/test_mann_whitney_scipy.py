"""The gate's hand-written Mann-Whitney U test against scipy's (scipy is a test-only dependency)."""

import random

import pytest
from scipy import stats  # in the test extra: a missing scipy fails here rather than skipping

from sparsek.bench.compare import EXACT_MAX_CELLS, mann_whitney_u


def _samples(rng, n, ties):
    if ties:
        return [round(rng.gauss(1.0, 0.05), 2) for _ in range(n)]
    return [rng.lognormvariate(0.0, 0.1) for _ in range(n)]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_p_values_match_scipy(ties):
    rng = random.Random(20261207 + ties)
    for trial in range(300):
        n1, n2 = rng.randint(1, 40), rng.randint(1, 40)
        shift = rng.choice([0.0, 0.02, 0.1])
        x = _samples(rng, n1, ties)
        y = [v + shift for v in _samples(rng, n2, ties)]
        exact = len(set(x + y)) == n1 + n2 and n1 * n2 <= EXACT_MAX_CELLS
        want = stats.mannwhitneyu(x, y, alternative="two-sided", method="exact" if exact else "asymptotic").pvalue
        got = mann_whitney_u(x, y)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (trial, n1, n2, ties, exact)
