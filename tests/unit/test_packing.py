"""Packing short examples into shared rows: the bins, the packed targets, and -- the point
of it all -- that a packed row computes exactly what its examples compute alone (positions
restart and the block-diagonal mask keeps examples apart), on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray.data.packing_stats import pack_bins, real_token_share
from lepton_ray.tasks.causal_lm_eval import (
    block_causal_mask,
    collate,
    model_inputs,
    token_loss,
    trained_tokens,
)
from lepton_ray.tasks.chat import CONTEXT, IGNORE, LAST_RESPONSE, RESPONSE
from lepton_ray.train.batching import TokenRows
from lepton_ray.train.packing import pack_rows

VOCAB = 96
PAD = 0


def _examples(lengths, seed=0):
    """(ids, (T, 2) labels/parts) per example: a context, then a trained response."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, VOCAB, size=n).astype(np.int32)
        context = max(1, n // 3)
        parts = np.array([CONTEXT] * context + [LAST_RESPONSE] * (n - context), np.int32)
        labels = np.where(parts == CONTEXT, IGNORE, ids).astype(np.int32)
        out.append((ids, np.stack([labels, parts], axis=1)))
    return out


def _token_rows(examples) -> TokenRows:
    lengths = [len(ids) for ids, _ in examples]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([ids for ids, _ in examples]).astype(np.int32)
    targets = np.concatenate([t for _, t in examples]).astype(np.int32)
    return TokenRows(ids, offsets, targets)


def _split(ids, targets):
    """A packed row's examples, cut where the position column restarts."""
    starts = [*np.flatnonzero(targets[:, 2] == 0), len(ids)]
    return [(ids[a:b], targets[a:b, :2]) for a, b in zip(starts[:-1], starts[1:])]


# ------------------------------------------------------------------------------ bins
def test_pack_bins_is_complete_within_capacity_and_deterministic():
    lengths = np.random.default_rng(1).integers(1, 40, size=300)
    bins = pack_bins(lengths, 64)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every row, exactly once
    assert all(sum(int(lengths[i]) for i in b) <= 64 for b in bins)
    assert all(b == sorted(b) for b in bins)  # original order inside a bin
    assert pack_bins(lengths, 64) == bins
    assert pack_bins(lengths.copy(), 64) == bins
    # Best-fit decreasing leaves little room: within a bin of the lower bound here.
    assert len(bins) <= int(np.ceil(lengths.sum() / 64)) + 1


def test_pack_bins_fills_exactly_where_it_can():
    assert sorted(map(sorted, pack_bins(np.array([5, 3, 4, 4]), 8))) == [[0, 1], [2, 3]]
    assert pack_bins(np.array([8, 8]), 8) == [[0], [1]]
    assert pack_bins(np.array([], dtype=np.int64), 8) == []


def test_a_row_over_capacity_raises():
    with pytest.raises(ValueError, match="a row of 9 tokens does not fit rows of 8"):
        pack_bins(np.array([3, 9, 2]), 8)


def test_real_token_share_for_known_lengths():
    assert real_token_share(np.array([5, 3, 4, 4]), 8) == {
        "rows": 4,
        "packed_rows": 2,
        "real_share_unpacked": 0.5,
        "real_share_packed": 1.0,
    }
    # [6], [4, 3], [3]: 16 real tokens in 3 rows of 8.
    assert real_token_share(np.array([6, 4, 3, 3]), 8) == {
        "rows": 4,
        "packed_rows": 3,
        "real_share_unpacked": 0.5,
        "real_share_packed": 0.6667,
    }
    assert real_token_share(np.array([3]), 7)["real_share_unpacked"] == 0.4286
    assert real_token_share(np.array([], dtype=np.int64), 8) == {
        "rows": 0,
        "packed_rows": 0,
        "real_share_unpacked": 0.0,
        "real_share_packed": 0.0,
    }


# ------------------------------------------------------------------------------ packed rows
def test_pack_rows_restarts_positions_and_keeps_ids_and_labels():
    examples = _examples([7, 3, 12, 5, 9, 2, 6])
    rows = _token_rows(examples)
    packed = pack_rows(rows, 16)
    assert packed.per_token and packed.targets.shape == (rows.tokens, 3)
    assert packed.tokens == rows.tokens
    assert (packed.lengths <= 16).all() and len(packed) < len(rows)
    seen = []
    for r in range(len(packed)):
        a, b = packed.offsets[r], packed.offsets[r + 1]
        ids, targets = packed.ids[a:b], packed.targets[a:b]
        assert targets[0, 2] == 0
        for piece_ids, piece_targets in _split(ids, targets):
            # The position column counts 0, 1, 2, ... inside each example.
            assert piece_targets.shape[0] == len(piece_ids)
            seen.append((tuple(piece_ids), tuple(map(tuple, piece_targets))))
        pos = targets[:, 2]
        assert ((pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)).all()
    original = sorted((tuple(ids), tuple(map(tuple, t))) for ids, t in examples)
    assert sorted(seen) == original  # every example's ids, labels and parts, whole
    assert pack_rows(rows, 16).offsets.tolist() == packed.offsets.tolist()


def test_pack_rows_needs_per_token_targets():
    rows = TokenRows(np.arange(6, dtype=np.int32), np.array([0, 2, 6]), np.array([0, 1]))
    with pytest.raises(ValueError, match="per-token targets"):
        pack_rows(rows, 8)


def test_collate_of_packed_rows():
    examples = _examples([4, 3, 5])
    packed = pack_rows(_token_rows(examples), 8)
    index = range(len(packed))
    batch = collate(packed.sequences(index), packed.targets_of(index), PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids", "segment_ids"}
    for r in index:
        targets = packed.targets_of([r])[0]
        n = len(targets)
        assert batch["position_ids"][r, :n].tolist() == targets[:, 2].tolist()
        assert batch["segment_ids"][r, :n].tolist() == (np.cumsum(targets[:, 2] == 0) - 1).tolist()
        assert (batch["segment_ids"][r, n:] == -1).all()
        assert (batch["labels"][r, n:] == IGNORE).all()
        # No example's first token is a target: it would be predicted from another example.
        assert (batch["labels"][r, :n][targets[:, 2] == 0] == IGNORE).all()


def test_block_causal_mask():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = block_causal_mask(segments, torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees itself only (no all -inf softmax row)
    ]
    assert mask.min() == torch.finfo(torch.float32).min


# ------------------------------------------------------------------------------ the model
def _llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=impl,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == impl
    return model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llama(request):
    return _llama(request.param)


LENGTHS = [7, 5, 11, 4, 9, 3]


@torch.no_grad()
def test_a_packed_batch_computes_what_its_examples_compute_alone(llama):
    examples = _examples(LENGTHS, seed=3)
    packed = pack_rows(_token_rows(examples), 16)
    assert len(packed) < len(examples)
    assert (
        max(
            len(_split(*r))
            for r in zip(
                packed.sequences(range(len(packed))), packed.targets_of(range(len(packed)))
            )
        )
        >= 2
    )
    index = range(len(packed))
    batch = collate(packed.sequences(index), packed.targets_of(index), PAD)
    assert batch["attention_mask"].eq(0).any()  # rows of different lengths: padding too
    logits = llama(**model_inputs(batch, llama)).logits
    packed_loss = float(token_loss(logits, batch["labels"]))

    # Unpacked, padded, one batch.
    flat = collate([ids for ids, _ in examples], [t for _, t in examples], PAD)
    assert "segment_ids" not in flat
    flat_loss = float(token_loss(llama(**model_inputs(flat, llama)).logits, flat["labels"]))
    # One by one: the token mean of every example's summed loss.
    total, tokens = 0.0, 0
    alone = {}
    for ids, targets in examples:
        one = collate([ids], [targets], PAD)
        out = llama(**model_inputs(one, llama)).logits
        alone[tuple(ids)] = out[0]
        total += float(token_loss(out, one["labels"], reduction="sum"))
        tokens += int((one["labels"][:, 1:] != IGNORE).sum())
    assert packed_loss == pytest.approx(total / tokens, abs=1e-5)
    assert packed_loss == pytest.approx(flat_loss, abs=1e-5)
    assert trained_tokens(packed.targets_of(index)) == tokens

    # Each example's logits inside its packed row: those of the example alone.
    checked = 0
    for r in index:
        targets = packed.targets_of([r])[0]
        starts = [*np.flatnonzero(targets[:, 2] == 0), len(targets)]
        for a, b in zip(starts[:-1], starts[1:]):
            ids = tuple(batch["input_ids"][r, a:b].tolist())
            diff = (logits[r, a:b] - alone[ids]).abs().max()
            assert float(diff) < 1e-4, (r, a, float(diff))
            checked += 1
    assert checked == len(examples)


@torch.no_grad()
def test_without_the_block_mask_examples_see_each_other(llama):
    """Restarting positions alone (a 2D mask) do not keep the second example apart: this is
    why ``model_inputs`` builds the 4D block-diagonal mask."""
    examples = _examples([6, 5], seed=4)
    packed = pack_rows(_token_rows(examples), 16)
    assert len(packed) == 1
    batch = collate(packed.sequences([0]), packed.targets_of([0]), PAD)
    second = int(np.flatnonzero(packed.targets_of([0])[0][:, 2] == 0)[1])
    ids_second = batch["input_ids"][:, second:]
    alone = llama(input_ids=ids_second).logits[0]

    masked = llama(**model_inputs(batch, llama)).logits[0, second:]
    assert float((masked - alone).abs().max()) < 1e-4

    positions_only = {k: v for k, v in batch.items() if k != "segment_ids"}
    inputs = model_inputs(positions_only, llama)
    assert inputs["attention_mask"].dim() == 2
    leaky = llama(**inputs).logits[0, second:]
    assert float((leaky - alone).abs().max()) > 1e-3
    # The first example comes first either way: causal attention keeps it unchanged.
    first = llama(**inputs).logits[0, :second]
    assert (
        float((first - llama(input_ids=batch["input_ids"][:, :second]).logits[0]).abs().max())
        < 1e-4
    )


def test_model_inputs_refuses_an_unknown_attention_kernel():
    model = _llama("sdpa")
    examples = _examples([4, 3])
    packed = pack_rows(_token_rows(examples), 8)
    batch = collate(packed.sequences([0]), packed.targets_of([0]), PAD)
    inputs = model_inputs(batch, model)
    assert inputs["attention_mask"].shape == (1, 1, 7, 7)
    assert "labels" not in inputs and "segment_ids" not in inputs
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="packing: attention 'flex_attention'"):
        model_inputs(batch, model)
    # Unpacked batches need no boundaries: any kernel.
    flat = collate([ids for ids, _ in examples], [t for _, t in examples], PAD)
    assert model_inputs(flat, model)["attention_mask"].dim() == 2


def test_model_inputs_for_varlen_kernels_keeps_positions_only():
    model = _llama("sdpa")
    packed = pack_rows(_token_rows(_examples([4, 3])), 8)
    batch = collate(packed.sequences([0]), packed.targets_of([0]), PAD)
    model.config._attn_implementation = "flash_attention_2"
    inputs = model_inputs(batch, model)
    assert "attention_mask" not in inputs
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]


# ------------------------------------------------------------------------------ counting
def test_trained_tokens_counts_shifted_labels_and_skips_packed_first_tokens():
    plain = np.array([[IGNORE, 0], [IGNORE, 0], [5, 1], [6, 1]], np.int32)
    # The first label is never a target (nothing predicts it), trained or not.
    first_trained = np.array([[9, 1], [IGNORE, 0], [7, 1]], np.int32)
    assert trained_tokens([plain]) == 2
    assert trained_tokens([first_trained]) == 1
    assert trained_tokens([plain, first_trained]) == 3
    # Packed: labels 7..11, examples start at 0 and 3; the one at 3 is not a target.
    packed = np.array(
        [
            [7, RESPONSE, 0],
            [8, RESPONSE, 1],
            [9, RESPONSE, 2],
            [10, RESPONSE, 0],
            [11, RESPONSE, 1],
        ],
        np.int32,
    )
    assert trained_tokens([packed]) == 3
    # It agrees with what the collated batch trains on.
    targets = [plain, first_trained, packed[:, :2].copy(), packed]
    for group in ([plain, first_trained], [packed]):
        batch = collate([t[:, 0].clip(0) for t in group], group, PAD)
        assert trained_tokens(group) == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert trained_tokens(targets[2:3]) == 4
