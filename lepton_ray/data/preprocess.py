"""``run_preprocess``: the whole data stage, written atomically to ``<run_dir>/data``.

One streaming Ray Data pass and two rounds of plain Ray tasks:

1. read every source, clean, key and split each row, and tokenize the rows kept so far in
   an actor pool (the tokenizer loads once per actor; the actors start while files are
   still being read); materialized;
2. a map-reduce of Ray tasks hash-partitions the rows by their text's key, tags exact
   duplicates, conflicting labels and contaminated evaluation rows (every copy of a text
   meets in one partition) and counts each partition: drop reasons, classes per split,
   masked PII, a sample of dropped rows; evaluation rows whose text a model already
   trained on (``trained_on``: its training split's Parquet files) are dropped there too;
3. optionally, near-duplicates by MinHash LSH (its own distributed plan; only the keys of
   the rows to drop come back, and the partitions are recounted);
4. one Ray task per partition: label ids, augmentation of training rows, Parquet files per
   split, and exact row/class/token-length counts.

The output appears at ``cfg.data_dir`` only when complete; the same inputs and
preprocessing config reuse it (``data.cache``), keyed by the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.data.clean import KEEP
from lepton_ray.data.output import task_options, token_extras, write_sample, write_splits
from lepton_ray.data.rows import (
    EVAL_SPLITS,
    Tokenize,
    merge_summaries,
    partition_block,
    prepare_batch,
    resolve_partition,
    summarize_batch,
    tokenizer_spec,
    trained_key_parts,
)
from lepton_ray.data.sources import TASK_CPUS, Source, detect_format, read_source, root_cause
from lepton_ray.data.split import KEY, SPLITS
from lepton_ray.errors import DataError, StageError
from lepton_ray.runtime.uri import (
    Uri,
    is_dir,
    is_file,
    location,
    parquet_files,
    read_text,
    remove_tree,
    write_text,
)
from lepton_ray.tasks import get_task

MANIFEST = "manifest.json"
DROPPED_SAMPLE = "dropped_sample.jsonl"
VERSION = 4
"""Bumped when the stage's output changes for the same config (invalidates caches)."""
ROWS_PER_BLOCK = 100_000


def run_preprocess(
    cfg: ExperimentConfig, log=print, force: bool = False, trained_on: Sequence[Path] = ()
) -> dict[str, Any]:
    """Read, clean, deduplicate, split, augment and tokenize; return the manifest.

    ``trained_on``: folders of preprocessed training rows (Parquet) of a model that will be
    evaluated on this data; validation and test rows with one of their texts are dropped as
    ``seen_in_training`` and counted in the manifest's ``seen_in_training``.
    """
    import ray
    import ray.data

    data = cfg.data
    started = time.time()
    ray.data.DataContext.get_current().enable_progress_bars = True

    timer = _Timer()
    trained_files = _parquet_files(trained_on)
    inputs = input_fingerprints(cfg, trained_files)
    fingerprint = preprocessing_fingerprint(cfg, inputs)
    cached = _cached_manifest(cfg, fingerprint)
    if cached is not None and data.cache and not force:
        log(f"[data] reusing {cfg.data_dir} (fingerprint {fingerprint} unchanged)")
        return cached | {"reused": True}

    log(f"[data] reading {data.source_name}")
    timer.lap("fingerprint")
    sources = _read_sources(cfg)
    timer.lap("scan")
    n_in = sum(s.n_rows for _, s in sources)
    blocks = max(_cluster_cpus(), min(256, -(-n_in // ROWS_PER_BLOCK)))
    clean = dict(
        unicode_form=data.clean.unicode_form,
        lowercase=data.clean.lowercase,
        min_chars=data.clean.min_chars,
        max_chars=data.clean.max_chars,
        strip_html=data.clean.strip_html,
        mask_pii=list(data.clean.mask_pii),
    )
    hashed = {s: getattr(data.split, s) for s in EVAL_SPLITS if s not in data.split.files}
    names = data.split.split_names() if data.split.column else None
    # Evaluation rows keep their raw text (the gate cleans it as each version does), unless
    # mask_pii asks that nothing unmasked outlives cleaning.
    keep_raw = not data.clean.mask_pii
    if not keep_raw:
        log("[data] data.clean.mask_pii is set: no raw_text kept (the gate scores cleaned text)")
    task = get_task(cfg.task)
    kwargs = dict(
        clean=clean,
        seed=data.split.seed,
        hashed=hashed,
        names=names,
        keep_raw=keep_raw,
        task=cfg.task,
    )
    prepared = None
    for preset, source in sources:
        part = source.ds.map_batches(
            prepare_batch,
            num_cpus=TASK_CPUS,
            batch_format="pandas",
            fn_kwargs=dict(kwargs, preset=preset),
        )
        prepared = part if prepared is None else prepared.union(part)
    # Tokenized in the same streaming pass as the read: the actors start while files are
    # read, and copies of a text dropped below cost a few wasted tokens, not a pass.
    tokenizer = tokenizer_spec(cfg.model.name)
    prepared = prepared.map_batches(
        Tokenize,
        batch_format="pandas",
        fn_constructor_kwargs=dict(
            tokenizer=tokenizer,
            max_length=data.max_length,
            task=cfg.task,
            model=cfg.model.name,
            options=task_options(cfg),
        ),
        compute=ray.data.ActorPoolStrategy(size=_actor_count()),
        num_cpus=TASK_CPUS,
    )
    prepared = _run(prepared.materialize, data.source_name)
    timer.lap("read_clean_tokenize")
    resolved, summaries = _resolve_by_text(
        prepared,
        blocks,
        dict(
            exact=data.dedup.exact,
            conflicts=data.dedup.conflicts,
            contamination=data.split.contamination,
        ),
        trained_files,
        data.split.seed,
    )

    timer.lap("dedup_count")
    drops, near = frozenset(), None
    if data.dedup.near.enabled:
        drops, near = _near_duplicates(cfg, resolved, log)

        timer.lap("near_duplicates")
    # The resolve tasks counted their blocks already; near-duplicate tags need a recount.
    summary = _summarize(resolved, drops) if drops else merge_summaries(summaries)
    timer.lap("count")
    n_bad = sum(s.n_bad for _, s in sources)
    dropped = {r: n for r, n in summary["reasons"].items() if r != KEEP and n}
    if n_bad:
        # Malformed rows skipped by the reader (data.on_bad_row: skip) are counted too.
        dropped["bad_row"] = n_bad
    n_kept = summary["reasons"].get(KEEP, 0)
    n_read = n_kept + sum(dropped.values())
    _check_nothing_lost(data, sources, sum(summary["reasons"].values()))
    per_class = summary["kept"]
    if n_kept == 0:
        raise DataError(
            f"data {data.source_name}: no usable rows ({n_read} read, dropped {dropped})"
        )
    labels = task.vocabulary(
        {key.split("|", 1)[1] for key in per_class},
        f"data.label_column '{data.label_column}' in {data.source_name}",
    )
    split_counts: dict[str, int] = {}
    for key, n in per_class.items():
        split = key.split("|", 1)[0]
        split_counts[split] = split_counts.get(split, 0) + n
    _check_splits(data, labels, split_counts, per_class)
    log(
        f"[data] {n_read} rows read"
        + (f", {len(labels)} classes" if labels else "")
        + "; dropped: "
        f"{dict(sorted(dropped.items())) or 'none'}"
    )

    label_map = {label: i for i, label in enumerate(labels)}
    augment = None
    if data.augment.enabled:
        augment = data.augment.model_dump(exclude={"enabled"})
    out = cfg.data_dir
    if isinstance(out, Uri):
        # An object store renames nothing: the old output goes first and the manifest,
        # written last in one PUT, is what makes the new one exist (load_manifest).
        remove_tree(out)
        tmp = out
    else:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
    try:
        stats = write_splits(
            resolved,
            tmp,
            dict(
                task=cfg.task,
                labels=labels,
                drops=drops,
                augment=augment,
                tokenizer=tokenizer,
                max_length=data.max_length,
                keep_raw=keep_raw,
            ),
            labels,
        )
        timer.lap("write")
        if stats["kept"] != n_kept:
            raise StageError(
                f"data stage lost rows: {n_kept} kept rows counted but {stats['kept']} written"
            )
        write_sample(tmp / DROPPED_SAMPLE, summary["sample"], sources)
        manifest = {
            "version": VERSION,
            "source": data.source_name,
            "sources": {(preset or "all"): _source_name(cfg, preset) for preset, _ in sources},
            "split_source": data.split.source,
            "format": detect_format(data) if data.hf is None else "hf",
            "fingerprint": fingerprint,
            "inputs": inputs,
            "reused": False,
            "bad_rows": [row for _, s in sources for row in s.bad_rows][:50],
            "labels": labels,
            "label_map": label_map,
            "model": cfg.model.name,
            "max_length": data.max_length,
            "raw_eval_text": keep_raw,
            "rows_read": n_read,
            "dropped": dropped,
            "kept": n_kept,
            "augmented": stats["augmented"],
            "splits": {s: stats["splits"].get(s, 0) for s in SPLITS},
            "class_counts": stats["class_counts"],
            "masked": {k: v for k, v in summary["masked"].items()},
            "conflicts": {"texts": summary["conflict_texts"], "rows": summary["conflict_rows"]},
            "contamination": {
                **{s: summary["contaminated"].get(s, 0) for s in EVAL_SPLITS},
                "action": data.split.contamination,
            },
            "token_lengths": stats["token_lengths"],
            **token_extras(cfg, stats),
            "seconds": round(time.time() - started, 1),
            "timings": timer.laps,
        }
        if near is not None:
            manifest["near_duplicates"] = near
        if trained_files:
            manifest["seen_in_training"] = {s: summary["seen"].get(s, 0) for s in EVAL_SPLITS}
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        if tmp != out:
            _swap_into_place(tmp, out)
    except BaseException:
        remove_tree(tmp)
        raise
    log(
        f"[data] wrote {out} in {manifest['seconds']} s: "
        + ", ".join(f"{s}={manifest['splits'][s]}" for s in SPLITS)
    )
    return manifest


class _Timer:
    """Seconds per phase, kept in the manifest (where the stage's time goes)."""

    def __init__(self):
        self.last, self.laps = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.last = now


# ------------------------------------------------------------------------------- fingerprints
def input_fingerprints(cfg: ExperimentConfig, trained_on: Sequence[str] = ()) -> dict[str, str]:
    """Content hash of every input: the main source, each split file and the training rows
    the evaluation splits must not hold."""
    from lepton_ray.data.sources import file_digests, fingerprint

    prints = {"all": fingerprint(cfg.data)}
    for split, path in cfg.data.split.files.items():
        prints[split] = fingerprint(source_config(cfg, path))
    if trained_on:
        prints["trained_on"] = file_digests(trained_on)
    return prints


def _parquet_files(folders: Sequence[Path]) -> list[str]:
    """The Parquet files of preprocessed splits (local paths or URIs), in a fixed order."""
    found_all = []
    for folder in folders:
        found = parquet_files(location(folder))
        if not found:
            raise StageError(f"no preprocessed rows at {folder} (a training split to check)")
        found_all.extend(found)
    return found_all


def preprocessing_fingerprint(cfg: ExperimentConfig, inputs: dict[str, str]) -> str:
    """Hash of the inputs' contents and of everything that decides the output."""
    settings = cfg.data.model_dump(mode="json", exclude={"cache", "path", "packing"})
    settings["split"]["files"] = sorted(cfg.data.split.files)  # contents are in ``inputs``
    blob = json.dumps(
        {"version": VERSION, "inputs": inputs, "data": settings, "model": cfg.model.name},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_manifest(cfg: ExperimentConfig, fingerprint: str) -> dict[str, Any] | None:
    path = cfg.data_dir / MANIFEST
    try:
        manifest = json.loads(read_text(path))
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    if not all(is_dir(cfg.data_dir / s) for s, n in manifest["splits"].items() if n):
        return None
    return manifest


# ------------------------------------------------------------------------------------ reading
def source_config(cfg: ExperimentConfig, path):
    """The data config of other files (a split file, data to predict): same columns and
    format, no split or row limit of its own. ``path``: absolute, or a URI."""
    return cfg.data.model_copy(
        update={
            "path": path,
            "hf": None,
            "max_rows": None,
            "split": cfg.data.split.model_copy(update={"files": {}, "column": None}),
        }
    )


def _read_sources(cfg: ExperimentConfig) -> list[tuple[str | None, Source]]:
    """(preset split or None, source) for data.path/hf and every data.split.files entry."""
    task = get_task(cfg.task)
    sources = [(None, read_source(cfg.data, task))]
    for split, path in cfg.data.split.files.items():
        sources.append((split, read_source(source_config(cfg, path), task)))
    return sources


def _source_name(cfg: ExperimentConfig, preset: str | None) -> str:
    return cfg.data.source_name if preset is None else str(cfg.data.split.files[preset])


def _near_duplicates(cfg: ExperimentConfig, resolved, log) -> tuple[frozenset, dict[str, Any]]:
    """Keys of near-duplicate rows to drop, and what the search found."""
    from lepton_ray.data.neardup import near_duplicate_drops

    near = cfg.data.dedup.near
    live = resolved.map_batches(
        lambda b: b.loc[b["drop_reason"] == KEEP, ["text", KEY, "split"]], batch_format="pandas"
    )
    found = _run(
        lambda: near_duplicate_drops(
            live,
            threshold=near.threshold,
            num_perm=near.num_perm,
            ngram=near.ngram,
            seed=cfg.data.split.seed,
        ).take_all(),
        cfg.data.source_name,
    )
    # Same split: a duplicate. Across splits (the copy in train): a leak, removed when the
    # split is ours (hash) or when contamination removal is asked for; else only reported.
    remove_cross = cfg.data.split.source == "hash" or cfg.data.split.contamination == "remove"
    drops, cross = set(), 0
    for row in found:
        same = row["split"] == row["dup_split"]
        if not same:
            cross += 1
        if same or remove_cross:
            drops.add((int(row[KEY]), row["split"]))
    log(f"[data] near-duplicates: {len(found)} found ({cross} across splits)")
    return frozenset(drops), {
        "threshold": near.threshold,
        "found": len(found),
        "cross_split": cross,
        "cross_split_removed": remove_cross,
    }


def _resolve_by_text(
    prepared, parts: int, options: dict[str, Any], trained_on: list[str], seed: int
):
    """Hash-partition the rows by their text's key and resolve duplicates per partition.

    A map-reduce of plain Ray tasks over the materialized blocks: every copy of a text lands
    in one partition, and each reduce task also counts its rows. Ray Data's hash shuffle
    does the same with an actor pool whose start-up costs more than the work at these sizes.
    The keys of the ``trained_on`` files' texts are partitioned the same way, one task per
    file, so each partition meets the keys of its own texts (the driver holds none).
    Returns the resolved dataset (materialized) and the per-partition counters.
    """
    import ray
    import ray.data

    split = (
        ray.remote(num_returns=parts, num_cpus=TASK_CPUS)(partition_block) if parts > 1 else None
    )
    pieces = []
    for bundle in prepared.iter_internal_ref_bundles():
        for block in bundle.block_refs:
            out = (
                split.remote(block, parts)
                if split
                else [ray.remote(num_cpus=TASK_CPUS)(partition_block).remote(block, 1)]
            )
            pieces.append(out)
    keys = ray.remote(num_returns=parts, num_cpus=TASK_CPUS)(trained_key_parts)
    seen = [keys.remote(path, seed, parts) for path in trained_on]
    seen = [[k] for k in seen] if parts == 1 else seen  # one return: a ref, not a list
    resolve = ray.remote(num_returns=2, num_cpus=TASK_CPUS)(resolve_partition)
    results = [
        resolve.remote(options, len(seen), *[k[i] for k in seen], *[p[i] for p in pieces])
        for i in range(parts)
    ]
    blocks = [r[0] for r in results]
    summaries = ray.get([r[1] for r in results])
    return ray.data.from_arrow_refs(blocks), summaries


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _summarize(resolved, drops: frozenset) -> dict[str, Any]:
    """Counters of every materialized block, one plain Ray task per block.

    Plain tasks on the block references skip a Ray Data execution's start-up (seconds on a
    small machine) for what is a cheap pass; only the counters come back to the driver.
    """
    import ray

    task = ray.remote(num_cpus=TASK_CPUS)(_summarize_block)
    drops_ref = ray.put(drops)
    refs = [
        task.remote(block, drops_ref)
        for bundle in resolved.iter_internal_ref_bundles()
        for block in bundle.block_refs
    ]
    return merge_summaries(ray.get(refs))


def _summarize_block(block, drops: frozenset) -> dict[str, Any]:
    from ray.data.block import BlockAccessor

    frame = BlockAccessor.for_block(block).to_pandas()
    return summarize_batch(frame, drops)


def _actor_count() -> int:
    """Tokenizer actors: half a CPU each, leaving room for the rest of the plan."""
    import ray

    cpus = ray.available_resources().get("CPU", 1.0)
    return max(1, min(8, int(cpus)))


def _check_nothing_lost(data, sources, tagged: int) -> None:
    """The rows tagged (kept or with a drop reason) are exactly the rows the scan counted."""
    expected = 0
    for preset, source in sources:
        limit = data.max_rows if preset is None and data.max_rows else None
        expected += min(source.n_rows, limit) if limit else source.n_rows
    if tagged != expected:
        raise StageError(
            f"data stage lost rows: the files hold {expected} readable rows but {tagged} "
            "came through cleaning (a bug: please report it with this config)"
        )


def _check_splits(
    data, labels: list[str], split_counts: dict[str, int], per_class: dict[str, int]
) -> None:
    """Refuse a split that would train or select models on nothing."""
    for split in ("train", "validation"):
        if not split_counts.get(split):
            raise DataError(
                f"data {data.source_name}: the {split} split is empty after cleaning and "
                f"deduplication ({sum(split_counts.values())} rows left); add rows, raise "
                "data.split.validation or give the split's file in data.split.files"
            )
    missing = [label for label in labels if not per_class.get(f"train|{label}")]
    if missing:
        raise DataError(
            f"data {data.source_name}: class(es) {missing} have no training row after the "
            "split; add rows for them or lower data.split.validation/test"
        )


def load_manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    path = cfg.data_dir / MANIFEST
    if not is_file(path):
        raise StageError(
            f"no preprocessed data at {cfg.data_dir}; run `lepton-ray preprocess` on this config first"
        )
    manifest = json.loads(read_text(path))
    if manifest.get("model") != cfg.model.name or manifest.get("max_length") != cfg.data.max_length:
        raise StageError(
            f"{cfg.data_dir} was tokenized for model '{manifest.get('model')}' "
            f"(max_length {manifest.get('max_length')}); run `lepton-ray preprocess` again"
        )
    return manifest


def _run(make, source: str):
    try:
        return make()
    except (DataError, StageError):
        raise
    except Exception as err:  # noqa: BLE001 - Ray wraps reader errors; name the file
        raise DataError(f"data {source}: {root_cause(err)}") from None


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
