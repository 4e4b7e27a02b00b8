"""The learnability cases of the benchmark suite: ``learn-quick`` and ``learn-full``.

``sparsek-bench run`` sends every case whose name starts with ``learn-`` to
``run_learn_case``; the asv class in benchmarks/bench_learn.py tracks the error rates it
returns. ``quick=True`` (the CLI's ``--quick``, and CI) keeps only the case's first seed.

* ``learn-quick``: 64 tokens, 4 facts, budgets of 6 to 12 keys, 300 steps. One seed (CI,
  ``--quick``) takes about a minute on one CPU core.
* ``learn-cpu``: 128 tokens, 8 facts, budgets of 10 to 24 keys, 600 steps, 3 seeds: the run
  committed in benchmarks/learn/ and tabled in docs/learn.md (about 25 minutes on one core).
* ``learn-full``: 512 tokens, 16 facts, budgets of 24 to 80 keys, 2000 steps; meant for a GPU.
* ``learn-4k``: 4096 tokens, 16 facts, one budget of K + W = 256 + 128 = 384 keys (9.4% of the
  context), 3 seeds, the model in bf16 so that SparseK runs on the CUDA kernels, forward and
  backward: the training path at a real length. A curriculum (``LearnConfig.short_task``): 600
  steps at 128 tokens learn the retrieval head, then 300 steps at 4096 tokens, where the scorer
  has to learn which keys to keep. Meant for a GPU with the kernels (sm_90a).
* ``learn-1k``: ``learn-4k``'s task and relative budget at 1024 tokens (K + W = 64 + 32 = 96 keys,
  9.4% of the context) in float32, with 1000 steps after a curriculum like learn-4k's (600 steps
  at 96 tokens, which the budget covers whole): how the selection learns when it is trained
  longer, on a CPU (reference path; about 45 minutes for one seed of the four variants on 2 cores).
* ``learn-1k-select``: ``learn-1k`` with learn-4k's short phase of 128 tokens, which K + W = 96
  does not cover: the scorer has to select from the first step.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .task import RetrievalTask
from .train import LearnConfig, run

CASES: dict[str, LearnConfig] = {
    "learn-quick": LearnConfig(
        task=RetrievalTask(seq_len=64, num_facts=4, num_queries=4, num_keys=16, num_values=16, num_filler=16),
        window=4,
        topks=(2, 4, 8),
        seeds=(0, 1, 2),
        steps=300,
        batch_size=32,
        lr=3e-3,
        warmup_steps=30,
        eval_size=512,
        d_model=32,
        num_heads=1,
        num_kv_heads=1,
        num_layers=1,
    ),
    "learn-cpu": LearnConfig(
        task=RetrievalTask(seq_len=128, num_facts=8, num_queries=4, num_keys=16, num_values=16, num_filler=16),
        window=8,
        topks=(2, 4, 8, 16),
        seeds=(0, 1, 2),
        steps=600,
        batch_size=32,
        lr=3e-3,
        warmup_steps=50,
        eval_size=512,
        d_model=32,
        num_heads=1,
        num_kv_heads=1,
        num_layers=1,
        log_every=100,
    ),
    "learn-full": LearnConfig(
        task=RetrievalTask(seq_len=512, num_facts=16, num_queries=8, num_keys=32, num_values=32, num_filler=32),
        window=16,
        topks=(8, 16, 32, 64),
        seeds=(0, 1, 2),
        steps=2000,
        batch_size=64,
        lr=3e-3,
        warmup_steps=100,
        eval_size=1024,
        eval_batch=128,
        d_model=64,
        num_heads=1,
        num_kv_heads=1,
        num_layers=1,
        log_every=250,
    ),
    "learn-4k": LearnConfig(
        task=RetrievalTask(seq_len=4096, num_facts=16, num_queries=8, num_keys=16, num_values=16, num_filler=16),
        short_task=RetrievalTask(seq_len=128, num_facts=8, num_queries=4, num_keys=16, num_values=16, num_filler=16),
        short_steps=600,
        window=128,
        topks=(256,),
        seeds=(0, 1, 2),
        steps=300,
        batch_size=32,
        lr=3e-3,
        warmup_steps=30,
        eval_size=256,
        eval_batch=32,
        d_model=64,  # one head of dimension 64: a head size the kernels support
        num_heads=1,
        num_kv_heads=1,
        num_layers=1,
        log_every=100,
        precision="bfloat16",
    ),
}
# learn-4k's task, model and relative budget at a quarter of the length (K + W = 64 + 32 = 96 of
# 1024), in float32 for the CPU, trained longer. Its short phase has 96 tokens, so that K + W
# covers the whole context there as learn-4k's 384 cover its 128: every variant computes the same function.
CASES["learn-1k"] = replace(
    CASES["learn-4k"],
    task=replace(CASES["learn-4k"].task, seq_len=1024),
    short_task=replace(CASES["learn-4k"].short_task, seq_len=96),
    window=32,
    topks=(64,),
    steps=1000,
    precision="float32",
)
# learn-1k with learn-4k's own short phase (128 tokens): there K + W = 96 of a 120-token context,
# so the scorer must already select while the retrieval head forms.
CASES["learn-1k-select"] = replace(
    CASES["learn-1k"],
    short_task=RetrievalTask(seq_len=128, num_facts=8, num_queries=4, num_keys=16, num_values=16, num_filler=16),
)


def case_config(name: str, quick: bool = False) -> LearnConfig:
    if name not in CASES:
        raise ValueError(f"learn case must be one of {sorted(CASES)}, got {name!r}")
    cfg = CASES[name]
    return replace(cfg, seeds=cfg.seeds[:1]) if quick else cfg


def variant_table(summary: list[dict]) -> dict:
    """{variant: {"error_rate", "accuracy", "loss" (means over budgets), "budgets": {budget: row}}}."""
    out: dict[str, dict] = {}
    for row in summary:
        v = out.setdefault(row["variant"], {"budgets": {}})
        v["budgets"][row["budget"]] = {k: row[k] for k in ("topk", "accuracy", "error_rate", "far_accuracy", "loss", "seeds")}
    for v in out.values():
        rows = list(v["budgets"].values())
        for key in ("accuracy", "error_rate", "loss"):
            v[key] = sum(r[key] for r in rows) / len(rows)
    return out


def run_learn_case(name: str, quick: bool, *, log=None) -> dict:
    """Train every variant and key budget of case ``name``; returns the JSON-ready results:
    per-variant accuracy, loss and error rate (overall and per budget), the settings, the
    seeds, the steps and the wall time, plus every single run."""
    cfg = case_config(name, quick)
    t0 = time.perf_counter()
    result = run(cfg, log=log)
    return {
        "case": name,
        "quick": quick,
        "seeds": list(cfg.seeds),
        "steps": cfg.steps,
        "variants": variant_table(result["summary"]),
        **result,
        "wall_s": time.perf_counter() - t0,
    }
