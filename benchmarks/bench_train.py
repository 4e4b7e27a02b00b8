"""One training step of attention (forward + backward with a fixed upstream gradient): every train
case x implementation with a backward, and tiers T1-train/T2-train.

track_time is the step's device-timed samples; track_tflops counts the step as 3.5x the forward's
attended FLOPs (sparsek.bench.metrics); track_error is the worst gradient's max abs error on the
checked subset (sparsek.bench.impls.grad_reference). Both classes share one measurement per asv
run, as in bench_prefill.
"""

from . import _common


def _measure():
    return _common.measure_kind("train")


class Train(_common._AttentionFamily):
    params = [_common.case_names("train"), _common.impl_ids("train")]
    setup_cache = staticmethod(_measure)


class TrainTiers(_common._TierFamily):
    params = [_common.case_names("train"), _common.tier_names("train")]
    setup_cache = staticmethod(_measure)
