"""sparsek_attention's check_finite argument on the CPU: validated at the boundary, and the
reference path raises the clear error for non-finite scores whatever the argument (the device-side
NaN poisoning of the CUDA path is tested in tests/test_graph_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import sparsek
from conftest import attention_inputs


def _inputs():
    return attention_inputs(1, 4, 2, 24, 8, torch.float32)


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_check_finite_must_be_a_bool(value):
    q, k, v, u = _inputs()
    with pytest.raises(TypeError, match=r"sparsek_attention: check_finite must be a bool \(True or False\), got "
                                        + type(value).__name__):
        sparsek.sparsek_attention(q, k, v, u, topk=4, window=2, check_finite=value)


@pytest.mark.parametrize("check_finite", [True, False], ids=["check", "no-check"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_cpu_raises_for_non_finite_scores(check_finite, bad):
    q, k, v, u = _inputs()
    u[0, 1, 7] = bad
    with pytest.raises(ValueError, match=rf"sparsek_attention: scores must be finite, got {bad} at index \(0, 1, 7\)"):
        sparsek.sparsek_attention(q, k, v, u, topk=4, window=2, check_finite=check_finite)


def test_cpu_raises_with_the_old_switch(monkeypatch):
    monkeypatch.setenv("SPARSEK_SKIP_FINITE_CHECK", "1")
    q, k, v, u = _inputs()
    u[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="scores must be finite"):
        sparsek.sparsek_attention(q, k, v, u, topk=4, window=2)


def test_check_finite_does_not_change_the_result():
    q, k, v, u = _inputs()
    a = sparsek.sparsek_attention(q, k, v, u, topk=4, window=2)
    b = sparsek.sparsek_attention(q, k, v, u, topk=4, window=2, check_finite=False)
    assert torch.equal(a, b)


def test_op_takes_check_finite():
    q, k, v, u = _inputs()
    torch.library.opcheck(torch.ops.sparsek.attention_fwd.default, (q, k, v, u, 5, 3, 0.3, False))
    out = torch.ops.sparsek.attention_fwd(q, k, v, u, 5, 3, 0.3)[0]  # the default: True
    assert torch.equal(out, torch.ops.sparsek.attention_fwd(q, k, v, u, 5, 3, 0.3, False)[0])
