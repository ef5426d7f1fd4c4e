"""The GLUE dev metrics, in numpy: accuracy, F1 (MRPC), Matthews correlation (CoLA), Pearson and Spearman (STS-B).

Conventions where a metric is undefined follow scikit-learn and scipy's usual reading, but return 0.0 instead of
NaN (so results stay valid JSON): F1 is 0.0 when there is no positive prediction and no positive label, and a
correlation is 0.0 when either side is constant (a model that predicts one value shows no correlation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .glue import GlueTask, get_glue_task

__all__ = [
    "accuracy",
    "binary_f1",
    "glue_metrics",
    "matthews_correlation",
    "pearson_correlation",
    "predictions_from_logits",
    "spearman_correlation",
]

ArrayLike = Sequence[float] | Sequence[int] | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both arguments as 1-D arrays of one common, non-zero length."""
    y_pred, y_true = np.asarray(predictions), np.asarray(labels)
    if y_pred.ndim != 1 or y_true.ndim != 1:
        raise ValueError(
            f"`predictions` and `labels` must be 1-D, got shapes {y_pred.shape} and {y_true.shape}; "
            "turn logits into predictions first (see `predictions_from_logits`)."
        )
    if len(y_pred) != len(y_true):
        raise ValueError(f"`predictions` and `labels` must have the same length, got {len(y_pred)} and {len(y_true)}.")
    if len(y_true) == 0:
        raise ValueError("`predictions` and `labels` must not be empty.")
    return y_pred, y_true


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to their label."""
    y_pred, y_true = _pair(predictions, labels)
    return float(np.mean(y_pred == y_true))


def binary_f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 of class `positive`: 2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall."""
    y_pred, y_true = _pair(predictions, labels)
    tp = int(np.sum((y_pred == positive) & (y_true == positive)))
    fp = int(np.sum((y_pred == positive) & (y_true != positive)))
    fn = int(np.sum((y_pred != positive) & (y_true == positive)))
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2 * tp / denominator


def matthews_correlation(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient, for any number of classes (the binary phi coefficient for two).

    From the confusion matrix C (rows true, columns predicted), with t = row sums, p = column sums,
    c = trace(C) and s = the number of examples: (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)).
    """
    y_pred, y_true = _pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true_index, pred_index = encoded[: len(y_true)], encoded[len(y_true) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_index, pred_index), 1.0)

    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - t @ p) / denominator)


def pearson_correlation(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson's r between predictions and labels; 0.0 when either is constant."""
    y_pred, y_true = _pair(predictions, labels)
    x = y_pred.astype(np.float64) - y_pred.mean()
    y = y_true.astype(np.float64) - y_true.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denominator == 0 else float(np.clip((x @ y) / denominator, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span (scipy's ``rankdata(method="average")``)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start of each run of equal values, then each run's mean rank spread back to its members.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks start+1 .. end, inclusive
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman_correlation(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman's rho: Pearson's r between the average ranks; 0.0 when either side is constant."""
    y_pred, y_true = _pair(predictions, labels)
    return pearson_correlation(_average_ranks(y_pred), _average_ranks(y_true))


def predictions_from_logits(logits: ArrayLike, task: str | GlueTask) -> np.ndarray:
    """Class indices (argmax over the last axis) for a classification task; the scores themselves for STS-B.

    Args:
        logits: ``[examples, num_labels]`` model outputs; for STS-B ``[examples, 1]`` or ``[examples]``.
        task: the task name or `GlueTask`.
    """
    task = task if isinstance(task, GlueTask) else get_glue_task(task)
    logits = np.asarray(logits)
    if task.is_regression:
        if logits.ndim == 2 and logits.shape[1] == 1:
            return logits[:, 0]
        if logits.ndim != 1:
            raise ValueError(f"`logits` of {task.folder} must be [examples] or [examples, 1], got {logits.shape}.")
        return logits
    if logits.ndim != 2:
        raise ValueError(f"`logits` of {task.folder} must be [examples, num_labels], got shape {logits.shape}.")
    return logits.argmax(axis=-1)


def glue_metrics(task: str | GlueTask, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The metrics GLUE reports for `task`, with the task's headline metric under the key ``"score"``.

    SST-2 and RTE: accuracy. MRPC: F1 and accuracy. CoLA: Matthews correlation and accuracy. STS-B: Pearson and
    Spearman correlation. Values are fractions (accuracy 0.91, not 91).
    """
    task = task if isinstance(task, GlueTask) else get_glue_task(task)
    if task.is_regression:
        results = {
            "pearson": pearson_correlation(predictions, labels),
            "spearman": spearman_correlation(predictions, labels),
        }
    else:
        results = {"accuracy": accuracy(predictions, labels)}
        if task.metric == "f1":
            results["f1"] = binary_f1(predictions, labels)
        if task.metric == "matthews_correlation":
            results["matthews_correlation"] = matthews_correlation(predictions, labels)
    results["score"] = results[task.metric]
    return results
