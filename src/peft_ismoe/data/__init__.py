"""Task data for the examples and benchmarks: GLUE reading and the GLUE metrics."""

from .glue import GLUE_TASKS, GlueSplit, GlueTask, get_glue_task, load_glue, read_glue_tsv
from .metrics import (
    accuracy,
    binary_f1,
    glue_metrics,
    matthews_correlation,
    pearson_correlation,
    predictions_from_logits,
    spearman_correlation,
)

__all__ = [
    "GLUE_TASKS",
    "GlueSplit",
    "GlueTask",
    "accuracy",
    "binary_f1",
    "get_glue_task",
    "glue_metrics",
    "load_glue",
    "matthews_correlation",
    "pearson_correlation",
    "predictions_from_logits",
    "read_glue_tsv",
    "spearman_correlation",
]
