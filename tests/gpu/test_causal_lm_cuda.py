"""The causal-LM path on the GPU without Ray: a packed batch computes what its examples
compute alone under sdpa (block-diagonal mask) and, where flash-attn is installed, under
flash_attention_2 (boundaries from the position ids); the loop trains a LoRA'd tiny Llama on
packed rows in bf16; FSDP2 over NCCL shards a tiny Llama per decoder layer and trains it."""

from __future__ import annotations

import importlib.util
import socket

import numpy as np
import pytest
import torch

from lepton_ray.tasks import get_task
from lepton_ray.tasks.causal_lm_eval import EvalData, collate, model_inputs, token_loss
from lepton_ray.tasks.chat import CONTEXT, IGNORE, LAST_RESPONSE
from lepton_ray.train.batching import TokenRows
from lepton_ray.train.loop import (
    LoopSettings,
    LoopState,
    build_optimizer,
    build_scheduler,
    run_training,
)
from lepton_ray.train.packing import pack_rows
from lepton_ray.train.precision import resolve_precision

pytestmark = pytest.mark.gpu

VOCAB = 96
PAD = 0


def tiny_llama(impl: str = "sdpa", dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation=impl, pad_token_id=PAD,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def examples(lengths, seed: int = 0, learnable: bool = False):
    """(ids, (T, 2) labels/parts): a context, then a trained response. ``learnable``: the
    response repeats the context (a rule a tiny model learns in a few steps)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        context = max(2, n // 2)
        head = rng.integers(3, VOCAB, size=context)
        tail = (
            np.resize(head, n - context) if learnable else rng.integers(3, VOCAB, size=n - context)
        )
        ids = np.concatenate([head, tail]).astype(np.int32)
        parts = np.array([CONTEXT] * context + [LAST_RESPONSE] * (n - context), np.int32)
        labels = np.where(parts == CONTEXT, IGNORE, ids).astype(np.int32)
        out.append((ids, np.stack([labels, parts], axis=1)))
    return out


def token_rows(pieces) -> TokenRows:
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in pieces], out=offsets[1:])
    ids = np.concatenate([ids for ids, _ in pieces]).astype(np.int32)
    return TokenRows(ids, offsets, np.concatenate([t for _, t in pieces]).astype(np.int32))


def _on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _packed_matches_alone(model, device, atol: float) -> None:
    pieces = examples([9, 5, 13, 4, 11, 6], seed=3)
    packed = pack_rows(token_rows(pieces), 24)
    assert len(packed) < len(pieces)
    index = range(len(packed))
    batch = _on(collate(packed.sequences(index), packed.targets_of(index), PAD), device)
    logits = model(**model_inputs(batch, model)).logits.float()
    seen = 0
    for r in index:
        positions = packed.targets_of([r])[0][:, 2]
        starts = [*np.flatnonzero(positions == 0), len(positions)]
        for a, b in zip(starts[:-1], starts[1:]):
            ids = torch.as_tensor(packed.sequences([r])[0][a:b], dtype=torch.long, device=device)
            alone = model(input_ids=ids[None]).logits.float()[0]
            assert torch.allclose(logits[r, a:b], alone, atol=atol), (r, a, b)
            seen += 1
    assert seen == len(pieces)


def test_packing_with_sdpa_on_the_gpu_keeps_examples_apart(cuda):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_llama("sdpa").to(cuda).eval()
    _packed_matches_alone(model, cuda, atol=1e-4)


def test_packing_with_flash_attention_2_reads_boundaries_from_positions(cuda):
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed on this GPU machine (pip install flash-attn)")
    model = tiny_llama("flash_attention_2", dtype=torch.bfloat16).to(cuda).eval()
    batch = collate([np.arange(3, 9)], [np.stack([np.arange(3, 9), np.ones(6)], 1)], PAD)
    assert "attention_mask" in model_inputs(batch, model)  # unpacked: the mask stays
    _packed_matches_alone(model, cuda, atol=3e-2)  # bf16: flash-attn has no fp32


def _train(model, rows, validation, device, precision, **settings):
    defaults = {"epochs": 3, "batch_size": 8, "seed": 0, "metric": "val_loss", "mode": "min"}
    settings = LoopSettings(**{**defaults, **settings})
    optimizer = build_optimizer(model, 3e-3, 0.0)
    scheduler = build_scheduler(optimizer, settings.steps_per_epoch(len(rows)) * 3, 0.1)
    index = range(len(validation))
    batches = EvalData([collate(validation.sequences(index), validation.targets_of(index), PAD)])
    state = run_training(
        model, optimizer, scheduler, rows, pad_id=PAD, eval_batches=lambda: batches,
        task=get_task("causal_lm"), labels=[], settings=settings, state=LoopState(),
        device=device, precision=precision, log=lambda _: None,
    )  # fmt: skip
    return state


def test_the_loop_trains_a_lora_llama_on_packed_rows_in_bf16(cuda):
    from peft import LoraConfig, TaskType, get_peft_model

    model = tiny_llama("sdpa")
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
    model = get_peft_model(model, lora).to(cuda)
    rng = np.random.default_rng(0)
    rows = pack_rows(token_rows(examples(rng.integers(8, 30, 256), 0, learnable=True)), 96)
    validation = token_rows(examples(rng.integers(8, 30, 32), 1, learnable=True))
    state = _train(model, rows, validation, cuda, resolve_precision("bf16", cuda))
    history = state.history
    assert all(np.isfinite(h["val_loss"]) for h in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_perplexity"] < history[0]["val_perplexity"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_over_nccl_shards_a_llama_per_decoder_layer_and_trains(cuda):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lepton_ray.train.parallel import full_state, layer_units

    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        device_id=cuda,
    )  # fmt: skip
    try:
        model = tiny_llama("sdpa").to(cuda)
        names = {n for n, _ in model.named_parameters()}
        units = layer_units(model)
        assert len(units) == 2  # one per LlamaDecoderLayer
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        rng = np.random.default_rng(1)
        rows = token_rows(examples(rng.integers(8, 30, 128), 0, learnable=True))
        validation = token_rows(examples(rng.integers(8, 30, 32), 1, learnable=True))
        state = _train(model, rows, validation, cuda, resolve_precision("bf16", cuda))
        assert state.history[-1]["val_loss"] < state.history[0]["val_loss"]
        weights, _ = full_state(model, state_optimizer(model))
        assert names <= set(weights)
        reference = tiny_llama("sdpa")
        missing, unexpected = reference.load_state_dict(weights, strict=False)
        assert not unexpected and not set(missing) & names
    finally:
        dist.destroy_process_group()


def state_optimizer(model):
    """A fresh optimizer over the sharded weights (full_state gathers its state too)."""
    return build_optimizer(model, 1e-3, 0.0)


def test_token_loss_on_the_gpu_matches_the_cpu(cuda):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, VOCAB)
    labels = torch.randint(3, VOCAB, (3, 7))
    labels[:, :3] = IGNORE
    cpu = token_loss(logits, labels)
    gpu = token_loss(logits.to(cuda), labels.to(cuda))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
