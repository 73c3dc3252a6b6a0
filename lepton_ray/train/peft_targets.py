"""Which layers an adapter adapts: a list of names or a preset, resolved against the real
model's Linear layers; a name that matches nothing is an error listing the candidates."""

from __future__ import annotations


def linear_layers(model) -> list[tuple[str, object]]:
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


ATTENTION_PARENTS = ("attn", "attention")
"""A Linear layer belongs to the attention block when a module on its path is named so."""


def resolve_targets(
    model,
    targets: list[str] | str,
    heads: tuple[str, ...] = (),
    key: str = "peft.lora.target_modules",
) -> list[str]:
    """The layer names an adapter adapts (``key`` names the setting in errors): a list as
    given (each must name a layer of the model), or
    a preset resolved against the model's own Linear layers, as full module paths (so a
    name shared by attention and MLP layers, BERT's ``dense``, adapts only the chosen ones):
    ``attention`` (those inside an attention block) or ``all-linear`` (all but the task's
    output ``heads``, e.g. lm_head or classifier)."""
    from lepton_ray.errors import ConfigError

    linear = linear_layers(model)
    leaves = {n.rsplit(".", 1)[-1] for n, _ in linear}
    if isinstance(targets, str):
        if targets == "attention":
            chosen = {
                n
                for n, _ in linear
                if any(p in part.lower() for part in n.split(".")[:-1] for p in ATTENTION_PARENTS)
            }
        else:
            chosen = {
                n
                for n, _ in linear
                if not any(n == h or n.startswith(h + ".") or n.endswith("." + h) for h in heads)
            }
        if not chosen:
            raise ConfigError(
                f"{key}: the preset '{targets}' matches no layer of the "
                f"model; its Linear layers are {sorted(leaves)}"
            )
        return sorted(chosen)
    _check_targets(model, list(targets), key)
    return list(targets)


def _check_targets(model, targets: list[str], key: str) -> None:
    """Every target must name a layer of the model, or the config is wrong."""
    import torch

    from lepton_ray.errors import ConfigError

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    linear = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"{key}: {missing} name no layer of the model; its Linear layers are {sorted(linear)}"
        )
