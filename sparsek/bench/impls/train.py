"""One training step of attention, built the same way for every adapter that has a backward.

An adapter describes its step with a ``TrainStep``: the leaves (the inputs that get gradients,
in the adapter's own layout, made in prepare), the differentiable forward over them, and the
fixed upstream gradient in the layout of that forward's output. ``prepared`` turns it into the
timed call

    torch.autograd.grad(forward(*leaves), leaves, grad_out)

``autograd.grad`` returns fresh gradient tensors and never accumulates into ``.grad``, so every
timed call does the same work with no zeroing step between calls (``.backward()`` would add
into ``.grad``, and resetting it would be extra work inside or around the timed region). The
fixed ``grad_out`` is drawn once with the case's inputs: a backward cannot shortcut a zero or
all-ones gradient, and every implementation differentiates the same loss.

The call enables grad itself, so it runs the same under the harness's ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .base import Prepared


def leaf(t: Tensor) -> Tensor:
    """A gradient-carrying alias of an input (same storage, no copy)."""
    return t.detach().requires_grad_()


@dataclass
class TrainStep:
    """What one adapter's training step differentiates.

    leaves: input name ("q", "k", "v", "scores") -> leaf tensor in the adapter's layout.
    forward: forward(*leaves.values()) -> the attention output in the adapter's layout.
    grad_out: the fixed upstream gradient, in the layout of forward's output.
    to_sdpa: input name -> function from that leaf's gradient to the inputs' layout
        (q (B, Hq, S, D), k and v (B, Hkv, S, D), scores (B, Hkv, S)); identity when absent.
    notes: facts a reader of the results needs (what the timed call includes).
    """

    leaves: dict[str, Tensor]
    forward: Callable[..., Tensor]
    grad_out: Tensor
    to_sdpa: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def prepared(step: TrainStep) -> Prepared:
    """The timed step (returns the gradients in leaf order) and its gradients by name for the check."""
    names = tuple(step.leaves)
    leaves = tuple(step.leaves.values())
    forward, grad_out = step.forward, step.grad_out
    for name, t in step.leaves.items():
        if not t.requires_grad:
            raise ValueError(f"TrainStep leaf {name!r} does not require grad; make it with train.leaf()")

    def fn():
        with torch.enable_grad():
            return torch.autograd.grad(forward(*leaves), leaves, grad_out)

    def grads() -> dict[str, Tensor]:
        return {name: step.to_sdpa.get(name, _same)(g) for name, g in zip(names, fn())}

    return Prepared(fn=fn, output_fn=grads, notes=list(step.notes))


def _same(t: Tensor) -> Tensor:
    return t
