"""Decode: one new token against a long context, every decode case x implementation, and tier T3.

GB/s counts the K/V bytes the pattern reads (decode is memory-bound). Both classes share one
measurement per asv run, as in bench_prefill.
"""

from . import _common


def _measure():
    return _common.measure_kind("decode")


class Decode(_common._AttentionFamily):
    params = [_common.case_names("decode"), _common.impl_ids("decode")]
    setup_cache = staticmethod(_measure)

    def track_gbps(self, cache, case, impl):
        return _common._value(self.rec, "gbps", "no byte count for this pattern")

    track_gbps.unit = "GB/s"


class DecodeTiers(_common._TierFamily):
    params = [_common.case_names("decode"), _common.tier_names("decode")]
    setup_cache = staticmethod(_measure)
