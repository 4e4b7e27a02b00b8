"""One schema for results files, applied by every reader: a malformed file is one line and exit 2.

The readers are `sparsek-bench report`, `tiers` and `compare`, and ci/gate.py. Each malformed
file below must give exit status 2 (not 1, which means "regression found") and a single line on
stderr that names the file and the problem, never a traceback.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import bench_docs
import pytest

from sparsek.bench import cli, results, results_schema

REPO = Path(__file__).resolve().parents[1]
COMMITTED_RUNS = sorted((REPO / "benchmarks" / "runs").glob("*.json"))
SAMPLES = [250e-6 * (1 + 0.001 * i) for i in range(20)]


def load_gate():
    spec = importlib.util.spec_from_file_location("ci_gate_schema", REPO / "ci" / "gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gate = load_gate()


def good_doc() -> dict:
    return bench_docs.results_doc([bench_docs.ok("seed", "sparsek", SAMPLES), bench_docs.ok("seed", "sdpa-cudnn", SAMPLES)])


def mutated(change) -> str:
    doc = good_doc()
    change(doc)
    return json.dumps(doc)


# name -> (file content, or None for a directory; what the one line must say)
MALFORMED = {
    "record-without-case": (mutated(lambda d: d["records"][0].pop("case")), "records[0]: missing 'case'"),
    "run-null": (mutated(lambda d: d.update(run=None)), "run: expected an object, got null"),
    "string-sample": (mutated(lambda d: d["records"][1]["timing"]["samples"].__setitem__(3, "0.25ms")),
                      'records[1].timing.samples[3]: expected a number (or "nan", "inf", "-inf"), got a string'),
    "directory": (None, "is a directory; expected a results file"),
    "unknown-status": (mutated(lambda d: d["records"][0].update(status="hung")), "records[0].status: expected one of"),
    "records-object": (mutated(lambda d: d.update(records={})), "records: expected an array"),
    "timing-without-median": (mutated(lambda d: d["records"][0]["timing"].pop("median")),
                              "records[0].timing: missing 'median'"),
    "count-not-integer": (mutated(lambda d: d["records"][0]["timing"].update(count="many")),
                          "records[0].timing.count: expected an integer"),
    "bad-peak": (mutated(lambda d: d["run"].update(peaks={"cpu": {"matmul": {"dtype": "float32", "n": 64}, "copy": {}}})),
                 "run.peaks.cpu.matmul: missing 'tflops'"),
    "device-string": (mutated(lambda d: d["run"].update(device="H200")), "run.device: expected an object"),
    "top-level-array": ("[]", "not a sparsek-bench results file"),
    "other-version": (mutated(lambda d: d.update(schema_version=2)), "schema_version 2; this sparsek-bench reads version 1"),
    "truncated": (json.dumps(good_doc())[:200], "not a JSON results file"),
    "empty": ("", "not a JSON results file"),
    "deep-nesting": ("[" * 100_000, "not a JSON results file"),
}


def write_case(tmp_path: Path, name: str) -> Path:
    content, _ = MALFORMED[name]
    path = tmp_path / f"{name}.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content, encoding="utf-8")
    return path


def good_file(tmp_path: Path) -> str:
    return str(results.write_json_atomic(tmp_path / "good.json", good_doc()))


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_is_one_line_and_exit_2_for_every_reader(name, tmp_path, capsys):
    bad = str(write_case(tmp_path, name))
    good = good_file(tmp_path)
    _, says = MALFORMED[name]
    for argv in (["report", "--results", bad], ["tiers", "--results", bad], ["compare", good, bad],
                 ["compare", bad, good]):
        assert cli.main(argv) == 2, argv
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"sparsek-bench: {bad}") and says in line, (argv, line)
    if name != "directory":  # the gate reads a directory as a set of files: see below
        assert gate.main([good, bad]) == 2
        line = one_line(capsys.readouterr().err)
        # The gate parses the JSON itself (asv or sparsek-bench?) before the results schema.
        says = "cannot read JSON" if says == "not a JSON results file" else says
        assert line.startswith(f"gate: {bad}") and says in line, line


def test_a_directory_without_results_is_unusable_for_the_gate(tmp_path, capsys):
    assert gate.main([good_file(tmp_path), str(write_case(tmp_path, "directory"))]) == 2
    assert "no result files found" in one_line(capsys.readouterr().err)


def test_one_line_also_from_the_installed_command(tmp_path):
    """The console script, not only cli.main: no traceback reaches the terminal."""
    bad = write_case(tmp_path, "run-null")
    proc = subprocess.run([sys.executable, "-m", "sparsek.bench.cli", "report", "--results", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == f"sparsek-bench: {bad}: malformed results file: run: expected an object, got null"


def test_the_files_own_encoding_of_nan_reads_back_as_nan(tmp_path, capsys):
    """The writer stores NaN and infinity as "nan"/"inf" strings; every reader takes them back."""
    doc = good_doc()
    doc["records"][0]["timing"]["samples"] += [math.nan, math.inf]
    doc["records"][0]["timing"]["rel_iqr"] = math.inf
    doc["records"][0]["metrics"] = {"us_per_iter": 250.0, "tflops_effective": math.inf, "implausible": []}
    path = results.write_json_atomic(tmp_path / "nan.json", doc)
    assert '"nan"' in path.read_text() and '"inf"' in path.read_text()
    loaded = results.load_results(path)
    timing = loaded["records"][0]["timing"]
    assert math.isnan(timing["samples"][-2]) and timing["samples"][-1] == math.inf and timing["rel_iqr"] == math.inf
    assert cli.main(["report", "--results", str(path)]) == 0
    assert cli.main(["compare", str(path), str(path)]) == 0  # non-finite samples are dropped, not compared
    assert gate.main([str(path), str(path)]) == 0
    # A bare NaN literal, which Python's json reads, is a number too.
    path.write_text(path.read_text().replace('"nan"', "NaN"))
    assert math.isnan(results.load_results(path)["records"][0]["timing"]["samples"][-2])
    capsys.readouterr()


@pytest.mark.parametrize("path", COMMITTED_RUNS, ids=[p.name for p in COMMITTED_RUNS])
def test_committed_runs_match_the_schema(path):
    assert results.load_results(path)["records"]


def test_docs_schema_is_the_published_copy():
    """docs/results-schema.json is SCHEMA itself (regenerate with the module's main)."""
    published = json.loads((REPO / "docs" / "results-schema.json").read_text(encoding="utf-8"))
    assert published == json.loads(json.dumps(results_schema.SCHEMA))
    proc = subprocess.run([sys.executable, "-m", "sparsek.bench.results_schema"], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == (REPO / "docs" / "results-schema.json").read_text(encoding="utf-8")


def test_a_standard_validator_agrees():
    """Where the jsonschema package is installed, it accepts and refuses the same files."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(results_schema.SCHEMA)
    for path in COMMITTED_RUNS:
        assert not list(validator.iter_errors(json.loads(path.read_text()))), path
    for name, (content, _) in MALFORMED.items():
        if content is None or name in ("truncated", "empty", "deep-nesting"):
            continue  # not JSON at all
        doc = json.loads(content)
        assert list(validator.iter_errors(doc)), name
        with pytest.raises(results_schema.SchemaError):
            results_schema.validate(copy.deepcopy(doc))
