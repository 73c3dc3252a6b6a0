"""Which training techniques a config turns on (``techniques.py`` holds their protocol).

Kept apart from ``techniques.py`` so that each technique module imports the protocol and
this one imports the technique modules, with no cycle between them.
"""

from __future__ import annotations

from lepton_ray.train.techniques import Technique, Techniques


def build_techniques(cfg, model, task, device, rank: int = 0, log=print) -> Techniques:
    """The techniques the config turns on, for this worker's (wrapped) ``model``.

    Each technique module adds itself here; the order is the order they wrap a step in.
    """
    parts: list[Technique] = []
    if cfg.train.adversarial.method != "none":
        from lepton_ray.train.adversarial import AdversarialTraining

        parts.append(AdversarialTraining.from_config(cfg.train.adversarial))
    if cfg.train.distill is not None:
        from lepton_ray.train.distill import build_distillation

        parts.append(build_distillation(cfg, task, device, rank, log))
    if cfg.peft.method == "adalora":
        from lepton_ray.train.peft_methods import build_peft_techniques

        parts += build_peft_techniques(cfg, model)
    return Techniques(parts)


__all__ = ["build_techniques"]
