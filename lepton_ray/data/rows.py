"""Batch transforms of the data stage, each a plain function of a pandas batch.

Rows are never filtered out before they are counted: every transform tags a row's
``drop_reason`` (``KEEP``: kept) and the stage counts the tags, so the rows read always
equal the rows kept plus the rows dropped, reason by reason.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

import pandas as pd

from lepton_ray.data.clean import KEEP, clean_batch, is_missing
from lepton_ray.data.split import KEY, KEY_TEXT, assign_split_batch, text_key

SAMPLE_PER_REASON = 20
"""Dropped rows kept per reason for the data report."""
SAMPLE_CHARS = 200
EVAL_SPLITS = ("validation", "test")
MASKED = ("email", "url", "phone")
SEEN_IN_TRAINING = "seen_in_training"
"""Drop reason of an evaluation row whose text a model already trained on (``trained_on``)."""
RAW_TEXT = "raw_text"
"""Column of the validation and test files holding each row's text before ``data.clean``
(the gate scores every version from it through its own cleaning). Written only with
``keep_raw``: never for training rows, never when ``data.clean.mask_pii`` is set."""


def prepare_batch(
    batch: pd.DataFrame,
    clean: dict[str, Any],
    seed: int,
    hashed: dict[str, float] | None = None,
    preset: str | None = None,
    names: dict[str, str] | None = None,
    keep_raw: bool = False,
    task: str | None = None,
) -> pd.DataFrame:
    """Clean a batch, tag drop reasons, and give each row its hash key and split.

    The split is ``preset`` (a file given for that split), the split column's value mapped
    through ``names`` (an unknown value drops the row as ``unknown_split``), or the hash split
    (``split.assign_split_batch``) with the fractions in ``hashed``. With ``keep_raw``, the
    column :data:`RAW_TEXT` holds the text before cleaning for validation and test rows (''
    for training rows and missing texts), always a string.
    """
    hashed = hashed or {}
    cleaned = None
    if task is not None:
        from lepton_ray.tasks import get_task

        cleaned = get_task(task).clean(batch[["text", "label"]], clean)
    out = assign_split_batch(
        cleaned if cleaned is not None else clean_batch(batch[["text", "label"]], **clean),
        validation=hashed.get("validation", 0.0),
        test=hashed.get("test", 0.0),
        seed=seed,
    )
    if preset is not None:
        out["split"] = preset
    elif names is not None:
        mapped = [_split_name(value, names) for value in batch["split"]]
        unknown = pd.Series([m is None for m in mapped], index=out.index)
        out.loc[unknown & (out["drop_reason"] == KEEP), "drop_reason"] = "unknown_split"
        out["split"] = [m or "" for m in mapped]
    if keep_raw:
        out[RAW_TEXT] = [
            "" if split not in EVAL_SPLITS or is_missing(text) else str(text)
            for text, split in zip(batch["text"].tolist(), out["split"].tolist(), strict=True)
        ]
    return out


def _split_name(value: Any, names: dict[str, str]) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return names.get(str(value).strip().lower())


def resolve_duplicates(
    batch: pd.DataFrame,
    exact: bool,
    conflicts: str,
    contamination: str,
    seen: Any = None,
) -> pd.DataFrame:
    """Tag duplicates, conflicting labels and contaminated evaluation rows.

    Runs on whole blocks hash-partitioned by the text's key, so every copy of a text is in
    the batch. Adds ``conflict_text`` (1 on one row per text with several labels) and
    ``contaminated`` (an evaluation row whose text is also a kept training row). Evaluation
    rows whose key is in ``seen`` (the keys of texts a model already trained on) are
    dropped as ``seen_in_training``, whatever ``contamination`` says.
    """
    out = batch.copy()
    out["conflict_text"] = 0
    out["contaminated"] = False
    live = out["drop_reason"] == KEEP
    if not live.any():
        return out
    rows = out[live]
    n_labels = rows.groupby("text")["label"].transform("nunique")
    conflicted = n_labels > 1
    if conflicted.any():
        first = ~rows["text"].duplicated() & conflicted
        out.loc[first[first].index, "conflict_text"] = 1
        if conflicts == "drop":
            out.loc[conflicted[conflicted].index, "drop_reason"] = "conflicting_label"
        elif conflicts == "majority":
            losers = _minority_rows(rows[conflicted])
            out.loc[losers, "drop_reason"] = "conflicting_label"
    if seen is not None and len(seen):
        live = out["drop_reason"] == KEEP
        hit = live & out["split"].isin(EVAL_SPLITS) & out[KEY].isin(seen)
        out.loc[hit, "drop_reason"] = SEEN_IN_TRAINING
    if exact:
        live = out["drop_reason"] == KEEP
        subset = ["text", "split"] if conflicts != "keep" else ["text", "label", "split"]
        dup = out[live].duplicated(subset=subset, keep="first")
        out.loc[dup[dup].index, "drop_reason"] = "duplicate"
    live = out["drop_reason"] == KEEP
    keyed = KEY_TEXT if KEY_TEXT in out else "text"  # a language model: its prompt
    train_texts = set(out.loc[live & (out["split"] == "train"), keyed])
    if train_texts:
        hit = live & out["split"].isin(EVAL_SPLITS) & out[keyed].isin(train_texts)
        out.loc[hit, "contaminated"] = True
        if contamination == "remove":
            out.loc[hit, "drop_reason"] = "contaminated"
    return out


def _minority_rows(rows: pd.DataFrame) -> pd.Index:
    """Rows of conflicting texts that lose the vote (all of a text's rows on a tie)."""
    counts = rows.groupby(["text", "label"]).size().rename("n").reset_index()
    best = counts.groupby("text")["n"].transform("max")
    winners = counts[counts["n"] == best]
    unique_winner = winners.groupby("text")["label"].transform("size") == 1
    keep = set(zip(winners.loc[unique_winner, "text"], winners.loc[unique_winner, "label"]))
    lose = [i for i, t, lab in zip(rows.index, rows["text"], rows["label"]) if (t, lab) not in keep]
    return pd.Index(lose)


def tag_near_duplicates(batch: pd.DataFrame, drops: frozenset) -> pd.DataFrame:
    """Tag rows whose (key, split) the near-duplicate search chose to drop."""
    if not drops:
        return batch
    hit = [
        reason == KEEP and (key, split) in drops
        for reason, key, split in zip(batch["drop_reason"], batch[KEY], batch["split"])
    ]
    out = batch.copy()
    out.loc[pd.Series(hit, index=batch.index), "drop_reason"] = "near_duplicate"
    return out


def summarize_batch(batch: pd.DataFrame, drops: frozenset = frozenset()) -> dict[str, Any]:
    """The counters of one batch (summed on the driver by ``merge_summaries``)."""
    batch = tag_near_duplicates(batch, drops)
    live = batch["drop_reason"] == KEEP
    reasons = Counter(batch["drop_reason"])
    kept_by = Counter(zip(batch.loc[live, "split"], batch.loc[live, "label"]))
    sample: list[dict[str, Any]] = []
    for reason, group in batch[~live].groupby("drop_reason"):
        for text, label, split in group[["text", "label", "split"]].head(SAMPLE_PER_REASON).values:
            sample.append(
                {"reason": reason, "text": str(text)[:SAMPLE_CHARS], "label": label, "split": split}
            )
    contaminated = Counter(batch.loc[batch["contaminated"], "split"])
    seen = Counter(batch.loc[batch["drop_reason"] == SEEN_IN_TRAINING, "split"])
    return {
        "reasons": dict(reasons),
        "kept": {f"{s}|{lab}": n for (s, lab), n in kept_by.items()},
        "masked": {k: int(batch[f"masked_{k}"].sum()) for k in MASKED},
        "conflict_texts": int(batch["conflict_text"].sum()),
        "conflict_rows": int((batch["drop_reason"] == "conflicting_label").sum()),
        "contaminated": dict(contaminated),
        "seen": dict(seen),
        "sample": sample,
    }


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {
        "reasons": Counter(),
        "kept": Counter(),
        "masked": Counter(),
        "contaminated": Counter(),
        "seen": Counter(),
        "conflict_texts": 0,
        "conflict_rows": 0,
        "sample": [],
    }
    per_reason: Counter = Counter()
    for part in parts:
        for key in ("reasons", "kept", "masked", "contaminated", "seen"):
            total[key].update(part[key])
        total["conflict_texts"] += part["conflict_texts"]
        total["conflict_rows"] += part["conflict_rows"]
        for item in part["sample"]:
            if per_reason[item["reason"]] < SAMPLE_PER_REASON:
                per_reason[item["reason"]] += 1
                total["sample"].append(item)
    return total


class Tokenize:
    """``map_batches`` callable: token ids of the rows kept so far.

    A class so that each actor loads the tokenizer once. Dropped rows get no tokens.
    """

    def __init__(
        self,
        tokenizer: str,
        max_length: int,
        task: str | None = None,
        model: str | None = None,
        options: dict[str, Any] | None = None,
    ):
        self.encode = self.task_encode = None
        if task is not None:
            from lepton_ray.tasks import get_task

            self.task_encode = get_task(task).encoder(model, max_length, options or {})
        if self.task_encode is None:
            self.encode = batch_encoder(tokenizer, max_length)

    def __call__(self, batch: pd.DataFrame):
        import numpy as np
        import pyarrow as pa

        live = np.flatnonzero((batch["drop_reason"] == KEEP).to_numpy())
        texts = batch["text"].iloc[live].tolist()
        if self.task_encode is None:
            columns = {"input_ids": self.encode(texts)}
        else:
            # A task's own tokens and per-token targets; a row it cannot fit is dropped.
            columns = self.task_encode(texts)
            drops = columns.pop("drop")
            cut = columns.pop(PROMPT_CUT, None)
            if cut is not None:  # tokens a too-long example's prompt lost (0: none)
                counts = np.zeros(len(batch), dtype=np.int32)
                counts[live] = cut
                batch = batch.assign(**{PROMPT_CUT: counts})
            reasons = batch["drop_reason"].to_numpy(dtype=object).copy()
            for pos, reason in zip(live, drops):
                if reason:
                    reasons[pos] = reason
            batch = batch.assign(drop_reason=reasons)
        table = pa.Table.from_pandas(batch, preserve_index=False)
        for name, encoded in columns.items():
            full: list[list[int]] = [[] for _ in range(len(batch))]
            for pos, row in zip(live, encoded):
                full[pos] = row
            table = table.append_column(name, list_array(full))
        return table


def list_array(rows: list):
    """Token id lists -> an Arrow list<int32> column, built from offsets (no per-int objects)."""
    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


PROMPT_CUT = "prompt_cut"
"""Tokens ``too_long: truncate_prompt`` cut from the start of an example's prompt."""

TOKEN_LISTS = ("input_ids", "labels", "parts")
"""Per-token list columns of the tokenized rows (kept in Arrow, never in pandas)."""


def light_frame(table) -> pd.DataFrame:
    """The columns other than token lists of an Arrow block, as pandas (lists stay in Arrow)."""
    names = [c for c in table.column_names if c not in TOKEN_LISTS]
    return table.select(names).to_pandas()


def finalize_partition(
    table,
    task: str,
    labels: list[str],
    drops: frozenset,
    augment: dict[str, Any] | None,
    tokenizer: str,
    max_length: int,
    keep_raw: bool = False,
) -> dict[str, Any]:
    """Kept rows of one partition (an Arrow table) -> the task's training targets (column
    ``target_column``, from each row's label among ``labels``) and augmented copies; Arrow
    tables per split. With ``keep_raw`` (the table has :data:`RAW_TEXT`, from
    ``prepare_batch``), the validation and test tables keep that column; training tables never.

    Returns ``{"tables": {split: table}, "stats": {...}}`` with the per-split row, class,
    augmented and token-length counts (lengths as a 1-token histogram, merged exactly).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from lepton_ray.tasks import get_task

    kind = get_task(task)
    frame = tag_near_duplicates(light_frame(table), drops).reset_index(drop=True)
    keep = np.flatnonzero((frame["drop_reason"] == KEEP).to_numpy())
    base = ["text", "label", KEY, "split"]
    keyed = [KEY_TEXT] if KEY_TEXT in frame else []
    rows = frame.loc[keep, base + keyed + ([RAW_TEXT] if keep_raw else [])].reset_index(drop=True)
    ids = table.column("input_ids").take(pa.array(keep)).combine_chunks()
    token_targets = {
        name: table.column(name).take(pa.array(keep)).combine_chunks()
        for name in (kind.target_columns if kind.token_targets else ())
    }
    # Prompts cut to fit, per kept row (rows past len(keep) are augmented copies).
    cut = frame[PROMPT_CUT].to_numpy()[keep] > 0 if PROMPT_CUT in frame else None
    rows["augmented"] = False
    if augment and len(rows):
        from lepton_ray.data.augment import augment_batch

        extra = augment_batch(rows.loc[rows["split"] == "train", base], **augment)
        if len(extra):
            if keep_raw:
                extra[RAW_TEXT] = ""  # training rows: never written
            encoded = _cached_encoder(tokenizer, max_length)(extra["text"].tolist())
            ids = pa.concat_arrays([ids, list_array(encoded)])
            rows = pd.concat([rows, extra[rows.columns]], ignore_index=True)
    tables, stats = {}, {}
    for split, part in rows.groupby("split"):
        split_ids = ids.take(pa.array(part.index.to_numpy()))
        lengths = pc.list_value_length(split_ids).to_numpy().astype(np.int32)
        where = pa.array(part.index.to_numpy())
        if kind.token_targets:
            targets = {name: column.take(where) for name, column in token_targets.items()}
        else:
            targets = {
                kind.target_column: pa.array(kind.encode_targets(part["label"].tolist(), labels))
            }
        raw = {}
        if keyed:
            raw[KEY_TEXT] = pa.array(part[KEY_TEXT].tolist(), pa.string())
        if keep_raw and split in EVAL_SPLITS:
            raw[RAW_TEXT] = pa.array(part[RAW_TEXT].tolist(), pa.string())
        tables[split] = pa.table(
            {
                "text": pa.array(part["text"].tolist(), pa.string()),
                **raw,
                "label": pa.array(part["label"].tolist(), pa.string()),
                **targets,
                "input_ids": split_ids,
                "length": pa.array(lengths),
                "augmented": pa.array(part["augmented"].to_numpy(dtype=bool)),
            }
        )
        stats[split] = {
            "rows": len(part),
            "augmented": int(part["augmented"].sum()),
            "classes": part["label"].value_counts().reindex(labels, fill_value=0).tolist(),
            "lengths": np.bincount(lengths, minlength=max_length + 1).tolist(),
        }
        if cut is not None:
            own = part.index.to_numpy()
            stats[split]["prompts_cut"] = int(cut[own[own < len(cut)]].sum())
        if "parts" in targets:  # a language model: prompt and response lengths apart
            parts = targets["parts"]
            flat = pc.list_flatten(parts).to_numpy(zero_copy_only=False)
            parent = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)
            response = np.bincount(parent, weights=flat > 0, minlength=len(part)).astype(np.int64)
            prompt = lengths - response
            stats[split]["prompt_lengths"] = np.bincount(prompt, minlength=max_length + 1).tolist()
            stats[split]["response_lengths"] = np.bincount(
                response, minlength=max_length + 1
            ).tolist()
    return {"tables": tables, "stats": stats}


def partition_block(block, parts: int):
    """Split an Arrow block by the text key's hash into ``parts`` tables."""
    import numpy as np
    import pyarrow as pa

    table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
    if parts == 1:
        return table
    which = table.column(KEY).to_numpy() % parts
    return tuple(table.take(pa.array(np.flatnonzero(which == i))) for i in range(parts))


def trained_key_parts(path: str, seed: int, parts: int):
    """The text keys of one preprocessed Parquet file (rows a model trained on), split into
    ``parts`` arrays as ``partition_block`` splits rows; read one row group at a time."""
    import numpy as np

    from lepton_ray.runtime.uri import open_parquet

    file = open_parquet(path)
    keyed = KEY_TEXT if KEY_TEXT in file.schema_arrow.names else "text"
    texts = file.iter_batches(columns=[keyed])
    keys = np.fromiter(
        (text_key(t, seed) for batch in texts for t in batch.column(0).to_pylist()),
        dtype=np.int64,
    )
    if parts == 1:
        return keys
    which = keys % parts
    return tuple(keys[which == i] for i in range(parts))


def resolve_partition(options: dict[str, Any], n_seen: int, *pieces):
    """Resolve one partition's duplicates; the token ids stay in Arrow, untouched.

    ``pieces``: ``n_seen`` arrays of this partition's keys of texts a model trained on
    (``trained_key_parts``), then the partition's tables.
    """
    import numpy as np
    import pyarrow as pa

    table = pa.concat_tables(pieces[n_seen:])
    seen = np.concatenate(pieces[:n_seen]) if n_seen else None
    out = resolve_duplicates(light_frame(table), **options, seen=seen)
    for name in ("drop_reason", "conflict_text", "contaminated"):
        column = pa.array(out[name].to_numpy())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table, summarize_batch(out)


def write_partition(index: int, table, folder: str, options: dict[str, Any]) -> dict[str, Any]:
    """Finalize one partition and write its rows as ``folder/<split>/part-<index>.parquet``
    (``folder``: a local folder or an object-store URI)."""
    from lepton_ray.runtime.uri import location, write_parquet

    result = finalize_partition(table, **options)
    for split, part in result["tables"].items():
        write_parquet(part, location(folder) / split / f"part-{index:05d}.parquet")
    return result["stats"]


@functools.lru_cache(maxsize=2)
def _cached_encoder(tokenizer: str, max_length: int):
    return batch_encoder(tokenizer, max_length)


def tokenizer_spec(model_name: str) -> str:
    """What the tokenizer actors load: the fast tokenizer's JSON (exactly what the
    ``transformers`` tokenizer runs, settings applied), else the model name.

    Actors then need only the ``tokenizers`` library (milliseconds), not ``transformers``
    (seconds per actor).
    """
    from lepton_ray.artifacts import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return "json:" + backend.to_str() if backend is not None else "name:" + model_name


def batch_encoder(spec: str, max_length: int):
    """texts -> token id lists, truncated to ``max_length`` with special tokens, unpadded."""
    kind, value = spec.split(":", 1)
    if kind == "json":
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(value)
        fast.no_padding()
        fast.enable_truncation(max_length)
        return lambda texts: [e.ids for e in fast.encode_batch(texts)]
    from lepton_ray.artifacts import load_tokenizer

    slow = load_tokenizer(value)
    return lambda texts: slow(
        texts,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
