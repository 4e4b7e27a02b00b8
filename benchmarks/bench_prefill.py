"""Prefill attention: every prefill case x implementation of the registry, and tiers T1/T2.

One measurement per asv run serves both classes (they share ``_measure`` as setup_cache, and
asv keys the cache by that function), so a tier's speedup and the timings come from the same
process on the same device.
"""

from . import _common


def _measure():
    return _common.measure_kind("prefill")


class Prefill(_common._AttentionFamily):
    params = [_common.case_names("prefill"), _common.impl_ids("prefill")]
    setup_cache = staticmethod(_measure)


class PrefillTiers(_common._TierFamily):
    params = [_common.case_names("prefill"), _common.tier_names("prefill")]
    setup_cache = staticmethod(_measure)
