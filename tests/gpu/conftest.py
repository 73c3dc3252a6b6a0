"""GPU checks: plain torch, transformers and lepton_ray's Ray-free modules only.

``scripts/gpu_check.sh`` runs this folder on a GPU machine that has no Ray (it makes
``import ray`` fail, and ``--confcutdir`` keeps ``tests/conftest.py`` out). So nothing here
imports Ray, pydantic (the config), MLflow or pandas: the tiny model and the rows are
built here from scratch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

TINY_BERT = {
    "vocab_size": 64,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}


@pytest.fixture()
def cuda() -> torch.device:
    """The GPU; a machine without one fails here (these tests exist to run on one)."""
    assert torch.cuda.is_available(), "no CUDA device: run tests/gpu on a GPU machine"
    return torch.device("cuda", torch.cuda.current_device())


def tiny_classifier(seed: int = 0, **config):
    """A random 2-layer BERT classifier (two labels), dropout off unless asked for."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    settings = {**TINY_BERT, **no_dropout, **config}
    return BertForSequenceClassification(BertConfig(num_labels=2, **settings))


def learnable_rows(n: int, seed: int = 0):
    """Rows whose label is their second token (10: negative, 11: positive), ragged lengths."""
    from lepton_ray.train.batching import TokenRows

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    ids = [
        [2, 10 + int(label), *rng.integers(12, 60, size=int(rng.integers(2, 20))), 3]
        for label in labels
    ]
    # A dict of columns stands in for a pandas frame (pandas need not be installed).
    return TokenRows.from_frames(
        [{"input_ids": ids, "label_id": labels}], "label_id", sort_by_text=False
    )
