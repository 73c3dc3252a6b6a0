"""Regularisation switches: ``model.dropout`` (hidden and attention dropout, mapped onto the
model config's own attribute names) and ``train.adversarial`` (FGM / PGD perturbations of
the input embeddings, run by ``lepton_ray.train.adversarial``).

``train.label_smoothing`` is a plain field of the ``train`` section (each task's loss reads
it). Weight decay, clipping, warm-up, schedules and early stopping are ``train`` fields too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lepton_ray.config.base import Section

HIDDEN_DROPOUT = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout")
"""Config attributes that hold a model's hidden-state dropout (BERT-like: after the
embeddings and after every attention and feed-forward block; GPT-2/Phi: the residual and
embedding dropout; DistilBERT, BART: ``dropout``). Every one a model has is set."""

ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
"""Config attributes that hold the dropout on attention probabilities (BERT-like; Llama,
Mistral, Qwen, DistilBERT, BART; GPT-2/Phi)."""


class DropoutSection(Section):
    """Dropout probabilities that replace the model's own; null keeps the model's."""

    hidden: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout on hidden states (after the embeddings and every attention and "
        "feed-forward block): BERT's hidden_dropout_prob, GPT-2's resid_pdrop and embd_pdrop. "
        "A model without one (Llama, Mistral, Qwen: attention dropout only) is refused. "
        "null: the model's own.",
    )
    attention: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout on attention probabilities: BERT's attention_probs_dropout_prob, "
        "Llama's attention_dropout, GPT-2's attn_pdrop. null: the model's own.",
    )

    def is_set(self) -> bool:
        return self.hidden is not None or self.attention is not None


def dropout_overrides(hf: dict[str, Any], dropout: DropoutSection) -> dict[str, float]:
    """The config attributes (of those in ``hf``, a model config as a dict) that carry
    ``dropout``, with their new values.

    Raises:
        ValueError: naming ``model.dropout.<kind>`` when the model has no such dropout.
    """
    out: dict[str, float] = {}
    for kind, names, value in (
        ("hidden", HIDDEN_DROPOUT, dropout.hidden),
        ("attention", ATTENTION_DROPOUT, dropout.attention),
    ):
        if value is None:
            continue
        found = [name for name in names if isinstance(hf.get(name), (int, float))]
        if not found:
            kind_of = hf.get("model_type", "this")
            raise ValueError(
                f"model.dropout.{kind}: {kind_of} models have no {kind} dropout (their config "
                f"has none of {', '.join(names)}); leave model.dropout.{kind} null"
            )
        out.update(dict.fromkeys(found, float(value)))
    return out


def set_dropout(hf_config, dropout: DropoutSection) -> dict[str, float]:
    """Write ``dropout`` into a transformers config before the model is built from it;
    returns what was set (attribute -> probability)."""
    if not dropout.is_set():
        return {}
    changes = dropout_overrides(hf_config.to_dict(), dropout)
    for name, value in changes.items():
        setattr(hf_config, name, value)
    return changes


class AdversarialSection(Section):
    """Adversarial training on the input embeddings (Miyato et al., 2017): each micro-batch
    is trained on as it is and again with its embedded tokens moved, per example, by an L2
    step of size ``epsilon`` up the loss gradient; the two gradients are summed."""

    method: Literal["none", "fgm", "pgd"] = Field(
        "none",
        description="none; fgm: one step of size epsilon along the normalised gradient; pgd: "
        "pgd_steps steps of pgd_alpha, each projected back into the epsilon ball "
        "(pgd_steps + 1 backward passes per micro-batch instead of 2).",
    )
    epsilon: float = Field(
        0.1,
        gt=0.0,
        description="L2 norm of the perturbation of one example's embedded tokens (all its "
        "positions together), in the units of the input embeddings. On MiniLM + SST-2, 0.1 "
        "helped and 1.0 collapsed training (benchmarks/RESULTS.md).",
    )
    pgd_steps: int | None = Field(
        None, ge=1, le=20, description="method pgd: ascent steps per micro-batch; null: 3."
    )
    pgd_alpha: float | None = Field(
        None,
        gt=0.0,
        description="method pgd: L2 size of each ascent step; null: 2.5 x epsilon / pgd_steps.",
    )

    @model_validator(mode="after")
    def _pgd_settings_need_pgd(self) -> AdversarialSection:
        stray = [
            f"train.adversarial.{key}"
            for key in ("pgd_steps", "pgd_alpha")
            if getattr(self, key) is not None and self.method != "pgd"
        ]
        if stray:
            raise ValueError(
                f"{' and '.join(stray)} only apply to train.adversarial.method pgd, not "
                f"{self.method}; remove them or set train.adversarial.method: pgd"
            )
        if self.method == "pgd" and self.pgd_alpha is not None and self.pgd_alpha > self.epsilon:
            raise ValueError(
                f"train.adversarial.pgd_alpha {self.pgd_alpha} is larger than "
                f"train.adversarial.epsilon {self.epsilon}: every step would leave the ball "
                "it is projected back into; use a pgd_alpha at most epsilon"
            )
        return self

    @property
    def steps(self) -> int:
        """Ascent steps: 1 for FGM."""
        return (self.pgd_steps or 3) if self.method == "pgd" else 1

    @property
    def alpha(self) -> float:
        """The size of one ascent step: epsilon for FGM."""
        if self.method != "pgd":
            return self.epsilon
        return self.pgd_alpha or 2.5 * self.epsilon / self.steps
