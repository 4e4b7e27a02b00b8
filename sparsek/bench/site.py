"""The tier-history page: each tier's speedup against commits, per card, from asv's results and
from the results files of ``sparsek-bench run --save``.

    python -m sparsek.bench.site [--results DIR] [--runs DIR] [--conf asv.conf.json] [--out FILE]
                                 [--repo DIR] [--offline VENDOR_DIR]

Reads the asv result files (api version 2) of every machine under ``--results`` (default: the
config's results_dir), takes the tier benchmarks (``PrefillTiers`` / ``DecodeTiers`` /
``TrainTiers`` ``track_speedup``: bar / sparsek, measured in one run on one GPU), and the tier
rows of every results file under ``--runs`` (default: benchmarks/runs of ``--repo``; these hold
the cases asv does not run on every commit, the decode cases of T3 among them, assessed with
today's tier rules), and writes one static page (default: ``tiers.html`` in the config's
html_dir, beside asv's index.html). Per card (the machine record's ``gpu`` key, the results
file's device) and history: one inline-SVG graph per tier that has results, a line per case,
commits in date order, each point marked pass (above the tier's required speedup) or fail and
linked to its commit (``show_commit_url``), and the same numbers as a table. A history without
any tier result (a CPU machine whose runs timed no tier) is named, not drawn.

Offline: the tier page has no script and nothing from elsewhere; ``--offline ci/site-vendor``
also copies the libraries asv's index.html takes from CDNs into the site and points index.html
at the copies (``make_offline``). Every name from a
result file, the machine record or git reaches the page through ``html.escape``; commit links
are built only from hexadecimal hashes and http(s) base URLs.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import html
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .asv_results import entries as asv_entries
from .cases import CASES
from .tiers import TIERS

# The asv benchmarks holding tier speedups, by case kind (benchmarks/bench_*.py).
TIER_BENCHMARKS = {
    "prefill": "bench_prefill.PrefillTiers.track_speedup",
    "decode": "bench_decode.DecodeTiers.track_speedup",
    "train": "bench_train.TrainTiers.track_speedup",
}
ASV_SKIP_FILES = {"machine.json", "benchmarks.json"}
PAGE_NAME = "tiers.html"
# Case colours, in the registry's order of cases (colour-blind-safe Okabe-Ito palette).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
_HEX = re.compile(r"^[0-9a-f]{7,40}$")
# asv 0.6.6's index.html: CDN address -> file in the vendor folder (ci/site-vendor/README.md).
CDN_TO_VENDOR = {
    "https://code.jquery.com/jquery-3.3.1.min.js": "jquery-3.3.1.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": "flot/jquery.flot.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js": "flot/jquery.flot.time.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js": "flot/jquery.flot.selection.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js": "flot/jquery.flot.categories.js",
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": "flot/jquery.flot.orderBars.js",
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": "stupidtable.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": "md5.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": "bootstrap/js/bootstrap.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": "bootstrap/css/bootstrap.min.css",
}
VENDOR_SUBDIR = "vendor"
_SRI_ATTRS = re.compile(r"""\s+(?:integrity|crossorigin|referrerpolicy)=("[^"]*"|'[^']*')""", re.IGNORECASE)
# A resource the page loads (not a link the reader follows): src= anywhere, href= of <link>.
_REMOTE_RESOURCE = re.compile(r"""(?:\bsrc=|<link\b[^>]*\bhref=)["'](https?:)?//""", re.IGNORECASE)


@dataclass
class Point:
    commit: str
    date: int  # commit date, ms since the epoch (asv's "date")
    speedups: dict[tuple[str, str], float]  # (tier, case) -> speedup


@dataclass
class MachineHistory:
    name: str
    info: dict  # machine.json: gpu, gpu_driver, cuda, clock_policy + asv's keys
    points: list[Point] = field(default_factory=list)
    source: str = "asv"  # or "runs": sparsek-bench results files

    @property
    def card(self) -> str:
        return str(self.info.get("gpu") or "unknown card")

    @property
    def cpu(self) -> bool:
        """A CPU machine: its tiers are a pipeline check (sparsek/bench/tiers.py), not a history."""
        return self.card.lower() == "cpu" or bool(self.info.get("pipeline_check"))

    def tiers_with_results(self) -> list:
        have = {t for p in self.points for (t, _), v in p.speedups.items() if v > 0}
        return [t for t in TIERS if t.name in have]


# ---------------------------------------------------------------------------------------------
# reading asv results


def _param_value(text: str) -> str:
    """asv stores parameter values as their repr: "'long-16k'" -> "long-16k"."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return str(value)


def tier_speedups(data: dict) -> dict[tuple[str, str], float]:
    """(tier, case) -> speedup from one asv result file; skipped and failed entries are absent."""
    out: dict[tuple[str, str], float] = {}
    wanted = set(TIER_BENCHMARKS.values())
    for name, combo, value, _, _ in asv_entries(data):
        if name not in wanted or len(combo) != 2:
            continue
        case, tier = (_param_value(p) for p in combo)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[(tier, case)] = float(value)
    return out


def load_history(results_dir: Path) -> list[MachineHistory]:
    """Every machine folder of an asv results_dir, points sorted by commit date."""
    machines = []
    for folder in sorted(p for p in Path(results_dir).iterdir() if p.is_dir()):
        info_path = folder / "machine.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        history = MachineHistory(name=folder.name, info=info)
        by_commit: dict[str, Point] = {}
        for path in sorted(folder.glob("*.json")):
            if path.name in ASV_SKIP_FILES:
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            commit = str(data.get("commit_hash") or "")
            speedups = tier_speedups(data)
            point = by_commit.setdefault(commit, Point(commit, int(data.get("date") or 0), {}))
            point.speedups.update(speedups)  # several environments of one commit: the last wins
        history.points = sorted(by_commit.values(), key=lambda p: (p.date, p.commit))
        machines.append(history)
    return machines


_RUN_NAME_COMMIT = re.compile(r"-([0-9a-f]{7,40})\.json$")


def _run_point(path: Path, doc: dict) -> tuple[str, Point, bool] | None:
    """(card, point, pipeline check) of one results file; None when no tier has a speedup."""
    from .tiers import assess

    run = doc.get("run") or {}
    device = run.get("device") or {}
    rows = [r for r in assess(doc) if r.get("case") and r.get("speedup")]
    if not rows:
        return None
    # Files written where git was not reachable name their commit only in the file name.
    named = _RUN_NAME_COMMIT.search(path.name)
    commit = str((device.get("git") or {}).get("commit") or (named.group(1) if named else ""))
    try:
        started = _dt.datetime.fromisoformat(str(run.get("started")))
        date = int(started.timestamp() * 1000)
    except ValueError:
        date = 0
    point = Point(commit, date, {(r["tier"], r["case"]): float(r["speedup"]) for r in rows})
    return str(device.get("name") or "unknown card"), point, any(r.get("pipeline_check") for r in rows)


def load_runs(runs_dir: Path) -> list[MachineHistory]:
    """One history per card from sparsek-bench results files, points in run order; a file that
    does not validate is reported on stderr and left out."""
    from .results import load_results

    by_card: dict[str, MachineHistory] = {}
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            found = _run_point(path, load_results(path))
        except (ValueError, OSError) as exc:
            print(f"site: {path}: left out: {exc}", file=sys.stderr)
            continue
        if found is None:
            continue
        card, point, pipeline_check = found
        slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
        history = by_card.setdefault(card, MachineHistory(f"runs-{slug}", {"gpu": card}, source="runs"))
        history.info["pipeline_check"] = history.info.get("pipeline_check") or pipeline_check
        same = next((p for p in history.points if p.commit == point.commit and point.commit), None)
        if same is not None:  # several files of one commit: the later run wins per (tier, case)
            same.speedups.update(point.speedups)
            same.date = max(same.date, point.date)
        else:
            history.points.append(point)
    for history in by_card.values():
        history.points.sort(key=lambda p: (p.date, p.commit))
    return list(by_card.values())


def commit_subjects(repo: Path | None, commits) -> dict[str, str]:
    """First line of each commit's message, where git knows the commit."""
    out = {}
    if repo is None:
        return out
    for sha in commits:
        if not _HEX.match(sha):
            continue
        done = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%s", sha],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0:
            out[sha] = done.stdout.strip()
    return out


# ---------------------------------------------------------------------------------------------
# rendering

_e = html.escape  # quote=True by default: safe in text and in double-quoted attributes


def commit_link(base: str | None, sha: str) -> str | None:
    if not base or not _HEX.match(sha) or not re.match(r"^https?://", base):
        return None
    return base + sha


def _status(tier_name: str, speedup: float) -> str:
    required = next(t.required_speedup for t in TIERS if t.name == tier_name)
    return "pass" if speedup > required else "fail"


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    k = math.floor(math.log2(lo))
    while 2.0**k <= hi * 1.0001:
        ticks.append(2.0**k)
        k += 1
    return ticks


def render_graph(tier, history: MachineHistory, commit_url: str | None, colours: dict[str, str]) -> str:
    """One tier on one machine: inline SVG, log2 speedup axis, the required speedup dashed."""
    width, height, left, right, top, bottom = 760, 260, 56, 16, 14, 46
    series: dict[str, list[tuple[int, float]]] = {}
    for i, point in enumerate(history.points):
        for (t, case), value in sorted(point.speedups.items(), key=lambda kv: _case_order(kv[0][1])):
            if t == tier.name and value > 0:
                series.setdefault(case, []).append((i, value))
    n = max(1, len(history.points))
    label = f"{tier.name} {tier.title}: speedup against commits on {history.name}"
    head = (f'<svg class="tier-graph" data-tier="{_e(tier.name)}" data-machine="{_e(history.name)}" '
            f'data-points="{sum(len(s) for s in series.values())}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">')
    parts = [head, f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    if not series:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">'
                     f'no measurable {_e(tier.name)} result on this machine yet</text></svg>')
        return "".join(parts)

    values = [v for s in series.values() for _, v in s] + [tier.required_speedup]
    lo, hi = min(values) / 1.25, max(values) * 1.25
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i):
        return left + (plot_w * (i + 0.5) / n)

    def y(v):
        return top + plot_h * (1 - (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo)))

    for tick in _log_ticks(lo, hi):
        if lo <= tick <= hi:
            parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
                         f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" class="tick">{tick:g}x</text>')
    yr = y(tier.required_speedup)
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yr:.1f}" y2="{yr:.1f}" class="required"/>'
                 f'<text x="{width - right}" y="{yr - 4:.1f}" text-anchor="end" class="tick">pass above '
                 f'{tier.required_speedup:g}x</text>')
    every = max(1, math.ceil(n / 16))  # at most 16 commit labels
    for i, point in enumerate(history.points):
        if i % every == 0:
            parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">'
                         f'{_e(point.commit[:8])}</text>')
    for case, pts in series.items():
        colour = colours[case]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, v in pts:
            point = history.points[i]
            status = _status(tier.name, v)
            title = f"{case} at {point.commit[:12]}: {v:.3g}x, {status}"
            if status == "pass":
                mark = f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="5" fill="{colour}" class="pass"/>'
            else:  # a hollow square: fail reads without colour
                mark = (f'<rect x="{x(i) - 5:.1f}" y="{y(v) - 5:.1f}" width="10" height="10" fill="#fff" '
                        f'stroke="{colour}" stroke-width="2" class="fail"/>')
            mark = f"<g><title>{_e(title)}</title>{mark}</g>"
            url = commit_link(commit_url, point.commit)
            parts.append(f'<a href="{_e(url)}">{mark}</a>' if url else mark)
    parts.append("</svg>")
    legend = "".join(f'<span class="key"><span class="swatch" style="background:{colours[c]}"></span>{_e(c)}</span>'
                     for c in series)
    return "".join(parts) + f'<div class="legend">{legend} <span class="key">● pass</span>' \
                            f'<span class="key">□ fail</span></div>'


def _case_order(case: str) -> tuple[int, str]:
    """The registry's order (seed, long-16k ... long-128k, decode-*), unknown names after it."""
    order = list(CASES)
    return (order.index(case) if case in order else len(order), case)


def render_table(tier, history: MachineHistory, commit_url: str | None, subjects: dict[str, str]) -> str:
    cases = sorted({c for p in history.points for (t, c) in p.speedups if t == tier.name}, key=_case_order)
    if not cases:
        return ""
    head = "".join(f"<th>{_e(c)}</th>" for c in cases)
    rows = []
    for point in reversed(history.points):  # newest first
        if not any((tier.name, case) in point.speedups for case in cases):
            continue  # a commit measured for other tiers only
        url = commit_link(commit_url, point.commit)
        sha = _e(point.commit[:12])
        cell = f'<a href="{_e(url)}"><code>{sha}</code></a>' if url else f"<code>{sha}</code>"
        date = _dt.datetime.fromtimestamp(point.date / 1000, _dt.timezone.utc).strftime("%Y-%m-%d") if point.date else ""
        tds = []
        for case in cases:
            v = point.speedups.get((tier.name, case))
            if v is None:
                tds.append('<td class="na">—</td>')
            else:
                status = _status(tier.name, v)
                tds.append(f'<td class="{status}">{v:.3g}x {status}</td>')
        rows.append(f"<tr><td>{cell}</td><td>{_e(date)}</td><td>{_e(subjects.get(point.commit, ''))}</td>"
                    f"{''.join(tds)}</tr>")
    return (f'<table class="tier-table"><thead><tr><th>commit</th><th>date</th><th>subject</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; } h3 { font-size: 15px; }
.meta { color: #555; } code { font-size: 12px; }
svg.tier-graph { border: 1px solid #ddd; display: block; margin: 8px 0 4px; }
svg .grid { stroke: #eee; } svg .required { stroke: #888; stroke-dasharray: 5 4; }
svg .tick { font-size: 11px; fill: #555; } svg .empty { font-size: 13px; fill: #777; }
.legend { font-size: 12px; margin-bottom: 8px; } .key { margin-right: 14px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
table.tier-table { border-collapse: collapse; font-size: 12px; margin-bottom: 16px; }
.tier-table td, .tier-table th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
td.pass { color: #006d2c; } td.fail { color: #b30000; font-weight: 600; } td.na { color: #999; }
"""


def _machine_section(m: MachineHistory, commit_url: str | None, subjects: dict[str, str], colours: dict[str, str],
                     asv_index: str) -> str:
    """One history: a graph and a table per tier with results, the other tiers named."""
    info = m.info
    meta = ", ".join(f"{k} {info[k]}" for k in ("gpu_driver", "cuda", "clock_policy") if info.get(k))
    if m.source == "runs":
        title = f"results files of <code>sparsek-bench run --save</code> (benchmarks/runs/)"
        meta = "tiers assessed from each file's records with today's rules" + (f"; {meta}" if meta else "")
    else:
        title = f"asv machine <code>{_e(m.name)}</code>"
        meta = _e(meta)
    parts = [f'<section class="machine" data-machine="{_e(m.name)}"><h3>{title}</h3>'
             f'<p class="meta">{meta}; {len(m.points)} commit(s)</p>']
    if m.cpu:
        parts.append('<p class="meta">CPU: a pipeline check (the op\'s PyTorch reference against PyTorch\'s CPU '
                     "kernels), not a performance history.</p>")
    shown = m.tiers_with_results()
    for tier in shown:
        heading = f"{_e(tier.name)} {_e(tier.title)}"
        if m.source == "asv":
            link = f"{asv_index}#{TIER_BENCHMARKS[tier.kind]}?machine={quote(m.name)}"
            heading += f' <small>(<a href="{_e(link)}">asv graph</a>)</small>'
        parts += [f"<h4>{heading}</h4>", render_graph(tier, m, commit_url, colours),
                  render_table(tier, m, commit_url, subjects)]
    missing = [t.name for t in TIERS if t not in shown]
    if missing:
        parts.append(f'<p class="meta">No results here for {_e(", ".join(missing))}.</p>')
    parts.append("</section>")
    return "".join(parts)


def render_page(machines: list[MachineHistory], commit_url: str | None, subjects: dict[str, str],
                asv_index: str = "index.html") -> str:
    cases_seen = sorted({case for m in machines for p in m.points for _, case in p.speedups}, key=_case_order)
    colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(cases_seen)}
    tier_list = "; ".join(f"{t.name} {t.title}" for t in TIERS)
    body = [f"<h1>SparseK tiers against commits</h1>"
            f'<p class="meta">Speedup of sparsek over each tier\'s bar (bar time / sparsek time), both measured in '
            f"the same run on the same GPU: {_e(tier_list)}. What each bar is, and why these ratios replace "
            f"absolute targets: <code>docs/tiers.md</code> in the repository. A point above the dashed line "
            f'passes. Every benchmark: <a href="{_e(asv_index)}">asv graphs</a>.</p>']
    drawn = [m for m in machines if m.tiers_with_results()]
    if not drawn:
        body.append("<p>No tier results yet.</p>")
    by_card: dict[str, list[MachineHistory]] = {}
    for m in drawn:
        by_card.setdefault(m.card, []).append(m)
    for card, group in sorted(by_card.items()):
        body.append(f'<h2 class="card">{_e(card)}</h2>')
        for m in group:
            body.append(_machine_section(m, commit_url, subjects, colours, asv_index))
    empty = [m for m in machines if not m.tiers_with_results()]
    if empty:
        names = ", ".join(f"<code>{_e(m.name)}</code> ({_e(m.card)}, {len(m.points)} commit(s))" for m in empty)
        body.append(f'<p class="meta empty-machines">Not drawn, no tier result: {names}.</p>')
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="swallow.ico">'  # asv's icon, beside this page
            f"<title>SparseK tier history</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def remote_resources(text: str) -> list[str]:
    """Scripts, stylesheets and images a page would fetch from another host."""
    found = []
    for m in re.finditer(r"""<(script|link|img)\b[^>]*>""", text, re.IGNORECASE):
        tag = m.group(0)
        if _REMOTE_RESOURCE.search(tag):
            url = re.search(r"""(?:src|href)=["']([^"']+)["']""", tag, re.IGNORECASE)
            found.append(url.group(1) if url else tag)
    return found


def make_offline(html_dir: Path, vendor_dir: Path) -> list[str]:
    """Copy the vendor folder into the site and point every *.html of asv's at it; returns the
    addresses replaced. Raises ValueError naming any remote resource left (an asv upgrade)."""
    import shutil

    html_dir, vendor_dir = Path(html_dir), Path(vendor_dir)
    missing = [f for f in CDN_TO_VENDOR.values() if not (vendor_dir / f).is_file()]
    if missing:
        raise ValueError(f"{vendor_dir}: vendored files missing: {missing}")
    target = html_dir / VENDOR_SUBDIR
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(vendor_dir, target, ignore=shutil.ignore_patterns("README.md"))
    replaced = []

    def localise(m: re.Match) -> str:
        tag = m.group(0)
        for url, local in CDN_TO_VENDOR.items():
            if url in tag:
                replaced.append(url)
                # The integrity hashes are those of the CDN's bytes (minified builds); the copies
                # are npm's files of the same releases, served from the site's own origin.
                tag = _SRI_ATTRS.sub("", tag.replace(url, f"{VENDOR_SUBDIR}/{local}"))
        return tag

    for page in sorted(html_dir.glob("*.html")):
        text = re.sub(r"<(?:script|link)\b[^>]*>", localise, page.read_text(encoding="utf-8"), flags=re.IGNORECASE)
        left = remote_resources(text)
        if left:
            raise ValueError(f"{page}: loads {left} from another host; vendor it in {vendor_dir} and add it to "
                             "CDN_TO_VENDOR in sparsek/bench/site.py")
        page.write_text(text, encoding="utf-8")
    return sorted(set(replaced))


def load_conf(path: Path) -> dict:
    """asv.conf.json (JSON with // comments)."""
    text = path.read_text(encoding="utf-8")
    return json.loads(re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*', lambda m: m.group(1) or "", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsek.bench.site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", type=Path, default=Path("asv.conf.json"), help="asv config (default asv.conf.json)")
    parser.add_argument("--results", type=Path, help="asv results_dir (default: the config's)")
    parser.add_argument("--runs", type=Path,
                        help="sparsek-bench results files (default: benchmarks/runs of --repo, when it exists)")
    parser.add_argument("--out", type=Path, help=f"page to write (default: {PAGE_NAME} in the config's html_dir)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="git repository for commit subjects")
    parser.add_argument("--offline", type=Path, metavar="VENDOR_DIR",
                        help="copy these libraries into the site and point asv's pages at them (ci/site-vendor)")
    args = parser.parse_args(argv)
    conf = load_conf(args.conf)
    base = args.conf.resolve().parent
    results = args.results or base / conf.get("results_dir", "results")
    out = args.out or base / conf.get("html_dir", "html") / PAGE_NAME
    if not Path(results).is_dir():
        parser.error(f"--results {results}: not a directory")
    machines = load_history(Path(results))
    runs = args.runs or args.repo / "benchmarks" / "runs"
    if args.runs is not None and not runs.is_dir():
        parser.error(f"--runs {runs}: not a directory")
    if runs.is_dir():
        machines += load_runs(runs)
    subjects = commit_subjects(args.repo, {p.commit for m in machines for p in m.points})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(machines, conf.get("show_commit_url"), subjects), encoding="utf-8")
    n = sum(len(p.speedups) for m in machines for p in m.points)
    print(f"site: {out} ({len(machines)} machine(s), {n} tier result(s))")
    if args.offline:
        try:
            replaced = make_offline(out.parent, args.offline)
        except ValueError as exc:
            print(f"site: {exc}", file=sys.stderr)
            return 1
        print(f"site: {len(replaced)} CDN address(es) replaced by copies in {out.parent / VENDOR_SUBDIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
