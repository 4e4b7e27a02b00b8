"""sparsek.learn: the retrieval task, the model variants, the training loop and its gradients."""

import math
import os
from dataclasses import replace

import pytest
import torch

from sparsek.learn.model import VARIANTS, FrozenScorer, MaskedSelfAttention, RetrievalModel
from sparsek.learn.task import IGNORE_INDEX, RetrievalTask
from sparsek.learn.train import LearnConfig, build_model, run, train_model

TINY_TASK = RetrievalTask(seq_len=32, num_facts=3, num_queries=2, num_keys=6, num_values=5, num_filler=4)
TINY = LearnConfig(task=TINY_TASK, window=2, topks=(2, 4), steps=3, batch_size=4, warmup_steps=1, eval_size=8, eval_batch=4, d_model=16, log_every=1, device="cpu")


# ------------------------------------------------------------------------------------------
# task
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7])
def test_task_is_deterministic_per_seed(seed):
    task = RetrievalTask()
    a, b = task.sample(8, seed), task.sample(8, seed)
    for name in ("tokens", "targets", "answer_pos", "fact_pos", "distance"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.tokens, task.sample(8, seed + 1).tokens)


def test_task_shapes_and_ranges():
    task = RetrievalTask(seq_len=96, num_facts=6, num_queries=3, num_keys=10, num_values=7, num_filler=5)
    batch = task.sample(16, 3)
    B, S, Q = 16, task.seq_len, task.num_queries
    assert batch.tokens.shape == batch.targets.shape == (B, S)
    assert batch.answer_pos.shape == batch.fact_pos.shape == batch.distance.shape == (B, Q)
    assert batch.tokens.dtype == torch.int64
    assert int(batch.tokens.min()) >= 0 and int(batch.tokens.max()) < task.vocab_size
    assert task.vocab_size == 1 + 5 + 10 + 7
    assert bool((batch.distance > 0).all())
    assert int((batch.targets != IGNORE_INDEX).sum()) == B * Q


def test_task_answers_are_the_facts():
    task = RetrievalTask(seq_len=80, num_facts=5, num_queries=5, num_keys=8, num_values=9, num_filler=3)
    batch = task.sample(32, 11)
    L = task.context_len
    for b in range(32):
        tokens = batch.tokens[b].tolist()
        ctx = tokens[:L]
        is_key = [task.key_start <= t < task.value_start for t in ctx]
        is_value = [t >= task.value_start for t in ctx]
        facts = {ctx[i]: ctx[i + 1] for i in range(L - 1) if is_key[i]}
        # every key is followed by a value, the keys are distinct, values only follow keys
        assert sum(is_key) == sum(is_value) == task.num_facts == len(facts)
        assert all(is_value[i + 1] for i in range(L - 1) if is_key[i])
        assert all(is_key[i - 1] for i in range(1, L) if is_value[i])
        asked = set()
        for q in range(task.num_queries):
            pos = int(batch.answer_pos[b, q])
            assert tokens[pos - 1] == task.QUERY
            key = tokens[pos]
            assert int(batch.targets[b, pos]) == facts[key]
            assert tokens[int(batch.fact_pos[b, q])] == facts[key] and tokens[int(batch.fact_pos[b, q]) - 1] == key
            asked.add(key)
        assert len(asked) == task.num_queries


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_queries": 9, "num_facts": 8}, "num_queries"),
        ({"num_facts": 20, "num_keys": 16}, "num_facts"),
        ({"seq_len": 20, "num_facts": 8}, "too short"),
        ({"num_values": 0}, "num_values"),
    ],
)
def test_task_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetrievalTask(**kwargs)


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_shapes(variant):
    model = RetrievalModel(TINY_TASK.vocab_size, variant=variant, topk=4, window=2, d_model=16, num_heads=2, num_kv_heads=1)
    logits = model(TINY_TASK.sample(3, 0).tokens)
    assert logits.shape == (3, TINY_TASK.seq_len, TINY_TASK.vocab_size)
    assert bool(torch.isfinite(logits).all())
    assert len(model.scorers()) == (1 if variant.startswith("sparsek") else 0)


def test_variants_start_from_the_same_weights():
    states = {v: build_model(TINY, v, 4, seed=5).state_dict() for v in VARIANTS}
    ref = states["sparsek"]
    for variant, state in states.items():
        common = [k for k in ref if k in state]
        assert len(common) >= len(ref) - 3, variant  # only the scorer may be renamed (frozen wrapper)
        for k in common:
            assert torch.equal(ref[k], state[k]), (variant, k)


def test_window_attention_sees_exactly_its_budget():
    torch.manual_seed(0)
    budget, S, i = 5, 20, 15
    layer = MaskedSelfAttention(8, 2, budget=budget)
    x = torch.randn(1, S, 8)
    base = layer(x)[0, i]
    for j in range(S):
        y = x.clone()
        y[0, j] += 1.0
        changed = not torch.allclose(layer(y)[0, i], base)
        assert changed == (i - budget < j <= i), j


def test_fact_score_auc_bounds():
    from sparsek.learn.train import _fact_score_auc

    task = RetrievalTask(seq_len=48, num_facts=4, num_queries=2, num_keys=6, num_values=5, num_filler=4)
    batch = task.sample(4, 0)
    facts = (batch.tokens >= task.value_start).double().unsqueeze(1)  # (B, 1, S)
    assert _fact_score_auc(facts, batch, task) == 1.0
    assert _fact_score_auc(-facts, batch, task) == 0.0
    assert _fact_score_auc(torch.zeros_like(facts), batch, task) == 0.5


def test_frozen_scorer_gets_no_gradient():
    model = build_model(TINY, "sparsek-frozen", 2, seed=0)
    scorer = model.scorers()[0]
    assert isinstance(scorer, FrozenScorer)
    assert not any(p.requires_grad for p in scorer.parameters())
    _, diag = train_model(TINY, "sparsek-frozen", 2, seed=0)
    assert diag["scorer_grad_norm"] == 0.0 and diag["scorer_change"] == 0.0


# ------------------------------------------------------------------------------------------
# gradients end to end
# ------------------------------------------------------------------------------------------


def test_scorer_gradient_matches_finite_differences():
    """Through the whole model (embeddings, SparseK op, head) in float64: the analytic gradient
    of the loss along a random direction of the scorer's weights equals the central difference.
    The step is small enough that no selection changes (the loss is smooth in between)."""
    task = RetrievalTask(seq_len=40, num_facts=4, num_queries=2, num_keys=6, num_values=6, num_filler=4)
    torch.manual_seed(1)
    model = RetrievalModel(task.vocab_size, variant="sparsek", topk=3, window=2, d_model=16).double()
    batch = task.sample(3, 2)
    scorer = model.scorers()[0]
    with torch.no_grad():
        # Spread the scores so that many gates are soft (0 < g < 1).
        scorer.proj.weight.mul_(4.0)
        # The model has no position embedding, so a repeated (previous, current) token pair
        # has the very same hidden state and score. Such exact ties sit on a kink of the loss
        # (the tie rule picks the later key; a rounding-level change of the weights flips it),
        # where a central difference averages two one-sided slopes. A position slope makes
        # every score distinct by far more than the step below.
        scorer.slope.fill_(4.0)

    def loss():
        logits = model(batch.tokens)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)

    params = list(scorer.parameters())
    grads = torch.autograd.grad(loss(), params)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = float(loss())
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = float(loss())
    numeric = (up - down) / (2 * eps)
    assert math.isclose(analytic, numeric, rel_tol=1e-4, abs_tol=1e-8), (analytic, numeric)


def test_scorer_receives_gradient_and_moves_in_training():
    model0 = build_model(TINY, "sparsek", 2, seed=0)
    w0 = model0.scorers()[0].proj.weight.detach().clone()
    model, diag = train_model(TINY, "sparsek", 2, seed=0)
    assert diag["scorer_grad_norm"] > 0
    assert diag["scorer_change"] > 0
    assert not torch.equal(model.scorers()[0].proj.weight.detach(), w0)


# ------------------------------------------------------------------------------------------
# training loop and benchmark entry points
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_result():
    return {"case": "learn-tiny", **run(TINY, log=None)}


def test_run_smoke(tiny_result):
    result = tiny_result
    runs = result["runs"]
    assert len(runs) == 3 * len(TINY.topks) + 1  # dense once per seed
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"])
        assert r["steps"] == TINY.steps and r["seed"] == 0
        assert len(r["curve"]) == TINY.steps
    assert {(r["variant"], r["topk"]) for r in result["summary"]} == {(v, k) for v in VARIANTS for k in TINY.topks}
    assert result["config"]["task"]["seq_len"] == TINY_TASK.seq_len


def test_run_is_deterministic():
    cfg = replace(TINY, variants=("sparsek",), topks=(2,))
    a, b = run(cfg, log=None), run(cfg, log=None)
    assert a["runs"][0]["loss"] == b["runs"][0]["loss"]
    assert a["runs"][0]["curve"] == b["runs"][0]["curve"]


def test_table_and_doc_come_from_the_results(tiny_result):
    from sparsek.learn.plot import markdown_table, markers, update_doc

    table = markdown_table(tiny_result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(TINY.topks) * len(VARIANTS)  # dense repeated as every budget's ceiling
    assert f"{TINY.steps} steps" in table and "seeds 0" in table
    begin, end = markers(tiny_result["case"])
    other = "\n".join(markers("learn-other"))  # another case's table stays as it is
    doc = f"# title\n\nprose\n\n{begin}\nold table\n{end}\n\n{other}\nmore prose\n"
    new = update_doc(doc, tiny_result)
    assert "old table" not in new and table in new
    assert new.startswith("# title\n\nprose\n") and new.endswith(f"\n{other}\nmore prose\n")
    assert update_doc(new, tiny_result) == new
    with pytest.raises(ValueError, match="markers"):
        update_doc("no markers", tiny_result)


def test_compact_table(tiny_result):
    from sparsek.learn.plot import compact_table

    lines = compact_table(tiny_result).splitlines()
    assert len(lines) == 2 + len(TINY.topks)
    assert lines[2].startswith(f"| {TINY.topks[0] + TINY.window} | ") and lines[2].count("%") == len(VARIANTS)


def test_plot_writes_a_png(tiny_result, tmp_path):
    if os.environ.get("CI") != "true":  # the test extra installs matplotlib: in CI its absence fails
        pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[test]')")
    from sparsek.learn.plot import plot

    path = tmp_path / "learn.png"
    plot(tiny_result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_case_registry():
    from sparsek.learn.bench import CASES, case_config

    assert set(CASES) == {"learn-quick", "learn-cpu", "learn-full", "learn-4k", "learn-1k", "learn-1k-select"}
    real = CASES["learn-4k"]  # the real-length case: K + W at most 10% of the context, >= 3 seeds, on the kernels
    assert (real.topks[0] + real.window) * 10 <= real.task.seq_len >= 4096 and len(real.seeds) >= 3
    assert real.precision == "bfloat16" and real.d_model // real.num_heads in (64, 128)
    # learn-1k: the same task, model and relative budget at a quarter of the length, trained longer
    short = CASES["learn-1k"]
    assert short.task.seq_len * 4 == real.task.seq_len and short.steps > real.steps
    assert (short.topks[0] + short.window) * real.task.seq_len == (real.topks[0] + real.window) * short.task.seq_len
    assert short.short_steps == real.short_steps and short.d_model == real.d_model
    for cfg in (real, short):  # the curriculum's short phase is covered by the budget: every variant computes the same
        assert cfg.topks[0] + cfg.window >= cfg.short_task.seq_len
    select = CASES["learn-1k-select"]  # ... except in learn-1k-select, whose short phase is learn-4k's
    assert select.short_task == real.short_task and select.topks[0] + select.window < select.short_task.seq_len
    assert replace(select, short_task=short.short_task) == short
    assert case_config("learn-quick", quick=True).seeds == CASES["learn-quick"].seeds[:1]
    for cfg in CASES.values():
        assert cfg.task.num_facts <= max(cfg.topks)  # the largest budget can hold every fact
    with pytest.raises(ValueError, match="learn case"):
        case_config("learn-nope")


def test_asv_class_reads_the_cached_results(monkeypatch):
    from benchmarks import bench_learn
    from sparsek.learn.bench import CASES

    bench = bench_learn.LearnErrorRate()
    assert bench.track_error_rate.unit == "error rate"
    assert bench.params == [list(CASES), list(VARIANTS)]
    rates = {"learn-quick": {"sparsek": 0.25}}
    bench.setup(rates, "learn-quick", "sparsek")
    assert bench.track_error_rate(rates, "learn-quick", "sparsek") == 0.25
    with pytest.raises(NotImplementedError, match="SPARSEK_ASV_CASES=learn-full"):
        bench.setup(rates, "learn-full", "sparsek")
    with pytest.raises(NotImplementedError):
        bench.setup(rates, "learn-quick", "window")


def test_asv_planned_cases(monkeypatch):
    from benchmarks import bench_learn

    monkeypatch.delenv("SPARSEK_ASV_CASES", raising=False)
    assert bench_learn._planned_cases() == ["learn-quick"]
    monkeypatch.setenv("SPARSEK_ASV_CASES", "cpu-smoke")  # the other classes' cases only
    assert bench_learn._planned_cases() == []
    monkeypatch.setenv("SPARSEK_ASV_CASES", "seed, learn-full,learn-cpu")
    assert bench_learn._planned_cases() == ["learn-full", "learn-cpu"]
    monkeypatch.setenv("SPARSEK_ASV_CASES", "learn-nope")
    with pytest.raises(ValueError, match="learn-nope"):
        bench_learn._planned_cases()


@pytest.mark.slow
def test_learn_quick_case_learns(tmp_path):
    """The quick setting as CI runs it, through ``sparsek-bench run --case learn-quick --quick``
    (one seed, about a minute on a CPU core). It is the end-to-end test of the gradients: a
    scorer that gets no useful gradient stays at the frozen scorer's accuracy. The margins are
    wide (seed 0 measured: SparseK 92%, frozen 20%, window 5%, dense 100% at K + W = 12) so
    that rounding differences between CPUs cannot flip them."""
    import json

    from sparsek.bench import cli
    from sparsek.learn.bench import CASES

    path = tmp_path / "learn.json"
    # One thread: these tensors are far too small to gain from two, and on a busy 2-core CI box
    # two OpenMP threads that wait on each other made this test ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["run", "--case", "learn-quick", "--quick", "--no-progress", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (record,) = json.loads(path.read_text())["records"]
    assert record["status"] == "ok", record.get("reason")
    assert record["seeds"] == [0]
    cfg = CASES["learn-quick"]
    top = max(cfg.topks) + cfg.window
    acc = {v: record["variants"][v]["budgets"][str(top)]["accuracy"] for v in VARIANTS}
    assert acc["dense"] >= 0.9, acc
    assert acc["sparsek"] >= 0.6, acc
    assert acc["sparsek"] >= acc["window"] + 0.3, acc
    assert acc["sparsek"] >= acc["sparsek-frozen"] + 0.3, acc


def test_bfloat16_precision_trains_under_autocast():
    """precision="bfloat16" runs the model under autocast (the CUDA kernels' dtype on a GPU);
    on the CPU the reference takes the bf16 q/k/v with the scorer's float32 scores."""
    from sparsek.learn.train import attention_path

    cfg = replace(TINY, variants=("sparsek",), topks=TINY.topks[:1], steps=3, precision="bfloat16", device="cpu")
    result = run(cfg, log=None)
    assert result["attention_path"] == attention_path(cfg) == "reference: not a CUDA device"
    r = result["runs"][0]
    assert math.isfinite(r["loss"]) and r["scorer_grad_norm"] > 0
    with pytest.raises(ValueError, match="precision"):
        replace(TINY, precision="float16")


def test_fact_auc_equals_all_pairs_count():
    """The row-wise fact AUC equals the probability over all (fact, non-fact) pairs of a row."""
    from types import SimpleNamespace

    from sparsek.learn.train import _fact_score_auc

    task = TINY_TASK
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, task.vocab_size, (3, task.seq_len), generator=g)
    scores = torch.randint(0, 4, (3, 1, task.seq_len), generator=g).float()  # ties on purpose
    L = task.context_len
    u, fact = scores[:, 0, :L], tokens[:, :L] >= task.value_start
    won = pairs = 0.0
    for b in range(3):
        for i in range(L):
            for j in range(L):
                if fact[b, i] and not fact[b, j]:
                    won += 1.0 if u[b, i] > u[b, j] else 0.5 if u[b, i] == u[b, j] else 0.0
                    pairs += 1
    assert _fact_score_auc(scores, SimpleNamespace(tokens=tokens), task) == pytest.approx(won / pairs, abs=1e-12)


def test_curriculum_trains_short_then_long():
    """short_task/short_steps: the first steps see the short task, the rest the task; the
    schedule spans both; ms per step and the first scorer gradient belong to the long phase."""
    short = replace(TINY_TASK, seq_len=TINY_TASK.seq_len // 2)
    cfg = replace(TINY, variants=("sparsek",), topks=TINY.topks[:1], steps=3, short_task=short, short_steps=2, device="cpu")
    r = run(cfg, log=None)["runs"][0]
    assert [c["seq_len"] for c in r["curve"]] == [short.seq_len] * 2 + [TINY_TASK.seq_len] * 3
    assert r["short_train_s"] > 0 and r["train_s"] > 0 and r["scorer_grad_norm"] is not None
    with pytest.raises(ValueError, match="go together"):
        replace(TINY, short_task=short)
    with pytest.raises(ValueError, match="vocabulary"):
        replace(TINY, short_task=replace(short, num_values=TINY_TASK.num_values + 1), short_steps=1)
