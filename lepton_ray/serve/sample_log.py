"""A JSONL sample of a replica's predictions, for drift checks."""

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any


class _SampleLog:
    """A JSONL sample of predictions for drift checks: text hash, label, probability, version."""

    def __init__(self, path: str | None, rate: float) -> None:
        self.rate = rate if path else 0.0
        self._file = None
        if self.rate > 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def record(self, texts: list[str], answers: list[dict[str, Any]], version: str) -> None:
        if self._file is None:
            return
        lines = []
        for text, answer in zip(texts, answers, strict=True):
            if random.random() >= self.rate:
                continue
            lines.append(
                json.dumps(
                    {
                        "time": round(time.time(), 3),
                        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                        "chars": len(text),
                        "label": answer["label"],
                        "probability": answer["probabilities"][answer["label"]],
                        "truncated": answer["truncated"],
                        "model_version": version,
                    }
                )
                + "\n"
            )
        if lines:
            self._file.write("".join(lines))
