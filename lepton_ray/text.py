"""Text normalisation shared by every place that feeds raw text to a model.

Training text is cleaned by the data stage; the same settings travel in the model artifact
(``ModelMeta.cleaning``) so serving, prediction, compression and benchmarks see the text
exactly as training did. This module imports nothing heavy and nothing from the stages.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

_WHITESPACE = re.compile(r"\s+")
_CONTROL = {"Cc", "Cf"}  # control and format characters (zero-width, BOM, ...)
_SPACES = "\t\n\r\v\f"

DEFAULT_CLEANING: dict[str, Any] = {"unicode_form": "NFKC", "lowercase": False}
"""The cleaning keys that change what a model sees (``data.clean`` minus row filters)."""


def normalize_text(text: str, unicode_form: str = "NFKC", lowercase: bool = False) -> str:
    """Normalise unicode, strip control characters and collapse whitespace."""
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = "".join(
        " " if ch in _SPACES else ch
        for ch in text
        if ch in _SPACES or unicodedata.category(ch) not in _CONTROL
    )
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


def clean_texts(texts: Iterable[str], cleaning: Mapping[str, Any] | None) -> list[str]:
    """Apply an artifact's cleaning settings to raw texts (``None``: the defaults)."""
    settings = {**DEFAULT_CLEANING, **(cleaning or {})}
    form, lower = settings["unicode_form"], bool(settings["lowercase"])
    return [normalize_text(t, form, lower) for t in texts]
