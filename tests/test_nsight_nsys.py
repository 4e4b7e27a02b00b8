"""nsight/nsys_to_json.py on CSV built from the documented report layouts.

nsys cannot write reports on the project's GPU machines, so these inputs are written here, with
the columns of ``nsys stats --format csv`` for cuda_gpu_kern_sum and nvtx_sum (nsight/README.md
says where the layout comes from).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "nsight"))

import nsys_to_json  # noqa: E402

KERN_HEADER = "Time (%),Total Time (ns),Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Name"
NVTX_HEADER = "Time (%),Total Time (ns),Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Style,Range"

KERN_SUM = "\n".join([
    KERN_HEADER,
    "61.2,10080000,3,3360000.0,3359872.0,3358720,3361408,1345.6,"
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
    '38.8,6390528,3,2130176.0,2130176.0,2129920,2130432,256.0,'
    '"void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, 0, 0, cutlass::bfloat16_t>>'
    '(pytorch_flash::Flash_fwd_params)"',
]) + "\n"

NVTX_SUM = "\n".join([
    NVTX_HEADER,
    "50.0,10150000,3,3383333.3,3380000.0,3370000,3400000,15275.3,PushPop,sparsek:case:long-16k",
    "30.1,6100000,3,2033333.3,2030000.0,2020000,2050000,15275.3,PushPop,sparsek:sdpa-cudnn",
    "19.9,4040000,1,4040000.0,4040000.0,4040000,4040000,0.0,StartEnd,:warmup",
    "0.0,1000,1,1000.0,1000.0,1000,1000,0.0,PushPop,other:phase:1",
]) + "\n"


def convert(*texts: str, **kw) -> dict:
    return nsys_to_json.convert([(f"in{i}", t) for i, t in enumerate(texts)], **kw)


def test_kernel_summary():
    doc = convert(KERN_SUM)
    assert doc["source"]["reports"] == ["cuda_gpu_kern_sum"]
    cudnn, flash = doc["kernels"]
    assert cudnn["name"].startswith("cudnn_generated_fort_native_sdpa_sm90")
    assert (cudnn["instances"], cudnn["total_ns"], cudnn["avg_ns"], cudnn["med_ns"]) == (3, 10080000, 3360000, 3359872)
    assert (cudnn["min_ns"], cudnn["max_ns"], cudnn["stddev_ns"], cudnn["time_pct"]) == (3358720, 3361408, 1345.6, 61.2)
    assert flash["name"].endswith("<128, 128, 64, 4, 0, 0, cutlass::bfloat16_t>>(pytorch_flash::Flash_fwd_params)")
    assert doc["ranges"] == []


def test_nvtx_summary_splits_known_domains_only():
    doc = convert(NVTX_SUM)
    case, impl, warmup, other = doc["ranges"]
    assert (case["domain"], case["range"], case["style"]) == ("sparsek", "case:long-16k", "PushPop")
    assert (impl["domain"], impl["range"], impl["instances"], impl["total_ns"]) == ("sparsek", "sdpa-cudnn", 3, 6100000)
    assert (warmup["domain"], warmup["range"], warmup["style"]) == (None, "warmup", "StartEnd")
    # an unknown prefix stays part of the name: range names contain ':' themselves
    assert (other["domain"], other["range"], other["raw_range"]) == (None, "other:phase:1", "other:phase:1")
    assert convert(NVTX_SUM, domains=("sparsek", "other"))["ranges"][3]["domain"] == "other"


def test_stats_stdout_with_both_reports():
    stdout = "\n".join([
        "Generating SQLite file /tmp/prof.sqlite from /tmp/prof.nsys-rep",
        "Processing [/tmp/prof.sqlite] with [/opt/nvidia/nsight-systems/host-linux-x64/reports/nvtx_sum.py]... ",
        NVTX_SUM,
        "Processing [/tmp/prof.sqlite] with [/opt/nvidia/nsight-systems/host-linux-x64/reports/cuda_gpu_kern_sum.py]... ",
        KERN_SUM,
    ])
    doc = convert(stdout)
    assert doc["source"]["reports"] == ["cuda_gpu_kern_sum", "nvtx_sum"]
    assert (len(doc["kernels"]), len(doc["ranges"])) == (2, 4)


def test_other_time_units_become_nanoseconds():
    text = KERN_HEADER.replace("(ns)", "(us)") + "\n100.0,12.5,2,6.25,6.25,6.0,6.5,0.35,k\n"
    (k,) = convert(text)["kernels"]
    assert (k["total_ns"], k["avg_ns"], k["min_ns"], k["max_ns"]) == (12500, 6250, 6000, 6500)
    assert k["stddev_ns"] == pytest.approx(350.0)


def test_older_layout_with_grid_and_block():
    header = "Time (%),Total Time (ns),Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),GridXYZ,BlockXYZ,Name"
    (k,) = convert(header + "\n100.0,1000,1,1000.0,1000.0,1000,1000,0.0, 132    1    1, 384    1    1,kern\n")["kernels"]
    assert (k["grid"], k["block"], k["name"]) == ([132, 1, 1], [384, 1, 1], "kern")


def test_other_reports_are_ignored():
    api = ("Time (%),Total Time (ns),Num Calls,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Name\n"
           "90.0,100,1,100.0,100.0,100,100,0.0,cudaMalloc\n")
    doc = convert(api + "\n" + KERN_SUM)
    assert [k["name"][:5] for k in doc["kernels"]] == ["cudnn", "void "]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "nsight" / "nsys_to_json.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_with_one_file_per_report(tmp_path):
    (tmp_path / "prof_cuda_gpu_kern_sum.csv").write_text(KERN_SUM)
    (tmp_path / "prof_nvtx_sum.csv").write_text(NVTX_SUM)
    out = tmp_path / "prof.json"
    proc = run_cli(str(tmp_path / "prof_cuda_gpu_kern_sum.csv"), str(tmp_path / "prof_nvtx_sum.csv"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["kernels"][0]["total_ns"] == 10080000
    assert doc["ranges"][1]["range"] == "sdpa-cudnn"
    assert doc["kernels"][0]["source"].endswith("prof_cuda_gpu_kern_sum.csv")


def test_cli_empty_report_is_an_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("Processing [/tmp/p.sqlite] with [/opt/reports/cuda_gpu_kern_sum.py]... \n"
                    "SKIPPED: /tmp/p.sqlite does not contain CUDA kernel data.\n")
    proc = run_cli(str(path))
    assert proc.returncode == 1
    assert "no cuda_gpu_kern_sum or nvtx_sum rows" in proc.stderr
    assert "SKIPPED: /tmp/p.sqlite does not contain CUDA kernel data." in proc.stderr


def test_the_streamed_file_is_the_document_of_convert(tmp_path):
    stdout = "Processing [p.sqlite] with [cuda_gpu_kern_sum.py]...\n\n" + KERN_SUM + "\n" + \
             "Processing [p.sqlite] with [nvtx_sum.py]...\nSKIPPED: nothing here\n\n" + NVTX_SUM
    (tmp_path / "stats.txt").write_text(stdout)
    (tmp_path / "k.csv").write_text(KERN_SUM)
    out = tmp_path / "out.json"
    proc = run_cli(str(tmp_path / "stats.txt"), str(tmp_path / "k.csv"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    expected = nsys_to_json.convert([(str(tmp_path / "stats.txt"), stdout), (str(tmp_path / "k.csv"), KERN_SUM)])
    assert json.loads(out.read_text()) == expected
    assert len(expected["kernels"]) == 4 and len(expected["ranges"]) == 4
    assert expected["messages"] == ["SKIPPED: nothing here"]


def test_an_empty_report_list_is_written_as_an_empty_array(tmp_path):
    (tmp_path / "k.csv").write_text(KERN_SUM)
    out = tmp_path / "out.json"
    assert run_cli(str(tmp_path / "k.csv"), "-o", str(out)).returncode == 0
    assert json.loads(out.read_text())["ranges"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.csv", "out.json"]
