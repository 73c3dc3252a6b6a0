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

    def record_generation(self, prompt: str, answer: dict[str, Any], version: str) -> None:
        """One generation (a language model's replica): prompt hash and size, the token
        counts, why it ended and its time to first token; never the texts."""
        if self._file is None or random.random() >= self.rate:
            return
        line = {
            "time": round(time.time(), 3),
            "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
            "chars": len(prompt),
            **answer,
            "model_version": version,
        }
        self._file.write(json.dumps(line) + "\n")
