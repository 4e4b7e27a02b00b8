"""Performance gate: compare a base and a head result set, print a markdown table, fail on a regression.

    python ci/gate.py BASE HEAD [--threshold 0.05] [--alpha 0.01] [--machine NAME]
                      [--base-commit SHA] [--head-commit SHA] [--bench REGEX] [--allow-partial]
                      [--head-error TEXT ...] [--base-error TEXT ...]
                      [--title TEXT] [--note TEXT ...] [--json PATH]

BASE and HEAD are each one or more paths, joined with commas:
- an asv results directory (asv's `results_dir`, or one machine's folder in it) or one asv result
  file. Only benchmarks whose unit is seconds (read from `benchmarks.json` beside the machine
  folders) are compared; their raw samples are there when asv ran with `--record-samples` or
  `--append-samples`. A result without samples counts as one sample: too few to decide.
- sparsek-bench results JSON (`sparsek-bench run --json`), or a directory of them, validated
  against the results schema; a partial run (one that never finished) is refused unless
  --allow-partial. Records that failed, ran out of memory or timed out are read as failures.
Several files of one side (rounds of the same commit on the same machine) pool their samples.

The gate fails closed: a benchmark measured in base that failed, timed out or is missing in head
fails it, unless base failed it too, and so does a head run that errored (--head-error, which
ci/gate.sh passes with the error's last line). The statistics and verdicts live in
sparsek.bench.compare. The table goes to stdout and, when $GITHUB_STEP_SUMMARY is set, is
appended to the job summary, as is the reason when the input is unusable.

Exit status: 0 pass; 1 a regression beyond the threshold, or a broken head (a benchmark of base
failed or missing in head, or the head run errored); 2 unusable input or nothing that could be
compared (a gate that compared nothing must not pass).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__":
    # Always the statistics of the checkout this script lives in, not whatever is installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsek.bench.asv_results import entries as asv_entries  # noqa: E402
from sparsek.bench.compare import (  # noqa: E402
    IMPROVEMENT,
    REGRESSION,
    UNCHANGED,
    compare_samples,
    failures,
    has_regression,
    to_markdown,
)
from sparsek.bench.results import (  # noqa: E402
    ResultsFileError,
    check_results,
    failures_by_key,
    is_partial,
    partial_note,
    refuse_partial,
    samples_by_key,
    write_json_atomic,
)

EXIT_PASS = 0
EXIT_FAIL = 1  # a regression, or a broken head
EXIT_UNUSABLE = 2

ASV_SKIP_FILES = {"machine.json", "benchmarks.json"}
ASV_TIME_UNIT = "seconds"

Samples = dict[str, list[float]]


class GateError(Exception):
    """Input the gate cannot judge; the message says which path and why."""


def load_side(spec: str, *, commit: str | None = None, machine: str | None = None,
              allow_partial: bool = False) -> tuple[Samples, dict]:
    """Samples by benchmark key for one side, and what was found: {"format", "commit", "machine",
    "files", "failed" (key -> why, sparsek-bench only), "notes"}."""
    files = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        files.extend(_json_files(Path(part)))
    if not files:
        raise GateError(f"{spec}: no result files found")
    asv_files, bench_files = [], []
    for path in files:
        data = _read_json(path)
        (asv_files if _is_asv_result(data) else bench_files).append((path, data))
    if asv_files and bench_files:
        raise GateError(
            f"{spec}: mixes asv results ({asv_files[0][0]}) and sparsek-bench results "
            f"({bench_files[0][0]}); give one kind per side"
        )
    if asv_files:
        return _load_asv(spec, asv_files, commit=commit, machine=machine)
    return _load_sparsek_bench(bench_files, allow_partial=allow_partial)


def asv_samples(data: dict, units: dict[str, str] | None) -> tuple[Samples, dict[str, str]]:
    """Samples and benchmark versions by key from one asv (0.6, api version 2) result file.

    Keys read like asv's own: `module.Class.track_x('seed', 'sparsek')` for parametrised benchmarks.
    `units` maps benchmark name -> unit from benchmarks.json; None keeps every benchmark with samples.
    """
    samples: Samples = {}
    versions: dict[str, str] = {}
    for name, combo, result, combo_samples, version in asv_entries(data):
        if units is not None and units.get(name) != ASV_TIME_UNIT:
            continue
        if combo_samples:
            kept = [float(s) for s in combo_samples if _is_number(s)]
        elif _is_number(result) and units is not None:
            # A timing recorded without --record-samples: its median alone, too few to judge.
            kept = [float(result)]
        else:
            continue  # skipped (NotImplementedError in setup), failed, or not a timing
        if kept:
            key = f"{name}({', '.join(combo)})" if combo else name
            samples[key] = kept
            versions[key] = version
    return samples, versions


def run_gate(args: argparse.Namespace) -> int:
    notes = list(args.note or [])
    try:
        base, base_info = load_side(args.base, commit=args.base_commit, machine=args.machine,
                                    allow_partial=args.allow_partial)
    except GateError as exc:
        return _unusable(args, str(exc))
    try:
        head, head_info = load_side(args.head, commit=args.head_commit, machine=args.machine,
                                    allow_partial=args.allow_partial)
    except GateError as exc:
        if not args.head_error:
            return _unusable(args, str(exc))
        # The head run errored and left nothing usable: every benchmark of base is lost in head.
        head, head_info = {}, {"format": base_info["format"], "failed": {}, "notes": []}
        notes.append(f"head results unusable: {exc}")
    notes += base_info.get("notes", []) + head_info.get("notes", [])
    notes += [f"base run error: {e}" for e in args.base_error or []]
    notes += [f"**head run error**: {e}" for e in args.head_error or []]

    if base_info.get("machine") and head_info.get("machine") and base_info["machine"] != head_info["machine"]:
        notes.append(
            f"base ran on machine `{base_info['machine']}`, head on `{head_info['machine']}`: "
            "timings from different machines are not comparable"
        )
    base_failed, head_failed = base_info.get("failed", {}), head_info.get("failed", {})
    if args.bench:
        base, head, base_failed, head_failed = (
            {k: v for k, v in side.items() if args.bench.search(k)} for side in (base, head, base_failed, head_failed)
        )
    for key in sorted(set(base) & set(head)):
        vb, vh = base_info.get("versions", {}).get(key), head_info.get("versions", {}).get(key)
        if vb != vh:
            notes.append(f"`{key}`: the benchmark changed between base and head (version differs); not compared")
            del base[key]

    rows = compare_samples(base, head, threshold=args.threshold, alpha=args.alpha,
                           base_failed=base_failed, head_failed=head_failed)
    failing = failures(rows)
    broken = [row for row in failing if row.verdict != REGRESSION]
    decided = bool(failing) or any(row.verdict in (REGRESSION, IMPROVEMENT, UNCHANGED) for row in rows)
    if failing or args.head_error:
        reasons = []
        if has_regression(rows):
            reasons.append("significant regression")
        if broken:
            reasons.append(f"{len(broken)} benchmark{'s' * (len(broken) != 1)} of base failed or missing in head")
        if args.head_error:
            reasons.append("the head run errored")
        outcome, code = "FAIL: " + "; ".join(reasons), EXIT_FAIL
    elif not decided:
        outcome, code = "NO VERDICT: no benchmark could be compared", EXIT_UNUSABLE
    else:
        outcome, code = "PASS: no significant regression", EXIT_PASS
    report = _report(args, rows, base_info, head_info, notes, outcome)
    print(report)
    _append_summary(report)
    if args.json:
        payload = {
            "threshold": args.threshold,
            "alpha": args.alpha,
            "outcome": outcome,
            "base": {k: v for k, v in base_info.items() if k != "versions"},
            "head": {k: v for k, v in head_info.items() if k != "versions"},
            "head_errors": list(args.head_error or []),
            "rows": [asdict(row) for row in rows],
        }
        write_json_atomic(args.json, payload)

    if code == EXIT_UNUSABLE:
        print(
            "gate: no benchmark had enough samples on both sides to decide; "
            "were samples recorded (asv run --record-samples) and did the benchmarks run?",
            file=sys.stderr,
        )
    return code


def _unusable(args: argparse.Namespace, why: str) -> int:
    """Input the gate cannot judge: one line on stderr and in the job summary, exit 2."""
    print(f"gate: {why}", file=sys.stderr)
    _append_summary(f"### {args.title}\n\n**NO VERDICT: unusable input**: {_one_line(why)}\n")
    return EXIT_UNUSABLE


def _append_summary(text: str) -> None:
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gate.py", description="Fail on a significant performance regression of HEAD against BASE."
    )
    parser.add_argument("base", help="base results: asv results dir/file or sparsek-bench JSON (comma-separated)")
    parser.add_argument("head", help="head results, same kinds as base")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative slowdown that fails (default 0.05)")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    parser.add_argument("--machine", help="asv: only results of this machine")
    parser.add_argument("--base-commit", help="asv: only base results of this commit (a prefix is enough)")
    parser.add_argument("--head-commit", help="asv: only head results of this commit (a prefix is enough)")
    parser.add_argument("--bench", help="only benchmark keys matching this regular expression")
    parser.add_argument("--allow-partial", action="store_true",
                        help="sparsek-bench: accept partial runs (checkpoints of runs that never finished)")
    parser.add_argument("--head-error", action="append", metavar="TEXT",
                        help="the head run errored (repeatable): the gate fails and shows TEXT")
    parser.add_argument("--base-error", action="append", metavar="TEXT",
                        help="the base run errored (repeatable): shown under the table")
    parser.add_argument("--title", default="Performance gate", help="heading of the markdown report")
    parser.add_argument("--note", action="append", help="a line to add under the table (repeatable)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        parser.error(f"--threshold {args.threshold}: expected a relative change >= 0, e.g. 0.05")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha {args.alpha}: expected a significance level in (0, 1), e.g. 0.01")
    if args.bench:
        try:
            args.bench = re.compile(args.bench)
        except re.error as exc:
            parser.error(f"--bench {args.bench!r}: not a regular expression ({exc})")
    return run_gate(args)


def _report(args, rows, base_info, head_info, notes, outcome) -> str:
    def describe(info):
        parts = [info["format"]]
        if info.get("commit"):
            parts.append(f"commit `{info['commit'][:12]}`")
        if info.get("machine"):
            parts.append(f"machine `{info['machine']}`")
        return ", ".join(parts)

    lines = [
        f"### {args.title}",
        "",
        f"Base: {describe(base_info)}. Head: {describe(head_info)}.",
        "",
        to_markdown(rows),
        f"A regression is a two-sided Mann-Whitney U test with p < {args.alpha:g} on the raw samples "
        f"and a median slowdown above {args.threshold:.1%} (head/base > {1 + args.threshold:.3f}).",
    ]
    lines.extend(f"\n> {note}" for note in notes)
    lines.extend(["", f"**{outcome}**"])
    return "\n".join(lines) + "\n"


def _load_asv(spec, files, *, commit, machine) -> tuple[Samples, dict]:
    chosen = []
    for path, data in files:
        file_machine = data.get("params", {}).get("machine")
        if machine and file_machine != machine:
            continue
        if commit and not data.get("commit_hash", "").startswith(commit):
            continue
        chosen.append((path, data, file_machine))
    if not chosen:
        wanted = ", ".join(f"{k} {v}" for k, v in (("commit", commit), ("machine", machine)) if v)
        raise GateError(f"{spec}: no asv result file" + (f" for {wanted}" if wanted else ""))
    commits = sorted({data.get("commit_hash") for _, data, _ in chosen})
    machines = sorted({m for _, _, m in chosen})
    if len(commits) > 1:
        raise GateError(f"{spec}: results of {len(commits)} commits ({', '.join(commits)}); pass --base-commit/--head-commit")
    if len(machines) > 1:
        raise GateError(f"{spec}: results of {len(machines)} machines ({', '.join(machines)}); pass --machine")

    samples: Samples = {}
    versions: dict[str, str] = {}
    for path, data, _ in chosen:
        file_samples, file_versions = asv_samples(data, _asv_units(path))
        for key, values in file_samples.items():
            samples.setdefault(key, []).extend(values)
        versions.update(file_versions)
    info = {
        "format": "asv",
        "commit": commits[0],
        "machine": machines[0],
        "files": [str(p) for p, _, _ in chosen],
        "versions": versions,
    }
    return samples, info


def _asv_units(result_file: Path) -> dict[str, str] | None:
    """Benchmark name -> unit from the results dir's benchmarks.json (results_dir/machine/file.json)."""
    path = result_file.parent.parent / "benchmarks.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    return {name: b.get("unit") for name, b in data.items() if isinstance(b, dict)}


def _load_sparsek_bench(files, *, allow_partial: bool) -> tuple[Samples, dict]:
    samples: Samples = {}
    failed: dict[str, str] = {}
    notes = []
    for path, data in files:
        try:
            doc = check_results(data, path)
            if not allow_partial:
                refuse_partial(doc, path)
        except ResultsFileError as exc:
            raise GateError(str(exc)) from None
        if is_partial(doc):
            notes.append(partial_note(doc, path))
        for key, values in samples_by_key(doc).items():
            samples.setdefault(key, []).extend(values)
        for key, why in failures_by_key(doc).items():
            failed.setdefault(key, why)  # the first failure of a key speaks for all rounds
    info = {"format": "sparsek-bench", "files": [str(p) for p, _ in files], "failed": failed, "notes": notes}
    return samples, info


def _json_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.json") if p.name not in ASV_SKIP_FILES)
    raise GateError(f"{path}: no such file or directory")


def _read_json(path: Path):
    try:
        # asv writes NaN for skipped parameter combinations; json reads it as float('nan').
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise GateError(f"{path}: cannot read JSON ({exc})") from None


def _is_asv_result(data) -> bool:
    return isinstance(data, dict) and "result_columns" in data and "results" in data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


if __name__ == "__main__":
    sys.exit(main())
