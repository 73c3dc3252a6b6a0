"""What the data stage did, for people: a terminal table, two figures, and an MLflow record.

Everything here reads the data stage's ``manifest.json`` (a plain dict) and nothing else.
Manifests written by older versions lack most keys; every function here shows what is there
and skips what is not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SPLIT_ORDER = ("train", "validation", "test")
MAX_CLASS_COLUMNS = 8
"""Up to this many classes, the split table has one column per class."""
TOP_CLASSES = 5
"""Beyond MAX_CLASS_COLUMNS, the split table shows this many (most frequent first) and '…'."""
DROPPED_SAMPLE = "dropped_sample.jsonl"
OK = "✓"
MISMATCH = "✗ MISMATCH"


# ------------------------------------------------------------------------------------ helpers
def _int(value: Any) -> int:
    """A count from the manifest; anything unusable counts as 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


def _dict(value: Any) -> dict:
    return value if isinstance(value, Mapping) else {}


def _splits(manifest: Mapping[str, Any]) -> list[str]:
    """Splits in the manifest: train, validation, test first, then any others."""
    names = list(_dict(manifest.get("splits"))) + list(_dict(manifest.get("class_counts")))
    lengths = _dict(_dict(manifest.get("token_lengths")).get("counts"))
    names += list(lengths)
    seen = dict.fromkeys(names)
    return [s for s in SPLIT_ORDER if s in seen] + [s for s in seen if s not in SPLIT_ORDER]


def _classes(manifest: Mapping[str, Any]) -> list[str]:
    """Class names: the manifest's label order, then any class only seen in the counts."""
    labels = [str(label) for label in manifest.get("labels") or []]
    for counts in _dict(manifest.get("class_counts")).values():
        for label in _dict(counts):
            if str(label) not in labels:
                labels.append(str(label))
    return labels


def _class_count(manifest: Mapping[str, Any], split: str, label: str) -> int:
    counts = _dict(_dict(manifest.get("class_counts")).get(split))
    return _int(counts.get(label, counts.get(_maybe_int(label))))


def _maybe_int(label: str) -> Any:
    try:
        return int(label)
    except ValueError:
        return label


def _rows(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Rows read, kept, dropped and augmented, with kept derived where older manifests lack it."""
    splits = _dict(manifest.get("splits"))
    augmented = _int(manifest.get("augmented"))
    kept = manifest.get("kept")
    return {
        "read": _int(manifest.get("rows_read")),
        "kept": _int(kept) if kept is not None else sum(map(_int, splits.values())) - augmented,
        "kept_given": kept is not None,
        "dropped": sum(map(_int, _dict(manifest.get("dropped")).values())),
        "augmented": augmented,
        "in_splits": sum(map(_int, splits.values())),
    }


def _table(header: list[str], rows: Iterable[list[str]], indent: str = "  ") -> list[str]:
    """Columns aligned for a monospace terminal: the first left-aligned, the rest right."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return (indent + "  ".join(cells)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return [line(rows[0]), rule, *(line(r) for r in rows[1:])]


def _short(text: Any, width: int = 72) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


# -------------------------------------------------------------------------------- the table
def summary_table(manifest: Mapping[str, Any]) -> str:
    """The manifest as a plain-text report for a terminal (monospace, aligned, no colours)."""
    out: list[str] = []
    rows = _rows(manifest)

    # Where the data came from.
    out.append("Data")
    fingerprint = str(manifest.get("fingerprint") or "")
    reused = manifest.get("reused")
    facts = [("source", _short(manifest.get("source", "?"), 90))]
    for origin, source in _dict(manifest.get("sources")).items():
        if origin != "all" and source != manifest.get("source"):
            facts.append((f"source ({origin})", _short(source, 90)))
    if "split_source" in manifest:
        facts.append(("splits from", str(manifest["split_source"])))
    if fingerprint:
        state = ""
        if reused is not None:
            state = "  (cached shards reused)" if reused else "  (built now)"
        facts.append(("fingerprint", fingerprint[:12] + state))
    if manifest.get("model"):
        facts.append(
            ("tokenized for", f"{manifest['model']}, max_length {manifest.get('max_length', '?')}")
        )
    if manifest.get("seconds") is not None:
        facts.append(("took", f"{_num(manifest['seconds'])} s"))
    width = max(len(k) for k, _ in facts)
    out += [f"  {k.ljust(width)}  {v}" for k, v in facts]

    # Rows in, rows out, and why.
    out += ["", "Rows"]
    dropped = {str(k): _int(v) for k, v in _dict(manifest.get("dropped")).items()}
    lines = [["read", _num(rows["read"])], ["kept", _num(rows["kept"])]]
    lines.append(["dropped", _num(rows["dropped"])])
    for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append([f"  {reason}", _num(n)])
    if rows["augmented"] or "augmented" in manifest:
        lines.append(["augmented (train)", _num(rows["augmented"])])
    out += _table(["", "rows"], lines)
    balanced = rows["read"] == rows["kept"] + rows["dropped"]
    out.append(
        f"  read = kept + dropped: {_num(rows['read'])} "
        f"{'=' if balanced else '≠'} {_num(rows['kept'])} + {_num(rows['dropped'])}  "
        + (
            OK
            if balanced
            else f"{MISMATCH} (off by {_num(rows['read'] - rows['kept'] - rows['dropped'])})"
        )
    )
    if rows["kept_given"]:
        in_splits = rows["kept"] + rows["augmented"]
        ok = rows["in_splits"] == in_splits
        out.append(
            f"  splits = kept + augmented: {_num(rows['in_splits'])} "
            f"{'=' if ok else '≠'} {_num(rows['kept'])} + {_num(rows['augmented'])}  "
            + (OK if ok else MISMATCH)
        )

    # Rows and classes per split.
    out += ["", "Splits"]
    splits = _splits(manifest)
    classes = _classes(manifest)
    split_rows = {s: _int(_dict(manifest.get("splits")).get(s)) for s in splits}
    totals = {c: sum(_class_count(manifest, s, c) for s in splits) for c in classes}
    if len(classes) <= MAX_CLASS_COLUMNS:
        shown, rest = classes, []
    else:
        ranked = sorted(classes, key=lambda c: (-totals[c], classes.index(c)))
        shown, rest = ranked[:TOP_CLASSES], ranked[TOP_CLASSES:]
    header = ["split", "rows", *(_short(c, 16) for c in shown)]
    if rest:
        header.append(f"… {len(rest)} more")
    body = []
    for split in [*splits, "total"]:
        if split == "total":
            row = ["total", _num(sum(split_rows.values()))]
            row += [_num(totals[c]) for c in shown]
            if rest:
                row.append(_num(sum(totals[c] for c in rest)))
        else:
            row = [split, _num(split_rows[split])]
            row += [_num(_class_count(manifest, split, c)) for c in shown]
            if rest:
                row.append(_num(sum(_class_count(manifest, split, c) for c in rest)))
        body.append(row)
    if splits:
        out += _table(header, body)
    else:
        out.append("  (no splits recorded)")
    if len(classes) > MAX_CLASS_COLUMNS:
        out.append(f"  {len(classes)} classes; the {len(shown)} most frequent shown")

    # Data quality findings.
    checks: list[tuple[str, str]] = []
    masked = _dict(manifest.get("masked"))
    if masked:
        found = {k: _int(v) for k, v in masked.items()}
        checks.append(
            (
                "masked",
                ", ".join(f"{k} {_num(v)}" for k, v in found.items())
                if any(found.values())
                else "none",
            )
        )
    conflicts = _dict(manifest.get("conflicts"))
    if conflicts:
        checks.append(
            (
                "conflicting labels",
                f"{_num(conflicts.get('texts', 0))} texts ({_num(conflicts.get('rows', 0))} rows) "
                "with the same text and different labels",
            )
        )
    contamination = _dict(manifest.get("contamination"))
    if contamination:
        parts = [f"{split} {_num(n)}" for split, n in contamination.items() if split != "action"]
        action = contamination.get("action")
        checks.append(
            (
                "eval texts in train",
                ", ".join(parts or ["-"]) + (f"  (action: {action})" if action else ""),
            )
        )
    seen = _dict(manifest.get("seen_in_training"))
    if seen:
        checks.append(
            (
                "eval texts trained on",
                ", ".join(f"{split} {_num(n)}" for split, n in seen.items()) + "  (removed)",
            )
        )
    near = _dict(manifest.get("near_duplicates"))
    if near:
        threshold = near.get("threshold")
        checks.append(
            (
                "near-dups across splits",
                _num(near.get("cross_split", 0))
                + (f"  (similarity >= {threshold})" if threshold is not None else ""),
            )
        )
    bad_rows = manifest.get("bad_rows") or []
    if bad_rows:
        first = bad_rows[0] if isinstance(bad_rows[0], Mapping) else {"error": bad_rows[0]}
        where = f"{first.get('file', '?')}:{first.get('line', '?')}"
        checks.append(
            (
                "malformed rows",
                f"{_num(len(bad_rows))} listed; first at {_short(where, 50)}: "
                f"{_short(first.get('error', ''), 60)}",
            )
        )
    if checks:
        out += ["", "Checks"]
        width = max(len(k) for k, _ in checks)
        out += [f"  {k.ljust(width)}  {v}" for k, v in checks]

    # Token lengths.
    lengths = _dict(manifest.get("token_lengths"))
    stats = [(k, lengths.get(k)) for k in ("mean", "p50", "p95", "max") if k in lengths]
    if stats or "truncated" in lengths:
        out += ["", "Token lengths"]
        line = "  " + "   ".join(f"{k} {_num(v)}" for k, v in stats)
        if "truncated" in lengths:
            truncated = _int(lengths["truncated"])
            total = rows["in_splits"] or rows["kept"]
            share = f" ({100 * truncated / total:.1f}%)" if total else ""
            limit = manifest.get("max_length")
            line += f"   truncated {_num(truncated)}{share}" + (
                f" at max_length {limit}" if limit else ""
            )
        out.append(line.rstrip())
    for key, name in (("prompt_lengths", "prompt"), ("response_lengths", "response")):
        part = _dict(manifest.get(key))
        if part:
            figures = "   ".join(
                f"{k} {_num(part[k])}" for k in ("mean", "p50", "p95", "max") if k in part
            )
            out.append(f"  {name:<9} {figures}")
    cut = _dict(manifest.get("prompts_cut"))
    if cut.get("policy") == "truncate_prompt":
        out.append(
            f"  too long: {_num(cut.get('rows', 0))} kept with the prompt's first tokens cut "
            "(too_long: truncate_prompt)"
        )
    packing = _dict(manifest.get("packing"))
    if packing:
        out.append(
            f"  real tokens: {100 * float(packing.get('real_share_unpacked', 0)):.1f}% of "
            f"{_num(packing.get('rows'))} rows padded to max_length, "
            f"{100 * float(packing.get('real_share_packed', 0)):.1f}% of "
            f"{_num(packing.get('packed_rows'))} packed rows"
            + (" (data.packing on)" if packing.get("enabled") else " (data.packing off)")
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_distribution_figure(manifest: Mapping[str, Any]):
    """Grouped bars, one group per class and one bar per split: counts, and share of the split.

    The left panel shows how many rows each class has; the right one each class's share of
    its split, where a skewed validation or test split stands out next to train.
    """
    plt = _pyplot()
    splits = [s for s in _splits(manifest) if s in _dict(manifest.get("class_counts"))] or _splits(
        manifest
    )
    classes = _classes(manifest)
    n_bars = max(len(classes), 1) * max(len(splits), 1)
    if n_bars <= 12:  # side by side
        fig, (ax_count, ax_share) = plt.subplots(1, 2, figsize=(9, 3.8))
    else:  # one above the other, wider with the classes
        fig, (ax_count, ax_share) = plt.subplots(
            2, 1, figsize=(min(max(6.0, 2 + 0.18 * n_bars), 20), 7)
        )
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        counts = [_class_count(manifest, split, c) for c in classes]
        total = sum(counts)
        xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(classes))]
        ax_count.bar(xs, counts, width=width, label=split)
        ax_share.bar(xs, [c / total if total else 0.0 for c in counts], width=width, label=split)
    rotate = 45 if len(classes) > 6 or max((len(c) for c in classes), default=0) > 8 else 0
    for ax, title, ylabel in (
        (ax_count, "Rows per class", "rows"),
        (ax_share, "Share of each split", "fraction of split"),
    ):
        ax.set_xticks(
            range(len(classes)),
            classes,
            rotation=rotate,
            ha="right" if rotate else "center",
            fontsize=8 if len(classes) > 12 else None,
        )
        ax.set(title=title, ylabel=ylabel)
        if splits:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def length_histogram_figure(
    manifest: Mapping[str, Any], key: str = "token_lengths", name: str = "Token lengths"
):
    """Token lengths per split, as a share of the split's rows per length bin.

    Bars of the splits stand side by side in each bin; a dashed line marks ``max_length``,
    where texts were truncated. Without ``key`` (``token_lengths``; a language model's
    ``prompt_lengths`` and ``response_lengths`` too) in the manifest the figure says so.
    """
    plt = _pyplot()
    lengths = _dict(manifest.get(key))
    edges = [float(e) for e in lengths.get("edges") or []]
    counts = {s: list(c) for s, c in _dict(lengths.get("counts")).items() if c}
    splits = [s for s in _splits(manifest) if s in counts]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if not edges or not splits:
        ax.text(0.5, 0.5, "no token lengths in this manifest", ha="center", va="center")
        ax.set_axis_off()
        return fig
    n_bins = max(len(c) for c in counts.values())
    if len(edges) < n_bins + 1:  # left edges only: repeat the last width
        step = edges[-1] - edges[-2] if len(edges) > 1 else 1.0
        while len(edges) < n_bins + 1:
            edges.append(edges[-1] + step)
    group = 0.85 / len(splits)
    for i, split in enumerate(splits):
        values = [_int(v) for v in counts[split]] + [0] * (n_bins - len(counts[split]))
        total = sum(values)
        lefts = [edges[b] + (edges[b + 1] - edges[b]) * (0.075 + i * group) for b in range(n_bins)]
        widths = [(edges[b + 1] - edges[b]) * group for b in range(n_bins)]
        ax.bar(
            lefts,
            [v / total if total else 0.0 for v in values],
            width=widths,
            align="edge",
            label=f"{split} ({total:,})",
        )
    limit = manifest.get("max_length")
    if isinstance(limit, (int, float)) and edges[0] <= limit <= edges[-1] + 1:
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
    parts = [f"{k} {_num(lengths[k])}" for k in ("mean", "p50", "p95", "max") if k in lengths]
    if "truncated" in lengths:
        parts.append(f"truncated {_num(lengths['truncated'])}")
    title = name + (f" (max_length {limit})" if limit else "")
    ax.set(xlabel="tokens", ylabel="fraction of split", title=title)
    if parts:
        ax.text(
            0.99, 0.95, ", ".join(parts), transform=ax.transAxes, ha="right", va="top", fontsize=8
        )
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- MLflow
def data_metrics(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Row counts as MLflow metrics: read, kept, dropped, rows per split, and the evaluation
    rows removed because a model trained on their text (retraining)."""
    rows = _rows(manifest)
    metrics = {
        "data_rows_read": float(rows["read"]),
        "data_rows_kept": float(rows["kept"]),
        "data_rows_dropped": float(rows["dropped"]),
    }
    for split, n in _dict(manifest.get("splits")).items():
        metrics[f"data_rows_{split}"] = float(_int(n))
    seen = _dict(manifest.get("seen_in_training"))
    if seen:
        metrics["data_rows_seen_in_training"] = float(sum(_int(n) for n in seen.values()))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def log_data_report(
    tracking_uri: str, run_id: str, manifest: Mapping[str, Any], data_dir: Path | str
) -> None:
    """Record the data stage in an MLflow run (by id: the stages create their runs through
    a client, not as the fluent active run).

    Logged: ``data/manifest.json``, ``data/summary.txt`` (:func:`summary_table`),
    ``data/label_distribution.png``, ``data/token_lengths.png`` (when the manifest has token
    lengths), ``data/dropped_sample.jsonl`` (when the data stage wrote one into
    ``data_dir``), and the metrics of :func:`data_metrics`.
    """
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    plt = _pyplot()
    client.log_dict(run_id, dict(manifest), "data/manifest.json")
    client.log_text(run_id, summary_table(manifest) + "\n", "data/summary.txt")
    figures = []
    if manifest.get("labels"):
        figures.append(("data/label_distribution.png", label_distribution_figure))
    for key, name in (
        ("token_lengths", "Token lengths"),
        ("prompt_lengths", "Prompt tokens"),
        ("response_lengths", "Response tokens"),
    ):
        if _dict(manifest.get(key)).get("counts"):
            figures.append(
                (
                    f"data/{key}.png",
                    lambda m, key=key, name=name: length_histogram_figure(m, key, name),
                )
            )
    for artifact, build in figures:
        fig = build(manifest)
        try:
            client.log_figure(run_id, fig, artifact)
        finally:
            plt.close(fig)
    from lepton_ray.runtime.uri import is_file, location, read_text

    sample = location(data_dir) / DROPPED_SAMPLE
    if is_file(sample):  # a local file, or an object in the storage bucket
        client.log_text(run_id, read_text(sample), f"data/{DROPPED_SAMPLE}")
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in data_metrics(manifest).items()]
    )
