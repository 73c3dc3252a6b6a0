"""train/loop.py on the GPU without Ray: bf16 autocast, fp16 with a gradient scaler, the
accumulation weighting, and FSDP2 over NCCL on one GPU (world size 1)."""

import copy
import socket

import pytest
import torch

from lepton_ray.tasks import get_task
from lepton_ray.tasks.classification_eval import collate
from lepton_ray.train.loop import (
    LoopSettings,
    LoopState,
    build_optimizer,
    build_scheduler,
    run_training,
)
from lepton_ray.train.precision import resolve_precision
from tests.gpu.conftest import learnable_rows, tiny_classifier

pytestmark = pytest.mark.gpu


def _train(model, rows, validation, device, precision, **settings):
    settings = LoopSettings(**{"epochs": 4, "batch_size": 16, "seed": 0, **settings})
    optimizer = build_optimizer(model, 3e-3, 0.01)
    steps = settings.steps_per_epoch(len(rows)) * settings.epochs
    scheduler = build_scheduler(optimizer, steps, 0.1)
    eval_batches = [
        collate(validation.sequences(range(i, min(i + 32, len(validation)))),
                validation.targets[i : i + 32], 0)
        for i in range(0, len(validation), 32)
    ]  # fmt: skip
    state = run_training(
        model, optimizer, scheduler, rows, pad_id=0, eval_batches=lambda: eval_batches,
        task=get_task("sequence_classification"), labels=["0", "1"], settings=settings, state=LoopState(), device=device,
        precision=precision, log=lambda _: None,
    )  # fmt: skip
    return state, optimizer


@pytest.mark.parametrize("setting", ["bf16", "fp16"])
def test_the_loop_trains_a_tiny_model_on_the_gpu(cuda, setting):
    rows, validation = learnable_rows(256, seed=0), learnable_rows(64, seed=1)
    model = tiny_classifier().to(cuda)
    precision = resolve_precision(setting, cuda)
    assert precision.use_grad_scaler == (setting == "fp16")
    state, optimizer = _train(model, rows, validation, cuda, precision)
    assert state.step == 4 * 16
    history = state.history
    assert all(torch.isfinite(torch.tensor(h["val_loss"])) for h in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_accuracy"] > 0.9  # the rule is the second token: easy
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(
        s["exp_avg"].device.type == "cuda" for s in optimizer.state.values() if "exp_avg" in s
    )


def test_accumulation_on_the_gpu_gives_the_whole_batchs_gradient(cuda):
    """fp32 on the GPU: micro-batches of 3 + 3 + 1 make the 7-row batch's SGD step."""
    rows = learnable_rows(7, seed=2)
    model = tiny_classifier(seed=3).to(cuda)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    everything = collate(rows.sequences(range(7)), rows.targets, 0)
    settings = LoopSettings(
        epochs=1, batch_size=3, accumulation=3, max_grad_norm=None, group_by_length=False
    )
    run_training(
        model, optimizer, build_scheduler(optimizer, 1, 0.0, "constant"), rows, pad_id=0,
        eval_batches=lambda: [everything], task=get_task("sequence_classification"), labels=["0", "1"], settings=settings, state=LoopState(),
        device=cuda, precision=resolve_precision("fp32", cuda), log=lambda _: None,
    )  # fmt: skip
    reference.train()
    reference(**{k: v.to(cuda) for k, v in everything.items()}).loss.backward()
    for (name, old), new in zip(reference.named_parameters(), model.parameters()):
        assert torch.allclose(old.detach() - new.detach(), old.grad, atol=1e-5), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_over_nccl_on_one_gpu_trains_and_gathers_whole_weights(cuda):
    """One process, world size 1: the layers sharded with fully_shard as the loop runs
    them, and full_state (a collective) gives plain whole tensors back by plain name."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lepton_ray.train.parallel import full_state, layer_units, load_full_state

    assert dist.is_nccl_available()
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        device_id=cuda,
    )  # fmt: skip
    try:
        model = tiny_classifier().to(cuda)
        names = [n for n, _ in model.named_parameters()]
        units = layer_units(model)
        assert len(units) == 2  # one per BERT layer
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        rows, validation = learnable_rows(128, seed=0), learnable_rows(32, seed=1)
        precision = resolve_precision("bf16", cuda)
        state, optimizer = _train(model, rows, validation, cuda, precision, epochs=3)
        assert state.history[-1]["val_loss"] < state.history[0]["val_loss"]
        weights, optim = full_state(model, optimizer)
        assert set(names) <= set(weights)  # the unwrapped model's names
        assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in weights.values())
        missing, unexpected = tiny_classifier().load_state_dict(weights, strict=False)
        assert not unexpected and not set(missing) & set(names)
        load_full_state(model, optimizer, weights, optim)  # and back into the shards
    finally:
        dist.destroy_process_group()
