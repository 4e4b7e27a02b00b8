"""The kernel A/B harness (sparsek.bench.kernel_ab) on the CPU: switch parsing, the order in
which values are timed, the bitwise comparison, and that the environment is restored."""

from __future__ import annotations

import os

import pytest
import torch

from sparsek.bench import kernel_ab


def test_parse_switch():
    assert kernel_ab.parse_switch("SPARSEK_FWD_KERNEL=7,5") == ("SPARSEK_FWD_KERNEL", ["7", "5"])
    assert kernel_ab.parse_switch("SPARSEK_SELECT_BAND=rule,2048") == ("SPARSEK_SELECT_BAND", ["rule", "2048"])
    for bad in ("SPARSEK_FWD_KERNEL=7", "SPARSEK_FWD_KERNEL", "FWD_KERNEL=7,8", "SPARSEK_FWD_KERNEL=7,7", "SPARSEK_X=,"):
        with pytest.raises(ValueError, match="--switch must be SPARSEK_NAME=v1,v2"):
            kernel_ab.parse_switch(bad)


def test_values_take_turns_and_outputs_are_compared(monkeypatch):
    monkeypatch.setenv("SPARSEK_TEST_SWITCH", "original")
    seen = []

    def call():
        v = os.environ.get("SPARSEK_TEST_SWITCH", "<unset>")
        seen.append(("call", v))
        x = torch.arange(4.0)
        return (x + 1,) if v == "b" else (x,)

    def time_ms(fn):
        fn()
        seen.append(("time", os.environ.get("SPARSEK_TEST_SWITCH", "<unset>")))
        return {"a": 1.0, "b": 2.0, "<unset>": 3.0}[os.environ.get("SPARSEK_TEST_SWITCH", "<unset>")]

    out = kernel_ab.run_ab("SPARSEK_TEST_SWITCH", ["a", "b", "rule"], 2, call, time_ms)
    timed = [v for what, v in seen if what == "time"]
    assert timed == ["a", "b", "<unset>", "a", "b", "<unset>"]  # in turn, round after round
    assert out["a"]["ms"] == [1.0, 1.0] and out["b"]["ms"] == [2.0, 2.0] and out["rule"]["ms"] == [3.0, 3.0]
    assert out["a"]["bitwise_equal_to_first"] and out["rule"]["bitwise_equal_to_first"]
    assert out["b"]["bitwise_equal_to_first"] is False
    assert os.environ["SPARSEK_TEST_SWITCH"] == "original"  # restored


def test_selection_compare_tells_tau_bits_from_integers():
    # (B*H, n_blocks, cap) lists with counts (B*H, n_blocks); past its count a list is garbage
    tau, end = torch.tensor([0.5, 1.0]), torch.tensor([3, 4])
    keys, count = torch.tensor([[[0, 1, 77], [2, 99, 5]]]), torch.tensor([[2, 1]])
    other_tail = torch.tensor([[[0, 1, -4], [2, 12, 8]]])
    nudged = torch.nextafter(tau, torch.full_like(tau, 2.0))
    same = {"tau_bitwise_equal_to_first": True, "integers_equal_to_first": True}
    assert kernel_ab.selection_compare((tau, end, keys, count), (tau, end, keys, count)) == same
    assert kernel_ab.selection_compare((tau, end, other_tail, count), (tau, end, keys, count)) == same
    assert kernel_ab.selection_compare((nudged, end, keys, count), (tau, end, keys, count)) == {
        "tau_bitwise_equal_to_first": False, "integers_equal_to_first": True}
    assert not kernel_ab.selection_compare((tau, end + 1, keys, count), (tau, end, keys, count))["integers_equal_to_first"]
    changed = torch.tensor([[[0, 3, 77], [2, 99, 5]]])
    assert not kernel_ab.selection_compare((tau, end, changed, count), (tau, end, keys, count))["integers_equal_to_first"]


def test_switch_restored_after_a_failure(monkeypatch):
    monkeypatch.delenv("SPARSEK_TEST_SWITCH", raising=False)

    def call():
        raise RuntimeError("kernel fault")

    with pytest.raises(RuntimeError, match="kernel fault"):
        kernel_ab.run_ab("SPARSEK_TEST_SWITCH", ["a", "b"], 1, call, lambda fn: 0.0)
    assert "SPARSEK_TEST_SWITCH" not in os.environ


def test_cli_needs_a_gpu_and_checks_its_arguments(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_ab.main(["--switch", "SPARSEK_FWD_KERNEL=7,5"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--switch must be"):
        kernel_ab.main(["--switch", "SPARSEK_FWD_KERNEL=7"])
    with pytest.raises(SystemExit):
        kernel_ab.main(["--switch", "SPARSEK_FWD_KERNEL=7,5", "--rounds", "0"])


def test_relative_difference_of_gradients():
    a = (torch.tensor([1.0, -4.0]), torch.tensor([0.0, 0.0]))
    b = (torch.tensor([1.0, -4.0 + 0.04]), torch.tensor([0.0, 0.0]))
    assert kernel_ab.relative_difference(a, a) == {"max_rel_diff_to_first": 0.0}
    assert kernel_ab.relative_difference(a, b)["max_rel_diff_to_first"] == pytest.approx(0.04 / 3.96, rel=1e-4)


def test_shaped_scores_flat_and_constant():
    u = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(4))
    assert kernel_ab.shaped_scores(u, "case") is u
    flat = kernel_ab.shaped_scores(u, "flat")
    spread = flat.amax(-1) - flat.amin(-1)
    assert bool((spread > 0).all()) and bool((spread < 0.02).all())  # distinct, yet every key within 1 of the rest
    assert torch.equal(flat.argsort(dim=-1, stable=True), u.argsort(dim=-1, stable=True))  # the same order
    const = kernel_ab.shaped_scores(u, "constant")
    assert const.shape == u.shape and not bool(const.any())
    with pytest.raises(ValueError, match="--scores must be one of"):
        kernel_ab.shaped_scores(u, "peaky")
