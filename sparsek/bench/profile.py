"""``sparsek-bench profile``: Nsight Compute metrics of cases x implementations -> metrics.json.

For each case, one ncu child process runs nsight/profile_worker.py, which calls every chosen
implementation inside the harness's NVTX ranges (``case:<case>`` wrapping ``<impl>``, domain
``sparsek``). ncu profiles only kernels launched inside those ranges: one
``--nvtx-include "sparsek@<impl>/"`` per implementation. A push/pop filter matches the range
anywhere on the stack, so the impl range nested in the case range matches; the H200 fixture
details.csv was captured that way (``sparsek@sdpa-cudnn/`` selected the kernel whose stack is
``case:B2-H8-S2048-D128-bf16`` > ``sdpa-cudnn``). One case per process keeps one case's
allocations and compiled kernels out of the next one's profile.

ncu runs with ``--csv --page raw --print-units base --log-file`` under ``LC_ALL=C`` (so numbers
have a '.' decimal point) and ``--clock-control none`` by default, so its durations compare with
the suite's CUDA-event timings, which also run at the clocks the GPU chooses; the setting is
recorded in the output. The metric names are checked with ``ncu --query-metrics`` before the
first (long) run. The log of each case is converted by nsight/ncu_to_json.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NSIGHT = REPO / "nsight"
WORKER = NSIGHT / "profile_worker.py"
DOMAIN = "sparsek"

# make bench-profile: the seed configuration (docs/tiers.md) and the first long-context case, with sparsek,
# the two fastest dense SDPA backends and the structured-sparse peer of the same key budget.
# Longer contexts run the same kernels over more tiles, so they add replay time (ncu replays
# every kernel once per metric pass) rather than information; --case adds them.
DEFAULT_CASES = ("seed", "long-16k")
DEFAULT_IMPLS = ("sparsek", "sdpa-cudnn", "sdpa-flash", "flex-window")
# Friendly metrics shown in the table and kept per implementation in metrics.json.
SHOWN = ("sm_throughput_pct", "warps_active_pct", "dram_throughput_pct", "l2_throughput_pct",
         "memory_throughput_pct", "tensor_pipe_active_pct", "theoretical_occupancy_pct")
_SHORT = {"sm_throughput_pct": "SM", "warps_active_pct": "warps", "dram_throughput_pct": "DRAM",
          "l2_throughput_pct": "L2", "memory_throughput_pct": "mem", "tensor_pipe_active_pct": "tensor",
          "theoretical_occupancy_pct": "occ.max"}

EXIT_FAILED = 1  # some case produced no profile
EXIT_SETUP = 2  # ncu missing, metric names unknown, bad arguments: nothing was profiled
EXIT_PERMISSION = 3  # ncu cannot read the performance counters

# ncu's filter syntax gives '@', '/', '[', ']' and ',' a meaning; ids that use them could not be
# matched reliably.
_FILTER_SAFE = re.compile(r"^[A-Za-z0-9._:+-]+$")
_METRIC_NAME = re.compile(r"^[a-z0-9_]+__[A-Za-z0-9_]+$")
_PERMISSION_HELP = (
    "ncu cannot read the GPU performance counters (ERR_NVGPUCTRPERM). Profiling counters are "
    "restricted to admin users on this machine: run as root, or have an admin load the driver "
    "with NVreg_RestrictProfilingToAdminUsers=0 (see https://developer.nvidia.com/ERR_NVGPUCTRPERM); "
    "in a container, start it with --cap-add=SYS_ADMIN."
)


class ProfileError(RuntimeError):
    def __init__(self, message: str, code: int = EXIT_SETUP):
        super().__init__(message)
        self.code = code


def converter():
    """nsight/ncu_to_json.py as a module.

    nsight/ holds scripts that import their siblings by plain name, and is not a package (a
    package named ``nsight`` would shadow NVIDIA's nsight-python), so its directory goes on the
    path; it is there only in a source checkout.
    """
    if not (NSIGHT / "ncu_to_json.py").is_file():
        raise ProfileError(f"{NSIGHT}/ncu_to_json.py not found: sparsek-bench profile runs from a source checkout")
    if str(NSIGHT) not in sys.path:
        sys.path.insert(0, str(NSIGHT))
    import ncu_to_json

    return ncu_to_json


# ---------------------------------------------------------------------------------------------
# ncu: finding it, its version, its metric names

def find_ncu(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [os.environ.get("NCU"), shutil.which("ncu"), "/usr/local/cuda/bin/ncu"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    looked = explicit if explicit else "$NCU, PATH and /usr/local/cuda/bin/ncu"
    raise ProfileError(
        f"ncu (Nsight Compute CLI) not found (looked at {looked}). Install Nsight Compute (it ships "
        "with the CUDA toolkit) or pass --ncu /path/to/ncu."
    )


def _run(argv: list[str], env: dict, timeout: float | None = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, errors="replace", timeout=timeout)


def ncu_version(ncu: str, env: dict) -> str:
    out = _run([ncu, "--version"], env)
    match = re.search(r"Version\s+(\S+)", out.stdout)
    return match.group(1) if match else (out.stdout.strip().splitlines() or ["unknown"])[-1]


def query_metric_names(ncu: str, env: dict) -> set[str]:
    """Base metric names the attached GPU supports, from ``ncu --query-metrics``.

    The CSV listing is asked for first and the table second; either way the name is the first
    field of a line.
    """
    for extra in (["--csv"], []):
        out = _run([ncu, "--query-metrics", *extra], env)
        text = out.stdout + out.stderr
        if "ERR_NVGPUCTRPERM" in text:
            raise ProfileError(_PERMISSION_HELP, EXIT_PERMISSION)
        names = set()
        for line in out.stdout.splitlines():
            first = re.split(r"[,\s]", line.strip(), maxsplit=1)[0].strip('"')
            if _METRIC_NAME.match(first):
                names.add(first)
        if out.returncode == 0 and names:
            return names
    tail = "\n  ".join(text.strip().splitlines()[-8:])
    raise ProfileError(f"ncu --query-metrics listed no metrics (exit {out.returncode}), so the metric names "
                       f"cannot be checked; pass --skip-metric-check to run anyway. ncu said:\n  {tail}")


def unknown_metrics(requested: list[str], known: set[str]) -> list[str]:
    """Requested metrics whose base name (before the first '.') the GPU does not have."""
    return [m for m in requested if ":" not in m and m.split(".")[0] not in known]


# ---------------------------------------------------------------------------------------------
# The child process

def nvtx_filter(impl: str) -> str:
    return f"{DOMAIN}@{impl}/"


def worker_argv(python: str, case: str, impls: list[str], *, iters: int, warmup: int, status: str) -> list[str]:
    return [python, str(WORKER), "--case", case, "--impl", ",".join(impls),
            "--iters", str(iters), "--warmup", str(warmup), "--status", status]


def ncu_argv(ncu: str, impls: list[str], *, metrics: list[str], section_set: str | None, clock_control: str,
             cache_control: str, log_file: str, app: list[str]) -> list[str]:
    argv = [ncu, "--nvtx"]
    for impl in impls:
        argv += ["--nvtx-include", nvtx_filter(impl)]
    if section_set:
        argv += ["--set", section_set]
    if metrics:
        argv += ["--metrics", ",".join(metrics)]
    argv += ["--clock-control", clock_control, "--cache-control", cache_control,
             "--csv", "--page", "raw", "--print-units", "base", "--log-file", log_file]
    return argv + app


def child_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["LC_ALL"] = "C"  # ncu prints numbers in the locale; the converter reads C-locale numbers
    # The worker imports this checkout's sparsek; keep what the caller put on the path (e.g. the
    # directory holding the nvtx wheel) after it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------------------------------------
# Turning one case's log into per-implementation records

def _impl_of(kernel: dict, case: str, impls: list[str]) -> tuple[str | None, list[dict]]:
    """(implementation, ranges nested inside it) of a kernel, from its NVTX stack."""
    stack = kernel["nvtx_stack"]
    names = [(e["domain"], e["range"]) for e in stack]
    if (DOMAIN, f"case:{case}") not in names:
        return None, []
    for i, (domain, name) in enumerate(names):
        if domain == DOMAIN and name in impls:
            return name, stack[i + 1:]
    return None, []


def _friendly(summary: dict) -> dict:
    return {name: summary["means"].get(name) for name in SHOWN}


def _kernel_table(members: list[dict], conv, targets: dict) -> list[dict]:
    by_name: dict[str, list[dict]] = {}
    for kernel in members:
        by_name.setdefault(kernel["name"], []).append(kernel)
    rows = []
    for name, group in by_name.items():
        s = conv.summarize(group, targets)
        first = group[0]["metrics"]
        rows.append({
            "name": name, "launches": len(group), "grid": group[0]["grid"], "block": group[0]["block"],
            "duration_ns": s["duration_ns"],
            "registers_per_thread": first.get("registers_per_thread", {}).get("value"),
            "shared_mem_per_block_bytes": first.get("shared_mem_per_block_bytes", {}).get("value"),
            "metrics": _friendly(s),
        })
    return sorted(rows, key=lambda r: -(r["duration_ns"] or 0))


def _phase(label: str, kernels: list[dict], conv, targets: dict) -> dict:
    s = conv.summarize(kernels, targets)
    return {"phase": label, "kernels": len(kernels), "duration_ns": s["duration_ns"], "metrics": _friendly(s),
            "pass": s["pass"]}


def impl_records(doc: dict | None, case: str, impls: list[str], status: dict, iters: int, conv,
                 targets: dict) -> tuple[list, int]:
    """One record per requested implementation, and the number of kernels none of them claims."""
    members: dict[str, list[dict]] = {impl: [] for impl in impls}
    phases: dict[str, dict[str, list[dict]]] = {impl: {} for impl in impls}
    unattributed = 0
    for kernel in doc["kernels"] if doc else []:
        impl, inner = _impl_of(kernel, case, impls)
        if impl is None:
            unattributed += 1
            continue
        members[impl].append(kernel)
        label = " > ".join(e["range"] for e in inner) if inner else "(direct)"
        phases[impl].setdefault(label, []).append(kernel)
    records = []
    for impl in impls:
        worker = status.get("impls", {}).get(impl, {})
        record = {"impl": impl, "status": worker.get("status", "unknown")}
        for key in ("reason", "error"):
            if key in worker:
                record[key] = worker[key]
        kernels = members[impl]
        if kernels:
            calls = worker.get("calls", iters)
            s = conv.summarize(kernels, targets)
            dram = [k["metrics"].get("dram_bytes", {}).get("value") for k in kernels]
            record.update({
                "status": "profiled",
                "calls": calls,
                "kernels": len(kernels),
                "kernels_per_call": len(kernels) / calls,
                "duration_ns": s["duration_ns"],
                "duration_ns_per_call": s["duration_ns"] / calls if s["duration_ns"] is not None else None,
                "dram_bytes_per_call": sum(dram) / calls if all(d is not None for d in dram) else None,
                "weighting": s["weighting"],
                "metrics": _friendly(s),
                "targets": s["targets"],
                "pass": s["pass"],
                "kernel_table": _kernel_table(kernels, conv, targets),
            })
            if set(phases[impl]) != {"(direct)"}:  # the op's own ranges (selection, attention)
                record["phases"] = [_phase(label, group, conv, targets) for label, group in phases[impl].items()]
        elif record["status"] == "profiled":
            record["status"] = "no kernels"
            record["reason"] = ("the calls ran inside the NVTX ranges but ncu profiled no kernel of them "
                                "(a CPU-only path?)")
        elif record["status"] == "unknown":
            record["reason"] = "no kernel profiled and no worker status (see the case's error and log)"
        records.append(record)
    return records, unattributed


def _run_profiled(argv: list[str], env: dict, timeout: float, out_path: Path) -> tuple[int | None, str]:
    """Run ncu and the worker it starts; (exit code or None on timeout, their stdout and stderr).

    In a session of its own, so a timeout ends the worker too and not only ncu (a worker left
    behind would hold the GPU).
    """
    with open(out_path, "w+", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        out.seek(0)
        return code, out.read()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def profile_case(case: str, impls: list[str], opts, ncu: str, env: dict, workdir: Path, conv) -> dict:
    log = workdir / f"{case}.ncu.csv"
    status_path = workdir / f"{case}.status.json"
    app = worker_argv(opts.python, case, impls, iters=opts.iters, warmup=opts.warmup, status=str(status_path))
    argv = ncu_argv(ncu, impls, metrics=opts.metric_list, section_set=opts.section_set,
                    clock_control=opts.clock_control, cache_control=opts.cache_control, log_file=str(log), app=app)
    print(f"sparsek-bench profile: {shlex.join(argv)}", file=sys.stderr, flush=True)
    record = {"case": case, "command": argv, "exit_code": None, "error": None, "impls": [], "unattributed_kernels": 0}
    record["exit_code"], output = _run_profiled(argv, env, opts.timeout, workdir / f"{case}.out.txt")
    if record["exit_code"] is None:
        record["error"] = f"ncu did not finish within --timeout {opts.timeout:g} s (killed)"
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    if "ERR_NVGPUCTRPERM" in text + output:
        raise ProfileError(_PERMISSION_HELP, EXIT_PERMISSION)
    status = _read_json(status_path)
    doc = None
    try:
        # The CSV is in the log; ncu's and the worker's own lines (errors included) on stdout.
        doc = conv.convert(text if text.strip() else output, targets=opts.targets, source=str(log))
    except conv.NoKernelsError as exc:
        said = [line for line in output.splitlines() if line.startswith("==ERROR==")]
        why = status.get("error") or "\n".join([str(exc)] + said)
        record["error"] = record["error"] or f"no kernel profiled: {why}"
    if doc:
        device = next(iter(doc["devices"].values()), {})
        record["device"] = {k: device.get(k) for k in ("name", "cc", "sm_count")} if device else None
    elif record["exit_code"] not in (None, 0) and not record["error"]:
        record["error"] = f"ncu exited with {record['exit_code']}"
    if record["error"]:
        record["output_tail"] = (text + output).strip().splitlines()[-15:]
    record["impls"], record["unattributed_kernels"] = impl_records(
        doc, case, impls, status, opts.iters, conv, opts.targets)
    return record


# ---------------------------------------------------------------------------------------------
# Plan, output, command line

def resolve_plan(cases: list[str], impls: list[str] | None, use_defaults: bool) -> list[tuple[str, list[str]]]:
    """[(case name, [impl ids])] from the registry: explicit ids, or the defaults, or all for the case."""
    from sparsek.bench.cases import get_case
    from sparsek.bench.impls import get_impl, impls_for

    plan = []
    for name in cases:
        case = get_case(name)
        if impls:
            ids = [get_impl(i).id for i in impls]
        else:
            available = [impl.id for impl in impls_for(case)]
            ids = [i for i in DEFAULT_IMPLS if i in available] if use_defaults else available
        plan.append((case.name, ids))
    return plan


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _mark(check: dict) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[check["pass"]]


def summary_table(doc: dict) -> str:
    headers = ["case", "impl", "status", "kernels/call", "us/call"] + [_SHORT[m] + " %" for m in SHOWN[:4]] + \
              [_SHORT[m] + " %" for m in SHOWN[4:]] + ["targets"]
    rows = []
    for case in doc["cases"]:
        for r in case["impls"]:
            m = r.get("metrics", {})
            per_call = r.get("duration_ns_per_call")
            targets = " ".join(f"{_SHORT.get(n, n)}:{_mark(c)}" for n, c in r.get("targets", {}).items())
            rows.append([case["case"], r["impl"], r["status"], r.get("kernels_per_call", ""),
                         "" if per_call is None else f"{per_call / 1e3:.1f}"]
                        + ["" if m.get(n) is None else f"{m[n]:.1f}" for n in SHOWN]
                        + [targets or r.get("reason", r.get("error", ""))[:60]])
    try:
        from tabulate import tabulate
    except ImportError:
        return "\n".join("  ".join(str(c) for c in row) for row in [headers] + rows)
    return tabulate(rows, headers=headers)


def _metrics_arg(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser(conv) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsek-bench profile", description=__doc__.split("\n\n")[0])
    what = p.add_argument_group("what to profile")
    what.add_argument("--default", action="store_true",
                      help=f"cases {', '.join(DEFAULT_CASES)} with {', '.join(DEFAULT_IMPLS)} "
                      "(those the case has)")
    what.add_argument("--case", action="append", default=[], help="case name (repeat or comma-separate)")
    what.add_argument("--impl", action="append", default=[], help="implementation id (repeat or comma-separate); "
                      "default: all implementations of the case, or the default set with --default")
    ncu = p.add_argument_group("ncu")
    ncu.add_argument("--ncu", help="path of the ncu binary (default: $NCU, PATH, /usr/local/cuda/bin/ncu)")
    ncu.add_argument("--metrics", type=_metrics_arg, default=None,
                     help="comma-separated metrics (default: " + ",".join(conv.DEFAULT_METRICS) + ")")
    ncu.add_argument("--set", dest="section_set", help="also collect this ncu section set (e.g. basic, full)")
    ncu.add_argument("--clock-control", default="none", choices=("none", "base"),
                     help="ncu --clock-control; 'none' (default) keeps the clocks that event timings see")
    ncu.add_argument("--cache-control", default="all", choices=("all", "none"),
                     help="ncu --cache-control; 'all' (default) flushes caches before each replay pass")
    ncu.add_argument("--iters", type=int, default=3, help="profiled calls per implementation (default 3)")
    ncu.add_argument("--warmup", type=int, default=2, help="unprofiled calls first (default 2)")
    ncu.add_argument("--timeout", type=float, default=3600, help="seconds per case (default 3600)")
    ncu.add_argument("--skip-metric-check", action="store_true", help="do not run ncu --query-metrics first")
    ncu.add_argument("--python", default=sys.executable, help="interpreter for the worker (default: this one)")
    out = p.add_argument_group("output")
    out.add_argument("--output", default="benchmarks/metrics.json",
                     help="metrics JSON (default: benchmarks/metrics.json)")
    out.add_argument("--target", action="append", type=conv.parse_target, default=[], metavar="NAME=VALUE",
                     help="override or add a target ('none' drops it); defaults: "
                     + ", ".join(f"{k}>{v:g}" for k, v in conv.DEFAULT_TARGETS.items()))
    out.add_argument("--log-dir", help="keep each case's ncu CSV log and worker status here")
    out.add_argument("--dry-run", action="store_true", help="print the ncu commands and exit")
    return p


def _split(values: list[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    try:
        conv = converter()
        args = build_parser(conv).parse_args(argv)
        return _main(args, conv)
    except ProfileError as exc:
        print(f"sparsek-bench profile: error: {exc}", file=sys.stderr)
        return exc.code


def _main(args, conv) -> int:
    cases = _split(args.case) or (list(DEFAULT_CASES) if args.default else [])
    if not cases:
        raise ProfileError("choose cases: --case NAME[,NAME] or --default")
    try:
        plan = resolve_plan(cases, _split(args.impl) or None, args.default)
    except (KeyError, ValueError, LookupError) as exc:
        raise ProfileError(f"{type(exc).__name__}: {exc}")
    bad = sorted({i for _, ids in plan for i in ids if not _FILTER_SAFE.match(i)})
    if bad:
        raise ProfileError(f"implementation ids {bad} contain characters that ncu's NVTX filter syntax reserves")
    args.metric_list = args.metrics if args.metrics is not None else list(conv.DEFAULT_METRICS)
    args.targets = conv.targets_from(args.target)
    env = child_env()

    if args.dry_run:
        ncu = args.ncu or shutil.which("ncu") or "ncu"
        for case, impls in plan:
            app = worker_argv(args.python, case, impls, iters=args.iters, warmup=args.warmup,
                              status=f"{case}.status.json")
            print(shlex.join(ncu_argv(ncu, impls, metrics=args.metric_list, section_set=args.section_set,
                                      clock_control=args.clock_control, cache_control=args.cache_control,
                                      log_file=f"{case}.ncu.csv", app=app)))
        return 0

    ncu = find_ncu(args.ncu)
    version = ncu_version(ncu, env)
    if not args.skip_metric_check:
        missing = unknown_metrics(args.metric_list, query_metric_names(ncu, env))
        if missing:
            raise ProfileError(f"ncu {version} does not know these metrics on this GPU: {', '.join(missing)} "
                               "(ncu --query-metrics lists the names; pass --metrics to choose others)")

    with tempfile.TemporaryDirectory(prefix="sparsek-ncu-") as tmp:
        workdir = Path(args.log_dir) if args.log_dir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        records = [profile_case(case, impls, args, ncu, env, workdir, conv) for case, impls in plan]

    device = next((r["device"] for r in records if r.get("device")), None)
    doc = {
        "schema": "sparsek-metrics/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "device": device,
        "ncu": {"path": ncu, "version": version, "clock_control": args.clock_control,
                "cache_control": args.cache_control, "set": args.section_set, "metrics": args.metric_list,
                "page": "raw", "print_units": "base", "iters": args.iters, "warmup": args.warmup},
        "targets": args.targets,
        "cases": records,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(output.name + ".tmp")
    tmp_out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_out, output)  # a reader never sees half a file

    print(summary_table(doc))
    name = device["name"] if device else "unknown device"
    print(f"\n{name}, ncu {version}, clock control {args.clock_control}: wrote {output}")
    failed = [r["case"] for r in records if r["error"]]
    profiled = any(i["status"] == "profiled" for r in records for i in r["impls"])
    for r in records:
        if r["error"]:
            print(f"sparsek-bench profile: {r['case']}: {r['error']}", file=sys.stderr)
    return EXIT_FAILED if failed or not profiled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
