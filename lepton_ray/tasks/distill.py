"""The distillation term of each task: KL(teacher_T || student_T) over what the task trains.

``Task.distill_loss`` returns this term averaged the way the task's own loss is: over the
examples of a micro-batch (classification, the class logits) or over its trained tokens
(causal LM, the vocabulary at every position whose shifted label is not -100: prompt,
padding and a packed row's example boundaries never count). It is not multiplied by
``T**2`` or weighted: the training technique (``train/distill.py``) mixes it with the task
loss. Pure torch, no Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def soft_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) of each row, in float32.

    Both ``(..., classes)``; the result has the leading shape. The teacher's side carries no
    gradient (it is detached here as well, whatever the caller did).
    """
    import torch.nn.functional as F

    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation: the student's logits {tuple(student_logits.shape)} and the "
            f"teacher's {tuple(teacher_logits.shape)} differ in shape"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)


def class_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """The mean over examples of the KL over the class logits (``(batch, classes)``)."""
    return soft_kl(student_logits, teacher_logits, temperature).mean()


def token_kl(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """The mean over trained tokens of the KL over the vocabulary.

    Logits are ``(batch, length, vocab)``; the logits at position ``i`` predict token
    ``i + 1``, so a position counts where ``labels[:, i + 1]`` is not -100: exactly the
    positions of the task's cross-entropy (``causal_lm_eval.token_loss``). Only those rows
    are upcast and normalised. Where the two models' output widths differ (one pads its
    embedding matrix past the shared tokenizer's size), only the common first columns are
    compared: the rest belong to no token. A batch without a trained token gives a zero
    that keeps the graph (as the task loss does).
    """
    from lepton_ray.tasks.chat import IGNORE

    live = labels[:, 1:] != IGNORE
    student = student_logits[:, :-1][live]
    teacher = teacher_logits[:, :-1][live]
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    width = min(student.shape[-1], teacher.shape[-1])
    return soft_kl(student[:, :width], teacher[:, :width], temperature).mean()


__all__ = ["class_kl", "soft_kl", "token_kl"]
