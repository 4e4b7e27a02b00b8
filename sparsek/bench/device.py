"""Which machine produced a number: NVML fingerprint, clock sampling during the timed loop, versions.

Everything NVML reports goes through an ``nvml`` object with the nvidia-ml-py (``pynvml``) API,
so tests pass a fake built from real H200 readings. A reading that NVML refuses (not supported
on this board, no permission) is recorded as None rather than failing the run.

``throttled``: a reading is throttled when a clocks-event reason other than "GPU idle" or
"user/application clocks" is active, or when the GPU is busy and its SM clock is under
``min_clock_fraction`` of the maximum. Under sustained tensor-core load an H200 sits at its
software power cap (reason SwPowerCap, SM ~1.5 of 1.98 GHz): that is flagged, because the
numbers are then power-limited and will move with the board's power limit and temperature.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Reasons that do not mean the measurement was slowed: the GPU was idle between calls, or the
# user pinned the clocks on purpose (then the pinned clocks are in the fingerprint).
BENIGN_REASONS = ("GpuIdle", "ApplicationsClocksSetting", "UserDefinedClocks")
MIN_CLOCK_FRACTION = 0.75
SAMPLE_INTERVAL_S = 0.05


def _pynvml():
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def reason_names(bits: int | None, nvml=None) -> list[str]:
    """Clocks-event reason bit mask -> names, from the nvidia-ml-py constants.

    Uses ``nvmlClocksEventReason*`` (the current names) and, for bits they lack,
    ``nvmlClocksThrottleReason*``. One bit can have two names (2 is both
    ApplicationsClocksSetting and UserDefinedClocks): both are listed, joined by '/'.
    """
    if bits is None:
        return []
    source = _pynvml() or nvml
    by_bit: dict[int, list[str]] = {}
    if source is not None:
        for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
            for attr in sorted(dir(source)):
                if not attr.startswith(prefix):
                    continue
                name = attr[len(prefix):]
                value = getattr(source, attr)
                if name in ("None", "All") or not isinstance(value, int) or value & (value - 1) or value == 0:
                    continue
                names = by_bit.setdefault(value, [])
                if name not in names and (prefix == "nvmlClocksEventReason" or not names):
                    names.append(name)
    out = []
    for bit in range(64):
        mask = 1 << bit
        if bits & mask:
            out.append("/".join(by_bit.get(mask, [f"bit{bit}"])))
    return out


def _benign(name: str) -> bool:
    return all(part in BENIGN_REASONS for part in name.split("/"))


def assess_reading(reading: dict, *, min_clock_fraction: float = MIN_CLOCK_FRACTION) -> list[str]:
    """Why this reading counts as throttled (empty list: not throttled)."""
    why = [n for n in reading.get("clocks_event_reason_names", []) if not _benign(n)]
    idle = any("GpuIdle" in n.split("/") for n in reading.get("clocks_event_reason_names", []))
    sm, sm_max = reading.get("sm_clock_mhz"), reading.get("sm_clock_max_mhz")
    if not idle and sm and sm_max and sm < min_clock_fraction * sm_max:
        why.append(f"SM clock {sm} MHz < {min_clock_fraction:.0%} of max {sm_max} MHz")
    return why


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported, NoPermission, ...: the field is unknown
        return None


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _nvml_index(device_index: int) -> int:
    """NVML enumerates all GPUs; CUDA_VISIBLE_DEVICES may renumber them for torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and all(v.isdigit() for v in ids) and device_index < len(ids):
        return int(ids[device_index])
    return device_index


def read_clocks(nvml, handle) -> dict:
    """The fast-changing readings (one NVML poll): clocks, power, temperature, reasons."""
    bits = _call(nvml.nvmlDeviceGetCurrentClocksEventReasons, handle) if hasattr(
        nvml, "nvmlDeviceGetCurrentClocksEventReasons") else _call(nvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
    return {
        "sm_clock_mhz": _call(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _call(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_w": _scale(_call(nvml.nvmlDeviceGetPowerUsage, handle), 1e-3),
        "temp_c": _call(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "clocks_event_reasons": bits,
        "clocks_event_reason_names": reason_names(bits, nvml),
    }


def _scale(value, factor):
    return None if value is None else value * factor


def nvml_fingerprint(nvml, device_index: int = 0, *, min_clock_fraction: float = MIN_CLOCK_FRACTION) -> dict:
    """Static identity plus one clock reading of GPU ``device_index`` through ``nvml``."""
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(device_index))
    cuda_driver = _call(nvml.nvmlSystemGetCudaDriverVersion)
    cc = _call(nvml.nvmlDeviceGetCudaComputeCapability, handle)
    out = {
        "source": "nvml",
        "name": _text(_call(nvml.nvmlDeviceGetName, handle)),
        "uuid": _text(_call(nvml.nvmlDeviceGetUUID, handle)),
        "driver": _text(_call(nvml.nvmlSystemGetDriverVersion)),
        "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}" if cuda_driver else None,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "sm_clock_max_mhz": _call(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        "mem_clock_max_mhz": _call(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_limit_w": _scale(_call(nvml.nvmlDeviceGetEnforcedPowerLimit, handle), 1e-3),
        "persistence_mode": _call(nvml.nvmlDeviceGetPersistenceMode, handle),
    }
    out.update(read_clocks(nvml, handle))
    out["throttle_reasons"] = assess_reading(out, min_clock_fraction=min_clock_fraction)
    out["throttled"] = bool(out["throttle_reasons"])
    return out


def software_versions() -> dict:
    """Versions of everything that changes the numbers, read without importing optional packages."""
    import torch

    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": cudnn,
        "triton": dist("triton") or dist("pytorch-triton"),
        "xformers": dist("xformers"),
        "vllm": dist("vllm"),
        "nvidia-ml-py": dist("nvidia-ml-py"),
        "nvtx": dist("nvtx"),
        "sparsek": dist("sparsek"),
    }


def git_state() -> dict:
    """The commit of this checkout (SPARSEK_COMMIT overrides, e.g. on a copy without .git)."""
    override = os.environ.get("SPARSEK_COMMIT")
    if override:
        return {"commit": override, "dirty": None, "source": "SPARSEK_COMMIT"}
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "source": "no git repository"}
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None, "source": "git not available"}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()), "source": "git"}


def fingerprint(device_index: int = 0, nvml=None, *, min_clock_fraction: float = MIN_CLOCK_FRACTION) -> dict:
    """The device, software and commit behind a run.

    With a GPU: the NVML identity and one clock reading (``nvml`` defaults to pynvml). Without
    NVML or without a GPU, what torch and the platform can tell, and why NVML is absent.
    """
    import torch

    out: dict = {}
    cuda = torch.cuda.is_available()
    if nvml is None and cuda:  # an explicit nvml (a fake in tests) is used even without a GPU
        nvml = _pynvml()
    if nvml is not None:
        try:
            out = nvml_fingerprint(nvml, device_index, min_clock_fraction=min_clock_fraction)
        except Exception as exc:
            out = {"source": "torch", "nvml_error": f"{type(exc).__name__}: {exc}"}
    else:
        out = {"source": "torch" if cuda else "cpu",
               "nvml_error": "nvidia-ml-py is not installed" if cuda else "no CUDA device"}
    if out.get("source") != "nvml":
        if cuda:
            props = torch.cuda.get_device_properties(device_index)
            out.update(name=props.name, compute_capability=f"{props.major}.{props.minor}", throttled=None)
        else:
            out.update(name=platform.processor() or platform.machine() or "cpu", cpu_count=os.cpu_count(),
                       throttled=None)
    if cuda:
        props = torch.cuda.get_device_properties(device_index)
        out.update(memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                   l2_bytes=getattr(props, "L2_cache_size", None))
    out["software"] = software_versions()
    out["git"] = git_state()
    out["host"] = platform.node()
    return out


class ClockSampler:
    """Polls NVML from a background thread while the timed loop runs.

    ``with sampler: measure(...)`` then ``sampler.summary()``. NVML calls go through ctypes,
    which releases the GIL, so polling every 50 ms does not slow the loop's host side.
    ``sample()`` takes one reading synchronously (tests call it directly).
    """

    def __init__(self, nvml, device_index: int = 0, *, interval_s: float = SAMPLE_INTERVAL_S,
                 min_clock_fraction: float = MIN_CLOCK_FRACTION):
        self.nvml = nvml
        self.interval_s = interval_s
        self.min_clock_fraction = min_clock_fraction
        nvml.nvmlInit()
        self.handle = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(device_index))
        self.sm_clock_max_mhz = _call(nvml.nvmlDeviceGetMaxClockInfo, self.handle, nvml.NVML_CLOCK_SM)
        self.readings: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict:
        reading = read_clocks(self.nvml, self.handle)
        reading["sm_clock_max_mhz"] = self.sm_clock_max_mhz
        reading["t"] = time.perf_counter()
        self.readings.append(reading)
        return reading

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self.readings = []
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="sparsek-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return False

    def summary(self) -> dict:
        return summarize_readings(self.readings, min_clock_fraction=self.min_clock_fraction)


def summarize_readings(readings: list[dict], *, min_clock_fraction: float = MIN_CLOCK_FRACTION) -> dict:
    """Clock range, reasons seen and the throttled flag over the readings of one timed loop."""
    if not readings:
        return {"samples": 0, "throttled": None, "throttle_reasons": []}
    sm = [r["sm_clock_mhz"] for r in readings if r.get("sm_clock_mhz") is not None]
    power = [r["power_w"] for r in readings if r.get("power_w") is not None]
    reasons = sorted({n for r in readings for n in r.get("clocks_event_reason_names", [])})
    why = sorted({w for r in readings for w in assess_reading(r, min_clock_fraction=min_clock_fraction)})
    # Clock phrases carry the reading's own clock; keep one line for all of them.
    clock_lines = [w for w in why if w.startswith("SM clock")]
    why = [w for w in why if not w.startswith("SM clock")]
    if clock_lines:
        low = sum(1 for r in readings if any(w.startswith("SM clock") for w in assess_reading(
            r, min_clock_fraction=min_clock_fraction)))
        why.append(f"SM clock under {min_clock_fraction:.0%} of max in {low}/{len(readings)} readings")
    return {
        "samples": len(readings),
        "sm_clock_mhz": {"min": min(sm), "median": statistics.median(sm), "max": max(sm)} if sm else None,
        "sm_clock_max_mhz": readings[0].get("sm_clock_max_mhz"),
        "mem_clock_mhz": {"min": min(r["mem_clock_mhz"] for r in readings if r.get("mem_clock_mhz") is not None)}
        if any(r.get("mem_clock_mhz") is not None for r in readings) else None,
        "power_w_max": max(power) if power else None,
        "reasons_seen": reasons,
        "throttle_reasons": why,
        "throttled": bool(why),
    }


def open_sampler(device_index: int = 0, nvml=None) -> ClockSampler | None:
    """A sampler for a real GPU, or None when NVML is unavailable (the run records that)."""
    nvml = nvml if nvml is not None else _pynvml()
    if nvml is None:
        return None
    try:
        return ClockSampler(nvml, device_index)
    except Exception:
        return None
