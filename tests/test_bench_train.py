"""Training-step cases (train-*): the registry, the step's FLOP count, gradients of the train
adapters against independent float64 references, the bounded gradient check of long cases,
T1-train/T2-train, and one CPU run end to end through the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import fake_xformers
from sparsek import reference, selection
from sparsek.bench import cli, metrics, results, runner, tiers
from sparsek.bench import impls as registry
from sparsek.bench.cases import CASES, DEFAULT_CASES, TRAIN_SHAPES, Case, make_inputs
from sparsek.bench.impls import grad_reference, train
from tolerances import ATOL, RTOL

SMOKE = CASES["train-cpu-smoke"]
TRAIN_IDS = {"sparsek", "sparsek-ref", "flex-sparsek", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
             "flex-causal", "flex-window", "xformers-cutlass", "xformers-flash", "xformers-flash3", "xformers-local"}
FAST = ["--quick", "--min-samples", "3", "--max-time", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def smoke_inputs():
    return make_inputs(SMOKE)


# ---------------------------------------------------------------------------------------------
# cases and registry


def test_train_cases_take_the_forward_shapes():
    for name, shape in (("train-seed", "seed"), ("train-16k", "long-16k"), ("train-64k", "long-64k")):
        c, f = CASES[name], CASES[shape]
        assert c.kind == "train" and c.device == "cuda" and TRAIN_SHAPES[name] == shape
        assert dataclasses.replace(c, name=f.name, kind=f.kind, seed=f.seed) == f
    seed = CASES["train-seed"]
    assert (seed.batch, seed.q_heads, seed.kv_heads, seed.seq_len, seed.head_dim, seed.dtype, seed.topk,
            seed.window) == (16, 96, 96, 4096, 128, "float16", 512, 256)
    long = CASES["train-64k"]
    assert (long.batch, long.q_heads, long.kv_heads, long.seq_len, long.head_dim, long.dtype, long.topk,
            long.window) == (1, 32, 8, 65536, 128, "bfloat16", 2048, 512)
    assert SMOKE.device == "cpu" and SMOKE.dtype == "float32" and SMOKE.kind == "train"
    assert {"train-seed", "train-16k", "train-64k"} <= set(DEFAULT_CASES["cuda"])
    assert "train-cpu-smoke" in DEFAULT_CASES["cpu"]


def test_default_run_includes_the_train_cases(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert {"train-seed", "train-16k", "train-64k"} <= set(runner.default_cases())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "train-cpu-smoke" in runner.default_cases()


def test_train_inputs_carry_a_fixed_nonzero_upstream_gradient(smoke_inputs):
    x, again = smoke_inputs, make_inputs(SMOKE)
    assert x.grad_out.shape == x.q.shape == (1, 4, 256, 32) and x.k.shape == (1, 2, 256, 32)
    assert bool((x.grad_out != 0).all()) and not torch.equal(x.grad_out, torch.ones_like(x.grad_out))
    assert torch.equal(x.grad_out, again.grad_out)  # drawn from the case seed
    assert SMOKE.input_bytes() == sum(t.numel() * t.element_size() for t in x.tensors().values())
    assert make_inputs(CASES["cpu-smoke"]).grad_out is None


def test_registry_lists_the_train_adapters():
    assert {i.id for i in registry.impls_for(SMOKE)} == TRAIN_IDS
    for impl in registry.IMPLS.values():
        assert ("train" in impl.kinds) == (impl.id in TRAIN_IDS), impl.id
    reason = registry.get_impl("sparsek-decode").available(SMOKE)
    assert reason.startswith("sparsek-decode has no backward here")


def test_unavailable_train_baselines_carry_reasons(monkeypatch):
    avail = {i.id: i.available(SMOKE) for i in registry.impls_for(SMOKE)}
    assert avail["sparsek-ref"] is None and avail["sdpa-math"] is None and avail["sdpa-flash"] is None
    assert "runs on CUDA only" in avail["sparsek"]  # the public op would time the reference on a CPU
    for i in ("flex-causal", "flex-window", "flex-sparsek", "xformers-cutlass", "xformers-local"):
        assert "runs on CUDA only" in avail[i], i
    assert "no CPU kernel" in avail["sdpa-cudnn"] and "no CPU kernel" in avail["sdpa-efficient"]
    if not torch.cuda.is_available():
        for name in ("train-seed", "train-16k", "train-64k"):
            for impl in registry.impls_for(CASES[name]):
                reason = impl.available(CASES[name])
                assert isinstance(reason, str) and reason, (name, impl.id)
    # the math backend's training step keeps four S x S matrices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 2**30, 80 * 2**30))
    reason = registry.get_impl("sdpa-math").available(CASES["train-16k"])
    assert reason.startswith("the math backend's four S x S matrices needs about 128.0 GiB; 80.0 GiB is free")
    assert "correctness oracle" in registry.get_impl("sparsek-ref").available(CASES["train-seed"])


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_step_flops_on_a_hand_counted_example():
    c = Case("t", "train", 1, 2, 1, 6, 4, "float32", 2, 2, "cpu", 0)
    # sparsek: window min(2, i+1) = 1,2,2,2,2,2 (11); candidates n_i = 0,0,1,2,3,4 -> min(2, n_i) = 0,0,1,2,2,2 (7)
    assert metrics.attended_pairs(c, "sparsek") == 18
    forward = 4 * 1 * 2 * 4 * 18  # 4·B·Hq·D per attended pair = 576
    assert metrics.flops(dataclasses.replace(c, kind="prefill"), "sparsek") == forward == 576
    assert metrics.flops(c, "sparsek") == 2016 == 3.5 * forward  # + backward 10·B·Hq·D per pair (2.5x)
    assert metrics.flops(c, "dense-causal") == 14 * 8 * 21  # 21 causal pairs
    assert metrics.dense_equivalent_flops(c) == 14 * 8 * 21
    assert metrics.STEP_FLOPS_PER_PAIR == 3.5 * metrics.FORWARD_FLOPS_PER_PAIR
    d = metrics.derive(c, "sparsek", 2e-3, {"matmul": {"tflops": 1e-6}})
    assert d["ms_per_step"] == pytest.approx(2.0) and d["flops_effective"] == 2016
    assert d["tflops_effective"] == pytest.approx(2016 / 2e-3 / 1e12)
    assert d["pct_peak_tflops"] == pytest.approx(100 * 2016 / 2e-3 / 1e12 / 1e-6)
    assert "2.5x" in d["flop_convention"]
    assert "ms_per_step" not in metrics.derive(dataclasses.replace(c, kind="prefill"), "sparsek", 1e-3, None)


# ---------------------------------------------------------------------------------------------
# the timed step


def test_the_step_returns_fresh_gradients_and_accumulates_nothing():
    torch.manual_seed(0)
    x = train.leaf(torch.randn(3, 4))
    w = torch.randn(4, 2)
    g = torch.randn(3, 2)
    prepared = train.prepared(train.TrainStep(leaves={"q": x}, forward=lambda t: (t @ w).tanh(), grad_out=g))
    with torch.no_grad():  # the harness's mode: the step enables grad itself
        first, second = prepared.fn(), prepared.fn()
    assert torch.equal(first[0], second[0]) and first[0] is not second[0]
    assert x.grad is None
    assert set(prepared.output()) == {"q"}
    with pytest.raises(ValueError, match="does not require grad"):
        train.prepared(train.TrainStep(leaves={"q": torch.randn(3, 4)}, forward=lambda t: t, grad_out=g))


# ---------------------------------------------------------------------------------------------
# gradients against independent float64 references (the (S, S) formulations)


def _f64(x):
    return {n: getattr(x, n).detach().to(torch.float64).requires_grad_() for n in ("q", "k", "v")}


def dense_grads(case, x, span=None):
    """Autograd through SDPA in float64, causal (and a window of ``span`` keys)."""
    t = _f64(x)
    i = torch.arange(case.seq_len).view(-1, 1)
    j = torch.arange(case.seq_len).view(1, -1)
    mask = (j <= i) if span is None else (j <= i) & (j > i - span)
    out = F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=mask, scale=case.scale, enable_gqa=True)
    return dict(zip(t, torch.autograd.grad(out, tuple(t.values()), x.grad_out.to(torch.float64))))


def sparsek_grads(case, x):
    """The exact dense backward of sparsek.reference (backward_dense), in float64."""
    q, k, v = (getattr(x, n).to(torch.float64) for n in ("q", "k", "v"))
    sel = selection.select(x.scores, case.topk, case.window)
    u = x.scores.to(torch.float64)
    out, lse = reference.attention_dense(q, k, v, u, case.topk, case.window, case.scale, sel)
    dq, dk, dv, du = reference.backward_dense(x.grad_out.to(torch.float64), q, k, v, u, out, lse, sel, case.scale)
    return {"q": dq, "k": dk, "v": dv, "scores": du}


def _assert_grads(got, want, dtype):
    for name, g in got.items():
        torch.testing.assert_close(g.to(torch.float64), want[name], atol=ATOL[dtype], rtol=RTOL[dtype],
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("impl_id,ref", [("sdpa-math", "dense"), ("sdpa-flash", "dense"), ("sparsek-ref", "sparsek")])
def test_cpu_train_adapters_match_the_reference(impl_id, ref, smoke_inputs):
    impl = registry.get_impl(impl_id)
    assert impl.available(SMOKE) is None
    with torch.no_grad():
        grads = impl.prepare(SMOKE, smoke_inputs).output()
    want = dense_grads(SMOKE, smoke_inputs) if ref == "dense" else sparsek_grads(SMOKE, smoke_inputs)
    assert set(grads) == ({"q", "k", "v", "scores"} if ref == "sparsek" else {"q", "k", "v"})
    _assert_grads(grads, want, torch.float32)


def test_the_public_op_adapter_differentiates_q_k_v_and_scores(monkeypatch, smoke_inputs):
    # On a CPU the op runs the reference, so the adapter refuses it; with the refusal lifted the
    # step (public op + its registered autograd) must give the exact gradients.
    import sparsek._cuda

    monkeypatch.setattr(sparsek._cuda, "unsupported_reason", lambda *a: None)
    with torch.no_grad():
        prepared = registry.get_impl("sparsek").prepare(SMOKE, smoke_inputs)
        grads = prepared.output()
    assert any("registered autograd" in n for n in prepared.notes)
    _assert_grads(grads, sparsek_grads(SMOKE, smoke_inputs), torch.float32)


def test_sdpa_expands_kv_heads_inside_the_step_when_a_backend_rejects_gqa(monkeypatch, smoke_inputs):
    impl = registry.get_impl("sdpa-math")
    monkeypatch.setattr(impl, "_mode", lambda case: ("expand", "kv heads repeated inside the step (test)"))
    with torch.no_grad():
        prepared = impl.prepare(SMOKE, smoke_inputs)
        grads = prepared.output()
    assert prepared.notes == ["kv heads repeated inside the step (test)"]
    assert grads["k"].shape == (1, 2, 256, 32)  # the gradients reach the Hkv heads
    _assert_grads(grads, dense_grads(SMOKE, smoke_inputs), torch.float32)


@pytest.mark.parametrize("impl_id,span", [("xformers-cutlass", None), ("xformers-local", "budget")])
def test_xformers_train_step_layout_gqa_and_operators(monkeypatch, impl_id, span, smoke_inputs):
    calls = []
    fake_xformers.install(monkeypatch, calls=calls)
    impl = registry.get_impl(impl_id)
    assert impl.probe(SMOKE, "cpu") is None  # the train probe: forward and backward
    with torch.no_grad():
        prepared = impl.prepare(SMOKE, smoke_inputs)
        grads = prepared.output()
    assert calls[-1] == (("cutlass-fw", "cutlass-bw") if impl_id == "xformers-cutlass" else None)
    assert {n: tuple(g.shape) for n, g in grads.items()} == {"q": (1, 4, 256, 32), "k": (1, 2, 256, 32),
                                                             "v": (1, 2, 256, 32)}
    assert any("GQA" in n for n in prepared.notes)
    want = dense_grads(SMOKE, smoke_inputs, None if span is None else SMOKE.key_budget)
    _assert_grads(grads, want, torch.float32)


# ---------------------------------------------------------------------------------------------
# the bounded gradient check


MID = Case("t-mid", "train", 1, 4, 2, 1024, 16, "float32", 64, 32, "cpu", 11)


@pytest.mark.parametrize("pattern", ["dense-causal", "window", "sparsek"])
def test_reference_gradients_are_exact_on_their_subset(monkeypatch, pattern):
    monkeypatch.setattr(grad_reference, "GRAD_MAX_PAIRS", 1 << 16)  # force the subset at S = 1024
    x = make_inputs(MID)
    subset = grad_reference.grad_subset(MID, pattern)
    if pattern == "sparsek":
        assert subset.rows is None and subset.key_ranges is None  # always the whole slice
        full = sparsek_grads(MID, x)
    else:
        assert subset.rows is not None and subset.key_ranges is not None
        full = dense_grads(MID, x, MID.key_budget if pattern == "window" else None)
    if pattern == "dense-causal":
        assert subset.key_ranges == ((1024 - 128, 1024),)  # the tail: every query attending it is computed
    if pattern == "window":
        assert subset.key_ranges == ((0, 128), (512, 640), (896, 1024))
    ref = grad_reference.reference_grads(MID, x, pattern, subset)
    want = grad_reference.take(MID, full, subset)
    assert set(ref) == set(want)
    for name in ref:
        assert ref[name].dtype == torch.float64  # float64 on the CPU
        torch.testing.assert_close(ref[name], want[name], atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")
    assert subset.describe()["batch"] == 0 and subset.describe()["q_heads"] == [0, 2]


def test_long_cases_check_a_bounded_subset():
    budget = grad_reference.GRAD_MAX_PAIRS
    for name in ("train-16k", "train-64k"):
        c = CASES[name]
        S = c.seq_len
        dense = grad_reference.grad_subset(c, "dense-causal")
        (tail,) = dense.key_ranges
        assert tail[1] == S and c.group * (tail[1] - tail[0]) * S <= budget
        assert len(dense.rows) <= (tail[1] - tail[0]) + 32
        window = grad_reference.grad_subset(c, "window")
        if c.group * metrics.attended_pairs(c, "window") <= budget:
            assert window.rows is None and window.key_ranges is None
        else:
            assert len(window.key_ranges) == 3 and len(window.rows) <= 3 * (128 + c.key_budget) + 32
        whole = grad_reference.grad_subset(c, "sparsek")
        assert whole.rows is None and whole.describe()["q_heads"] == [0, c.group]
    assert grad_reference.grad_subset(CASES["train-64k"], "window").key_ranges is not None
    seed = CASES["train-seed"]
    assert grad_reference.grad_subset(seed, "dense-causal").rows is None  # one head of 4096: all of it


def test_wrong_gradient_shapes_are_named():
    grads = {"q": torch.zeros(1, 4, 256, 32), "k": torch.zeros(1, 4, 256, 32)}
    subset = grad_reference.grad_subset(SMOKE, "dense-causal")
    with pytest.raises(ValueError, match=r"gradient 'k' has shape \(1, 4, 256, 32\), expected \(1, 2, 256, 32\)"):
        grad_reference.take(SMOKE, grads, subset)


def test_grad_error_scales_atol_with_the_gradient():
    ref = {"k": torch.tensor([100.0, 0.0])}
    ok = metrics.grad_error_stats({"k": torch.tensor([100.0, 0.05])}, ref, "bfloat16")  # 0.05 <= 1.6e-2 * 100
    assert ok["passed"] and ok["grads"]["k"]["atol"] == pytest.approx(1.6)
    bad = metrics.grad_error_stats({"k": torch.tensor([100.0, 0.05])}, {"k": torch.tensor([1.0, 0.0])}, "bfloat16")
    assert not bad["passed"] and bad["max_abs"] == pytest.approx(99.0)


# ---------------------------------------------------------------------------------------------
# tiers


def rec(case, impl, ms=None, status="ok", passed=True, reason=None):
    c = CASES[case]
    r = {"case": case, "impl": impl, "kind": c.kind, "case_spec": asdict(c), "status": status, "reason": reason}
    if status == "ok":
        r["timing"] = {"median": ms * 1e-3, "samples": [ms * 1e-3] * 3}
        r["error"] = {"passed": passed, "max_abs": 1e-3 if passed else 0.5, "atol": 1.6e-2}
    return r


def _rows(d, tier):
    return [r for r in tiers.assess({"records": d}) if r["tier"] == tier]


def test_train_tiers_from_synthetic_results():
    d = [rec("train-16k", "sparsek", 100.0), rec("train-16k", "sdpa-cudnn", 50.0), rec("train-16k", "sdpa-flash", 80.0),
         rec("train-16k", "flex-window", 10.0), rec("train-16k", "flex-sparsek", 200.0),
         rec("train-64k", "sparsek", 100.0), rec("train-64k", "sdpa-cudnn", 300.0, passed=False),
         rec("train-64k", "sdpa-flash", 400.0), rec("train-64k", "flex-window", 5.0, passed=False),
         rec("train-64k", "flex-sparsek", 150.0),
         rec("long-16k", "sparsek", 4.0), rec("long-16k", "sdpa-cudnn", 3.0)]
    t1 = {r["case"]: r for r in _rows(d, "T1-train")}
    t2 = {r["case"]: r for r in _rows(d, "T2-train")}
    assert set(t1) == set(t2) == {"train-16k", "train-64k"}  # forward cases are not train tiers' business
    assert t1["train-16k"]["baseline"] == "sdpa-cudnn" and t1["train-16k"]["speedup"] == pytest.approx(0.5)
    assert t1["train-16k"]["status"] == "fail" and t2["train-16k"]["baseline"] == "flex-window"
    # gradients that failed their check neither set nor clear a bar
    assert t1["train-64k"]["baseline"] == "sdpa-flash" and t1["train-64k"]["status"] == "pass"
    assert t1["train-64k"]["speedup"] == pytest.approx(4.0) and "error check" in t1["train-64k"]["excluded"]["sdpa-cudnn"]
    assert t2["train-64k"]["baseline"] == "flex-sparsek" and t2["train-64k"]["speedup"] == pytest.approx(1.5)
    (t1_forward,) = _rows(d, "T1")
    assert t1_forward["case"] == "long-16k"
    none = _rows([rec("train-16k", "sparsek", status="skipped", reason="no kernels"),
                  rec("train-16k", "sdpa-cudnn", 50.0)], "T1-train")[0]
    assert none["status"] == "not measurable" and "no kernels" in none["reason"]


# ---------------------------------------------------------------------------------------------
# the CPU train case end to end


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "train.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["run", "--case", "cpu-smoke,train-cpu-smoke", "--impl", "sparsek,sparsek-ref,sdpa-math,flex-window",
                       "--json", str(path), *FAST])
    return rc, path, out.getvalue()


def test_cpu_train_case_runs_through_the_cli(train_run):
    rc, path, _ = train_run
    assert rc == 0
    doc = results.load_results(path)
    recs = {r["impl"]: r for r in doc["records"] if r["case"] == "train-cpu-smoke"}
    assert {i: r["status"] for i, r in recs.items()} == {"sparsek": "skipped", "sparsek-ref": "ok", "sdpa-math": "ok",
                                                         "flex-window": "skipped"}
    assert "CUDA only" in recs["flex-window"]["reason"]
    for impl, pattern in (("sparsek-ref", "sparsek"), ("sdpa-math", "dense-causal")):
        r = recs[impl]
        assert r["kind"] == "train" and r["pattern"] == pattern
        m, t = r["metrics"], r["timing"]
        assert m["ms_per_step"] == pytest.approx(t["median"] * 1e3)
        assert m["flops_effective"] == metrics.flops(SMOKE, pattern) == 3.5 * metrics.flops(CASES["cpu-smoke"], pattern)
        assert m["tflops_effective"] == pytest.approx(m["flops_effective"] / t["median"] / 1e12)
        assert m["pct_peak_tflops"] is not None
        err = r["error"]
        assert err["passed"] and err["subset"]["dq_rows"] == "all" and err["against"] == f"{pattern} reference gradients"
    assert set(recs["sparsek-ref"]["error"]["grads"]) == {"q", "k", "v", "scores"}
    assert set(recs["sdpa-math"]["error"]["grads"]) == {"q", "k", "v"}
    t1 = [r for r in doc["tiers"] if r["tier"] == "T1-train"]
    assert len(t1) == 1 and t1[0]["case"] == "train-cpu-smoke" and t1[0]["baseline"] == "sdpa-math"
    # on a CPU the op runs its reference: the tier is computed with it, as a pipeline check
    assert t1[0]["status"] in ("pass", "fail") and t1[0]["subject"] == "sparsek-ref" and t1[0]["pipeline_check"]


def test_report_shows_the_training_table_beside_the_forward(train_run, capsys):
    _, path, out = train_run
    assert "== train-cpu-smoke: train B1 Hq4 Hkv2 S256 D32 float32 topk32 window16 (cpu) ==" in out
    assert "ms/step" in out and "grad max abs err" in out and "TRAINING STEP beside the FORWARD" in out
    assert "T1-train" in out and "T2-train" in out
    assert cli.main(["report", "--results", str(path)]) == 0
    again = capsys.readouterr().out
    assert "TRAINING STEP beside the FORWARD" in again and "cpu-smoke" in again


# ---------------------------------------------------------------------------------------------
# asv


def test_asv_training_classes(monkeypatch):
    pytest.importorskip("asv_runner")
    from asv_runner.discovery import disc_benchmarks

    from benchmarks import _common

    found = {b.name: b for b in disc_benchmarks("benchmarks") if b.name.startswith("bench_train.")}
    for name in ("time", "tflops", "speedup", "error", "peak_memory"):
        assert f"bench_train.Train.track_{name}" in found
    time = found["bench_train.Train.track_time"]
    assert time.unit == "seconds" and time.version == _common.VERSION
    assert time._params == [[n for n, c in CASES.items() if c.kind == "train"], sorted(TRAIN_IDS, key=list(registry.IMPLS).index)]
    assert found["bench_train.TrainTiers.track_speedup"]._params[1] == ["T1-train", "T2-train"]
    assert time.setup_cache_key == found["bench_train.TrainTiers.track_speedup"].setup_cache_key
    monkeypatch.setattr(_common, "device_type", lambda: "cpu")
    assert _common.planned_cases("train") == ["train-cpu-smoke"] and _common.planned_cases("prefill") == ["cpu-smoke"]


def test_asv_train_measurement_reads_like_prefill(monkeypatch):
    from benchmarks import _common
    from benchmarks.bench_train import Train, TrainTiers

    monkeypatch.setenv(_common.ENV_CASES, "train-cpu-smoke")
    monkeypatch.setenv(_common.ENV_IMPLS, "sparsek,sdpa-math")
    monkeypatch.setenv(_common.ENV_QUICK, "1")
    cache = _common.measure_kind("train")
    bench = Train()
    bench.setup(cache, "train-cpu-smoke", "sdpa-math")
    samples = bench.track_time(cache, "train-cpu-smoke", "sdpa-math")
    assert samples["number"] == 1 and len(samples["samples"]) >= 3
    assert bench.track_tflops(cache, "train-cpu-smoke", "sdpa-math") > 0
    assert bench.track_speedup(cache, "train-cpu-smoke", "sdpa-math") == 1.0  # the only dense step
    with pytest.raises(NotImplementedError, match="CUDA only"):
        bench.setup(cache, "train-cpu-smoke", "sparsek")
    with pytest.raises(NotImplementedError, match="not measurable"):
        TrainTiers().setup(cache, "train-cpu-smoke", "T1-train")
