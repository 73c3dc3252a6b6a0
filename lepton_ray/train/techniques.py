"""Training techniques as hooks into the loop (``loop.run_training``).

A technique changes what one training step does without the loop knowing which techniques
exist: adversarial training runs a second, perturbed forward/backward per micro-batch;
distillation adds a teacher term to the loss; AdaLoRA re-allocates its rank budget after
every optimizer step. Each is a :class:`Technique`; :class:`Techniques` runs several in the
order given, so they compose (for example FGM on a distilled student).

The loop calls, for every micro-batch::

    techniques.micro_step(model, forward_backward, sync)

where ``forward_backward(sync)`` runs the forward pass, the loss (through
``techniques.loss``), and the backward pass, with the gradient all-reduce on or off, and
returns the detached loss. A technique that needs more than one backward pass per
micro-batch (adversarial training) calls it more than once, syncing on the last call only.
After each optimizer step, before the gradients are cleared: ``techniques.after_step``.
At each evaluation the loop adds ``techniques.metrics()`` to what it reports (then
reset), so each technique's own loss terms reach MLflow and the console.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

ForwardBackward = Callable[[bool], torch.Tensor]


class Technique:
    """One technique's hooks; each default leaves the step as it is."""

    name = "technique"

    def micro_step(self, model, forward_backward: ForwardBackward, sync: bool) -> torch.Tensor:
        """Train on one micro-batch: call ``forward_backward`` (once by default)."""
        return forward_backward(sync)

    def loss(
        self,
        model,
        batch: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        outputs,
        loss: torch.Tensor,
    ) -> torch.Tensor:
        """The micro-batch's mean loss, changed or added to (runs under autocast)."""
        return loss

    def after_step(self, model, step: int) -> None:
        """After optimizer step ``step`` (1-based), before the gradients are cleared."""

    def metrics(self) -> dict[str, float]:
        """Running values since the last evaluation (the loop reports them, then resets)."""
        return {}

    def reset(self) -> None:
        """Forget the running values (after each evaluation)."""


class Techniques(Technique):
    """Several techniques, applied in order: ``micro_step`` hooks wrap one another (the
    first outermost), ``loss`` hooks are chained, ``after_step`` hooks run in order."""

    name = "techniques"

    def __init__(self, parts: Sequence[Technique] = ()):
        self.parts = list(parts)

    def micro_step(self, model, forward_backward: ForwardBackward, sync: bool) -> torch.Tensor:
        step = forward_backward
        for part in reversed(self.parts):
            step = _wrapped(part, model, step)
        return step(sync)

    def loss(self, model, batch, inputs, outputs, loss):
        for part in self.parts:
            loss = part.loss(model, batch, inputs, outputs, loss)
        return loss

    def after_step(self, model, step: int) -> None:
        for part in self.parts:
            part.after_step(model, step)

    def metrics(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for part in self.parts:
            found.update(part.metrics())
        return found

    def reset(self) -> None:
        for part in self.parts:
            part.reset()


def _wrapped(part: Technique, model, inner: ForwardBackward) -> ForwardBackward:
    return lambda sync: part.micro_step(model, inner, sync)


class RunningMean:
    """A mean of floats (a technique's loss term) between two evaluations."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total += float(value)
        self.count += 1

    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def reset(self) -> None:
        self.total, self.count = 0.0, 0


def metrics_of(means: dict[str, RunningMean]) -> dict[str, Any]:
    return {name: mean.value() for name, mean in means.items() if mean.count}


__all__ = [
    "ForwardBackward",
    "RunningMean",
    "Technique",
    "Techniques",
    "metrics_of",
]
