"""GLUE reading: the quirks of each original TSV file, the task names, and the Hub fallback."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from peft_ismoe.data import GLUE_TASKS, GlueSplit, get_glue_task, load_glue, read_glue_tsv

GLUE_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "SST-2" / "dev.tsv").is_file(), reason=f"no GLUE copy at {GLUE_DIR}")

# (task, split, rows, how many labels equal `counted`, counted): from the data README.
ROW_COUNTS = [
    ("sst2", "dev", 872, 444, 1),
    ("rte", "dev", 277, 146, 0),  # 0 = entailment, the Hub's convention
    ("mrpc", "dev", 408, 279, 1),
    ("cola", "dev", 1043, 721, 1),
    ("stsb", "dev", 1500, None, None),
    ("sst2", "train", 67349, 37569, 1),
    ("rte", "train", 2490, 1249, 0),
    ("mrpc", "train", 3668, 2474, 1),
    ("cola", "train", 8551, 6023, 1),
    ("stsb", "train", 5749, None, None),
]

ALIASES = [
    ("sst2", "sst2"),
    ("SST-2", "sst2"),
    ("sst-2", "sst2"),
    ("STS-B", "stsb"),
    ("CoLA", "cola"),
    (" MRPC ", "mrpc"),
]


@needs_glue
@pytest.mark.parametrize("task, split, rows, count, counted", ROW_COUNTS, ids=[f"{t}-{s}" for t, s, *_ in ROW_COUNTS])
def test_row_counts_and_label_balance_match_the_data_readme(task, split, rows, count, counted):
    data = load_glue(task, split, GLUE_DIR)

    assert len(data) == rows
    assert len(data.sentence1) == rows
    assert (data.sentence2 is not None) == GLUE_TASKS[task].is_pair
    if count is not None:
        assert data.labels.count(counted) == count
        assert set(data.labels) == {0, 1}


@needs_glue
def test_cola_has_no_header_so_its_first_line_is_an_example():
    data = load_glue("cola", "dev", GLUE_DIR)

    assert data.sentence1[0] == "The sailors rode the breeze clear of the rocks."
    assert data.labels[0] == 1
    # The file's last line has no newline at the end and must still be read.
    assert data.sentence1[-1] == (GLUE_DIR / "CoLA" / "dev.tsv").read_text().split("\t")[-1]


@needs_glue
def test_mrpc_first_column_is_found_despite_the_byte_order_mark():
    assert (GLUE_DIR / "MRPC" / "dev.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")

    data = load_glue("mrpc", "dev", GLUE_DIR)

    assert data.labels[:3] == [1, 0, 0]
    assert data.sentence1[0].startswith("He said the foodservice pie business")
    assert data.sentence2[0] == '"The foodservice pie business does not fit our long-term growth strategy.'


@needs_glue
def test_rte_rows_with_quotes_are_kept_intact():
    data = load_glue("rte", "dev", GLUE_DIR)

    # A CSV reader with quoting on would strip these quotes and join the following fields.
    assert data.sentence1[137].startswith('"It\'s Only a Play" is Terrence McNally\'s "Give My Regards to Broadway,"')
    assert data.labels[:2] == [1, 0]
    assert sum('"' in text for text in data.sentence1 + data.sentence2) > 10


@needs_glue
def test_stsb_labels_are_float_scores():
    data = load_glue("stsb", "dev", GLUE_DIR)

    assert data.labels[:2] == [5.0, 4.75]
    assert all(isinstance(label, float) for label in data.labels)
    assert 0.0 == min(data.labels) and max(data.labels) == 5.0
    assert len(set(data.labels)) > 50
    assert GLUE_TASKS["stsb"].num_labels == 1


@needs_glue
def test_sst2_keeps_the_text_as_published_and_validation_means_dev():
    dev, validation = load_glue("sst2", "dev", GLUE_DIR), load_glue("SST-2", "validation", GLUE_DIR)

    assert dev.sentence1[0] == "it 's a charming and often affecting journey . "
    assert validation.sentence1 == dev.sentence1
    assert validation.split == "dev"


@pytest.mark.parametrize("name, expected", ALIASES, ids=[name.strip() for name, _ in ALIASES])
def test_task_names_accept_the_hub_and_the_folder_spelling(name, expected):
    assert get_glue_task(name).name == expected


@pytest.mark.parametrize("name", ["mnli", "sst", "", "glue"])
def test_bad_task_name_lists_the_valid_ones(name):
    with pytest.raises(
        ValueError, match=rf"`task` must be one of 'sst2' \(SST-2\), 'rte'.*'stsb' \(STS-B\), got '{name}'"
    ):
        get_glue_task(name)


def test_task_name_must_be_a_string():
    with pytest.raises(TypeError, match="`task` must be a task name"):
        get_glue_task(2)


def test_bad_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"`split` must be one of \['dev', 'train', 'validation'\], got 'test'"):
        load_glue("rte", "test", tmp_path)


def test_missing_file_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CoLA/dev.tsv"):
        load_glue("cola", "dev", tmp_path)


def test_glue_dir_environment_variable_is_read(tmp_path, monkeypatch):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t0\n")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))

    data = load_glue("sst2")

    assert data.sentence1 == ["good ", "bad "]
    assert data.labels == [1, 0]


BAD_FILES = [
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", r"line 2: the label must be .*got 'maybe'"),
    ("sst2", "sentence\tlabel\ngood\t1\nbad\t0\textra\n", r"line 3: expected 2 tab-separated fields for SST-2, got 3"),
    ("stsb", "\t".join(["x"] * 10) + "\n", r"must contain the column 'sentence1'"),
    ("cola", "gj04\tyes\t\tA sentence.\n", r"line 1: the label must be an integer, got 'yes'"),
]


@pytest.mark.parametrize("task, text, message", BAD_FILES, ids=["bad-label", "extra-field", "bad-header", "cola"])
def test_malformed_files_raise_with_the_line_number(tmp_path, task, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)

    with pytest.raises(ValueError, match=message):
        read_glue_tsv(path, task)


def test_byte_order_mark_and_crlf_are_tolerated_in_any_file(tmp_path):
    path = tmp_path / "mrpc.tsv"
    path.write_bytes('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n0\t1\t2\t"a\tb"\r\n'.encode())

    data = read_glue_tsv(path, "mrpc")

    assert data.labels == [0]
    assert data.texts() == (['"a'], ['b"'])


def test_select_and_length_checks():
    split = GlueSplit(GLUE_TASKS["rte"], "train", ["a", "b", "c"], ["x", "y", "z"], [0, 1, 0])

    picked = split.select([2, 0])

    assert (picked.sentence1, picked.sentence2, picked.labels) == (["c", "a"], ["z", "x"], [0, 0])
    with pytest.raises(ValueError, match=r"must have the same length, got \[2, 3\]"):
        GlueSplit(GLUE_TASKS["rte"], "train", ["a", "b", "c"], ["x", "y"], [0, 1, 0])


def test_without_a_local_copy_the_hub_is_used_with_its_split_names(monkeypatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"sentence1": ["s1"], "sentence2": ["s2"], "label": [3]}

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    data = load_glue("STS-B", "dev")

    assert calls == [("glue", "stsb", "validation")]
    assert data.labels == [3.0] and isinstance(data.labels[0], float)
    assert data.texts() == (["s1"], ["s2"])


def test_without_a_local_copy_or_datasets_the_error_says_what_to_install(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)

    with pytest.raises(ImportError, match=r"needs the `datasets` package .* or pass `data_dir`"):
        load_glue("cola", "train")


def test_a_split_tokenizes_into_trainer_features():
    from transformers import AutoTokenizer

    from peft_ismoe.backbones import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    split = load_glue("mrpc", "dev", GLUE_DIR).select([0, 1, 2])
    features = split.tokenize(tokenizer, max_length=12)
    assert [f["labels"] for f in features] == split.labels
    assert all(len(f["input_ids"]) == len(f["attention_mask"]) <= 12 for f in features)
    # A pair task puts both sentences in one sequence, separated by [SEP].
    assert features[0]["input_ids"].count(tokenizer.sep_token_id) == 2
