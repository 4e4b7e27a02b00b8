"""The device fingerprint and clock sampling against real H200 NVML readings (a fake NVML)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sparsek.bench import device

pynvml = pytest.importorskip("pynvml")

FIXTURE = Path(__file__).parent / "fixtures" / "nvml" / "h200_idle_and_load.json"
READINGS = json.loads(FIXTURE.read_text())


class FakeNvml:
    """The nvidia-ml-py calls device.py makes, answering from fixture readings (one per poll)."""

    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, readings, refuse=()):
        self.readings = list(readings)
        self.i = 0
        self.refuse = set(refuse)
        self.indices = []

    @property
    def r(self):
        return self.readings[min(self.i, len(self.readings) - 1)]

    def _check(self, name):
        if name in self.refuse:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        self.indices.append(index)
        return "handle"

    def nvmlDeviceGetName(self, h):
        return self.r["name"]

    def nvmlDeviceGetUUID(self, h):
        return self.r["uuid"]

    def nvmlSystemGetDriverVersion(self):
        return self.r["driver"]

    def nvmlSystemGetCudaDriverVersion(self):
        return self.r["cuda_driver"]

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return tuple(self.r["compute_capability"])

    def nvmlDeviceGetMaxClockInfo(self, h, which):
        return self.r["sm_clock_max_mhz" if which == self.NVML_CLOCK_SM else "mem_clock_max_mhz"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        self._check("power_limit")
        return self.r["power_limit_mw"]

    def nvmlDeviceGetPersistenceMode(self, h):
        return self.r["persistence"]

    # the polled readings: the reasons call comes first in read_clocks and advances the script
    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        value = self.r["clocks_event_reasons"]
        return value

    def nvmlDeviceGetClockInfo(self, h, which):
        return self.r["sm_clock_mhz" if which == self.NVML_CLOCK_SM else "mem_clock_mhz"]

    def nvmlDeviceGetPowerUsage(self, h):
        self._check("power")
        return self.r["power_mw"]

    def nvmlDeviceGetTemperature(self, h, which):
        value = self.r["temp_c"]
        self.i += 1  # last call of one poll
        return value


def test_idle_reading_is_not_throttled():
    fp = device.nvml_fingerprint(FakeNvml([READINGS["idle"]]))
    assert fp["name"] == "NVIDIA H200"
    assert fp["uuid"] == "GPU-c0b62778-fa04-78c1-0cfd-cea75364fc73"
    assert (fp["driver"], fp["cuda_driver"], fp["compute_capability"]) == ("580.159.04", "13.0", "9.0")
    assert (fp["sm_clock_mhz"], fp["sm_clock_max_mhz"], fp["mem_clock_max_mhz"]) == (345, 1980, 3201)
    assert fp["power_limit_w"] == pytest.approx(700.0)
    assert fp["clocks_event_reasons"] == 1 and fp["clocks_event_reason_names"] == ["GpuIdle"]
    assert fp["throttled"] is False  # 345 MHz, but the GPU is idle: not a slowed measurement


def test_reading_under_load_is_throttled_by_the_power_cap():
    fp = device.nvml_fingerprint(FakeNvml([READINGS["under_load"]]))
    assert fp["sm_clock_mhz"] == 1515 and fp["power_w"] == pytest.approx(687.439)
    assert fp["clocks_event_reason_names"] == ["SwPowerCap"]
    assert fp["throttled"] is True and fp["throttle_reasons"] == ["SwPowerCap"]


def test_sampler_summarises_the_timed_loop():
    nvml = FakeNvml(READINGS["samples"])
    sampler = device.ClockSampler(nvml)
    for _ in READINGS["samples"]:
        sampler.sample()
    s = sampler.summary()
    assert s["samples"] == 16
    assert s["sm_clock_mhz"]["min"] == 1425 and s["sm_clock_mhz"]["max"] == 1980
    assert s["sm_clock_max_mhz"] == 1980
    assert s["reasons_seen"] == ["SwPowerCap"]
    # 1425 of 1980 MHz is under 75%: counted once, beside the power cap
    assert s["throttled"] is True
    assert s["throttle_reasons"] == ["SwPowerCap", "SM clock under 75% of max in 1/16 readings"]
    assert s["power_w_max"] == pytest.approx(691.827)


def test_sampler_thread_polls_while_the_loop_runs():
    sampler = device.ClockSampler(FakeNvml(READINGS["samples"]), interval_s=0.005)
    with sampler:
        time.sleep(0.05)
    assert len(sampler.readings) >= 3  # one at entry, polls, one at exit
    assert sampler.summary()["samples"] == len(sampler.readings)


def test_reason_names_from_the_pynvml_constants():
    assert device.reason_names(0) == []
    assert device.reason_names(1 | 4) == ["GpuIdle", "SwPowerCap"]
    assert device.reason_names(2) == ["ApplicationsClocksSetting/UserDefinedClocks"]
    assert device.reason_names(64) == ["HwThermalSlowdown"]
    assert device.reason_names(1 << 40) == ["bit40"]


def test_throttled_rules():
    def reading(bits, sm, sm_max=1980):
        return {"clocks_event_reason_names": device.reason_names(bits), "sm_clock_mhz": sm, "sm_clock_max_mhz": sm_max}

    assert device.assess_reading(reading(0, 1980)) == []
    assert device.assess_reading(reading(2, 1410)) == ["SM clock 1410 MHz < 75% of max 1980 MHz"]  # pinned low
    assert device.assess_reading(reading(2, 1600)) == []  # user-set clocks are not throttling
    assert device.assess_reading(reading(1, 345)) == []  # idle
    assert device.assess_reading(reading(8, 1900)) == ["HwSlowdown"]
    assert device.assess_reading(reading(0, 1400), min_clock_fraction=0.7) == []


def test_a_refused_nvml_call_leaves_the_field_unknown():
    fp = device.nvml_fingerprint(FakeNvml([READINGS["under_load"]], refuse={"power", "power_limit"}))
    assert fp["power_w"] is None and fp["power_limit_w"] is None
    assert fp["name"] == "NVIDIA H200" and fp["throttled"] is True


def test_cuda_visible_devices_maps_to_the_nvml_index(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    nvml = FakeNvml([READINGS["idle"]])
    device.nvml_fingerprint(nvml, device_index=1)
    assert nvml.indices == [5]


def test_fingerprint_with_a_fake_nvml_adds_versions_and_commit():
    fp = device.fingerprint(nvml=FakeNvml([READINGS["idle"]]))
    assert fp["source"] == "nvml" and fp["name"] == "NVIDIA H200"
    assert fp["software"]["torch"] and "commit" in fp["git"]


def test_fingerprint_without_a_gpu(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fp = device.fingerprint()
    assert fp["source"] == "cpu" and fp["throttled"] is None and fp["nvml_error"] == "no CUDA device"
    assert fp["software"]["torch"] == torch.__version__


def test_commit_override(monkeypatch):
    monkeypatch.setenv("SPARSEK_COMMIT", "abc1234")
    assert device.git_state() == {"commit": "abc1234", "dirty": None, "source": "SPARSEK_COMMIT"}
