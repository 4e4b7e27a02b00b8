"""Publish a learn run: the plot of accuracy against key budget and the markdown table, both
from the committed results JSON, never from numbers typed by hand.

    python -m sparsek.learn.plot benchmarks/learn/learn-cpu.json \
        --png docs/learn/learn-cpu.png --doc docs/learn.md

The table goes between two marker comments of the document; everything else there is left
alone, so the prose can be edited freely and rerunning the script only refreshes the table.
"""

from __future__ import annotations

import argparse
import json
import re

from .model import VARIANTS

STYLE = {  # variant: (colour, marker, label)
    "sparsek": ("tab:blue", "o", "SparseK (learned scorer)"),
    "window": ("tab:orange", "s", "sliding window of K+W"),
    "dense": ("black", "", "dense causal (ceiling)"),
    "sparsek-frozen": ("tab:green", "^", "SparseK, frozen random scorer"),
}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for variant in VARIANTS:
        rows = sorted((r for r in result["summary"] if r["variant"] == variant), key=lambda r: r["budget"])
        if not rows:
            continue
        colour, marker, label = STYLE[variant]
        x = [r["budget"] for r in rows]
        y = [r["accuracy"] for r in rows]
        if variant == "dense":
            ax.axhline(y[0], color=colour, linestyle="--", linewidth=1, label=f"{label}: {y[0]:.2f}")
            continue
        ax.plot(x, y, color=colour, marker=marker, label=f"{label} (mean)")
        # Every seed as its own point: a mean of a run that learned and one that did not
        # would hide exactly what the benchmark is about.
        runs = [r for r in result["runs"] if r["variant"] == variant]
        ax.scatter([r["topk"] + r["window"] for r in runs], [r["accuracy"] for r in runs], color=colour,
                   marker=marker, s=14, alpha=0.35, linewidths=0)
    task = cfg["task"]
    ax.axhline(1.0 / task["num_values"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel(f"key budget per query, K + W (W = {cfg['window']})")
    ax.set_ylabel("answer accuracy (held out)")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(sorted({r["budget"] for r in result["summary"]}))
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    ax.set_title(
        f"{result.get('case', 'learn')}: S={task['seq_len']}, {task['num_facts']} facts, "
        f"{cfg['steps']} steps, seeds {seeds} (faint points: single seeds)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))  # room for the legend under the axes
    fig.savefig(path)
    plt.close(fig)


def markers(case: str) -> tuple[str, str]:
    """The two lines around a case's table in a markdown file (one table per case)."""
    return (f"<!-- learn-table:{case}:begin (written by python -m sparsek.learn.plot; do not edit) -->",
            f"<!-- learn-table:{case}:end -->")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _curriculum(cfg: dict) -> str:
    short = cfg.get("short_task")
    return f"first {cfg['short_steps']} steps at {short['seq_len']} tokens, then " if short else ""


def _precision_note(cfg: dict, result: dict) -> str:
    """The model's precision and which SparseK attention ran (results before these were
    recorded ran float32 on the reference)."""
    if "attention_path" not in result:
        return ""
    return f"; model in {cfg.get('precision', 'float32')}, SparseK attention on {result['attention_path']}"


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    task = cfg["task"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    lines = [
        f"Case `{result.get('case', '?')}`: seq_len {task['seq_len']}, {task['num_facts']} facts, "
        f"{task['num_queries']} queries per sequence, {task['num_values']} values (chance "
        f"{_pct(1 / task['num_values'])}); window W = {cfg['window']}; {_curriculum(cfg)}{cfg['steps']} steps of batch "
        f"{cfg['batch_size']}; seeds {seeds}; {cfg['eval_size'] * task['num_queries']} held-out answers per "
        f"run; device {result['device_name']}, {result['threads']} thread{'' if result['threads'] == 1 else 's'}, torch {result['torch']}; "
        f"wall time {result['wall_s'] / 60:.1f} min for the whole run"
        f"{_precision_note(cfg, result)}.",
        "",
        "Accuracy is the mean over seeds (min to max in brackets). *Far* counts only answers whose fact "
        "lies beyond the last K + W positions, out of reach of the sliding window. *Recall* is how "
        "often the answering fact was among the keys the query attended to, and *fact AUC* how "
        "well the scores alone rank fact positions above the rest of the context (0.5 = chance, "
        "1 = perfect); both for the SparseK variants only.",
        "",
        "| K + W | variant | accuracy | far accuracy | selection recall | fact AUC | loss | train s / run | ms / step |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for row in sorted(result["summary"], key=lambda r: (r["budget"], order[r["variant"]])):
        runs = [
            r
            for r in result["runs"]
            if r["variant"] == row["variant"] and (row["variant"] == "dense" or r["topk"] == row["topk"])
        ]
        recall = [r["selection_recall"][-1] for r in runs if r["selection_recall"]]
        auc = [r["fact_score_auc"][-1] for r in runs if r.get("fact_score_auc")]
        train_s = sum(r["train_s"] for r in runs) / len(runs)
        step_ms = 1e3 * sum(r["train_s"] / r["steps"] for r in runs) / len(runs)
        name = "dense (all keys)" if row["variant"] == "dense" else row["variant"]
        lines.append(
            f"| {row['budget']} | {name} | {_pct(row['accuracy'])} ({_pct(row['accuracy_min'])} to "
            f"{_pct(row['accuracy_max'])}) | {_pct(row['far_accuracy'])} | "
            f"{_pct(sum(recall) / len(recall)) if recall else '-'} | "
            f"{f'{sum(auc) / len(auc):.2f}' if auc else '-'} | {row['loss']:.3f} | {train_s:.0f} | {step_ms:.1f} |"
        )
    return "\n".join(lines)


def compact_table(result: dict) -> str:
    """Accuracy per key budget (rows) and variant (columns), mean over seeds: the README's table."""
    by = {(r["budget"], r["variant"]): r for r in result["summary"]}
    budgets = sorted({b for b, _ in by})
    variants = [v for v in VARIANTS if any(v == w for _, w in by)]
    head = ["K + W"] + [STYLE[v][2] for v in variants]
    lines = ["| " + " | ".join(head) + " |", "| ---: |" + " ---: |" * len(variants)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(_pct(by[b, v]["accuracy"]) if (b, v) in by else "-" for v in variants) + " |")
    return "\n".join(lines)


def update_doc(doc: str, result: dict) -> str:
    """``doc`` with the text between the markers replaced by the table of ``result``."""
    begin, end = markers(result.get("case", "?"))
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"the document has no table markers for this case; add the two lines\n{begin}\n{end}")
    block = f"{begin}\n{markdown_table(result)}\n{end}"
    return pattern.sub(lambda _m: block, doc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="plot and table of a learn results JSON")
    parser.add_argument("results", help="results JSON written by sparsek.learn.train or sparsek-bench")
    parser.add_argument("--png", help="write the plot here")
    parser.add_argument("--doc", help="markdown file whose table (between the markers) is rewritten")
    parser.add_argument("--compact", action="store_true", help="print the compact accuracy table (README)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        result = json.load(f)
    if args.png:
        plot(result, args.png)
    if args.doc:
        with open(args.doc) as f:
            doc = f.read()
        with open(args.doc, "w") as f:
            f.write(update_doc(doc, result))
    if args.compact:
        print(compact_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
