"""Train the retrieval model in every variant and key budget for a fixed number of steps.

One run = (variant, topk, seed). For a seed, all runs see the same training batches, the same
evaluation set and the same initial weights (the variants share one parameter layout), so the
variants differ only in which keys each query may attend to. The key budget of a query is
``topk + window`` keys for ``sparsek``, ``sparsek-frozen`` and ``window``; ``dense`` sees its
whole prefix and does not depend on ``topk`` (it is trained once per seed).

Also the end-to-end test of the gradients: each SparseK run records the gradient norm that
reached its scorer on the first step and how far the scorer's weights moved by the end.

    python -m sparsek.learn --case learn-quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from sparsek import sparsek_selection

from .model import VARIANTS, RetrievalModel
from .task import IGNORE_INDEX, RetrievalTask

# Seed offsets keep the three random streams of a run apart: weights (the seed itself),
# training batches (_TRAIN_STREAM * (seed + 1) + step) and the evaluation set
# (_EVAL_STREAM + _EVAL_PER_SEED * seed + first row). The ranges cannot meet for any
# practical seed, step count or eval size, so no held-out sequence is ever trained on.
_TRAIN_STREAM = 1_000_003
_EVAL_STREAM = 7_919_000_000
_EVAL_PER_SEED = 1_000_000
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class LearnConfig:
    """Everything that defines a learnability run; recorded in full with its results."""

    task: RetrievalTask = RetrievalTask()
    window: int = 4
    topks: tuple[int, ...] = (4, 8, 16)
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0,)
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    scorer_lr_mult: float = 1.0  # learning rate of the SparseK scorers relative to lr
    # Multiplies the scorers' initial weights: the spread of the first scores decides how many
    # gates start soft (0 < g < 1, with a score gradient) rather than saturated.
    scorer_init_scale: float = 1.0
    weight_decay: float = 0.01
    warmup_steps: int = 30
    eval_size: int = 256
    eval_batch: int = 64
    d_model: int = 32
    num_heads: int = 2
    num_kv_heads: int = 1
    num_layers: int = 1
    log_every: int = 50
    device: str | None = None  # None: CUDA when available, else CPU
    # "bfloat16" runs the model under autocast, so q, k and v reach SparseK attention in bf16 and
    # the CUDA kernels run on a GPU (scores stay float32: the scorer computes them in float32).
    precision: str = "float32"
    # A curriculum: the first ``short_steps`` steps train on ``short_task`` (same vocabulary, a
    # short context), then ``steps`` steps on ``task``. No variant, dense included, learns the
    # retrieval from scratch at thousands of tokens in a few hundred steps: at initialisation the
    # answer's key is one of thousands of equally weighted positions. A retrieval head learned on
    # short sequences carries over (the model has no position embedding), and the comparison at
    # the real length is then about which keys each variant keeps: the scorer learns there.
    short_task: RetrievalTask | None = None
    short_steps: int = 0

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"LearnConfig: variants must be among {VARIANTS}, got {unknown}")
        if not self.topks or any(k < 1 for k in self.topks):
            raise ValueError(f"LearnConfig: topks must be ints >= 1, got {self.topks}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"LearnConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.short_task is None) != (self.short_steps == 0) or self.short_steps < 0:
            raise ValueError(f"LearnConfig: short_task and short_steps >= 1 go together, got {self.short_task}, {self.short_steps}")
        if self.short_task is not None and self.short_task.vocab_size != self.task.vocab_size:
            raise ValueError(f"LearnConfig: short_task must use task's vocabulary ({self.task.vocab_size} tokens), "
                             f"got {self.short_task.vocab_size}")
        if self.steps < 1 or self.batch_size < 1 or not self.seeds:
            raise ValueError(f"LearnConfig: steps, batch_size >= 1 and one seed at least, got {self.steps}, {self.batch_size}, {self.seeds}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["task"] = self.task.as_dict()
        d["short_task"] = self.short_task.as_dict() if self.short_task is not None else None
        return d


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(cfg: LearnConfig, device: torch.device):
    """The model's forward under bf16 autocast when cfg.precision asks for it (a no-op otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")


def attention_path(cfg: LearnConfig) -> str:
    """Which SparseK attention runs in this configuration: "cuda kernels" (forward and backward)
    or "reference: <why>". Asked with inputs of the model's shapes, as the op itself asks."""
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return "reference: not a CUDA device"
    from sparsek import _cuda

    dtype = torch.bfloat16 if cfg.precision == "bfloat16" else torch.float32
    head_dim, S = cfg.d_model // cfg.num_heads, cfg.task.seq_len
    q = torch.empty(1, cfg.num_heads, S, head_dim, device=device, dtype=dtype)
    kv = torch.empty(1, cfg.num_kv_heads, S, head_dim, device=device, dtype=dtype)
    scores = torch.empty(1, cfg.num_kv_heads, S, device=device)
    reason = _cuda.unsupported_reason(q, kv, kv, scores) or _cuda.backward_reason()
    return "cuda kernels" if reason is None else f"reference: {reason}"


def _lr_at(cfg: LearnConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.short_steps + cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * t)))


def _answer_loss(logits, targets):  # (B, S, V), (B, S)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def _scorer_params(model: RetrievalModel) -> list[torch.Tensor]:
    return [p for s in model.scorers() for p in s.parameters()]


@torch.no_grad()
def evaluate(model: RetrievalModel, cfg: LearnConfig, seed: int, device: torch.device) -> dict:
    """Loss and accuracy on the answers of ``cfg.eval_size`` held-out sequences, also split by
    whether the answering fact lies inside the last ``topk + window`` positions (where a sliding
    window of the same budget sees it) or beyond."""
    model.eval()
    budget = model.topk + model.window
    captured: list[torch.Tensor] = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: captured.append(out)) for s in model.scorers()]
    recall = [0] * len(hooks)
    auc = [0.0] * len(hooks)
    batches = 0
    loss_sum, correct, near_correct, near_total, total = 0.0, 0, 0, 0, 0
    for b0 in range(0, cfg.eval_size, cfg.eval_batch):
        n = min(cfg.eval_batch, cfg.eval_size - b0)
        batch = cfg.task.sample(n, seed=_EVAL_STREAM + _EVAL_PER_SEED * seed + b0).to(device)
        captured.clear()
        with autocast(cfg, device):
            logits = model(batch.tokens)
        for layer, scores in enumerate(captured):
            recall[layer] += int(_fact_selected(scores, model.topk, model.window, batch).sum())
            auc[layer] += _fact_score_auc(scores, batch, cfg.task)
        batches += 1
        rows = torch.arange(n, device=device).unsqueeze(1)
        answer_logits = logits[rows, batch.answer_pos].float()  # (n, Q, V)
        answers = batch.targets[rows, batch.answer_pos]  # (n, Q)
        loss_sum += F.cross_entropy(answer_logits.flatten(0, 1), answers.flatten(), reduction="sum").item()
        hit = answer_logits.argmax(-1) == answers
        near = batch.distance < budget
        correct += int(hit.sum())
        total += hit.numel()
        near_correct += int((hit & near).sum())
        near_total += int(near.sum())
    for h in hooks:
        h.remove()
    model.train()
    far_total = total - near_total
    return {
        "loss": loss_sum / total,
        "accuracy": correct / total,
        "near_accuracy": near_correct / near_total if near_total else None,
        "far_accuracy": (correct - near_correct) / far_total if far_total else None,
        "near_fraction": near_total / total,
        "selection_recall": [r / total for r in recall],
        "fact_score_auc": [a / batches for a in auc],
        "answers": total,
    }


def _fact_score_auc(scores, batch, task) -> float:
    """How well the scores single out facts, without any query: the probability that a fact's
    value position outscores a non-fact position of the same context (first kv head; 0.5 is
    chance, 1.0 a perfect ranking). The value position is the one that holds the whole fact,
    its own token plus the key through the token shift."""
    u = scores[:, 0, : task.context_len].float()  # (B, L)
    is_fact = batch.tokens[:, : task.context_len] >= task.value_start  # (B, L)
    # One row at a time, facts against the rest only: (facts x L) comparisons rather than the
    # (L x L) of all pairs, which at 4096 tokens would be 64 MiB per sequence.
    won, pairs = 0.0, 0
    for row, fact in zip(u, is_fact):
        f, rest = row[fact].unsqueeze(1), row[~fact].unsqueeze(0)  # (F, 1), (1, L - F)
        won += float((f > rest).sum() + 0.5 * (f == rest).sum())
        pairs += f.numel() * rest.numel()
    return won / pairs


def _fact_selected(scores, topk: int, window: int, batch) -> torch.Tensor:
    """(B, Q) bool: the answering fact is among the keys its query attends to (window or
    SparseK selection of the first kv head's scores)."""
    sel = sparsek_selection(scores[:, :1].float(), topk=topk, window=window)
    end = sel.end[:, 0].long().gather(1, batch.fact_pos)  # (B, Q)
    in_window = batch.distance < window
    return in_window | ((batch.fact_pos + window <= batch.answer_pos) & (batch.answer_pos < end))


def build_model(cfg: LearnConfig, variant: str, topk: int, seed: int) -> RetrievalModel:
    """The model of one run; the same initial weights for every variant of a seed."""
    torch.manual_seed(seed)
    model = RetrievalModel(
        cfg.task.vocab_size,
        variant=variant,
        topk=topk,
        window=cfg.window,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        num_layers=cfg.num_layers,
    ).to(resolve_device(cfg.device))
    if cfg.scorer_init_scale != 1.0:
        with torch.no_grad():
            for scorer in model.scorers():
                _inner(scorer).proj.weight.mul_(cfg.scorer_init_scale)
    return model


def train_model(cfg: LearnConfig, variant: str, topk: int, seed: int, *, log=None) -> tuple[RetrievalModel, dict]:
    """Train one model for ``cfg.short_steps`` steps on the short task (if any), then
    ``cfg.steps`` on the task. Returns it with its training diagnostics: training-loss curve,
    wall time of each phase, the gradient norm that reached the SparseK scorers on the first step
    at the task's length, and how far the scorers' weights moved."""
    device = resolve_device(cfg.device)
    model = build_model(cfg, variant, topk, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    scorer_ids = {id(p) for p in _scorer_params(model)}
    groups = [
        {"params": [p for p in params if id(p) not in scorer_ids], "lr_mult": 1.0},
        {"params": [p for p in params if id(p) in scorer_ids], "lr_mult": cfg.scorer_lr_mult},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scorer_init = [p.detach().clone() for p in _scorer_params(model)]
    first_scorer_grad = None
    curve = []
    total = cfg.short_steps + cfg.steps
    t0 = time.perf_counter()
    short_train_s = 0.0
    for step in range(total):
        if step == cfg.short_steps and step > 0:  # the short phase ends: time the task's steps alone
            if device.type == "cuda":
                torch.cuda.synchronize()
            short_train_s, t0 = time.perf_counter() - t0, time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step) * group["lr_mult"]
        task = cfg.short_task if step < cfg.short_steps else cfg.task
        batch = task.sample(cfg.batch_size, seed=_TRAIN_STREAM * (seed + 1) + step).to(device)
        with autocast(cfg, device):
            logits = model(batch.tokens)
        loss = _answer_loss(logits, batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if first_scorer_grad is None and step >= cfg.short_steps:
            grads = [p.grad for p in _scorer_params(model) if p.grad is not None]
            first_scorer_grad = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            curve.append({"step": step + 1, "seq_len": task.seq_len, "train_loss": loss.item()})
            if log:
                log(f"  {variant:>14} topk={topk:<3} seed={seed} step {step + 1:>5}/{total} "
                    f"({task.seq_len} tokens) loss {loss.item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    moved = [(p.detach() - p0).norm().item() for p, p0 in zip(_scorer_params(model), scorer_init)]
    return model, {
        "train_s": train_s,  # the ``steps`` at the task's length (ms per step = 1e3 train_s / steps)
        "short_train_s": short_train_s,
        "scorer_grad_norm": first_scorer_grad,
        "scorer_change": math.sqrt(sum(m * m for m in moved)) if moved else None,
        "slope": [float(v) for s in model.scorers() for v in _inner(s).slope.detach().cpu()],
        "curve": curve,
    }


def train_run(cfg: LearnConfig, variant: str, topk: int, seed: int, *, log=None) -> dict:
    """Train and evaluate one (variant, topk, seed); returns a JSON-ready record."""
    model, diag = train_model(cfg, variant, topk, seed, log=log)
    result = evaluate(model, cfg, seed, resolve_device(cfg.device))
    result.update(
        variant=variant,
        topk=topk,
        window=cfg.window,
        budget=topk + cfg.window if variant != "dense" else None,
        seed=seed,
        steps=cfg.steps,
        **diag,
    )
    return result


def _inner(scorer):
    return getattr(scorer, "inner", scorer)


def summarize(runs: list[dict], cfg: LearnConfig) -> list[dict]:
    """One row per (variant, topk): mean and spread over seeds. Dense appears once per topk
    with the same numbers so that every budget row has its ceiling."""
    rows = []
    for variant in cfg.variants:
        for topk in cfg.topks:
            sel = [r for r in runs if r["variant"] == variant and (variant == "dense" or r["topk"] == topk)]
            if not sel:
                continue
            acc = torch.tensor([r["accuracy"] for r in sel], dtype=torch.float64)
            far = [r["far_accuracy"] for r in sel if r["far_accuracy"] is not None]
            rows.append(
                {
                    "variant": variant,
                    "topk": topk,
                    "window": cfg.window,
                    "budget": topk + cfg.window,
                    "accuracy": float(acc.mean()),
                    "accuracy_min": float(acc.min()),
                    "accuracy_max": float(acc.max()),
                    "error_rate": 1.0 - float(acc.mean()),
                    "far_accuracy": sum(far) / len(far) if far else None,
                    "loss": sum(r["loss"] for r in sel) / len(sel),
                    "seeds": [r["seed"] for r in sel],
                    "steps": cfg.steps,
                }
            )
    return rows


def run(cfg: LearnConfig, *, log=print) -> dict:
    """Every (variant, topk, seed) of ``cfg``; the result is JSON-ready."""
    device = resolve_device(cfg.device)
    path = attention_path(cfg)
    if log:
        log(f"SparseK attention runs on: {path}")
    t0 = time.perf_counter()
    runs = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            for topk in cfg.topks if variant != "dense" else cfg.topks[:1]:
                runs.append(train_run(cfg, variant, topk, seed, log=log))
                r = runs[-1]
                if log:
                    log(
                        f"{variant:>14} topk={topk:<3} seed={seed}: accuracy {r['accuracy']:.3f} "
                        f"(far {r['far_accuracy'] if r['far_accuracy'] is None else round(r['far_accuracy'], 3)}) "
                        f"loss {r['loss']:.3f} [{r['train_s']:.0f} s]"
                    )
    return {
        "config": cfg.as_dict(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "attention_path": path,
        "summary": summarize(runs, cfg),
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }


# What each variant of model.VARIANTS is (model.py says how it is built), for --help.
VARIANT_HELP = {
    "sparsek": "SparseK attention with a learned scorer",
    "window": "a sliding window of the last K + W keys",
    "dense": "full causal attention (the ceiling)",
    "sparsek-frozen": "SparseK whose scorer keeps its random initial weights",
}


def _describe(cfg: LearnConfig) -> str:
    task, budgets = cfg.task, sorted(k + cfg.window for k in cfg.topks)
    return (f"{task.seq_len} tokens, {task.num_facts} facts, K + W of {budgets[0]} to {budgets[-1]} keys, "
            f"{cfg.steps} steps x batch {cfg.batch_size}, seeds {', '.join(map(str, cfg.seeds))}")


def _epilog(cases: dict) -> str:
    lines = ["cases (--case):", *(f"  {name:<12} {_describe(cfg)}" for name, cfg in cases.items()), "",
             "variants (--variants):",
             *(f"  {v:<15} {VARIANT_HELP.get(v, '')}" for v in VARIANTS), "",
             "The learned-scorer results and what they mean: docs/learn.md."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .bench import CASES, case_config

    parser = argparse.ArgumentParser(prog="python -m sparsek.learn", description=__doc__.split("\n\n")[0],
                                     epilog=_epilog(CASES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="learn-quick", choices=list(CASES), metavar="CASE",
                        help=f"one of {', '.join(CASES)} (below; default learn-quick)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the case's seeds")
    parser.add_argument("--steps", type=int, help="override the case's step budget")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
                        help=f"override the case's variants: {', '.join(VARIANTS)} (below)")
    parser.add_argument("--topks", type=int, nargs="+", help="override the case's topk values")
    parser.add_argument("--scorer-lr-mult", type=float, help="override the scorers' learning-rate multiplier")
    parser.add_argument("--scorer-init-scale", type=float, help="override the scale of the scorers' initial weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = case_config(args.case)
    overrides = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "steps": args.steps,
        "variants": tuple(args.variants) if args.variants else None,
        "topks": tuple(args.topks) if args.topks else None,
        "scorer_lr_mult": args.scorer_lr_mult,
        "scorer_init_scale": args.scorer_init_scale,
        "device": args.device,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = replace(cfg, **overrides)
    result = {"case": args.case, "overrides": overrides, **run(cfg)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
