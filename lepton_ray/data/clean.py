"""Row-level cleaning: HTML, unicode and whitespace normalisation, PII masking, drop reasons."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lepton_ray.text import _normalize, normalize_text, pii_kinds

__all__ = ["KEEP", "clean_batch", "keep_rows", "normalize_label", "normalize_text"]

KEEP = ""
"""drop_reason of a row that survives cleaning."""

DROP_REASONS = ("missing_text", "empty_text", "too_long", "missing_label")
"""Why ``clean_batch`` drops a row, in the order they are checked (the first one applies)."""

MASK_COLUMNS = {"email": "masked_email", "url": "masked_url", "phone": "masked_phone"}
"""Per-row counts of masked PII, by kind (zeros when masking is off)."""


def normalize_label(value: Any) -> str | None:
    """Labels become strings: 1, 1.0 and "1" are the same class; blanks are missing."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def clean_batch(
    batch: pd.DataFrame,
    unicode_form: str,
    lowercase: bool,
    min_chars: int,
    max_chars: int | None = None,
    strip_html: bool = False,
    mask_pii: Sequence[str] = (),
) -> pd.DataFrame:
    """Clean a batch of ``text``/``label`` rows and tag each with why it is dropped, if it is.

    Returns ``text``, ``label``, ``drop_reason`` (:data:`KEEP` or one of
    :data:`DROP_REASONS`: ``missing_text``; ``empty_text`` when the cleaned text is shorter
    than ``min_chars``; ``too_long`` when it is longer than ``max_chars``; ``missing_label``)
    and the int64 columns of :data:`MASK_COLUMNS`, what ``mask_pii`` replaced in the row.
    Lengths are measured on the cleaned text, placeholders such as ``[EMAIL]`` included.
    """
    kinds = pii_kinds(mask_pii)
    n = len(batch)
    texts: list[str] = []
    labels: list[str] = []
    reasons: list[str] = []
    masked = {kind: np.zeros(n, dtype=np.int64) for kind in MASK_COLUMNS}
    label_of: dict[tuple[type, Any], str | None] = {}  # labels repeat: normalise each once
    for i, (raw_text, raw_label) in enumerate(
        zip(batch["text"].tolist(), batch["label"].tolist(), strict=True)
    ):
        try:
            label = label_of[type(raw_label), raw_label]
        except KeyError:
            label = label_of[type(raw_label), raw_label] = normalize_label(raw_label)
        except TypeError:  # unhashable
            label = normalize_label(raw_label)
        if is_missing(raw_text):
            text, reason = "", "missing_text"
        else:
            text, counts = _normalize(str(raw_text), unicode_form, lowercase, strip_html, kinds)
            for kind, count in counts.items():
                if count:
                    masked[kind][i] = count
            if len(text) < min_chars:
                reason = "empty_text"
            elif max_chars is not None and len(text) > max_chars:
                reason = "too_long"
            else:
                reason = KEEP
        if reason == KEEP and label is None:
            reason = "missing_label"
        texts.append(text)
        labels.append(label or "")
        reasons.append(reason)
    out = pd.DataFrame({"text": texts, "label": labels, "drop_reason": reasons})
    for kind, column in MASK_COLUMNS.items():
        out[column] = masked[kind]
    return out


def is_missing(value: Any) -> bool:
    """None, NaN and pandas' NA (pandas 3 strings use it) all mean a missing cell."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def keep_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["drop_reason"] == KEEP].drop(columns=["drop_reason"])
