"""The plots the notebooks show; each is also saved beside the results (PNG)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .images import read_thumbnail
from .tasks import label_sets
from .utils import save_figure


def _done(fig, path: str | Path | None):
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def image_grid(paths: list[str], titles: list[str], path=None, cols: int = 8):
    """Images in a grid, each with its title."""
    rows = max(1, int(np.ceil(len(paths) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), paths, titles):
        try:
            ax.imshow(read_thumbnail(image))
        except ValueError:  # an unreadable file gets its tile, named, instead of stopping the plot
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", color="red", transform=ax.transAxes)
            title = f"{Path(image).name}\n{title}"
        ax.set_title(title, fontsize=8)
    return _done(fig, path)


def sample_grid(df: pd.DataFrame, label_col: str, path=None, n: int = 24, seed: int = 0):
    """A random sample of images with their label."""
    rows = df.sample(n=min(n, len(df)), random_state=seed)
    return image_grid(rows["path"].tolist(), rows[label_col].astype(str).tolist(), path)


def label_counts(column: pd.Series, sep: str = " ") -> pd.Series:
    """Multi-label: rows holding each label (labels in `column`, `sep` apart), by label."""
    counts = pd.Series([label for labels in label_sets(column, sep) for label in labels], dtype=object).value_counts()
    return counts.sort_index()


def target_balance(df: pd.DataFrame, target_col: str, task: str, path=None, label_sep: str = " "):
    """Class counts (classification), the target's histogram (regression), or the rows holding
    each label beside the number of labels per row (multilabel)."""
    if task == "multilabel":
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1]})
        counts = label_counts(df[target_col], label_sep)
        sns.barplot(x=counts.index.astype(str), y=counts.values, ax=ax, color="C0")
        ax.set_ylabel("rows with the label")
        ax.tick_params(axis="x", rotation=90 if len(counts) > 15 else 0)
        per_row = pd.Series([len(s) for s in label_sets(df[target_col], label_sep)]).value_counts().sort_index()
        sns.barplot(x=per_row.index, y=per_row.values, ax=ax2, color="C1")
        ax2.set(xlabel="labels per row", ylabel="rows")
        ax.set_title(f"{target_col}: label counts")
        return _done(fig, path)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if task == "regression":
        sns.histplot(df[target_col], bins=40, ax=ax)
    else:
        counts = df[target_col].astype(str).value_counts().sort_index()
        sns.barplot(x=counts.index, y=counts.values, ax=ax, color="C0")
        ax.set_ylabel("rows")
        ax.tick_params(axis="x", rotation=90 if len(counts) > 15 else 0)
    ax.set_title(f"{target_col}: {'distribution' if task == 'regression' else 'class balance'}")
    return _done(fig, path)


def image_sizes(sizes: pd.DataFrame, path=None):
    """Scatter of image width vs height (coloured by mode when `sizes` has one)."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    sns.scatterplot(data=sizes, x="width", y="height", hue="mode" if "mode" in sizes else None, ax=ax, s=15)
    ax.set_title("image sizes")
    return _done(fig, path)


def fold_shares(folds: pd.DataFrame, target_col: str, label_sep: str = " ") -> pd.DataFrame:
    """Multi-label: the share of each fold's rows that hold each label (fold x label)."""
    sets = label_sets(folds[target_col], label_sep)
    labels = sorted({label for s in sets for label in s}, key=str)
    hot = pd.DataFrame([[label in s for label in labels] for s in sets], columns=labels, index=folds.index)
    return hot.groupby(folds["fold"].to_numpy()).mean().rename_axis("fold")


def fold_distribution(folds: pd.DataFrame, target_col: str, task: str, path=None, label_sep: str = " "):
    """Rows per fold and class, the target's distribution per fold, or (multilabel) the share
    of each fold's rows holding each label: even columns mean well-stratified folds."""
    if task == "multilabel":
        shares = fold_shares(folds, target_col, label_sep)
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * shares.shape[1] + 2), 0.5 * len(shares) + 1.5))
        sns.heatmap(shares, annot=shares.shape[1] <= 20, fmt=".2f", cmap="Blues", ax=ax, cbar_kws={"label": "share of rows"})
        ax.set_title("label share per fold")
        return _done(fig, path)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if task == "regression":
        sns.boxplot(data=folds, x="fold", y=target_col, ax=ax)
    else:
        table = pd.crosstab(folds["fold"], folds[target_col].astype(str))
        table.plot.bar(stacked=True, ax=ax, legend=len(table.columns) <= 20, width=0.8)
        ax.set_ylabel("rows")
        if len(table.columns) <= 20:
            ax.legend(title=target_col, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    ax.set_title("fold distribution")
    return _done(fig, path)


def learning_curves(histories: dict[int | str, list[dict]], metric: str, path=None):
    """Train/valid loss and the CV metric per epoch, one line per fold (the refit, with no
    validation rows: its training loss and learning rate)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (fold, history) in enumerate(histories.items()):
        h = pd.DataFrame(history)
        if h.empty:
            continue
        name, color = (fold if isinstance(fold, str) else f"fold {fold}"), f"C{fold if isinstance(fold, int) else i}"
        ax1.plot(h["epoch"], h["train_loss"], "--", color=color, label=f"{name} train")
        if "valid_loss" in h:
            ax1.plot(h["epoch"], h["valid_loss"], "-", color=color, label=f"{name} valid")
        if "metric" in h:
            ax2.plot(h["epoch"], h["metric"], "-o", color=color, ms=3, label=name)
        else:
            ax2.plot(h["epoch"], h["lr"], "-o", color=color, ms=3, label=f"{name} learning rate")
            metric = "learning rate"
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel=metric, title=metric if metric == "learning rate" else f"validation {metric}")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return _done(fig, path)


def feature_importance(importance: pd.DataFrame, path=None, top: int = 30):
    """Top features by gain, the CNN's predictions, its embeddings and the metadata told apart by colour."""
    top_rows = importance.head(top)
    fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(top_rows))))
    sns.barplot(data=top_rows, y="feature", x="gain", hue="kind", dodge=False, ax=ax,
                palette={"image": "C0", "metadata": "C3", "cnn prediction": "C2"})
    ax.set_title(f"LightGBM feature importance (gain, mean over folds, top {len(top_rows)})")
    return _done(fig, path)


def score_bars(scores: pd.DataFrame, metric: str, path=None):
    """CV score of each experiment and the ensemble."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(scores) + 1.2))
    sns.barplot(data=scores, y="experiment", x="cv", ax=ax, color="C0")
    for i, v in enumerate(scores["cv"]):
        ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    lo, hi = scores["cv"].min(), scores["cv"].max()
    ax.set_xlim(max(lo - (hi - lo) * 2 - 1e-3, 0) if metric != "rmse" else 0, hi + (hi - lo) * 0.5 + 1e-3)
    ax.set_title(f"CV {metric}")
    return _done(fig, path)


def correlation_heatmap(corr: pd.DataFrame, path=None):
    """Model-correlation heatmap of OOF predictions."""
    fig, ax = plt.subplots(figsize=(1.2 * len(corr) + 3, 1.0 * len(corr) + 2))
    sns.heatmap(corr, annot=True, fmt=".3f", cmap="viridis", square=True, ax=ax, cbar_kws={"shrink": 0.8})
    ax.set_title("OOF prediction correlation")
    return _done(fig, path)


def confusion_heatmap(cm: np.ndarray, classes: list[str], title: str, path=None):
    """A confusion matrix (rows true, columns predicted), counts written in when it is small."""
    size = min(0.5 * len(classes) + 3, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    sns.heatmap(cm, annot=len(classes) <= 30, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _done(fig, path)


def label_confusion(report: pd.DataFrame, path=None):
    """Multi-label: each label's true/false positives and negatives (shares of its rows) and
    its precision, recall and F1, as a heatmap."""
    counts = report[["tp", "fp", "fn", "tn"]].astype(float)
    shares = counts.div(counts.sum(axis=1), axis=0)
    table = pd.concat([shares, report[["precision", "recall", "f1"]]], axis=1)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(table) + 1.5))
    sns.heatmap(table, annot=len(table) <= 40, fmt=".2f", cmap="Blues", vmin=0, vmax=1, ax=ax, cbar=False)
    ax.set_title("per label: outcome shares at its threshold, and precision / recall / F1 (OOF)")
    return _done(fig, path)


def residuals(frame: pd.DataFrame, target_col: str, path=None):
    """Regression: OOF prediction against target, and the residuals' histogram."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    sns.scatterplot(data=frame, x=target_col, y="pred", s=12, ax=ax1)
    lo, hi = frame[[target_col, "pred"]].min().min(), frame[[target_col, "pred"]].max().max()
    ax1.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax1.set_title("OOF prediction vs target")
    sns.histplot(frame["residual"], bins=40, ax=ax2)
    ax2.set_title("residuals (prediction - target)")
    return _done(fig, path)
