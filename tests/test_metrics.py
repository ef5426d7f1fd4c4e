"""GLUE metrics against hand-worked examples, scipy where it has the same statistic, and their edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peft_ismoe.data import (
    accuracy,
    binary_f1,
    glue_metrics,
    matthews_correlation,
    pearson_correlation,
    predictions_from_logits,
    spearman_correlation,
)

# One binary example worked by hand: TP = 2 (positions 0, 4), FP = 1 (1), FN = 1 (3), TN = 1 (2).
PREDICTIONS = [1, 1, 0, 0, 1]
LABELS = [1, 0, 0, 1, 1]

HAND_WORKED = [
    ("accuracy", accuracy, PREDICTIONS, LABELS, 3 / 5),
    ("f1", binary_f1, PREDICTIONS, LABELS, 2 * 2 / (2 * 2 + 1 + 1)),
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3 * 3 * 2 * 2) = 1/6
    ("mcc", matthews_correlation, PREDICTIONS, LABELS, 1 / 6),
    ("mcc-perfect", matthews_correlation, LABELS, LABELS, 1.0),
    ("mcc-inverted", matthews_correlation, [1 - y for y in LABELS], LABELS, -1.0),
    ("mcc-constant", matthews_correlation, [1] * 5, LABELS, 0.0),
    # x = [1, 2, 3], y = [2, 4, 7]: sum dx dy = 5, sum dx^2 = 2, sum dy^2 = 114 / 9.
    ("pearson", pearson_correlation, [1.0, 2.0, 3.0], [2.0, 4.0, 7.0], 5 / math.sqrt(2 * 114 / 9)),
    ("pearson-constant", pearson_correlation, [2.0, 2.0, 2.0], [2.0, 4.0, 7.0], 0.0),
    # Ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5.
    ("spearman-ties", spearman_correlation, [0.1, 0.5, 0.5, 0.9], [1.0, 2.0, 3.0, 4.0], 4.5 / math.sqrt(4.5 * 5)),
    ("spearman-monotone", spearman_correlation, [1.0, 10.0, 100.0], [0.0, 0.1, 0.2], 1.0),
    ("f1-no-positives", binary_f1, [0, 0], [0, 0], 0.0),
]


@pytest.mark.parametrize("name, metric, predictions, labels, expected", HAND_WORKED, ids=[c[0] for c in HAND_WORKED])
def test_metric_matches_the_hand_worked_value(name, metric, predictions, labels, expected):
    assert metric(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_multiclass_matthews_correlation_by_hand():
    # Confusion (rows true, columns predicted) [[1, 1, 0], [0, 1, 0], [0, 1, 1]]: t = [2, 1, 2], p = [1, 3, 1],
    # c = 3, s = 5, so (15 - 7) / sqrt((25 - 11) (25 - 9)) = 8 / sqrt(224).
    labels = [0, 0, 1, 2, 2]
    predictions = [0, 1, 1, 1, 2]

    assert matthews_correlation(predictions, labels) == pytest.approx(8 / math.sqrt(224))


def test_binary_matthews_correlation_is_the_pearson_correlation_of_the_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    predictions = np.where(rng.random(200) < 0.7, labels, 1 - labels)

    assert matthews_correlation(predictions, labels) == pytest.approx(pearson_correlation(predictions, labels))


def test_correlations_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    labels = np.round(rng.uniform(0, 5, size=300), 1)  # rounding makes ties, as in STS-B's scores
    predictions = np.round(labels + rng.normal(0, 1.5, size=300), 1)

    assert pearson_correlation(predictions, labels) == pytest.approx(stats.pearsonr(predictions, labels)[0])
    assert spearman_correlation(predictions, labels) == pytest.approx(stats.spearmanr(predictions, labels)[0])


def test_classification_metrics_agree_with_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=300)
    predictions = rng.integers(0, 2, size=300)

    assert binary_f1(predictions, labels) == pytest.approx(sklearn_metrics.f1_score(labels, predictions))
    assert matthews_correlation(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions)
    )


GLUE_KEYS = [
    ("sst2", {"accuracy", "score"}, "accuracy"),
    ("RTE", {"accuracy", "score"}, "accuracy"),
    ("mrpc", {"accuracy", "f1", "score"}, "f1"),
    ("cola", {"accuracy", "matthews_correlation", "score"}, "matthews_correlation"),
]


@pytest.mark.parametrize("task, keys, headline", GLUE_KEYS, ids=[c[0] for c in GLUE_KEYS])
def test_glue_metrics_report_the_task_headline_as_score(task, keys, headline):
    results = glue_metrics(task, PREDICTIONS, LABELS)

    assert set(results) == keys
    assert results["score"] == results[headline]


def test_glue_metrics_for_stsb_are_correlations():
    results = glue_metrics("stsb", [1.0, 2.0, 3.0], [2.0, 4.0, 7.0])

    assert set(results) == {"pearson", "spearman", "score"}
    assert results["score"] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert results["spearman"] == pytest.approx(1.0)


def test_predictions_from_logits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])

    assert predictions_from_logits(logits, "sst2").tolist() == [1, 0, 1]
    assert predictions_from_logits(np.array([[4.5], [0.2]]), "stsb").tolist() == [4.5, 0.2]
    with pytest.raises(ValueError, match=r"`logits` of SST-2 must be \[examples, num_labels\], got shape \(3,\)"):
        predictions_from_logits(np.zeros(3), "sst2")
    with pytest.raises(ValueError, match=r"`logits` of STS-B must be \[examples\] or \[examples, 1\]"):
        predictions_from_logits(np.zeros((3, 2)), "stsb")


BAD_INPUTS = [
    ([1, 0], [1, 0, 1], r"must have the same length, got 2 and 3"),
    ([], [], r"must not be empty"),
    ([[0.1, 0.9]], [1], r"must be 1-D, got shapes \(1, 2\) and \(1,\)"),
]


@pytest.mark.parametrize("metric", [accuracy, binary_f1, matthews_correlation, pearson_correlation])
@pytest.mark.parametrize("predictions, labels, message", BAD_INPUTS, ids=["length", "empty", "logits"])
def test_bad_inputs_are_rejected(metric, predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        metric(predictions, labels)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match=r"`task` must be one of .* got 'qqp'"):
        glue_metrics("qqp", [1], [1])
