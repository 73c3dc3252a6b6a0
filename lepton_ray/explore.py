"""Read-only views of an experiment for notebooks: tables and figures from MLflow.

The notebooks in ``notebooks/`` run stages through :mod:`lepton_ray.pipeline` and look at
what they left behind through the functions here (and :mod:`lepton_ray.registry.versions`): the data
manifest as tables, a sweep's trials, a run's metric history and logged plots, a registered
version scored on a split, the registry's versions. Everything is read from the
experiment's MLflow store and output folder; nothing here trains, registers or deploys.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import LeptonError, StageError

if TYPE_CHECKING:  # pandas is a dependency, but importing it costs time at CLI start
    import pandas as pd

PARAM_TAG_PREFIX = "lepton.param."
"""Tags of a Tune trial's run naming each swept value (``lepton.param.train.lr``)."""

TRIAL_METRICS = (
    "epoch",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_roc_auc",
    "best_epoch",
)
"""Metrics of a trial's run shown by :func:`trials_frame` (latest values) besides its best
``tune.metric``."""

EVALUATION_KEY = "val_loss"
"""A metric logged at every evaluation and nowhere else: marks the evaluation steps."""


# ---------------------------------------------------------------------------------- paths
def _is_project_root(folder: Path) -> bool:
    pyproject = folder / "pyproject.toml"
    if not (pyproject.is_file() and (folder / "lepton_ray").is_dir()):
        return False
    try:
        return 'name = "lepton-ray"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        return False


def project_root(start: str | Path | None = None) -> Path:
    """The lepton-ray checkout: the nearest folder at or above ``start`` (default: the
    current directory) holding this project's ``pyproject.toml``, else the checkout this
    package was imported from (an editable install).

    Notebooks ``os.chdir`` here first, so the configs' relative paths (``experiments/...``,
    ``outputs``, ``mlruns``) mean the same from Jupyter (started in ``notebooks/``) as from
    the command line.

    Raises:
        LeptonError: neither is a lepton-ray checkout (a wheel installed elsewhere).
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if _is_project_root(folder):
            return folder
    package = Path(__file__).resolve().parents[1]
    if _is_project_root(package):
        return package
    raise LeptonError(
        f"no lepton-ray checkout at or above {here} (a folder with its pyproject.toml); "
        "start Jupyter inside the repository"
    )


# ----------------------------------------------------------------------------------- data
def manifest_frames(manifest: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The data stage's manifest as tables.

    Returns ``splits`` (one row per split: ``rows`` and one column per label),
    ``dropped`` (one row per drop reason, with ``rows``; empty when nothing was dropped)
    and ``totals`` (rows read, kept, dropped, augmented, and whether the shards were reused).
    """
    import pandas as pd

    labels = list(manifest.get("labels") or [])
    counts = manifest.get("class_counts") or {}
    splits = pd.DataFrame(
        [
            {
                "split": split,
                "rows": int(rows),
                **{label: int((counts.get(split) or {}).get(label, 0)) for label in labels},
            }
            for split, rows in (manifest.get("splits") or {}).items()
        ],
        columns=["split", "rows", *labels],
    ).set_index("split")
    dropped_counts = {k: int(v) for k, v in (manifest.get("dropped") or {}).items()}
    dropped = pd.DataFrame(
        sorted(dropped_counts.items(), key=lambda kv: (-kv[1], kv[0])), columns=["reason", "rows"]
    ).set_index("reason")
    totals = pd.Series(
        {
            "rows_read": int(manifest.get("rows_read", 0)),
            "kept": int(manifest.get("kept", 0)),
            "dropped": sum(dropped_counts.values()),
            "augmented": int(manifest.get("augmented", 0)),
            "reused": bool(manifest.get("reused", False)),
        },
        name="rows",
        dtype=object,
    )
    return {"splits": splits, "dropped": dropped, "totals": totals}


# ----------------------------------------------------------------------------------- runs
def _client(cfg: ExperimentConfig):
    from lepton_ray.tracking.mlflow import client

    return client(cfg.tracking.tracking_uri)


def _experiment_id(cfg: ExperimentConfig) -> str:
    found = _client(cfg).get_experiment_by_name(cfg.experiment_name)
    if found is None:
        raise StageError(
            f"no MLflow experiment '{cfg.experiment_name}' in the store of this config; "
            "run a stage first"
        )
    return found.experiment_id


def _parse_scalar(text: str) -> Any:
    """A tag's value back as the number (or bool) it was, else the text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def sweep_run_id(cfg: ExperimentConfig, trial_run_id: str | None = None) -> str:
    """The MLflow run a sweep's trials are nested under.

    With ``trial_run_id`` (e.g. ``run_tune_stage(cfg)["run_id"]``, the best trial's run), its
    parent; without, the parent of the newest trial in the experiment.

    Raises:
        StageError: the run has no parent, or the experiment has no trial.
    """
    from lepton_ray.tracking.mlflow import TAG_PARENT, TAG_STAGE

    c = _client(cfg)
    if trial_run_id is None:
        newest = c.search_runs(
            [_experiment_id(cfg)],
            filter_string=f"tags.`{TAG_STAGE}` = 'trial'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not newest:
            raise StageError(f"experiment '{cfg.experiment_name}' has no Tune trial yet")
        trial_run_id = newest[0].info.run_id
    parent = c.get_run(trial_run_id).data.tags.get(TAG_PARENT)
    if not parent:
        raise StageError(f"run {trial_run_id} is not nested under a sweep")
    return parent


def trials_frame(cfg: ExperimentConfig, parent_run_id: str | None = None) -> pd.DataFrame:
    """The trials of one sweep, from MLflow: one row per trial, best first.

    Columns: ``trial_id``, ``run_id``, ``status`` (FINISHED, KILLED when ASHA stopped it,
    FAILED), ``early_stopped``, one column per swept key (``train.lr``, ...) with the value
    the trial ran, ``best_<tune.metric>`` (its best evaluation), the latest values of
    :data:`TRIAL_METRICS` that the run has, and ``seconds``. ``parent_run_id`` defaults to
    the newest sweep (:func:`sweep_run_id`).
    """
    import pandas as pd

    from lepton_ray.tracking.mlflow import TAG_PARENT, TAG_STAGE, TAG_TRIAL_ID

    parent_run_id = parent_run_id or sweep_run_id(cfg)
    c = _client(cfg)
    runs = c.search_runs(
        [c.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_STAGE}` = 'trial'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    best_key = f"best_{cfg.tune.metric}"
    rows, params = [], []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        swept = {
            k.removeprefix(PARAM_TAG_PREFIX): _parse_scalar(v)
            for k, v in sorted(tags.items())
            if k.startswith(PARAM_TAG_PREFIX)
        }
        params += [k for k in swept if k not in params]
        end = run.info.end_time
        rows.append(
            {
                "trial_id": tags.get(TAG_TRIAL_ID),
                "run_id": run.info.run_id,
                "status": run.info.status,
                "early_stopped": tags.get("lepton.early_stopped") == "true",
                **swept,
                best_key: metrics.get(best_key),
                **{k: metrics[k] for k in TRIAL_METRICS if k in metrics},
                "seconds": round((end - run.info.start_time) / 1000, 1) if end else None,
            }
        )
    present = [k for k in TRIAL_METRICS if any(k in r for r in rows)]
    columns = ["trial_id", "run_id", "status", "early_stopped", *params, best_key, *present]
    frame = pd.DataFrame(rows, columns=[*columns, "seconds"])
    frame[best_key] = pd.to_numeric(frame[best_key])
    ascending = cfg.tune.mode == "min"
    return frame.sort_values(best_key, ascending=ascending, na_position="last").reset_index(
        drop=True
    )


def metric_history(
    cfg: ExperimentConfig, run_id: str, keys: Iterable[str] | None = None
) -> pd.DataFrame:
    """Every logged value of a run's metrics: one row per step (the index), one column per
    metric (default: all the run has), NaN where a metric was not logged at that step.

    A metric logged twice at one step (a resumed run) keeps its latest value.
    """
    import pandas as pd

    c = _client(cfg)
    keys = sorted(keys) if keys is not None else sorted(c.get_run(run_id).data.metrics)
    columns: dict[str, pd.Series] = {}
    for key in keys:
        points = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        latest = {m.step: m.value for m in points}
        columns[key] = pd.Series(latest, dtype="float64")
    frame = pd.DataFrame(columns, columns=keys)
    frame.index.name = "step"
    return frame.sort_index()


def evaluation_history(cfg: ExperimentConfig, run_id: str) -> list[dict[str, float]]:
    """A training run's evaluations, in step order, as the ``history`` that
    :func:`lepton_ray.tracking.plots.learning_curves` draws: ``step``, ``epoch``,
    ``train_loss``, ``val_*``, ... (a metric missing at an evaluation is left out)."""
    history = metric_history(cfg, run_id)
    if EVALUATION_KEY not in history:
        return []
    rows = []
    for step, values in history[history[EVALUATION_KEY].notna()].iterrows():
        row = {k: float(v) for k, v in values.items() if not math.isnan(v)}
        row["step"] = float(step)
        rows.append(row)
    return rows


def learning_curves(cfg: ExperimentConfig, run_id: str):
    """The learning-curves figure of a run, drawn from its metrics in MLflow."""
    from lepton_ray.tracking import plots

    history = evaluation_history(cfg, run_id)
    if not history:
        raise StageError(f"run {run_id} has logged no evaluation ({EVALUATION_KEY})")
    return plots.learning_curves(history)


def plot_images(cfg: ExperimentConfig, run_id: str, folder: str = "plots") -> dict[str, bytes]:
    """The PNG images a run logged under ``folder`` (artifact path -> bytes), by path.

    Every training run logs ``plots/learning_curves.png``, ``plots/confusion_matrix_val.png``
    and ``plots/roc_curve_val.png``; a sweep's parent run ``plots/sweep.png``.
    """
    from lepton_ray.registry.versions import run_artifact

    c = _client(cfg)
    if not any(a.path.endswith(".png") for a in c.list_artifacts(run_id, folder)):
        return {}
    with tempfile.TemporaryDirectory(prefix="lepton-plots-") as tmp:
        local = run_artifact(cfg.tracking.tracking_uri, run_id, folder, Path(tmp))
        return {
            f"{folder}/{p.relative_to(local).as_posix()}": p.read_bytes()
            for p in sorted(local.rglob("*.png"))
        }


def show_logged_plots(
    cfg: ExperimentConfig, run_id: str, folder: str = "plots", names: Sequence[str] | None = None
) -> list[str]:
    """Display a run's logged plot images in the notebook, each under its artifact path.

    ``names``: only the images whose file name (``confusion_matrix_val.png``) is listed.
    Returns the artifact paths shown.
    """
    from IPython.display import Image, Markdown, display

    shown = []
    for path, data in plot_images(cfg, run_id, folder).items():
        if names is not None and Path(path).name not in names:
            continue
        display(Markdown(f"`{path}` (run `{run_id}`)"), Image(data=data, format="png"))
        shown.append(path)
    return shown


# ------------------------------------------------------------------------------- registry
def versions_frame(cfg: ExperimentConfig) -> pd.DataFrame:
    """The versions of this experiment's registered model, newest first, as a table.

    One row per version of :func:`lepton_ray.registry.list_versions`: ``version``,
    ``aliases``, ``quantization``, ``peft_method``, ``source_version``, ``trial_id``,
    ``run_id``, ``created`` (UTC) and one column per recorded validation metric.
    """
    import pandas as pd

    from lepton_ray.registry import versions
    from lepton_ray.tracking.mlflow import TAG_TRIAL_ID

    rows = []
    for v in versions.list_versions(cfg.tracking.tracking_uri, cfg.registered_model_name):
        rows.append(
            {
                "version": int(v["version"]),
                "aliases": ", ".join(f"@{a}" for a in v["aliases"]),
                "quantization": v["quantization"],
                "peft_method": v["peft_method"],
                "source_version": v["source_version"],
                "trial_id": v["lineage"].get(TAG_TRIAL_ID),
                "run_id": v["run_id"],
                "created": pd.to_datetime(v["created"], unit="ms", utc=True),
                **{k: float(x) for k, x in sorted(v["metrics"].items())},
            }
        )
    return pd.DataFrame(rows).set_index("version") if rows else pd.DataFrame()


# ----------------------------------------------------------------------------- evaluation
def evaluate_version(
    cfg: ExperimentConfig, model_uri: str | None = None, split: str = "test"
) -> dict[str, Any]:
    """Score a registered version on one of this experiment's preprocessed splits, its texts
    (the raw ones where the split kept them: ``registry.gate.score_version``) read through the
    version's own cleaning, tokenizer and ``max_length``.

    ``model_uri``: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (default: the
    champion). Returns ``model_uri``, ``split``, ``labels``, ``metrics`` (``loss``,
    ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``, ``roc_auc``,
    ``examples``), ``confusion`` (rows: true label) and ``probs`` / ``targets``, ready for
    :func:`lepton_ray.tracking.plots.confusion_matrix` and ``roc_curve``.

    Raises:
        StageError: the split was not preprocessed (or is empty), the version is missing, or
            its labels are not the experiment's.
    """
    from lepton_ray.pipeline import serving_model_uri
    from lepton_ray.registry.gate import open_eval_split, score_version
    from lepton_ray.runtime.uri import is_dir

    if not is_dir(cfg.data_dir / split):
        raise StageError(
            f"no preprocessed '{split}' split in {cfg.data_dir}; run the data stage first"
        )
    rows = open_eval_split(cfg, split)
    if rows is None:
        raise StageError(f"the '{split}' split in {cfg.data_dir} has no rows")
    model_uri = model_uri or serving_model_uri(cfg)
    result, labels = score_version(cfg, model_uri, rows)
    scalars = ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1", "roc_auc")
    return {
        "model_uri": model_uri,
        "split": split,
        "labels": labels,
        "metrics": {k: float(result[k]) for k in scalars} | {"examples": int(result["examples"])},
        "confusion": [[int(x) for x in row] for row in result["confusion"]],
        "probs": result["probs"],
        "targets": result["targets"],
    }
