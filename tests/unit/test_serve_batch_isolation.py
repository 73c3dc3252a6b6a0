"""A text that fails inside a batch fails only its own request; validation comes first."""

import pytest
from fastapi import HTTPException

from lepton_ray.serve import app
from lepton_ray.serve.app import _classify_isolated, _TextFailed, check_texts


def _loaded(monkeypatch, fail_on: str):
    """A loaded model whose task's predict fails on one text (the real batching code around
    it)."""
    from lepton_ray.tasks.classification import SequenceClassification

    calls = []

    class Exploding(SequenceClassification):
        def predict(self, model, tokenizer, meta, texts):
            calls.append(list(texts))
            if fail_on in texts:
                raise RuntimeError("tokenizer exploded")
            return [
                {"label": "ok", "probabilities": {"ok": 1.0}, "truncated": False} for _ in texts
            ]

    loaded = object.__new__(app._Loaded)
    loaded.model = loaded.tokenizer = loaded.meta = None
    loaded.task = Exploding()
    return loaded, calls


def test_a_failing_text_fails_alone_and_its_batch_mates_are_answered(monkeypatch):
    loaded, calls = _loaded(monkeypatch, fail_on="boom")

    results = _classify_isolated(loaded, ["a", "boom", "b", "c"])
    assert isinstance(results[1], _TextFailed)
    assert [r["label"] for i, r in enumerate(results) if i != 1] == ["ok", "ok", "ok"]
    assert calls[0] == ["a", "boom", "b", "c"]  # one batch first, then one by one


@pytest.mark.parametrize(
    "texts, status, needle",
    [
        ([], 422, "at least one text"),
        (["ok", "\ud800"], 422, "texts.1: not encodable as UTF-8"),
        (["ok", "x" * 11], 413, "texts.1: 11 characters, at most 10"),
        (["a"] * 4, 413, "4 texts, at most 3"),
        (["ok", " \n "], 422, "texts.1: empty text"),
    ],
)
def test_check_texts_refuses_before_batching(texts, status, needle):
    with pytest.raises(HTTPException) as err:
        check_texts(texts, max_texts=3, max_chars=10)
    assert err.value.status_code == status and needle in err.value.detail


def test_check_texts_accepts_good_texts():
    check_texts(["fine", "Ｔｈｅ lamp"], max_texts=3, max_chars=10)
