"""Reading five GLUE tasks (SST-2, RTE, MRPC, CoLA, STS-B) from their original TSV files or from the Hub.

The GLUE distribution files are not uniform, and a generic CSV reader gets several of them wrong:

* quotes are part of the text (RTE, MRPC): a CSV reader with quoting on joins or truncates rows, so each line is
  split on tabs and nothing else;
* MRPC's header starts with a UTF-8 byte-order mark, which would otherwise hide the name of its first column;
* CoLA has no header line, and its dev file does not end with a newline;
* STS-B's label is a real similarity score from 0 to 5 (a regression task), not a class.

`load_glue` reads a local copy (``data_dir`` or ``$GLUE_DIR``, laid out as ``<data_dir>/SST-2/dev.tsv``) and, when
neither is given, falls back to ``datasets.load_dataset("glue", ...)`` for users who are online; ``datasets`` is
imported only then. Both paths return the same `GlueSplit`, with the Hub's label convention (RTE: 0 =
entailment, 1 = not entailment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["GLUE_TASKS", "GlueSplit", "GlueTask", "get_glue_task", "load_glue", "read_glue_tsv"]

logger = logging.getLogger(__name__)

BYTE_ORDER_MARK = "\ufeff"


@dataclass(frozen=True)
class GlueTask:
    """What is needed to read one GLUE task and score it.

    ``text_columns`` and ``label_column`` are header names, or 0-based column positions for a file without a
    header (CoLA). ``label_map`` turns a label string into the Hub's integer class; None means the label is
    already an integer (or, for regression, a float).
    """

    name: str  # canonical lowercase name, the Hub's config name
    folder: str  # folder of the original distribution, e.g. "SST-2"
    text_columns: tuple[str, ...] | tuple[int, ...]
    label_column: str | int
    num_columns: int
    has_header: bool
    metric: Literal["accuracy", "f1", "matthews_correlation", "pearson"]
    is_regression: bool = False
    label_map: tuple[tuple[str, int], ...] | None = None
    hub_text_columns: tuple[str, ...] = ("sentence",)

    @property
    def num_labels(self) -> int:
        """1 for a regression task (one output), else the number of classes (every task here has two)."""
        return 1 if self.is_regression else 2

    @property
    def is_pair(self) -> bool:
        """Whether each example is a pair of sentences."""
        return len(self.text_columns) == 2


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        name="sst2",
        folder="SST-2",
        text_columns=("sentence",),
        label_column="label",
        num_columns=2,
        has_header=True,
        metric="accuracy",
    ),
    "rte": GlueTask(
        name="rte",
        folder="RTE",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        num_columns=4,
        has_header=True,
        metric="accuracy",
        label_map=(("entailment", 0), ("not_entailment", 1)),
        hub_text_columns=("sentence1", "sentence2"),
    ),
    "mrpc": GlueTask(
        name="mrpc",
        folder="MRPC",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        num_columns=5,
        has_header=True,
        metric="f1",
        hub_text_columns=("sentence1", "sentence2"),
    ),
    "cola": GlueTask(
        name="cola",
        folder="CoLA",
        text_columns=(3,),
        label_column=1,
        num_columns=4,
        has_header=False,
        metric="matthews_correlation",
    ),
    "stsb": GlueTask(
        name="stsb",
        folder="STS-B",
        text_columns=("sentence1", "sentence2"),
        label_column="score",
        num_columns=10,
        has_header=True,
        metric="pearson",
        is_regression=True,
        hub_text_columns=("sentence1", "sentence2"),
    ),
}

# Both spellings a user meets: the Hub's config names and the folder names of the original distribution.
_ALIASES = {key: key for key in GLUE_TASKS} | {task.folder.lower(): key for key, task in GLUE_TASKS.items()}
_SPLIT_FILES = {"train": "train.tsv", "dev": "dev.tsv", "validation": "dev.tsv"}
_HUB_SPLITS = {"train": "train", "dev": "validation", "validation": "validation"}


@dataclass(frozen=True)
class GlueSplit:
    """One split of one task, as plain Python lists of equal length.

    ``sentence2`` is None for single-sentence tasks (SST-2, CoLA). ``labels`` are ints for classification
    tasks and floats (0 to 5) for STS-B.
    """

    task: GlueTask
    split: str
    sentence1: list[str]
    sentence2: list[str] | None
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        lengths = {len(self.sentence1), len(self.labels)} | ({len(self.sentence2)} if self.sentence2 else set())
        if len(lengths) != 1:
            raise ValueError(
                f"`sentence1`, `sentence2` and `labels` must have the same length, got {sorted(lengths)}."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int]) -> GlueSplit:
        """A new split holding the examples at `indices`, in that order."""
        return GlueSplit(
            task=self.task,
            split=self.split,
            sentence1=[self.sentence1[i] for i in indices],
            sentence2=None if self.sentence2 is None else [self.sentence2[i] for i in indices],
            labels=[self.labels[i] for i in indices],
        )

    def tokenize(self, tokenizer, max_length: int = 64) -> list[dict]:
        """One feature dict per example: the tokenizer's fields (unpadded, truncated to `max_length`) and ``labels``.

        The list feeds a ``Trainer`` or a ``DataLoader`` with ``DataCollatorWithPadding`` directly.
        """
        encoded = tokenizer(*self.texts(), truncation=True, max_length=max_length)
        return [
            {**{key: encoded[key][i] for key in encoded.keys()}, "labels": label}
            for i, label in enumerate(self.labels)
        ]

    def texts(self) -> tuple[list[str]] | tuple[list[str], list[str]]:
        """The positional text arguments of a tokenizer call: ``tokenizer(*split.texts())``."""
        return (self.sentence1,) if self.sentence2 is None else (self.sentence1, self.sentence2)


def get_glue_task(name: str) -> GlueTask:
    """The `GlueTask` called `name`, in either spelling ("sst2" or "SST-2"), case-insensitive.

    Raises:
        TypeError: if `name` is not a string.
        ValueError: if `name` is not one of the five supported tasks; the message lists them.
    """
    if not isinstance(name, str):
        raise TypeError(f"`task` must be a task name (str), got {type(name).__name__} {name!r}.")
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        valid = ", ".join(f"{key!r} ({task.folder})" for key, task in GLUE_TASKS.items())
        raise ValueError(f"`task` must be one of {valid}, got {name!r}.")
    return GLUE_TASKS[key]


def _split_lines(text: str) -> list[str]:
    # The last line of CoLA's dev file has no newline; a stray CR from a Windows copy is dropped too.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _column_index(column: str | int, header: list[str] | None, path: Path) -> int:
    if isinstance(column, int):
        return column
    if header is None or column not in header:
        raise ValueError(f"The header of {path} must contain the column {column!r}, got {header!r}.")
    return header.index(column)


def _parse_label(raw: str, task: GlueTask, path: Path, line_number: int) -> int | float:
    try:
        if task.is_regression:
            return float(raw)
        if task.label_map is not None:
            return dict(task.label_map)[raw]
        return int(raw)
    except (KeyError, ValueError):
        expected = "a float" if task.is_regression else (dict(task.label_map) if task.label_map else "an integer")
        raise ValueError(f"{path}, line {line_number}: the label must be {expected}, got {raw!r}.") from None


def read_glue_tsv(path: str | os.PathLike, task: str | GlueTask, split: str = "dev") -> GlueSplit:
    """Read one GLUE TSV file of the original distribution into a `GlueSplit`.

    Each line is split on tabs only (no CSV quoting), a leading byte-order mark is dropped, and the header (where
    the task has one) locates the columns by name.

    Raises:
        ValueError: for an unknown task, a row with the wrong number of fields, or a label that does not parse.
        FileNotFoundError: if `path` does not exist.
    """
    task = task if isinstance(task, GlueTask) else get_glue_task(task)
    path = Path(path)
    # utf-8-sig drops the byte-order mark that starts MRPC's files and does nothing for the others.
    lines = _split_lines(path.read_text(encoding="utf-8-sig"))

    header = lines[0].split("\t") if task.has_header and lines else None
    rows = lines[1:] if task.has_header else lines
    first_line = 2 if task.has_header else 1
    text_indices = [_column_index(column, header, path) for column in task.text_columns]
    label_index = _column_index(task.label_column, header, path)

    texts: list[list[str]] = [[] for _ in text_indices]
    labels: list[int | float] = []
    for line_number, line in enumerate(rows, start=first_line):
        fields = line.split("\t")
        if len(fields) != task.num_columns:
            raise ValueError(
                f"{path}, line {line_number}: expected {task.num_columns} tab-separated fields for "
                f"{task.folder}, got {len(fields)}."
            )
        for column, index in zip(texts, text_indices, strict=True):
            column.append(fields[index])
        labels.append(_parse_label(fields[label_index], task, path, line_number))

    logger.debug("Read %d %s rows from %s", len(labels), task.folder, path)
    return GlueSplit(
        task=task,
        split=split,
        sentence1=texts[0],
        sentence2=texts[1] if len(texts) == 2 else None,
        labels=labels,
    )


def _load_from_hub(task: GlueTask, split: str) -> GlueSplit:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "Reading GLUE without a local copy needs the `datasets` package (`pip install datasets`); or pass "
            "`data_dir` (or set GLUE_DIR) to a folder holding the original TSV files, e.g. <data_dir>/SST-2/dev.tsv."
        ) from error

    table = datasets.load_dataset("glue", task.name, split=_HUB_SPLITS[split])
    columns = [list(table[name]) for name in task.hub_text_columns]
    labels = [float(v) for v in table["label"]] if task.is_regression else [int(v) for v in table["label"]]
    return GlueSplit(
        task=task,
        split=split,
        sentence1=columns[0],
        sentence2=columns[1] if len(columns) == 2 else None,
        labels=labels,
    )


def load_glue(
    task: str | GlueTask,
    split: Literal["train", "dev", "validation"] = "train",
    data_dir: str | os.PathLike | None = None,
) -> GlueSplit:
    """One split of a GLUE task: from ``<data_dir>/<folder>/<split>.tsv``, else from the Hugging Face Hub.

    Args:
        task: "sst2", "rte", "mrpc", "cola" or "stsb" (or the folder names "SST-2", "STS-B", ...).
        split: "train", or "dev" / "validation" (the same development set; GLUE's test labels are not public).
        data_dir: folder of the original TSV distribution. None reads ``$GLUE_DIR`` when set, and otherwise loads
            the task with ``datasets.load_dataset("glue", task)``, which needs network access.

    Raises:
        ValueError: for an unknown task or split.
        FileNotFoundError: if the TSV file is missing from `data_dir`.
    """
    task = task if isinstance(task, GlueTask) else get_glue_task(task)
    if split not in _SPLIT_FILES:
        raise ValueError(f"`split` must be one of {sorted(_SPLIT_FILES)}, got {split!r}.")

    data_dir = data_dir if data_dir is not None else os.environ.get("GLUE_DIR")
    if data_dir is None:
        logger.info("No data_dir nor GLUE_DIR given: loading GLUE %s/%s from the Hugging Face Hub", task.name, split)
        return _load_from_hub(task, split)

    path = Path(data_dir) / task.folder / _SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"No {task.folder} {split} file at {path}: `data_dir` must hold the original GLUE layout, "
            f"<data_dir>/{task.folder}/{_SPLIT_FILES[split]}."
        )
    return read_glue_tsv(path, task, split="dev" if split == "validation" else split)
