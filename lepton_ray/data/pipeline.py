"""``run_preprocess``: the whole data stage, written atomically to ``<run_dir>/data``."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.data.clean import KEEP as KEEP_REASON
from lepton_ray.data.clean import clean_batch, keep_rows
from lepton_ray.data.sources import detect_format, read_source, root_cause
from lepton_ray.data.split import KEY, SPLITS, assign_split_batch
from lepton_ray.data.tokenize import tokenize_batch
from lepton_ray.errors import DataError, StageError

MANIFEST = "manifest.json"


def run_preprocess(cfg: ExperimentConfig, log=print) -> dict[str, Any]:
    """Read, clean, deduplicate, split and tokenize; return the manifest.

    Output appears at ``cfg.data_dir`` only when complete: it is built in a temporary
    folder beside it and renamed into place, and ``manifest.json`` is its last file.
    """
    import ray.data

    data = cfg.data
    started = time.time()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True

    log(f"[data] reading {data.source_name}")
    source = read_source(data)
    ds = source.ds
    cleaned = _run(
        lambda: ds.map_batches(
            clean_batch,
            batch_format="pandas",
            fn_kwargs=dict(
                unicode_form=data.clean.unicode_form,
                lowercase=data.clean.lowercase,
                min_chars=data.clean.min_chars,
            ),
        ).materialize(),
        data.source_name,
    )
    reasons = _count_by(cleaned, "drop_reason")
    n_read = sum(reasons.values())
    dropped = {reason: n for reason, n in reasons.items() if reason}
    if source.n_bad:
        # Malformed rows skipped by the reader (data.on_bad_row: skip) are counted too:
        # rows in the files = kept + dropped, reason by reason.
        dropped["bad_row"] = source.n_bad
        n_read += source.n_bad
    kept = cleaned.map_batches(keep_rows, batch_format="pandas").materialize()
    if n_read == 0 or kept.count() == 0:
        raise DataError(
            f"data {data.source_name}: no usable rows ({n_read} read, dropped {dropped})"
        )
    labels = _sorted_labels(kept.unique("label"))
    if len(labels) < 2:
        raise DataError(
            f"data.label_column '{data.label_column}' in {data.source_name} has a single class "
            f"({labels[0]!r}); classification needs at least 2"
        )
    log(
        f"[data] {n_read} rows read, {len(labels)} classes; dropped while cleaning: {dropped or 'none'}"
    )

    assigned = kept.map_batches(
        assign_split_batch,
        batch_format="pandas",
        fn_kwargs=dict(
            validation=data.split.validation, test=data.split.test, seed=data.split.seed
        ),
    )
    if data.dedup:
        # Exact (text, label) duplicates: an aggregation, hash-partitioned across the cluster.
        # The key and split are functions of the text, so they ride along in the group key.
        counted = assigned.groupby(["text", "label", KEY, "split"]).count()
        n_unique = counted.count()
        n_kept = reasons.get(KEEP_REASON, 0)
        if n_kept > n_unique:
            dropped["duplicate"] = n_kept - n_unique
        assigned = counted.drop_columns(["count()"])
    # Written in hash order: every block mixes the classes (training shuffles from there).
    assigned = assigned.sort(KEY).materialize()
    per_class = _count_by(assigned, "split", "label")
    split_counts: dict[str, int] = {}
    for key, n in per_class.items():  # one pass over the data, not two
        split = key.split("|", 1)[0]
        split_counts[split] = split_counts.get(split, 0) + n
    _check_splits(data, labels, split_counts, per_class)

    tokenized = assigned.map_batches(
        tokenize_batch,
        batch_format="pandas",
        fn_kwargs=dict(model_name=cfg.model.name, max_length=data.max_length, labels=labels),
    ).materialize()

    out = cfg.data_dir
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for split in SPLITS:
            part = tokenized.filter(expr=f"split == '{split}'").drop_columns(["split", KEY])
            if split_counts.get(split, 0):
                part.write_parquet(str(tmp / split))
        manifest = {
            "source": data.source_name,
            "format": detect_format(data),
            "fingerprint": source.fingerprint,
            "bad_rows": source.bad_rows,
            "labels": labels,
            "model": cfg.model.name,
            "max_length": data.max_length,
            "rows_read": n_read,
            "dropped": dropped,
            "splits": {s: split_counts.get(s, 0) for s in SPLITS},
            "class_counts": {
                s: {k.split("|", 1)[1]: v for k, v in per_class.items() if k.startswith(s + "|")}
                for s in SPLITS
            },
            "seconds": round(time.time() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"[data] wrote {out}: "
        + ", ".join(f"{s}={manifest['splits'][s]}" for s in SPLITS)
        + f" (dropped {sum(dropped.values())}: {dropped or 'none'})"
    )
    return manifest


def _check_splits(
    data, labels: list[str], split_counts: dict[str, int], per_class: dict[str, int]
) -> None:
    """Refuse a split that would train or select models on nothing."""
    for split in ("train", "validation"):
        if not split_counts.get(split):
            raise DataError(
                f"data {data.source_name}: the {split} split is empty after cleaning and "
                f"deduplication ({sum(split_counts.values())} rows left); add rows or raise "
                "data.split.validation"
            )
    missing = [label for label in labels if not per_class.get(f"train|{label}")]
    if missing:
        raise DataError(
            f"data {data.source_name}: class(es) {missing} have no training row after the "
            "split; add rows for them or lower data.split.validation/test"
        )


def load_manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    path = cfg.data_dir / MANIFEST
    if not path.is_file():
        raise StageError(
            f"no preprocessed data at {cfg.data_dir}; run `lepton-ray preprocess` on this config first"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("model") != cfg.model.name or manifest.get("max_length") != cfg.data.max_length:
        raise StageError(
            f"{cfg.data_dir} was tokenized for model '{manifest.get('model')}' "
            f"(max_length {manifest.get('max_length')}); run `lepton-ray preprocess` again"
        )
    return manifest


def _run(make, source: str):
    try:
        return make()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray wraps reader errors; name the file
        raise DataError(f"data {source}: {root_cause(err)}") from None


def _count_by(ds, *columns: str) -> dict[str, int]:
    rows = ds.groupby(list(columns)).count().take_all()
    return {"|".join(str(row[c]) for c in columns): int(row["count()"]) for row in rows}


def _sorted_labels(values: list[str]) -> list[str]:
    values = sorted(set(values))
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return values


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
