"""``sparsek-bench``: run the suite, assess tiers, compare two runs, print the environment, profile.

    sparsek-bench run --default                     # make bench: the default cases of this machine
    sparsek-bench run --default --save              # a GPU run to commit: into benchmarks/runs/
    sparsek-bench run --case seed --impl sparsek,sdpa-cudnn --warm --json out.json
    sparsek-bench tiers --results benchmarks/runs/X.json --explain
    sparsek-bench report --results part1.json --results part2.json --json merged.json
    sparsek-bench compare base.json head.json       # exit 1 on a regression or a broken head, 2 bad input
    sparsek-bench env
    sparsek-bench profile ...                        # Nsight Compute (sparsek.bench.profile)

Also ``python -m sparsek.bench.cli``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_REGRESSION = 1  # also: a benchmark of base failed or missing in head
EXIT_USAGE = 2  # bad arguments, or results files that cannot be used (one line on stderr)


# Argument types: argparse turns their ArgumentTypeError into "argument --x: message", exit 2.

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; expected an integer >= 1")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; expected a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, fractions)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive; expected a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (where 0 has a meaning, e.g. no timeout or no threshold)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; expected a finite number >= 0")
    return value


def probability(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1); expected a significance level such as 0.01")
    return value


def output_path(text: str) -> str:
    """A file to write: not an existing directory (the write would fail only at the end of a run)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file path, e.g. {Path(text) / 'run.json'}")
    return text


def _split(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--case", action="append", metavar="NAME",
                   help="case name (repeatable or comma-separated; learn-* cases go to sparsek.learn)")
    p.add_argument("--impl", action="append", metavar="ID", help="implementation id (repeatable or comma-separated)")
    p.add_argument("--default", action="store_true",
                   help="the default cases of this machine (GPU: seed and long-*; CPU: cpu-smoke)")
    p.add_argument("--quick", action="store_true", help="fewer samples and a shorter time cap (smoke runs)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cold", dest="cold", action="store_true", default=True,
                      help="flush L2 before every sample (default)")
    mode.add_argument("--warm", dest="cold", action="store_false", help="no L2 flush between samples")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays of each call")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", metavar="PATH", type=output_path,
                     help="results file (default: benchmarks/local/<date>-<device>-<commit>.json, ignored by git); "
                          "written at the end, with a checkpoint in PATH.partial while the run goes on")
    out.add_argument("--save", action="store_true",
                     help="write the results file into benchmarks/runs/ instead, the committed GPU runs "
                          "(benchmarks/runs/README.md)")
    p.add_argument("--timeout", type=non_negative_float, default=300.0, metavar="S",
                   help="per case x implementation: prepare + check + timing (default 300; 0 = none)")
    p.add_argument("--max-time", type=positive_float, metavar="S", help="time cap of one timed loop")
    p.add_argument("--min-samples", type=positive_int, metavar="N", help="samples before the stopping rule may stop")
    p.add_argument("--target-rel-iqr", type=positive_float, metavar="F", help="stop when IQR/median is under this")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def _do_run(args, argv):
    from . import runner

    cases = _split(args.case)
    if args.default:
        cases = runner.default_cases() + [c for c in cases if c not in runner.default_cases()]
    if not cases:
        from .cases import CASES

        raise SystemExit(f"sparsek-bench: choose cases with --case NAME or --default; cases: {', '.join(CASES)}")
    overrides = {k: v for k, v in (("max_time_s", args.max_time), ("min_samples", args.min_samples),
                                   ("target_rel_iqr", args.target_rel_iqr)) if v is not None}
    options = runner.RunOptions(quick=args.quick, cold=args.cold, cuda_graph=args.cuda_graph,
                                timeout_s=args.timeout, timing=overrides)
    progress = None if args.no_progress else runner.stderr_progress
    return runner.run(cases, _split(args.impl) or None, options=options, json_path=args.json,
                      progress=progress, argv=argv, folder=runner.RUNS_DIR if args.save else runner.LOCAL_DIR)


def cmd_run(args, argv) -> int:
    from . import report

    doc = _do_run(args, argv)
    print(report.format_report(doc))
    print()
    print(report.format_tiers(doc["tiers"]))
    print(f"\nresults: {doc['run']['json_path']}")
    return EXIT_OK


def cmd_tiers(args, argv) -> int:
    from . import report, tiers

    doc = None
    if args.results:
        doc = _load_many(args.results)
    elif args.case or args.default:
        doc = _do_run(args, argv)
    if doc is not None:
        print(report.format_tiers(tiers.assess(doc)))
    if args.explain:
        peaks = None  # the original targets are GPU figures (docs/tiers.md): only a GPU peak is a fair yardstick
        if doc is not None:
            peaks = (doc["run"].get("peaks") or {}).get("cuda")
        else:
            import torch

            from .metrics import measure_peaks

            if torch.cuda.is_available():
                peaks = measure_peaks("cuda", quick=True)
        if doc is not None:
            print()
        print(report.format_explain(tiers.explain(peaks if peaks and "error" not in peaks else None)))
    if doc is None and not args.explain:
        raise SystemExit("sparsek-bench tiers: give --results FILE, cases to run (--case/--default), or --explain")
    return EXIT_OK


def _load_many(paths: list[str]) -> dict:
    """Validated results files (one, or several runs of one GPU merged); a partial run is marked
    with a line at the top of the output, since its tables hold only the records it finished."""
    from .results import is_partial, load_results, merge_results, partial_note

    docs = [load_results(p) for p in paths]
    for path, doc in zip(paths, docs):
        if is_partial(doc):
            print(partial_note(doc, path))
    return docs[0] if len(docs) == 1 else merge_results(docs, paths)


def cmd_report(args, argv) -> int:
    from . import report, tiers
    from .results import write_json_atomic

    doc = _load_many(args.results)
    doc["tiers"] = tiers.assess(doc)
    if args.json:
        write_json_atomic(args.json, doc)
    print(report.format_report(doc))
    print()
    print(report.format_tiers(doc["tiers"]))
    if args.json:
        print(f"\nmerged results: {args.json}")
    return EXIT_OK


def cmd_compare(args, argv) -> int:
    from .results import failures_by_key, is_partial, load_results, partial_note, refuse_partial, samples_by_key

    try:
        from . import compare
    except ImportError as exc:
        print(f"sparsek-bench compare: the statistics module sparsek.bench.compare is missing ({exc})", file=sys.stderr)
        return EXIT_USAGE
    base, head = load_results(args.base), load_results(args.head)
    for path, doc in ((args.base, base), (args.head, head)):
        if not args.allow_partial:
            refuse_partial(doc, path)
        elif is_partial(doc):
            print(f"warning: {partial_note(doc, path)}", file=sys.stderr)
    names = [(d["run"].get("device") or {}).get("name") for d in (base, head)]
    if names[0] != names[1]:
        print(f"warning: {args.base} ran on {names[0]} and {args.head} on {names[1]}; "
              "timings from different cards are not comparable", file=sys.stderr)
    rows = compare.compare_samples(samples_by_key(base), samples_by_key(head), threshold=args.threshold,
                                   alpha=args.alpha, base_failed=failures_by_key(base),
                                   head_failed=failures_by_key(head))
    print(compare.to_markdown(rows), end="")
    return EXIT_REGRESSION if compare.failures(rows) else EXIT_OK


def cmd_env(args, argv) -> int:
    from .device import fingerprint

    fp = fingerprint()
    if args.json:
        print(json.dumps(fp, indent=1, default=str))
        return EXIT_OK
    from tabulate import tabulate

    flat = []
    for key, value in fp.items():
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            flat.append((key, ", ".join(map(str, value)) if isinstance(value, list) else value))
    print(tabulate(flat, tablefmt="plain", disable_numparse=True))
    return EXIT_OK


def registry_epilog() -> str:
    """The cases and implementations `run` accepts, from the one registry (cases.py, impls/)."""
    import textwrap

    from .cases import CASES, DEFAULT_CASES
    from .impls import IMPLS

    cases = [f"  {name:<18} {case.describe()}" for name, case in CASES.items()]
    cases += [f"  --default on a {'GPU' if dev == 'cuda' else 'CPU'}: {', '.join(names)}" for dev, names in DEFAULT_CASES.items()]
    try:
        from sparsek.learn.bench import CASES as LEARN_CASES
    except ImportError:
        LEARN_CASES = {}
    if LEARN_CASES:
        cases.append(f"  {', '.join(LEARN_CASES)}: learnability (python -m sparsek.learn --help)")
    impls = [f"  {impl.id:<22} {'/'.join(impl.kinds):<15} {textwrap.shorten(impl.description, 58, placeholder=' ...')}"
             for impl in IMPLS.values()]
    return "\n".join(["cases (--case NAME):", *cases, "",
                      "implementations (--impl ID; the case kinds each runs; default: all of the case's kind):",
                      *impls])


class _Parser(argparse.ArgumentParser):
    """An epilog may be a function, called only when the help is printed: the registry imports
    torch, which the other commands must not pay for."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsek-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="run cases x implementations; print the report and the tier assessment",
                       epilog=registry_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(p)
    p = sub.add_parser("tiers", help="tier assessment from a results file or a fresh run",
                       epilog=registry_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", metavar="FILE", action="append",
                   help="a results JSON (repeatable: runs of one GPU are merged); otherwise run the given cases")
    p.add_argument("--explain", action="store_true",
                   help="what the original absolute us/head targets (docs/tiers.md) imply in TFLOP/s, next to "
                        "the measured peak")
    _add_run_args(p)
    p = sub.add_parser("report", help="print the report and tiers of results files (merging runs of one GPU)")
    p.add_argument("--results", metavar="FILE", action="append", required=True, help="a results JSON (repeatable)")
    p.add_argument("--json", metavar="PATH", type=output_path, help="also write the merged document here")
    p = sub.add_parser("compare", help="base vs head: significance test on the samples; exit 1 on a regression "
                                       "or on a benchmark of base that failed or is missing in head")
    p.add_argument("base", help="results JSON of the base run")
    p.add_argument("head", help="results JSON of the head run")
    p.add_argument("--threshold", type=non_negative_float, default=0.05,
                   help="relative slowdown that counts (default 0.05)")
    p.add_argument("--alpha", type=probability, default=0.01, help="significance level (default 0.01)")
    p.add_argument("--allow-partial", action="store_true",
                   help="compare partial runs (checkpoints of runs that never finished) too")
    p = sub.add_parser("env", help="print the device fingerprint, versions and commit")
    p.add_argument("--json", action="store_true", help="as JSON")
    sub.add_parser("profile", help="Nsight Compute profile (sparsek.bench.profile; see `profile --help`)",
                   add_help=False)
    return parser


COMMANDS = {"run": cmd_run, "tiers": cmd_tiers, "report": cmd_report, "compare": cmd_compare, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "profile":
        from .profile import main as profile_main

        return profile_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .cases import UnknownName

    try:
        return COMMANDS[args.command](args, argv)
    except UnknownName as exc:
        print(f"sparsek-bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:
        if args.command in ("compare", "tiers", "report"):  # unreadable or mismatched results files
            print(f"sparsek-bench: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
