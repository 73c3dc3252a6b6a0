"""The ``train.distill`` section: knowledge distillation from a teacher model.

The student (``model``) learns from the data's targets and from a teacher's softened
predictions at once. Per micro-batch the loss is::

    alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

with the KL averaged over examples (classification: the class logits) or over the trained
tokens (causal LM: the vocabulary at every position the task's loss trains on, labels !=
-100). ``T**2`` keeps the soft term's gradient on the scale of the task loss's as T grows
(Hinton et al., 2015). The teacher runs in eval mode without gradients on every training
worker. The train stage checks, before any worker starts, that the teacher is a model of the
experiment's task with the student's labels (in the same order) and tokenizer vocabulary;
``lepton-ray validate`` checks the same where it can (the labels once the data is
preprocessed).

A smaller student from a pretrained model: ``model.config_overrides: {num_hidden_layers: 2}``
on ``model.name: minilm`` builds a 2-layer MiniLM whose embeddings and layers 0 and 1 are
MiniLM's pretrained ones (transformers loads every weight whose name matches and drops the
other layers'); ``tests/unit/test_distill.py`` checks it.
"""

from __future__ import annotations

from pydantic import Field

from lepton_ray.config.base import Section

REGISTRY_PREFIX = "models:/"


class DistillSection(Section):
    """Knowledge distillation: a teacher's soft targets mixed into the student's loss."""

    teacher: str = Field(
        min_length=1,
        description="The teacher: a lepton-ray model artifact or checkpoint folder (every "
        "worker reads it, so on several nodes it must be on shared storage), or a registered "
        "version, models:/NAME/VERSION or models:/NAME@ALIAS, that every worker downloads from "
        "tracking.tracking_uri. Float weights only (adapter, full or bf16; an adapter is "
        "merged); its task, labels and tokenizer vocabulary must be the student's.",
    )
    temperature: float = Field(
        2.0,
        gt=0.0,
        le=100.0,
        description="T: both models' logits are divided by it before the softmax (above 1 "
        "softens them); the KL term is multiplied by T**2.",
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the distillation term: loss = alpha * T**2 * KL(teacher_T || "
        "student_T) + (1 - alpha) * task loss; 0 trains on the task loss alone (the KL is "
        "still measured), 1 on the teacher alone.",
    )

    @property
    def from_registry(self) -> bool:
        """Whether the teacher is a registered version (``models:/...``), not a folder."""
        return self.teacher.strip().startswith(REGISTRY_PREFIX)
