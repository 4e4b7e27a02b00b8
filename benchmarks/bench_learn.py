"""Learnability: error rate on the retrieval task per attention variant at equal key budget.

Not a timing: ``setup_cache`` trains the small models of each planned ``learn-*`` case once per
asv run (sparsek.learn, one seed: the ``--quick`` reduction), and every ``track_error_rate``
reads its number from that result. Lower is better. docs/learn.md explains the task and the
variants.

Which cases train: the ``learn-*`` names in SPARSEK_ASV_CASES (the variable the other asv classes
read; their names are ignored here), else only ``learn-quick`` (about a minute on one CPU core).
``learn-cpu`` and ``learn-full`` take tens of minutes per seed, too long for every commit; ask
for them by name.
"""

import os

from sparsek.learn.bench import CASES, run_learn_case
from sparsek.learn.model import VARIANTS

ENV_CASES = "SPARSEK_ASV_CASES"
DEFAULT_CASES = ("learn-quick",)


def _planned_cases():
    raw = os.environ.get(ENV_CASES, "").strip()
    if not raw:
        return list(DEFAULT_CASES)
    wanted = [n.strip() for n in raw.split(",") if n.strip().startswith("learn-")]
    unknown = [n for n in wanted if n not in CASES]
    if unknown:
        raise ValueError(f"{ENV_CASES}: unknown learn case(s) {unknown}; valid: {', '.join(CASES)}")
    return wanted


def _error_rates(result):
    """{variant: mean over the case's key budgets of 1 - held-out accuracy} (small, picklable)."""
    return {variant: row["error_rate"] for variant, row in result["variants"].items()}


class LearnErrorRate:
    # Every case on every machine: asv publish drops results whose parameters the discovered
    # benchmark does not list, so the list must not depend on the machine or the environment.
    params = [list(CASES), list(VARIANTS)]
    param_names = ["case", "variant"]
    # asv applies this to setup_cache too: learn-quick trains in about a minute on a CPU core,
    # learn-full (when asked for) in the order of an hour.
    timeout = 4 * 3600
    version = "1"

    def setup_cache(self):
        return {case: _error_rates(run_learn_case(case, quick=True)) for case in _planned_cases()}

    def setup(self, rates, case, variant):
        if case not in rates:
            raise NotImplementedError(f"{case} was not trained in this run (default: {', '.join(DEFAULT_CASES)}; "
                                      f"ask for it with {ENV_CASES}={case})")
        if variant not in rates[case]:
            raise NotImplementedError(f"{variant} is not part of {case}")

    def track_error_rate(self, rates, case, variant):
        return rates[case][variant]

    track_error_rate.unit = "error rate"
