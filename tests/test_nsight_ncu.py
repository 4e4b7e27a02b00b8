"""nsight/ncu_to_json.py on the real H200 outputs in tests/fixtures/nsight/ (see its README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nsight"
sys.path.insert(0, str(REPO / "nsight"))  # nsight/ scripts import their siblings by plain name

import csvparse  # noqa: E402
import ncu_to_json  # noqa: E402

CASE = {"domain": "sparsek", "range": "case:B2-H8-S2048-D128-bf16"}


def convert(name: str, **kw) -> dict:
    return ncu_to_json.convert((FIXTURES / name).read_text(), source=name, **kw)


def value(kernel: dict, metric: str):
    return kernel["metrics"][metric]["value"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "nsight" / "ncu_to_json.py"), *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def raw():
    return convert("raw_logfile.csv")


# --- raw page, --log-file ----------------------------------------------------------------------

def test_raw_log_has_every_kernel_and_skips_tool_lines(raw):
    assert [k["id"] for k in raw["kernels"]] == list(range(10))
    assert raw["source"]["page"] == "raw"
    assert [m["level"] for m in raw["messages"]] == ["WARNING", "PROF", "PROF"]
    assert raw["messages"][1]["text"] == "Connected to process 441 (/usr/bin/python3.12)"


def test_cudnn_kernel_launch_nvtx_and_metrics(raw):
    k = raw["kernels"][1]
    assert k["name"] == "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0"
    assert k["grid"] == [132, 1, 1] and k["block"] == [384, 1, 1]
    assert (k["process_id"], k["device"], k["cc"], k["stream"]) == (441, 0, "9.0", 7)
    assert k["nvtx_thread"] == 441
    assert k["nvtx_stack"] == [CASE, {"domain": "sparsek", "range": "sdpa-cudnn"}]
    assert k["nvtx_start_end"] == []
    assert k["metrics"]["gpu__time_duration.sum"] == {"value": 51552, "unit": "ns"}
    assert k["metrics"]["duration_ns"] == {"value": 51552, "unit": "ns", "from": "gpu__time_duration.sum"}
    assert value(k, "sm__throughput.avg.pct_of_peak_sustained_elapsed") == 36.86
    assert value(k, "sm_throughput_pct") == 36.86
    assert value(k, "dram_throughput_pct") == 10.64
    assert value(k, "l2_throughput_pct") == 23.45
    assert value(k, "warps_active_pct") == 14.03
    assert value(k, "tensor_pipe_active_pct") == 58.41
    assert value(k, "dram_bytes") == 26368256
    assert value(k, "registers_per_thread") == 168
    assert value(k, "shared_mem_per_block_bytes") == 233472
    assert k["attributes"]["launch__cluster_scheduling_policy"] == "PolicySpread"


def test_flash_kernel_values(raw):
    k = raw["kernels"][0]
    assert k["name"].startswith("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4")
    assert k["grid"] == [16, 2, 8] and k["block"] == [128, 1, 1]
    assert k["nvtx_stack"] == [CASE, {"domain": "sparsek", "range": "sdpa-flash"}]
    assert value(k, "duration_ns") == 103424
    assert value(k, "registers_per_thread") == 255
    assert value(k, "theoretical_occupancy_pct") == 12.5
    assert k["metrics"]["dram__bytes.sum"] == {"value": 27167232, "unit": "byte"}


def test_start_end_range_in_default_domain(raw):
    k8, k9 = raw["kernels"][8], raw["kernels"][9]
    for k in (k8, k9):
        assert k["nvtx_stack"] == [] and k["nvtx_thread"] is None
        assert k["nvtx_start_end"] == [{"id": 0, "domain": None, "range": "startend-matmul"}]
    assert (value(k8, "duration_ns"), value(k9, "duration_ns")) == (42752, 175424)
    assert k9["name"] == "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"


def test_device_attributes_are_hoisted(raw):
    device = raw["devices"]["0"]
    assert (device["name"], device["cc"], device["sm_count"]) == ("NVIDIA H200", "9.0", 132)
    assert device["attributes"]["device__attribute_l2_cache_size"] == 62914560
    assert not any(n.startswith("device__attribute_") for k in raw["kernels"] for n in k["metrics"])


def test_ranges_group_by_innermost_range(raw):
    ranges = {r["label"]: r for r in raw["ranges"]}
    assert list(ranges) == [
        "sparsek:case:B2-H8-S2048-D128-bf16 > sparsek:sdpa-flash",
        "sparsek:case:B2-H8-S2048-D128-bf16 > sparsek:sdpa-cudnn",
        "sparsek:case:B2-H8-S2048-D128-bf16 > sparsek:reference",
        "startend-matmul",
    ]
    cudnn = ranges["sparsek:case:B2-H8-S2048-D128-bf16 > sparsek:sdpa-cudnn"]
    assert (cudnn["domain"], cudnn["range"], cudnn["kind"]) == ("sparsek", "sdpa-cudnn", "push_pop")
    assert (cudnn["kernels"], cudnn["duration_ns"], cudnn["kernel_ids"]) == (1, 51552, [1])
    assert cudnn["means"]["sm_throughput_pct"] == 36.86
    assert ranges["startend-matmul"]["kind"] == "start_end"


def test_range_means_are_duration_weighted(raw):
    ref = next(r for r in raw["ranges"] if r["range"] == "reference")
    durations = [44288, 61600, 186848, 140544, 90336, 40416]  # kernels 2..7 of raw_logfile.csv
    sm = [40.84, 17.61, 55.76, 54.32, 9.12, 44.15]
    dram = [58.33, 82.71, 42.00, 75.62, 88.38, 74.70]
    assert ref["kernels"] == 6 and ref["duration_ns"] == sum(durations) == 564032
    assert ref["weighting"] == "duration"
    expect = lambda xs: sum(d * x for d, x in zip(durations, xs)) / sum(durations)  # noqa: E731
    assert ref["means"]["sm_throughput_pct"] == pytest.approx(expect(sm), abs=1e-4)
    assert ref["means"]["dram_throughput_pct"] == pytest.approx(expect(dram), abs=1e-4)
    # the raw name is averaged too, to the same value
    assert ref["means"]["sm__throughput.avg.pct_of_peak_sustained_elapsed"] == ref["means"]["sm_throughput_pct"]


def test_targets_pass_and_fail(raw):
    by_range = {r["range"]: r for r in raw["ranges"]}
    flash = by_range["sdpa-flash"]["targets"]
    assert flash["sm_throughput_pct"] == {"target": 85.0, "value": 27.32, "pass": False}
    assert flash["warps_active_pct"] == {"target": 90.0, "value": 11.2, "pass": False}
    matmul = by_range["startend-matmul"]  # (73.10 * 42752 + 90.08 * 175424) / 218176
    assert matmul["targets"]["sm_throughput_pct"]["value"] == pytest.approx(86.7527, abs=1e-4)
    assert matmul["targets"]["sm_throughput_pct"]["pass"] is True
    assert matmul["pass"] is False  # warps active, DRAM and L2 miss
    assert raw["targets"] == ncu_to_json.DEFAULT_TARGETS


def test_custom_targets():
    doc = convert("raw_logfile.csv", targets={"sm_throughput_pct": 30.0})
    verdict = {r["range"]: r["pass"] for r in doc["ranges"]}
    assert verdict["sdpa-flash"] is False and verdict["sdpa-cudnn"] is True


# --- stdout captures ---------------------------------------------------------------------------

def test_mixed_stdout():
    doc = convert("raw_stdout_mixed.txt")
    assert [r["range"] for r in doc["ranges"]] == ["sdpa-flash", "sdpa-cudnn"]
    flash, cudnn = doc["kernels"]
    assert (value(flash, "duration_ns"), value(cudnn, "duration_ns")) == (103296, 54464)
    assert value(cudnn, "sm_throughput_pct") == 34.66
    assert cudnn["nvtx_stack"][-1] == {"domain": "sparsek", "range": "sdpa-cudnn"}


def test_application_output_between_rows_is_skipped():
    lines = (FIXTURES / "raw_stdout_mixed.txt").read_text().splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    noisy = (lines[:header_at] + ["step 0: loss 1.25", 'a stray "quote that never closes']
             + lines[header_at:header_at + 3]
             + ["==PROF== Disconnected from process 594", '"not","a","kernel","row"', "a,b,c"]
             + lines[header_at + 3:] + ["done"])
    doc = ncu_to_json.convert("\r\n".join(noisy) + "\r\n")
    assert [value(k, "duration_ns") for k in doc["kernels"]] == [103296, 54464]
    assert doc["kernels"][1]["name"].startswith("cudnn_generated_fort_native_sdpa_sm90")


def test_two_captures_in_one_input():
    text = (FIXTURES / "raw_logfile.csv").read_text() + (FIXTURES / "raw_stdout_mixed.txt").read_text()
    doc = ncu_to_json.convert(text)
    assert len(doc["kernels"]) == 12
    cudnn = next(r for r in doc["ranges"] if r["range"] == "sdpa-cudnn")
    assert (cudnn["kernels"], cudnn["duration_ns"]) == (2, 51552 + 54464)


def test_single_kernel_with_thousands_separators():
    doc = convert("raw_stdout_single_kernel.txt")
    (k,) = doc["kernels"]
    assert value(k, "duration_ns") == 14304  # printed as "14,304"
    assert value(k, "launch__shared_mem_per_block_allocated") == 135168  # "135,168"
    assert value(k, "launch__persisting_l2_cache_size") == 11796480  # "11,796,480"
    assert k["grid"] == [128, 1, 1] and k["block"] == [384, 1, 1]
    assert k["nvtx_stack"] == [{"domain": "sparsek", "range": "sdpa"}]
    assert value(k, "dram_throughput_pct") == 3.09
    assert "memory_throughput_pct" not in k["metrics"]  # not collected in that run


# --- details page ------------------------------------------------------------------------------

def test_details_page():
    doc = convert("details.csv")
    assert doc["source"]["page"] == "details"
    (k,) = doc["kernels"]
    assert k["nvtx_stack"] == [CASE, {"domain": "sparsek", "range": "sdpa-cudnn"}]
    assert k["grid"] == [132, 1, 1] and k["block"] == [384, 1, 1]
    assert k["metrics"]["Duration"] == {"value": 54720, "unit": "ns", "section": "GPU Speed Of Light Throughput"}
    assert k["metrics"]["duration_ns"]["value"] == 54720
    assert value(k, "sm_throughput_pct") == 34.44  # "Compute (SM) Throughput"
    assert value(k, "memory_throughput_pct") == 22.96
    assert value(k, "warps_active_pct") == 14.11  # "Achieved Occupancy"
    assert value(k, "theoretical_occupancy_pct") == 18.75
    assert value(k, "SM Frequency") == pytest.approx(1791874543.13)
    rules = {r["name"]: r for r in k["rules"]}
    assert set(rules) == {"SOLBottleneck", "TheoreticalOccupancy"}
    assert rules["TheoreticalOccupancy"]["estimated_speedup_pct"] == 81.25
    assert rules["TheoreticalOccupancy"]["type"] == "OPT"
    (r,) = doc["ranges"]
    assert (r["range"], r["duration_ns"], r["means"]["l2_throughput_pct"]) == ("sdpa-cudnn", 54720, 22.2)


def test_details_and_raw_page_agree_on_the_same_kernel():
    """Two separate captures of the cuDNN kernel: the friendly names mean the same thing."""
    details = convert("details.csv")["kernels"][0]
    raw = convert("raw_stdout_mixed.txt")["kernels"][1]
    assert details["name"] == raw["name"]
    for name in ("duration_ns", "sm_throughput_pct", "memory_throughput_pct", "dram_throughput_pct",
                 "l2_throughput_pct", "warps_active_pct", "theoretical_occupancy_pct"):
        assert value(details, name) == pytest.approx(value(raw, name), rel=0.05), name


# --- NVTX cells and numbers --------------------------------------------------------------------

@pytest.mark.parametrize("entry, expected", [
    ("sparsek:sdpa-flash:none:none:RGB:0xff:REGISTERED:sdpa-flash", ("sparsek", "sdpa-flash")),
    ("sparsek:case:a:b:c:none:none:RGB:0xff:REGISTERED:case:a:b:c", ("sparsek", "case:a:b:c")),
    ("my:dom:phase:none:none:RGB:0xff:REGISTERED:phase", ("my:dom", "phase")),
    ("<default domain>:step:none:none:none:none:none:none", (None, "step")),
    ("<default domain>:a:b:none:none:none:none:none:none", (None, "a:b")),
])
def test_nvtx_entry_split(entry, expected):
    got = ncu_to_json._split_entry(entry)
    assert (got["domain"], got["range"]) == expected


def test_push_pop_cell():
    thread, stack = ncu_to_json.parse_push_pop(
        '7  "sparsek:case:x:y:none:none:RGB:0xff:REGISTERED:case:x:y"  "sparsek:sparsek:none:none:RGB:0xff:REGISTERED:sparsek" '
        ' "sparsek:selection:none:none:RGB:0xff:REGISTERED:selection" ')
    assert thread == 7
    assert [e["range"] for e in stack] == ["case:x:y", "sparsek", "selection"]


@pytest.mark.parametrize("text, expected", [
    ("103424", 103424), ("14,304", 14304), ("11,796,480", 11796480), ("27.30", 27.3), ("-3.5", -3.5),
    ("1e3", 1000.0), ("12,34", None), ("n/a", None), ("", None), ("nan", None), ("PolicySpread", None),
])
def test_parse_number(text, expected):
    assert csvparse.parse_number(text) == expected


# --- command line ------------------------------------------------------------------------------

def test_cli_writes_json(tmp_path):
    out = tmp_path / "raw.json"
    proc = run_cli(str(FIXTURES / "raw_logfile.csv"), "-o", str(out),
                   "--target", "sm_throughput_pct=30", "--target", "dram_throughput_pct=none")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert len(doc["kernels"]) == 10
    assert doc["targets"] == {"sm_throughput_pct": 30.0, "warps_active_pct": 90.0, "l2_throughput_pct": 80.0}
    cudnn = next(r for r in doc["ranges"] if r["range"] == "sdpa-cudnn")
    assert cudnn["targets"]["sm_throughput_pct"]["pass"] is True


def test_cli_reads_stdin():
    proc = run_cli("-", stdin=(FIXTURES / "raw_stdout_single_kernel.txt").read_text())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kernels"][0]["metrics"]["duration_ns"]["value"] == 14304


@pytest.mark.parametrize("text, says", [
    ("", "no ncu CSV table"),
    ("==PROF== Connected to process 9 (/usr/bin/python3)\n==WARNING== No kernels were profiled.\n",
     "--nvtx-include"),
    ("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance "
     "Counters on the target device 0.\n", "ERR_NVGPUCTRPERM"),
    ((FIXTURES / "raw_logfile.csv").read_text().splitlines()[3] + "\n", "no kernel rows"),
])
def test_no_kernels_is_an_error(tmp_path, text, says):
    path = tmp_path / "empty.csv"
    path.write_text(text)
    proc = run_cli(str(path))
    assert proc.returncode == 1
    assert "no profiled kernels" in proc.stderr and says in proc.stderr
    assert proc.stdout == ""


# --- streaming and the output file -------------------------------------------------------------

@pytest.mark.parametrize("name", ["raw_logfile.csv", "raw_stdout_mixed.txt", "details.csv",
                                  "raw_stdout_single_kernel.txt"])
def test_the_streamed_file_is_the_document_of_convert(name, tmp_path):
    """The command streams its input and spools the kernels; the document is the same."""
    out = tmp_path / "out.json"
    proc = run_cli(str(FIXTURES / name), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    expected = ncu_to_json.convert((FIXTURES / name).read_text(), source=str(FIXTURES / name))
    assert json.loads(out.read_text()) == json.loads(json.dumps(expected))


def test_details_rows_of_one_kernel_make_one_record_however_they_are_fed():
    lines = (FIXTURES / "details.csv").read_text().splitlines()
    conversion = ncu_to_json.Conversion()
    kernels = list(conversion.kernels(iter(lines)))  # a one-way stream, as from a file
    assert len(kernels) == 1 and kernels[0]["rules"]


def test_output_is_atomic_with_the_usual_mode(tmp_path):
    out = tmp_path / "doc.json"
    out.write_text('{"previous": true}\n')
    empty = tmp_path / "empty.csv"
    empty.write_text("==WARNING== No kernels were profiled.\n")
    assert run_cli(str(empty), "-o", str(out)).returncode == 1
    assert out.read_text() == '{"previous": true}\n'  # a failed conversion leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json", "empty.csv"]
    proc = subprocess.run(f"umask 022 && {sys.executable} {REPO / 'nsight' / 'ncu_to_json.py'} "
                          f"{FIXTURES / 'raw_logfile.csv'} -o {out}", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())["kernels"]) == 10
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json", "empty.csv"]


def test_iter_lines_splits_like_splitlines(tmp_path):
    text = 'a\r\nb\rc\n\nd\x0ce\x1cf\u2028g\r\n"h\r\ni"\n\xff'
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode("utf-8")[:-2] + b"\xff")  # and a byte that is not UTF-8
    assert list(csvparse.iter_lines(str(path))) == path.read_bytes().decode("utf-8", "replace").splitlines()
