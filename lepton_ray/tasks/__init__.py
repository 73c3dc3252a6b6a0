"""Tasks: the one axis that crosses every stage. ``get_task(name)`` returns the task an
experiment's ``task:`` (or an artifact's ``lepton_model.json``) names; see ``base.Task``."""

from __future__ import annotations

from lepton_ray.tasks.base import Task
from lepton_ray.tasks.causal_lm import CausalLM
from lepton_ray.tasks.classification import SequenceClassification

TASKS: dict[str, Task] = {task.name: task for task in (SequenceClassification(), CausalLM())}


def get_task(name: str) -> Task:
    """The task called ``name``; a ``ValueError`` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task '{name}' is not one of {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "get_task"]
