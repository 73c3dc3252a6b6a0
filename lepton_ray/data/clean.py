"""Row-level cleaning: unicode and whitespace normalisation, drop reasons."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lepton_ray.text import normalize_text

KEEP = ""
"""drop_reason of a row that survives cleaning."""


def normalize_label(value: Any) -> str | None:
    """Labels become strings: 1, 1.0 and "1" are the same class; blanks are missing."""
    if _missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def clean_batch(
    batch: pd.DataFrame, unicode_form: str, lowercase: bool, min_chars: int
) -> pd.DataFrame:
    """Clean a batch of ``text``/``label`` rows and tag each with why it is dropped, if it is."""
    texts, labels, reasons = [], [], []
    for raw_text, raw_label in zip(batch["text"], batch["label"]):
        label = normalize_label(raw_label)
        if _missing(raw_text):
            text, reason = "", "missing_text"
        else:
            text = normalize_text(str(raw_text), unicode_form, lowercase)
            reason = "empty_text" if len(text) < min_chars else KEEP
        if reason == KEEP and label is None:
            reason = "missing_label"
        texts.append(text)
        labels.append(label or "")
        reasons.append(reason)
    return pd.DataFrame({"text": texts, "label": labels, "drop_reason": reasons})


def _missing(value: Any) -> bool:
    """None, NaN and pandas' NA (pandas 3 strings use it) all mean a missing cell."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def keep_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["drop_reason"] == KEEP].drop(columns=["drop_reason"])
