"""The statistics behind the performance gate: planted slowdowns are caught, equal runs are not."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import FrozenInstanceError

import pytest

from sparsek.bench.compare import (
    IMPROVEMENT,
    MISSING_IN_BASE,
    MISSING_IN_HEAD,
    REGRESSION,
    TOO_FEW_SAMPLES,
    UNCHANGED,
    compare_samples,
    has_regression,
    mann_whitney_u,
    median,
    min_p_value,
    to_markdown,
)

MEDIAN_S = 250e-6  # a typical kernel time


def timings(rng: random.Random, n: int, scale: float, noise: float) -> list[float]:
    """n timings around MEDIAN_S * scale with relative Gaussian noise."""
    return [MEDIAN_S * scale * (1 + rng.gauss(0, noise)) for _ in range(n)]


def verdict(base, head, **kwargs) -> str:
    (row,) = compare_samples({"k": base}, {"k": head}, **kwargs)
    return row.verdict


# ------------------------------------------------------------------------------------------------
# The gate's contract


@pytest.mark.parametrize("seed", range(20))
def test_planted_8_percent_slowdown_is_a_regression(seed):
    rng = random.Random(seed)
    (row,) = compare_samples({"k": timings(rng, 30, 1.0, 0.01)}, {"k": timings(rng, 30, 1.08, 0.01)})
    assert row.verdict == REGRESSION
    assert row.ratio == pytest.approx(1.08, rel=0.01)
    assert row.p_value < 1e-6
    assert has_regression([row])


def test_planted_8_percent_slowdown_is_caught_through_5_percent_noise():
    caught = 0
    for seed in range(200):
        rng = random.Random(1000 + seed)
        caught += verdict(timings(rng, 30, 1.0, 0.05), timings(rng, 30, 1.08, 0.05)) == REGRESSION
    # The median ratio has a spread of about 1.6% here, so 8% clears the 5% bar most of the time.
    assert caught >= 180


def test_a_a_identical_samples_are_unchanged():
    samples = timings(random.Random(7), 30, 1.0, 0.01)
    (row,) = compare_samples({"k": samples}, {"k": list(samples)})
    assert row.verdict == UNCHANGED
    assert row.ratio == 1.0
    assert row.p_value == pytest.approx(1.0)


@pytest.mark.parametrize("n", [10, 30])
def test_noisy_equal_runs_almost_never_fail(n):
    """5% noise, one distribution, many seeds: the false-alarm rate of the gate is tiny."""
    false_alarms = 0
    for seed in range(500):
        rng = random.Random(seed)
        false_alarms += verdict(timings(rng, n, 1.0, 0.05), timings(rng, n, 1.0, 0.05)) == REGRESSION
    assert false_alarms <= 0.01 * 500


def test_heavy_right_tail_does_not_fake_a_regression():
    """GPU timings have rare large outliers (a clock dip, a preempted launch); ranks ignore their size."""
    for seed in range(50):
        rng = random.Random(seed)
        base = timings(rng, 40, 1.0, 0.01)
        head = timings(rng, 40, 1.0, 0.01)
        for i in rng.sample(range(40), 4):
            head[i] *= 3.0
        assert verdict(base, head) != REGRESSION


def test_significant_but_small_change_is_unchanged():
    """Thousands of tight samples make a 2% shift significant; the threshold keeps it from failing."""
    rng = random.Random(3)
    (row,) = compare_samples({"k": timings(rng, 2000, 1.0, 0.002)}, {"k": timings(rng, 2000, 1.02, 0.002)})
    assert row.p_value < 1e-10
    assert row.verdict == UNCHANGED


def test_threshold_is_a_parameter():
    rng = random.Random(4)
    base, head = timings(rng, 30, 1.0, 0.005), timings(rng, 30, 1.03, 0.005)
    assert verdict(base, head) == UNCHANGED
    assert verdict(base, head, threshold=0.02) == REGRESSION


def test_speedup_is_an_improvement_not_a_regression():
    rng = random.Random(5)
    (row,) = compare_samples({"k": timings(rng, 30, 1.0, 0.01)}, {"k": timings(rng, 30, 0.8, 0.01)})
    assert row.verdict == IMPROVEMENT
    assert not has_regression([row])


def test_missing_keys_on_either_side():
    rng = random.Random(6)
    base = {"only-base": timings(rng, 20, 1.0, 0.01), "both": timings(rng, 20, 1.0, 0.01)}
    head = {"only-head": timings(rng, 20, 1.0, 0.01), "both": timings(rng, 20, 1.0, 0.01)}
    rows = {row.key: row for row in compare_samples(base, head)}
    assert rows["only-base"].verdict == MISSING_IN_HEAD
    assert rows["only-base"].head_median is None and rows["only-base"].ratio is None
    assert rows["only-head"].verdict == MISSING_IN_BASE
    assert rows["both"].verdict == UNCHANGED
    assert not has_regression(list(rows.values()))


def test_rows_come_sorted_by_key():
    samples = [1.0, 2.0, 3.0]
    keys = [row.key for row in compare_samples({"b": samples, "a": samples}, {"c": samples})]
    assert keys == ["a", "b", "c"]


def test_too_few_samples_to_decide():
    slow = [2.0, 2.1, 2.2, 2.3]
    fast = [1.0, 1.1, 1.2, 1.3]
    # 4 against 4 can never reach p < 0.01 (the best is 2/70), however far apart.
    assert verdict(fast, slow) == TOO_FEW_SAMPLES
    assert verdict(fast, slow, alpha=0.05) == REGRESSION
    assert verdict(fast + [1.4], slow + [2.4]) == REGRESSION  # 5 against 5: 2/252 < 0.01
    assert verdict([1.0, 1.0], [2.0] * 100) == TOO_FEW_SAMPLES  # under MIN_SAMPLES on one side


def test_non_finite_samples_are_dropped():
    rng = random.Random(8)
    base = timings(rng, 30, 1.0, 0.01) + [math.nan, None, math.inf]
    head = timings(rng, 30, 1.08, 0.01) + [math.nan]
    (row,) = compare_samples({"k": base}, {"k": head})
    assert (row.n_base, row.n_head) == (30, 30)
    assert row.verdict == REGRESSION
    (row,) = compare_samples({"k": [math.nan, math.nan]}, {"k": head})
    assert row.verdict == MISSING_IN_BASE


def test_quantised_timings_with_ties():
    """CUDA events tick in about 0.5 us: short kernels give many tied samples."""
    tick = 0.5e-6
    rng = random.Random(9)

    def quantised(scale):
        return [round(t / tick) * tick for t in timings(rng, 60, scale, 0.01)]

    base = quantised(1.0)
    assert len(set(base)) < len(base)
    assert verdict(base, quantised(1.0)) == UNCHANGED
    assert verdict(base, quantised(1.08)) == REGRESSION


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_samples({}, {}, **kwargs)


def test_non_numbers_are_refused():
    with pytest.raises(TypeError, match=r"base\['k'\]"):
        compare_samples({"k": ["1.0", 2.0]}, {"k": [1.0]})


def test_rows_are_immutable():
    (row,) = compare_samples({"k": [1.0] * 5}, {"k": [1.0] * 5})
    with pytest.raises(FrozenInstanceError):
        row.verdict = REGRESSION


# ------------------------------------------------------------------------------------------------
# The test itself


def brute_force_p(x, y):
    """Two-sided exact p by enumerating every way to split the pooled samples."""
    pooled = list(x) + list(y)

    def u(first):
        a = [pooled[i] for i in first]
        b = [pooled[i] for i in range(len(pooled)) if i not in first]
        return sum((ai > bj) + 0.5 * (ai == bj) for ai in a for bj in b)

    observed = u(tuple(range(len(x))))
    all_u = [u(c) for c in itertools.combinations(range(len(pooled)), len(x))]
    lower = sum(v <= observed for v in all_u)
    upper = sum(v >= observed for v in all_u)
    return min(1.0, 2 * min(lower, upper) / len(all_u))


@pytest.mark.parametrize("seed", range(25))
def test_exact_p_matches_enumeration(seed):
    rng = random.Random(seed)
    x = [rng.random() for _ in range(rng.randint(1, 6))]
    y = [rng.random() + rng.choice([0.0, 0.3]) for _ in range(rng.randint(1, 6))]
    assert mann_whitney_u(x, y) == pytest.approx(brute_force_p(x, y), abs=1e-12)


def test_known_values():
    assert mann_whitney_u([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)  # 2 / C(6, 3)
    assert mann_whitney_u([4, 5, 6], [1, 2, 3]) == pytest.approx(0.1)
    assert mann_whitney_u([5.0] * 10, [5.0] * 10) == 1.0
    assert min_p_value(3, 3) == pytest.approx(0.1)


def test_normal_approximation_with_ties_is_close_to_enumeration():
    x = [1, 2, 2, 3, 3, 3, 4, 5]
    y = [3, 4, 4, 5, 5, 6, 6, 7]
    assert mann_whitney_u(x, y) == pytest.approx(brute_force_p(x, y), rel=0.15)


def test_large_samples_use_the_normal_approximation():
    rng = random.Random(10)
    x = [rng.random() for _ in range(100)]
    y = [rng.random() for _ in range(100)]
    assert 0.0 < mann_whitney_u(x, y) <= 1.0
    with pytest.raises(ValueError, match="at least one"):
        mann_whitney_u([], [1.0])


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


# ------------------------------------------------------------------------------------------------
# The report


def test_markdown_table_worst_news_first():
    spread = [MEDIAN_S * (1 + 0.001 * i) for i in range(-10, 11)]  # median exactly MEDIAN_S
    base = {"a/fast": spread, "z|slow": spread, "gone": [1.0] * 5}
    head = {"a/fast": spread[::-1], "z|slow": [1.5 * t for t in spread]}
    text = to_markdown(compare_samples(base, head))
    lines = text.splitlines()
    assert lines[0] == "**1 regression, 1 missing-in-head, 1 unchanged**"
    assert lines[2].startswith("| benchmark | base median | head median | head/base |")
    body = [line for line in lines[4:] if line.startswith("|")]
    assert len(body) == 3
    assert body[0].startswith("| z\\|slow |") and "**regression**" in body[0]  # the | is escaped
    assert "| 250 us | 375 us | 1.500x |" in body[0]
    # A benchmark that head lost is bad news too: right after the regressions.
    assert body[1].startswith("| gone |") and "| - |" in body[1] and "**missing-in-head**" in body[1]
    assert body[2].startswith("| a/fast |") and body[2].endswith("| unchanged |")
    assert all(line.count("|") - line.count("\\|") == 8 for line in body)


def test_markdown_of_nothing():
    assert to_markdown([]).startswith("**no benchmarks**")
