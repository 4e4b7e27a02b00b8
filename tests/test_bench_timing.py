"""Timing statistics and the stopping rule, on the CPU with a fake clock."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from sparsek.bench import timing


class FakeClock:
    """Returns scripted durations; wall time advances by each duration plus a fixed overhead."""

    name = "fake"

    def __init__(self, durations, overhead=0.0):
        self.durations = iter(durations)
        self.overhead = overhead
        self.t = 0.0
        self.calls = 0

    def time(self, fn):
        fn()
        self.calls += 1
        d = next(self.durations)
        self.t += d + self.overhead
        return d

    def now(self):
        return self.t


def test_quantiles_interpolate_linearly():
    s = timing.summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["q1"], s["median"], s["q3"]) == (1.75, 2.5, 3.25)
    assert s["iqr"] == pytest.approx(1.5)
    assert s["rel_iqr"] == pytest.approx(0.6)
    assert s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["stdev"] == pytest.approx(1.2909944, rel=1e-6)
    assert s["cv"] == pytest.approx(1.2909944 / 2.5, rel=1e-6)


def test_constant_samples_stop_at_min_samples():
    clock = FakeClock(itertools.repeat(1e-3))
    m = timing.measure(lambda: None, device="cpu", clock=clock, min_samples=10, warmup=2, warmup_s=0)
    assert m.stop_reason == timing.STOP_CONVERGED
    assert m.count == 10 and len(m.samples) == 10
    assert m.median == 1e-3 and m.iqr == 0 and m.warmup_calls == 2
    assert clock.calls == 12  # warm-up goes through the clock too, then is discarded


def test_spread_samples_run_to_max_samples():
    clock = FakeClock(itertools.cycle([1.0, 2.0]))
    m = timing.measure(lambda: None, device="cpu", clock=clock, min_samples=10, max_samples=30,
                       max_time_s=1e9, warmup=0, warmup_s=0)
    assert (m.stop_reason, m.count) == (timing.STOP_MAX_SAMPLES, 30)
    assert m.rel_iqr > 0.01


def test_converges_once_spread_settles():
    durations = [5.0, 1.0, 9.0] + [2.0] * 100
    m = timing.measure(lambda: None, device="cpu", clock=FakeClock(durations), target_rel_iqr=0.01,
                       min_samples=10, max_time_s=1e9, warmup=0, warmup_s=0)
    assert m.stop_reason == timing.STOP_CONVERGED
    assert m.median == 2.0 and m.samples[:3] == [5.0, 1.0, 9.0]
    assert 10 <= m.count < 20


def test_time_cap_stops_before_min_samples():
    m = timing.measure(lambda: None, device="cpu", clock=FakeClock(itertools.cycle([1.0, 2.0])),
                       min_samples=10, max_time_s=5.0, warmup=0, warmup_s=0)
    # elapsed after each sample: 1, 3, 4, 6 -> the cap (5 s) is passed at the 4th sample
    assert (m.stop_reason, m.count) == (timing.STOP_MAX_TIME, 4)


def test_time_cap_never_leaves_fewer_than_three_samples():
    m = timing.measure(lambda: None, device="cpu", clock=FakeClock(itertools.cycle([100.0, 300.0])),
                       max_time_s=1.0, warmup=0, warmup_s=0)
    assert (m.stop_reason, m.count) == (timing.STOP_MAX_TIME, timing.HARD_MIN_SAMPLES)


def test_warmup_runs_for_calls_and_for_time():
    clock = FakeClock(itertools.repeat(1.0))
    m = timing.measure(lambda: None, device="cpu", clock=clock, warmup=1, warmup_s=4.5, min_samples=3)
    assert m.warmup_calls == 5  # 1 call is not 4.5 s; five 1-second calls are


def test_around_wraps_every_timed_call():
    entered = []

    @contextlib.contextmanager
    def around():
        entered.append(1)
        yield

    calls = []
    m = timing.measure(lambda: calls.append(1), device="cpu", clock=FakeClock(itertools.repeat(1.0)),
                       around=around, warmup=2, warmup_s=0, min_samples=4)
    assert len(entered) == len(calls) == m.warmup_calls + m.count


def test_stop_rule_directly():
    kw = dict(target_rel_iqr=0.01, min_samples=5, max_samples=8, max_time_s=10.0)
    assert timing.stop_reason([1.0] * 4, 0.0, **kw) is None
    assert timing.stop_reason([1.0] * 5, 0.0, **kw) == timing.STOP_CONVERGED
    assert timing.stop_reason([1.0, 2.0] * 4, 0.0, **kw) == timing.STOP_MAX_SAMPLES
    assert timing.stop_reason([1.0, 2.0], 11.0, **kw) is None  # fewer than 3 samples
    assert timing.stop_reason([1.0, 2.0, 1.0], 11.0, **kw) == timing.STOP_MAX_TIME


def test_host_clock_times_cpu_cases():
    m = timing.measure(lambda: sum(range(2000)), device="cpu", min_samples=3, max_time_s=0.2, warmup_s=0)
    assert m.timer == "host perf_counter" and m.mode == "warm"  # no L2 flush on the CPU
    assert m.count >= 3 and all(s > 0 for s in m.samples)
    assert m.to_dict()["samples"] == m.samples


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA device"):
        timing.measure(lambda: None, device="cpu", cuda_graph=True)


@pytest.mark.gpu
def test_cuda_events_cold_and_graph():
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    props = torch.cuda.get_device_properties(0)
    m = timing.measure(lambda: a @ a, device="cuda", cold=True, min_samples=5, max_time_s=1.0)
    assert m.timer == "cuda events" and m.mode == "cold"
    assert m.settings["flush_bytes"] >= 2 * props.L2_cache_size
    assert all(s > 0 for s in m.samples)
    g = timing.measure(lambda: a @ a, device="cuda", cold=False, cuda_graph=True, min_samples=5, max_time_s=1.0)
    assert g.mode == "warm+graph" and g.median > 0
