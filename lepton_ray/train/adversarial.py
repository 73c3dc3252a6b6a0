"""Adversarial training on the input embeddings (``train.adversarial``): FGM and PGD.

Each micro-batch is trained on twice: as it is, and with its embedded tokens moved by a
small step up the loss; both gradients are summed into the step (Miyato et al., 2017,
"Adversarial training methods for semi-supervised text classification").

Where the perturbation goes: on the *output* of the input embedding layer, through a
forward hook, not on its weight matrix. So

- it works with LoRA and other adapters: the gradient that sets the direction is taken with
  respect to the embedded tokens, which the hook makes a leaf that requires grad when the
  (frozen) embedding weights do not; the weights are never made trainable or written to,
  and nothing has to be restored but the hook;
- under DDP and FSDP no weight differs between the ranks' passes, and the clean pass runs
  with the gradient all-reduce off (``forward_backward(False)``): only the last backward of
  the micro-batch syncs, with the clean and adversarial gradients already summed;
- each example's perturbation is normalised over its own tokens (an L2 ball of radius
  ``epsilon`` per example), so its size does not depend on the batch size. The classic
  "FGM" that moves the whole embedding matrix by ``epsilon * g / ||g||`` normalises over
  the batch instead, and gives a repeated token one shared shift.

PGD takes ``pgd_steps`` ascent steps of ``pgd_alpha``, each projected back into the ball;
its inner passes only need the embeddings' gradient, so the weights are frozen for them (no
weight gradient is computed or accumulated) and they never sync. Mixed precision: the
gradient scaler's factor (fp16) and the micro-batch's weight scale the embeddings' gradient
and cancel in the normalisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lepton_ray.train.parallel import unwrap
from lepton_ray.train.techniques import ForwardBackward, RunningMean, Technique, metrics_of


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The token embedding layer of a (DDP-wrapped, PEFT) model."""
    get = getattr(unwrap(model), "get_input_embeddings", None)
    layer = get() if callable(get) else None
    if not isinstance(layer, torch.nn.Module):
        raise ValueError(
            f"train.adversarial: {type(unwrap(model)).__name__} has no input embedding layer "
            "(get_input_embeddings) to perturb"
        )
    return layer


class _Probe:
    """The forward hook on the embedding layer: adds ``delta`` to its output and, while
    ``capture`` is on, keeps the gradient of the loss with respect to that output."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.capture = False
        self.grad: torch.Tensor | None = None

    def __call__(self, module, args, output):
        out = output if self.delta is None else output + self.delta.to(output.dtype)
        if self.capture:
            if not out.requires_grad:  # frozen embeddings: a leaf of its own
                out = out.detach().requires_grad_(True)
            out.register_hook(self._keep)
        return out

    def _keep(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach()

    def take(self) -> torch.Tensor:
        grad, self.grad = self.grad, None
        if grad is None:
            raise RuntimeError(
                "train.adversarial: the loss has no gradient with respect to the input "
                "embeddings (the model did not use its get_input_embeddings() layer)"
            )
        # An fp16 overflow makes the step skipped by the grad scaler; keep the pass finite.
        return torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each example (dim 0) over all its other dims, shaped to broadcast."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def ascend(delta: torch.Tensor | None, grad: torch.Tensor, alpha: float, epsilon: float):
    """One ascent step of L2 size ``alpha`` per example, projected into the ``epsilon`` ball."""
    step = alpha * grad / per_example_norm(grad).clamp_min(1e-12)
    delta = step if delta is None else delta + step
    return delta * (epsilon / per_example_norm(delta).clamp_min(epsilon))


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Trainable weights need no gradient for a while (PGD's inner passes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class AdversarialTraining(Technique):
    """FGM (``steps`` 1, ``alpha`` = ``epsilon``) or PGD on the embedded tokens."""

    name = "adversarial"

    def __init__(self, method: str, epsilon: float, steps: int = 1, alpha: float | None = None):
        self.method = method
        self.epsilon = float(epsilon)
        self.steps = int(steps)
        self.alpha = float(alpha if alpha is not None else epsilon)
        self.adv_loss = RunningMean()
        self.last_delta: torch.Tensor | None = None  # the latest perturbation (tests)

    @classmethod
    def from_config(cls, section) -> AdversarialTraining:
        """From the ``train.adversarial`` section."""
        return cls(section.method, section.epsilon, section.steps, section.alpha)

    def micro_step(self, model, forward_backward: ForwardBackward, sync: bool) -> torch.Tensor:
        probe = _Probe()
        handle = input_embeddings(model).register_forward_hook(probe)
        try:
            probe.capture = True
            clean = forward_backward(False)
            delta = None
            for step in range(self.steps):
                delta = ascend(delta, probe.take(), self.alpha, self.epsilon)
                if step < self.steps - 1:
                    probe.delta = delta
                    with frozen(model):
                        forward_backward(False)
            probe.delta, probe.capture = delta, False
            adversarial = forward_backward(sync)
        finally:
            handle.remove()
        self.last_delta = delta
        self.adv_loss.add(float(adversarial))
        # The clean loss is what train_loss reports, comparable with runs without FGM.
        return clean

    def metrics(self) -> dict[str, float]:
        return metrics_of({"train_adv_loss": self.adv_loss})

    def reset(self) -> None:
        self.adv_loss.reset()


__all__ = ["AdversarialTraining", "ascend", "frozen", "input_embeddings", "per_example_norm"]
