"""``train.gradient_checkpointing`` on a causal LM with LoRA, through the recipe the workers
build (``setup_recipe``): the base model recomputes its activations in the backward pass,
and the adapter's gradients are those of the same model without checkpointing (a frozen base
under reentrant checkpointing would silently give the adapter no gradient at all)."""

from __future__ import annotations

import torch

from lepton_ray.config import validate_experiment
from lepton_ray.data.sample import write_chats_jsonl
from lepton_ray.train.recipe import setup_recipe
from tests.conftest import TINY_LLAMA, smoke_config


def _recipe(tmp_path, checkpointing: bool):
    source = write_chats_jsonl(tmp_path / "chats.jsonl", n=20)
    raw = smoke_config(tmp_path, source, name="gc")
    raw["task"] = "causal_lm"
    raw["data"] = {"path": str(source), "max_length": 64, "chat": {"format": "messages"}}
    raw["model"] = {"name": "smollm2", "random_init": True, "config_overrides": TINY_LLAMA}
    raw["peft"] = {
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    raw["train"] = {"batch_size": 2, "gradient_checkpointing": checkpointing, "precision": "fp32"}
    raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    cfg = validate_experiment(raw)
    return setup_recipe(cfg, {"labels": []}, 8, torch.device("cpu"), log=lambda _: None)


def _checkpointing(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5.25
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def _adapter_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24))
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt
    model.train()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads


def test_checkpointing_recomputes_and_gives_the_adapter_the_same_gradients(tmp_path, smollm2_path):
    plain = _recipe(tmp_path / "plain", checkpointing=False).model
    checkpointed = _recipe(tmp_path / "gc", checkpointing=True).model
    base = checkpointed.get_base_model()
    assert _checkpointing(base) and not _checkpointing(plain.get_base_model())
    assert base.config.use_cache is False

    calls = []
    mlp = base.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):  # (a forward hook does not see the recomputation)
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    mlp.forward = counted
    loss_gc, grads_gc = _adapter_grads(checkpointed)
    # Forward once with autograd, then again in the backward pass to rebuild the activations.
    assert len(calls) == 2, calls

    loss, grads = _adapter_grads(plain)
    assert abs(loss_gc - loss) < 1e-6
    assert grads.keys() == grads_gc.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads_gc.items() if "lora_B" in n)
