"""How one implementation is timed: clocks, the L2 flush, the stopping rule and the statistics.

Three small pieces behind one call, ``measure``:

* a **clock** times one call: ``CudaEventClock`` (CUDA events on the current stream, so the
  figure is device time) or ``HostClock`` (``time.perf_counter``, for CPU cases). Tests inject a
  fake clock.
* **cold mode** (default) zeroes a buffer of at least twice the L2 size before every sample, so
  each call starts with the caches as a real model step would find them, not with its own
  inputs still resident. Warm mode skips the flush.
* the **stopping rule**: sample until the relative IQR (IQR / median) is under a target (1%), with
  at least ``min_samples`` samples, or until ``max_samples`` or the time cap.

Before each CUDA sample a short spin kernel (``torch.cuda._sleep``) keeps the GPU busy while the
host enqueues the call, so the events measure the kernels and not the launch latency of an idle
GPU; a call whose host work exceeds the spin is host-bound and its time says so.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Protocol

import torch

# Spin before each CUDA sample: about 0.5 ms at H100/H200 clocks, longer than the host side of
# any call here except the Python reference (which is host-bound anyway).
SPIN_CYCLES = 1_000_000
# The flush buffer is at least this many times the L2 size.
FLUSH_L2_MULTIPLE = 2
# Samples below this count give no meaningful IQR; the time cap never stops earlier.
HARD_MIN_SAMPLES = 3
MAX_WARMUP_CALLS = 1000

STOP_CONVERGED = "converged"  # relative IQR under the target after min_samples
STOP_MAX_SAMPLES = "max_samples"
STOP_MAX_TIME = "max_time"
STOP_REASONS = (STOP_CONVERGED, STOP_MAX_SAMPLES, STOP_MAX_TIME)


class Clock(Protocol):
    name: str

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds of one call of fn."""

    def now(self) -> float:
        """Wall time in seconds, for the time cap."""


class HostClock:
    name = "host perf_counter"

    def time(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def now(self) -> float:
        return time.perf_counter()


_flush_buffers: dict[int, torch.Tensor] = {}


def l2_flush_buffer(device) -> torch.Tensor:
    """A byte buffer of FLUSH_L2_MULTIPLE x the L2 size of ``device`` (one per device, reused)."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index not in _flush_buffers:
        l2 = torch.cuda.get_device_properties(index).L2_cache_size
        size = FLUSH_L2_MULTIPLE * max(int(l2), 1 << 20)
        _flush_buffers[index] = torch.empty(size, dtype=torch.uint8, device=f"cuda:{index}")
    return _flush_buffers[index]


class CudaEventClock:
    """CUDA events around each call on the current stream; optional L2 flush before it."""

    name = "cuda events"

    def __init__(self, device, *, flush: bool = True, spin_cycles: int = SPIN_CYCLES):
        self.device = torch.device(device)
        self.flush_buffer = l2_flush_buffer(self.device) if flush else None
        self.spin_cycles = spin_cycles
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time(self, fn) -> float:
        if self.flush_buffer is not None:
            self.flush_buffer.zero_()
        if self.spin_cycles and hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(self.spin_cycles)
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3

    def now(self) -> float:
        return time.perf_counter()


# ---------------------------------------------------------------------------------------------
# statistics


def quantile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between order statistics (numpy's default, R type 7)."""
    if not sorted_values:
        raise ValueError("quantile of no samples")
    pos = (len(sorted_values) - 1) * p
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict:
    """median, q1, q3, iqr, rel_iqr, mean, stdev, cv, min, max of samples (seconds)."""
    xs = sorted(samples)
    n = len(xs)
    mean = sum(xs) / n
    stdev = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    q1, med, q3 = quantile(xs, 0.25), quantile(xs, 0.5), quantile(xs, 0.75)
    return {
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "rel_iqr": (q3 - q1) / med if med > 0 else math.inf,
        "mean": mean,
        "stdev": stdev,
        "cv": stdev / mean if mean > 0 else math.inf,
        "min": xs[0],
        "max": xs[-1],
    }


def stop_reason(samples: list[float], elapsed_s: float, *, target_rel_iqr: float, min_samples: int,
                max_samples: int, max_time_s: float) -> str | None:
    """Why sampling stops now, or None to take another sample."""
    n = len(samples)
    if n >= max(min_samples, HARD_MIN_SAMPLES) and summarize(samples)["rel_iqr"] <= target_rel_iqr:
        return STOP_CONVERGED
    if n >= max_samples:
        return STOP_MAX_SAMPLES
    if elapsed_s >= max_time_s and n >= HARD_MIN_SAMPLES:
        return STOP_MAX_TIME
    return None


@dataclass
class Measurement:
    samples: list[float]  # seconds, in the order taken
    median: float
    q1: float
    q3: float
    iqr: float
    rel_iqr: float
    mean: float
    stdev: float
    cv: float
    min: float
    max: float
    count: int
    stop_reason: str
    warmup_calls: int
    mode: str  # "cold" | "warm", plus "+graph" for CUDA-graph replay
    timer: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _capture_graph(fn) -> Callable[[], None]:
    """Capture fn into a CUDA graph (after warm-up on a side stream) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # lets lazy initialisation (cuBLAS workspaces, autotuning) happen
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:
        raise RuntimeError(f"CUDA graph capture failed: {type(exc).__name__}: {exc}") from exc
    return graph.replay


def measure(
    fn: Callable[[], object],
    *,
    device,
    cold: bool = True,
    target_rel_iqr: float = 0.01,
    min_samples: int = 10,
    max_samples: int = 1000,
    max_time_s: float = 10.0,
    warmup: int = 3,
    warmup_s: float = 0.1,
    cuda_graph: bool = False,
    clock: Clock | None = None,
    around: Callable[[], ContextManager] | None = None,
) -> Measurement:
    """Time ``fn`` (zero arguments, the timed work only) until the stopping rule says stop.

    ``around`` is entered around every timed call (the harness's NVTX ranges), outside the
    graph in CUDA-graph mode so replays are annotated too. Warm-up: at least ``warmup`` calls
    and at least ``warmup_s`` seconds (clocks ramp up; lazy initialisation happens).
    """
    dev = torch.device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {dev}")
    if clock is None:
        clock = CudaEventClock(dev, flush=cold) if dev.type == "cuda" else HostClock()
    timed = _capture_graph(fn) if cuda_graph else fn
    wrap = around or contextlib.nullcontext

    def call():
        with wrap():
            timed()

    t0 = clock.now()
    warmup_calls = 0
    while warmup_calls < warmup or (clock.now() - t0 < warmup_s and warmup_calls < MAX_WARMUP_CALLS):
        clock.time(call)
        warmup_calls += 1

    samples: list[float] = []
    t0 = clock.now()
    while True:
        samples.append(clock.time(call))
        reason = stop_reason(samples, clock.now() - t0, target_rel_iqr=target_rel_iqr, min_samples=min_samples,
                             max_samples=max_samples, max_time_s=max_time_s)
        if reason:
            break
    stats = summarize(samples)
    mode = ("cold" if cold and dev.type == "cuda" else "warm") + ("+graph" if cuda_graph else "")
    settings = {"target_rel_iqr": target_rel_iqr, "min_samples": min_samples, "max_samples": max_samples,
                "max_time_s": max_time_s, "warmup": warmup, "warmup_s": warmup_s}
    if isinstance(clock, CudaEventClock):
        settings["flush_bytes"] = clock.flush_buffer.numel() if clock.flush_buffer is not None else 0
        settings["spin_cycles"] = clock.spin_cycles
    return Measurement(samples=samples, count=len(samples), stop_reason=reason, warmup_calls=warmup_calls,
                       mode=mode, timer=clock.name, settings=settings, **stats)
