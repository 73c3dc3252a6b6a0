"""A sweep that searches ``data.max_length`` tokenizes once at the config's length; a trial
cuts its rows to its own, and gets what tokenizing at that length would have given."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lepton_ray.artifacts import load_tokenizer
from lepton_ray.config import validate_experiment
from lepton_ray.errors import ConfigError
from lepton_ray.tasks import get_task
from lepton_ray.tasks.chat import CONTEXT, LAST_RESPONSE, RESPONSE, fit_example
from lepton_ray.train.batching import TokenRows
from lepton_ray.train.recipe import fit_to_length
from tests.conftest import smoke_config

TEXTS = [
    "A short one.",
    "This lamp is bright, sturdy and cheap, and it has worked every night for a year now.",
    "It broke after two days and the seller never answered a single one of my messages.",
]


def _rows(seqs, targets) -> TokenRows:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    return TokenRows(ids, offsets, targets)


def _cfg(tmp_path, max_length: int, **tune):
    raw = smoke_config(tmp_path, tmp_path / "reviews.csv")
    raw["data"]["max_length"] = max_length
    if tune:
        raw["tune"] = {"enabled": True, **tune}
    return validate_experiment(raw, check_files=False)


def test_classifier_rows_cut_short_equal_rows_tokenized_short(tmp_path):
    tokenizer = load_tokenizer("minilm")
    long = tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]
    short = tokenizer(TEXTS, truncation=True, max_length=12)["input_ids"]
    rows = _rows(long, np.array([0, 1, 0]))
    cut = fit_to_length(_cfg(tmp_path, 12), rows, "train", log=lambda _: None)
    assert [list(cut.sequences([i])[0]) for i in range(3)] == short
    assert list(cut.targets) == [0, 1, 0]
    assert fit_to_length(_cfg(tmp_path, 32), rows, "train") is rows  # nothing longer


def test_a_row_without_a_closing_special_token_is_cut_at_its_end():
    cut = get_task("sequence_classification").shortener(3, {0}, None)
    ids, target = cut(np.array([5, 6, 7, 8]), 1)
    assert list(ids) == [5, 6, 7] and target == 1


def test_language_model_rows_follow_too_long_when_cut(tmp_path):
    c, r, last = CONTEXT, RESPONSE, LAST_RESPONSE
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    parts = [c, c, c, c, c, last, last, last]
    labels = [-100] * 5 + [6, 7, 8]
    # truncate_prompt: the context loses its first tokens; the answer stays whole.
    (kept, kept_labels, kept_parts), why = fit_example(ids, labels, parts, 5, "truncate_prompt")
    assert kept == [4, 5, 6, 7, 8] and kept_labels == [-100, -100, 6, 7, 8] and why is None
    assert fit_example(ids, labels, parts, 2, "truncate_prompt") == (None, "response_too_long")
    assert fit_example(ids, labels, parts, 5, "drop") == (None, "too_long_tokens")
    # A plain text is all response: cut at its end.
    (kept, _, _), _ = fit_example(ids, ids, [r] * 8, 3, "truncate_prompt")
    assert kept == [1, 2, 3]

    task = get_task("causal_lm")
    targets = np.stack([np.array(labels), np.array(parts)], axis=1).astype(np.int32)
    rows = _rows([ids, ids[:4]], targets=np.concatenate([targets, targets[:4]]))
    for policy, expect in (("truncate_prompt", ([4, 5, 6, 7, 8], 0)), ("drop", (None, 1))):
        cfg = _cfg_lm(tmp_path, policy)
        fitted, n_cut, dropped = rows.refit(task.shortener(5, set(), cfg))
        assert dropped == expect[1]
        first = list(fitted.sequences([0])[0])
        assert first == (expect[0] or ids[:4])
        if expect[0]:
            assert n_cut == 1 and fitted.targets_of([0])[0][:, 0].tolist() == [-100, -100, 6, 7, 8]
        assert fitted.tokens == sum(len(s) for s in fitted.sequences(range(len(fitted))))


def _cfg_lm(tmp_path, too_long: str):
    """The one setting a language model's shortener reads (data.chat.too_long)."""
    return SimpleNamespace(data=SimpleNamespace(chat=SimpleNamespace(too_long=too_long)))


def test_data_max_length_is_searchable_up_to_the_configs_own(tmp_path):
    space = {"data.max_length": {"type": "choice", "values": [16, 32]}}
    assert _cfg(tmp_path, 32, space=space).tune.space
    with pytest.raises(ConfigError, match=r"64 is above data.max_length 32"):
        _cfg(tmp_path, 32, space={"data.max_length": {"type": "choice", "values": [16, 64]}})
    with pytest.raises(ConfigError, match=r"data.max_length"):
        _cfg(tmp_path, 32, space={"data.max_length": {"type": "int", "low": 8, "high": 48}})
