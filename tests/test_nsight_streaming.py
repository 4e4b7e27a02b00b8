"""The Nsight converters on 50 MB inputs: peak memory stays small, the documents stay right.

The inputs are built in a temporary directory from real rows: the kernel rows of the H200 ncu
capture in tests/fixtures/nsight (renumbered), and the nsys report rows of tests/test_nsight_nsys.py.
Each converter runs as the child of a small launcher that reports its peak RSS (os.wait4): a
child forked straight from pytest would count pytest's own memory from before its exec.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_nsight_nsys import KERN_SUM, NVTX_SUM

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nsight"
INPUT_BYTES = 50_000_000
MAX_RSS_MIB = 300

pytestmark = pytest.mark.slow


LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)  # KiB on Linux
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(script: str, *args: str) -> tuple[int, float, str]:
    """(exit status, peak RSS in MiB, stderr) of one converter run."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, str(REPO / "nsight" / script), *args],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, int(proc.stdout) / 1024, proc.stderr


def write_ncu_input(path: Path) -> int:
    """The capture's tool lines, header and units row, then its 10 kernel rows repeated with new
    IDs up to INPUT_BYTES; returns the number of kernel rows."""
    lines = (FIXTURES / "raw_logfile.csv").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    head, rows = lines[: start + 2], lines[start + 2:]
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(head)
        while size < INPUT_BYTES:
            row = re.sub(r'^"\d+"', f'"{n}"', rows[n % len(rows)])
            f.write(row)
            size += len(row)
            n += 1
    return n


def read_streamed(path: Path, array: str) -> tuple[int, dict, dict]:
    """(records in ``array``, its first record, the document with that array emptied), without
    loading the whole document: each record of a streamed array is one line."""
    count, first, rest = 0, None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line != f' "{array}": [\n':
                rest.append(line)
                continue
            for item in f:
                if item.startswith(" ]"):
                    rest.append(f' "{array}": []' + item[len(" ]"):])
                    break
                count += 1
                if first is None:
                    first = json.loads(item.rstrip().rstrip(","))
    return count, first, json.loads("".join(rest))


def test_ncu_50_mb_stays_small(tmp_path):
    source = tmp_path / "raw.csv"
    rows = write_ncu_input(source)
    assert source.stat().st_size >= INPUT_BYTES
    out = tmp_path / "raw.json"
    code, rss, stderr = run_measured("ncu_to_json.py", str(source), "-o", str(out))
    assert code == 0, stderr
    assert rss <= MAX_RSS_MIB, f"peak RSS {rss:.0f} MiB for a {INPUT_BYTES / 1e6:.0f} MB input"
    count, first, doc = read_streamed(out, "kernels")
    assert count == rows
    assert first["id"] == 0 and first["metrics"]["duration_ns"]["value"] > 0
    assert sum(r["kernels"] for r in doc["ranges"]) == rows
    assert doc["devices"]["0"]["name"] == "NVIDIA H200"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv", "raw.json"]  # no temp file left


def test_nsys_50_mb_stays_small(tmp_path):
    kern, nvtx = KERN_SUM.splitlines(), NVTX_SUM.splitlines()
    source = tmp_path / "stats.txt"
    n_kernels = n_ranges = size = 0
    with open(source, "w", encoding="utf-8") as f:
        f.write("Processing [p.sqlite] with [cuda_gpu_kern_sum.py]...\n\n" + kern[0] + "\n")
        while size < INPUT_BYTES / 2:
            row = f"{kern[1 + n_kernels % 2]} #{n_kernels}\n"
            f.write(row)
            size, n_kernels = size + len(row), n_kernels + 1
        f.write("\nProcessing [p.sqlite] with [nvtx_sum.py]...\n\n" + nvtx[0] + "\n")
        while size < INPUT_BYTES:
            row = f"{nvtx[1 + n_ranges % 4]}:{n_ranges}\n"
            f.write(row)
            size, n_ranges = size + len(row), n_ranges + 1
    out = tmp_path / "stats.json"
    code, rss, stderr = run_measured("nsys_to_json.py", str(source), "-o", str(out))
    assert code == 0, stderr
    assert rss <= MAX_RSS_MIB, f"peak RSS {rss:.0f} MiB for a {INPUT_BYTES / 1e6:.0f} MB input"
    count, first, _ = read_streamed(out, "kernels")
    assert count == n_kernels and first["total_ns"] == 10080000
    count, first, doc = read_streamed(out, "ranges")
    assert count == n_ranges and first["domain"] == "sparsek"
    assert doc["source"]["reports"] == ["cuda_gpu_kern_sum", "nvtx_sum"]
