"""Registry specs, version tags and the pyfunc's input handling (no store needed)."""

import pandas as pd
import pytest

from lepton_ray.errors import LeptonError
from lepton_ray.registry.versions import Candidate, GateResult, gate
from lepton_ray.tasks.base import input_texts as _texts
from lepton_ray.tracking.mlflow import parse_spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("quickstart", ("quickstart", None, None)),
        ("quickstart@champion", ("quickstart", "champion", None)),
        ("models:/quickstart@challenger", ("quickstart", "challenger", None)),
        ("quickstart/3", ("quickstart", None, "3")),
        ("models:/team/sst2/12", ("team/sst2", None, "12")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("bad", ["", "name@", "@alias", "name/", "name/v3", "models:/"])
def test_parse_spec_refuses(bad):
    with pytest.raises(LeptonError, match="NAME, NAME@ALIAS or NAME/VERSION"):
        parse_spec(bad)


def test_candidate_tags_keep_finite_numbers_only():
    tags = Candidate(
        metrics={"val_accuracy": 0.91234567, "val_roc_auc": float("nan"), "flag": True},
        metric_name="val_accuracy",
        metric_mode="max",
        eval_split="fp:validation",
        peft_method="lora",
        quantization="dynamic_int8",
        source_version="4",
    ).tags()
    assert tags["lepton.metric.val_accuracy"] == "0.912346"
    assert "lepton.metric.val_roc_auc" not in tags and "lepton.metric.flag" not in tags
    assert tags["lepton.source_version"] == "4" and tags["lepton.quantization"] == "dynamic_int8"


class _V:
    def __init__(self, version, **tags):
        self.version, self.tags = version, tags


def _tags(value, mode="max", split="s"):
    return {
        "lepton.metric_name": "val_loss" if mode == "min" else "val_accuracy",
        "lepton.metric_mode": mode,
        "lepton.eval_split": split,
        ("lepton.metric.val_loss" if mode == "min" else "lepton.metric.val_accuracy"): str(value),
    }


def test_gate_directions():
    champion = _V("1", **_tags(0.5, mode="min"))
    assert gate(_V("2", **_tags(0.49, mode="min")), champion, 0.0).passed
    assert not gate(_V("2", **_tags(0.52, mode="min")), champion, 0.0).passed
    assert gate(_V("2", **_tags(0.52, mode="min")), champion, 0.03).passed
    assert gate(_V("2", **_tags(0.9)), None, 0.0) == GateResult(True, "no champion yet")
    missing = gate(_V("2", **{"lepton.eval_split": "s"}), _V("1", **_tags(0.9)), 0.0)
    assert missing.passed is False


def test_pyfunc_accepts_lists_series_and_frames():
    assert _texts(["a", "b"]) == ["a", "b"]
    assert _texts("a") == ["a"]
    assert _texts(pd.Series(["a"])) == ["a"]
    assert _texts(pd.DataFrame({"id": [1], "text": ["t"]})) == ["t"]
    assert _texts(pd.DataFrame({"review": ["r"]})) == ["r"]
    with pytest.raises(ValueError, match="item 1 is int"):
        _texts(["a", 3])
