"""A text that fails inside a batch fails only its own request; validation comes first."""

import pytest
from fastapi import HTTPException

from lepton_ray.serve.app import TextClassifier, _TextFailed, check_texts


def _replica(fail_on: str):
    cls = TextClassifier.func_or_class  # the plain class under the Serve decorator
    replica = object.__new__(cls)
    calls = []

    def classify(texts):
        calls.append(list(texts))
        if fail_on in texts:
            raise RuntimeError("tokenizer exploded")
        return [{"label": "ok", "probabilities": {"ok": 1.0}, "truncated": False} for _ in texts]

    replica._classify = classify
    return replica, calls


def test_a_failing_text_fails_alone_and_its_batch_mates_are_answered():
    replica, calls = _replica(fail_on="boom")

    results = replica._classify_isolated(["a", "boom", "b", "c"])
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
