"""Figures logged to MLflow as images: learning curves, confusion matrices, sweeps."""

from __future__ import annotations

from collections.abc import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, float]]):
    """Loss and validation metrics per evaluation.

    The x axis is the optimizer step when every entry has ``step`` (evaluations every N
    steps), else the epoch. A metric is drawn from the entries that have it; one that no
    entry has (an old history without ``val_macro_f1``, say) is left out.
    """
    plt = _pyplot()
    x_key = "step" if history and all("step" in h for h in history) else "epoch"
    perplexity = any("val_perplexity" in h for h in history)
    fig, axes = plt.subplots(1, 3 if perplexity else 2, figsize=(13.5 if perplexity else 9, 3.5))
    ax_loss, ax_metric = axes[0], axes[1]

    def draw(ax, key: str, label: str) -> None:
        points = [(h[x_key], h[key]) for h in history if key in h and x_key in h]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)

    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        draw(ax_loss, key, label)
    for key in (
        "val_accuracy", "val_macro_f1", "val_roc_auc",
        "val_token_accuracy", "val_rouge_l", "val_exact_match", "val_gsm8k",
    ):  # fmt: skip
        draw(ax_metric, key, key)
    ax_loss.set(xlabel=x_key, ylabel="cross-entropy", title="Loss")
    ax_metric.set(xlabel=x_key, ylim=(0, 1.02), title="Validation")
    if perplexity:
        draw(axes[2], "val_perplexity", "validation")
        axes[2].set(xlabel=x_key, ylabel="perplexity", title="Perplexity (response tokens)")
    for ax in axes:
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    return fig


def roc_curve(probs, targets, labels: Sequence[str], title: str):
    """ROC curve(s) with their AUCs in the legend, and the chance diagonal.

    Two labels: one curve, for the second label's probability. More: one one-vs-rest
    curve per class; a class with no positives or no negatives in ``targets`` has no curve.
    """
    import numpy as np

    from lepton_ray.tasks.classification_eval import binary_auc, roc_points

    plt = _pyplot()
    probs, targets = np.asarray(probs), np.asarray(targets)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    classes = [1] if len(labels) == 2 else range(len(labels))
    for c in classes:
        positives = targets == c
        if not positives.any() or positives.all():
            continue
        fpr, tpr = roc_points(probs[:, c], positives)
        auc = binary_auc(probs[:, c], positives)
        ax.plot(fpr, tpr, label=f"{labels[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str):
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    peak = max((max(row) for row in matrix), default=0) or 1
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                color="white" if value > peak / 2 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    return fig


SWEEP_COLORS = {
    None: ("tab:blue", "ran to the end"),
    "asha": ("tab:red", "stopped by ASHA"),
    "median": ("tab:purple", "by the median rule"),
    "hyperband": ("tab:brown", "by HyperBand"),
    "early_stopping": ("tab:orange", "by its own early stopping"),
}
"""A sweep point's color by who stopped the trial (``tune.report.stop_reason``)."""


def sweep(trials: list[dict], metric: str, params: list[str]):
    """One panel per swept parameter: the trial's final metric against the value tried
    (a trial without that parameter, under another branch, is left out of its panel)."""
    plt = _pyplot()
    params = params or ["trial"]
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, param in zip(axes[0], params):
        shown = [(i, t) for i, t in enumerate(trials) if param == "trial" or param in t["params"]]
        xs = [t["params"].get(param, i) for i, t in shown]
        ys = [t["metrics"].get(metric) for _, t in shown]
        colors = [SWEEP_COLORS[t.get("stopped_by")][0] for _, t in shown]
        if all(isinstance(x, (int, float)) for x in xs):
            ax.scatter(xs, ys, c=colors)
        else:  # a choice of strings or lists: one column per value
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, c=colors)
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        if param.endswith("lr"):
            ax.set_xscale("log")
        ax.set(xlabel=param, ylabel=metric, title=f"{metric} by {param}")
    seen = [key for key in SWEEP_COLORS if any(t.get("stopped_by") == key for t in trials)]
    legend = "; ".join(
        f"{SWEEP_COLORS[k][0].removeprefix('tab:')}: {SWEEP_COLORS[k][1]}" for k in seen
    )
    fig.suptitle(f"Sweep ({legend})", fontsize=9)
    fig.tight_layout()
    return fig
