"""The data stage's output: each partition's Parquet files per split, written in plain Ray
tasks, and the counts the manifest gives of them (rows, classes, token lengths; a language
model's prompt and response lengths and the real-token share with and without packing)."""

from __future__ import annotations

import json
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.data.rows import write_partition
from lepton_ray.data.sources import TASK_CPUS
from lepton_ray.data.split import SPLITS
from lepton_ray.runtime.uri import Location, write_text

LENGTH_BINS = 16


def task_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a task's tokenizer actors need of the config (plain JSON)."""
    chat = cfg.data.chat
    return {
        "format": chat.format,
        "template": chat.template,
        "train_on_prompt": chat.train_on_prompt,
        "too_long": chat.too_long,
    }


def token_extras(cfg: ExperimentConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """A language model's prompt/response lengths and the real-token share with and
    without packing (the training split, rows of data.max_length)."""
    if "response_lengths" not in stats:
        return {}
    import numpy as np

    from lepton_ray.data.packing_stats import real_token_share

    # Examples are never cut at max_length (too_long drops them or cuts the prompt): a
    # length of max_length is a fit, not a truncation.
    stats["token_lengths"].pop("truncated", None)
    hist = stats["train_lengths"]
    lengths = np.repeat(np.arange(len(hist)), hist)
    return {
        "prompt_lengths": stats["prompt_lengths"],
        "response_lengths": stats["response_lengths"],
        "packing": real_token_share(lengths, cfg.data.max_length) | {"enabled": cfg.data.packing},
        # Examples kept by too_long: truncate_prompt with their prompt's first tokens cut.
        "prompts_cut": {
            "policy": cfg.data.chat.too_long,
            "rows": int(sum(stats.get("prompts_cut", {}).values())),
            "per_split": dict(stats.get("prompts_cut", {})),
        },
    }


def write_splits(resolved, tmp: Location, options: dict[str, Any], labels: list[str]):
    """Write each partition's kept rows as Parquet, one file per split, in plain Ray tasks;
    return the merged counts (rows, classes, augmented rows, token lengths per split)."""
    import numpy as np
    import ray

    task = ray.remote(num_cpus=TASK_CPUS)(write_partition)
    refs = [
        task.remote(i, block, str(tmp), options)
        for i, block in enumerate(
            b for bundle in resolved.iter_internal_ref_bundles() for b in bundle.block_refs
        )
    ]
    max_length = options["max_length"]
    splits, augmented = {}, 0
    classes = {s: np.zeros(len(labels), dtype=np.int64) for s in SPLITS}
    lengths = {s: np.zeros(max_length + 1, dtype=np.int64) for s in SPLITS}
    pieces = {
        key: {s: np.zeros(max_length + 1, dtype=np.int64) for s in SPLITS}
        for key in ("prompt_lengths", "response_lengths")
    }
    cut: dict[str, int] = {}
    for part in ray.get(refs):
        for split, st in part.items():
            if "prompts_cut" in st:
                cut[split] = cut.get(split, 0) + st["prompts_cut"]
            splits[split] = splits.get(split, 0) + st["rows"]
            augmented += st["augmented"]
            classes[split] += np.asarray(st["classes"], dtype=np.int64)
            lengths[split] += np.asarray(st["lengths"])[: max_length + 1]
            for key, hist in pieces.items():
                if key in st:
                    hist[split] += np.asarray(st[key])[: max_length + 1]
    return {
        "splits": splits,
        "augmented": augmented,
        "kept": sum(splits.values()) - augmented,
        "class_counts": {
            s: {label: int(classes[s][i]) for i, label in enumerate(labels)}
            for s in SPLITS
            if splits.get(s)
        }
        | {s: {} for s in SPLITS if not splits.get(s)},
        "token_lengths": _length_summary(lengths, max_length),
        "train_lengths": lengths["train"],
        **({"prompts_cut": cut} if cut else {}),
        **{
            key: _length_summary(hist, max_length)
            for key, hist in pieces.items()
            if any(h.sum() for h in hist.values())
        },
    }


def _length_summary(per_split: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Histogram bins and exact percentiles from 1-token counts."""
    import numpy as np

    edges = np.unique(np.linspace(0, max_length + 1, LENGTH_BINS + 1).round().astype(int))
    total = sum(per_split.values())
    n = int(total.sum())

    def percentile(q: float) -> int:
        return int(np.searchsorted(np.cumsum(total), q * n, side="left")) if n else 0

    return {
        "edges": edges.tolist(),
        "counts": {
            s: [int(c[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
            for s, c in per_split.items()
            if c.sum()
        },
        "mean": round(float((total * np.arange(len(total))).sum() / n), 2) if n else 0.0,
        "p50": percentile(0.5),
        "p95": percentile(0.95),
        "max": int(np.flatnonzero(total).max()) if n else 0,
        "truncated": int(total[max_length]),
    }


def write_sample(path: Location, sample: list[dict[str, Any]], sources) -> None:
    """Dropped rows with their reasons, and the malformed rows the reader skipped."""
    lines = [json.dumps(item) + "\n" for item in sample]
    for _, source in sources:
        lines.extend(
            json.dumps({"reason": "bad_row", **row}) + "\n" for row in source.bad_rows[:20]
        )
    write_text(path, "".join(lines))
