"""A full fine-tune of a model with tied weights (SmolLM2's lm_head is its embedding table)
checkpoints its trainable tensors once and reads both names back, sharing one tensor."""

from __future__ import annotations

import pytest
import torch

from lepton_ray.train.checkpoint import TRAINABLE_FILE, _load_trainable, _untied, save_trainable


def test_tied_tensors_are_written_once_and_read_back_under_every_name(tmp_path):
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, as a causal LM's lm_head
    other = torch.randn(3)
    trainable = {"embed.weight": embed.weight, "head.weight": head.weight, "other": other}
    kept, aliases = _untied(trainable)
    assert set(kept) == {"embed.weight", "other"} and aliases == {"head.weight": "embed.weight"}

    save_trainable(trainable, tmp_path)
    assert (tmp_path / TRAINABLE_FILE).is_file()
    back = _load_trainable(tmp_path)
    assert set(back) == set(trainable)
    torch.testing.assert_close(back["head.weight"], embed.weight.detach())
    torch.testing.assert_close(back["other"], other)


def test_views_of_one_storage_with_other_offsets_are_not_aliases():
    base = torch.arange(8.0)
    kept, aliases = _untied({"a": base[:4], "b": base[4:]})
    assert set(kept) == {"a", "b"} and not aliases
    assert kept["b"].tolist() == pytest.approx([4.0, 5.0, 6.0, 7.0])
