"""The GLUE benchmark harness without training: planning and resuming runs, batching, memory accounting, report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"


def _load_harness():
    spec = importlib.util.spec_from_file_location("glue_benchmark", REPO_ROOT / "benchmarks" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


glue = _load_harness()


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    return BertForSequenceClassification(config)


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 50, (4, 8), generator=generator),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }


def test_default_seeds_are_three_for_lora_lst_and_mpismoe_8bit_and_one_otherwise():
    args = glue.parse_args(["--methods", "lora", "full", "mpismoe_8bit", "--tasks", "rte"])

    assert glue.planned_runs(args) == [
        ("lora", "rte", 0),
        ("lora", "rte", 1),
        ("lora", "rte", 2),
        ("full", "rte", 0),
        ("mpismoe_8bit", "rte", 0),
        ("mpismoe_8bit", "rte", 1),
        ("mpismoe_8bit", "rte", 2),
    ]


def test_a_rerun_skips_finished_runs_unless_redo(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(glue.subprocess, "run", lambda argv: launched.append(argv) or type("R", (), {"returncode": 0}))
    (tmp_path / "lora-sst2-seed0.json").write_text("{}")
    flags = ["--methods", "lora", "--tasks", "sst2", "--seeds", "0", "1", "--results-dir", str(tmp_path)]

    glue.run_all(glue.parse_args(flags))
    glue.run_all(glue.parse_args([*flags, "--redo"]))

    singles = [argv[argv.index("--single") + 1] for argv in launched]
    assert singles == ["lora:sst2:1", "lora:sst2:0", "lora:sst2:1"]


def test_ismoe_methods_are_skipped_while_the_tuner_is_missing(tmp_path, monkeypatch, caplog):
    launched = []
    monkeypatch.setattr(glue, "ismoe_available", lambda: False)
    monkeypatch.setattr(glue.subprocess, "run", lambda argv: launched.append(argv) or type("R", (), {"returncode": 0}))

    glue.run_all(glue.parse_args(["--methods", "lst", "--tasks", "rte", "--results-dir", str(tmp_path)]))

    assert launched == []
    assert "ISMoEConfig is not importable" in caplog.text


def test_length_grouped_batches_cover_every_example_once_with_similar_lengths():
    lengths = [(7 * i) % 60 + 1 for i in range(1000)]
    generator = np.random.default_rng(0)

    batches = glue.length_grouped_batches(lengths, 32, generator, group=10)

    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert [len(batch) for batch in batches].count(32) == 31
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    assert padded < 1.3 * sum(lengths)  # random batches of these lengths pad to about 1.9 times the tokens


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        glue.parse_args(["--max-train", "0"])
    assert "--max-train must be a positive integer, got 0" in capsys.readouterr().err


def test_saved_bytes_shrink_when_the_backbone_is_frozen_and_gradients_match_the_trainable_parameters():
    full, frozen = _tiny_bert(), _tiny_bert()
    for name, parameter in frozen.named_parameters():
        parameter.requires_grad = name.startswith("classifier.")

    full_memory = glue.measure_saved_and_gradients(full, _batch())
    frozen_memory = glue.measure_saved_and_gradients(frozen, _batch())

    assert full_memory["gradient_bytes"] == sum(p.numel() * 4 for p in full.parameters())
    assert frozen_memory["gradient_bytes"] == sum(p.numel() * 4 for p in frozen.classifier.parameters())
    assert 0 < frozen_memory["saved_for_backward_bytes"] < full_memory["saved_for_backward_bytes"]
    assert all(p.grad is None for p in full.parameters())  # measuring leaves no gradient behind


def test_optimizer_state_bytes_count_both_adam_moments():
    model = _tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**_batch()).loss.backward()
    optimizer.step()

    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    # exp_avg and exp_avg_sq per parameter, plus one scalar step counter each.
    assert glue.optimizer_state_bytes(optimizer) == 2 * parameter_bytes + 4 * len(list(model.parameters()))


def _record(method: str, task: str, seed: int, score: float, memory: int = 100 * 2**20, **metrics) -> dict:
    return {
        "metrics": {"accuracy": score, "score": score} | metrics,
        "method": method,
        "task": task,
        "seed": seed,
        "score": score,
        "trainable_parameters": 1000,
        "total_parameters": 100_000,
        "memory": {"total_bytes": memory, "peak_rss_bytes": 2 * memory},
        "seconds": {"total": 60.0},
        "budget": {**vars(glue.Budget()), "train_examples": 10, "steps": 1},
        "device": "cpu",
    }


@pytest.mark.skipif(not (GLUE_DIR / "RTE" / "dev.tsv").is_file(), reason="needs the GLUE dev sets for chance levels")
def test_report_shows_mean_and_std_marks_chance_and_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    results = [_record("lora", "sst2", seed, score) for seed, score in enumerate([0.80, 0.81, 0.82])]
    results += [_record("lora", "rte", 0, 0.53), _record("full", "rte", 0, 0.52, memory=400 * 2**20)]
    results += [_record("full", "sst2", 0, 0.85, memory=400 * 2**20)]
    # MRPC is judged on accuracy: F1 84 is close to the all-positive 81.2, but accuracy 75 is well above 68.4.
    results += [_record("lora", "mrpc", 0, 0.84, accuracy=0.75)]
    report, figure = tmp_path / "results.md", tmp_path / "figures" / "plot.png"

    text = glue.write_report(results, GLUE_DIR, report, figure)

    lora_row = next(line for line in text.splitlines() if line.startswith("| LoRA"))
    assert "| 81.0 ± 1.0 |" in lora_row and "| 53.0 † |" in lora_row and "| LoRA (r=8) | 3 |" in lora_row
    assert "RTE acc (at chance)" in text and "SST-2 acc |" in text and "MRPC F1 |" in text
    assert "**At chance:** on RTE" in text
    assert "at most 8,000 training examples" in text and "2 epochs, batch 32, at most 64 tokens" in text
    assert report.read_text() == text
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_report_without_results_says_so(tmp_path):
    with pytest.raises(ValueError, match="No result files to report on"):
        glue.write_report([], GLUE_DIR, tmp_path / "r.md", tmp_path / "p.png")


def test_result_files_are_written_whole(tmp_path):
    path = glue.result_path(tmp_path / "new", "bitfit", "cola", 0)

    glue.write_json(path, {"score": 0.5})

    assert path.name == "bitfit-cola-seed0.json"
    assert json.loads(path.read_text()) == {"score": 0.5}
    assert list(path.parent.iterdir()) == [path]


def test_ablations_run_on_their_two_tasks_only_and_keep_the_default_seed_count():
    args = glue.parse_args(["--methods", "ablation_no_balance", "mpismoe_4bit", "--tasks", "sst2", "rte", "stsb"])

    runs = glue.planned_runs(args)

    assert [r for r in runs if r[0] == "ablation_no_balance"] == [
        ("ablation_no_balance", "sst2", 0),
        ("ablation_no_balance", "stsb", 0),
    ]
    assert [r[1] for r in runs if r[0] == "mpismoe_4bit"] == ["sst2", "rte", "stsb"]


def test_every_ablation_changes_exactly_one_field_of_its_reference():
    for name in glue.ABLATIONS:
        reference, _ = glue.ABLATION_BASELINES[name]
        changed = {
            field
            for field, value in vars(glue.SIDE_RECIPES[name]).items()
            if value != getattr(glue.SIDE_RECIPES[reference], field)
        }
        assert len(changed) == 1, (name, changed)


def test_learning_rate_override_reaches_the_run_command_and_bad_values_are_refused(capsys):
    args = glue.parse_args(["--learning-rate", "5e-3", "--results-dir", "/tmp/sweep"])
    assert glue.single_run_argv("lst", "cola", 0, args)[-4:-2] == ["--learning-rate", "0.005"]

    with pytest.raises(SystemExit):
        glue.parse_args(["--learning-rate", "-1"])
    assert "--learning-rate must be a positive number, got -1.0" in capsys.readouterr().err


@pytest.mark.skipif(not (GLUE_DIR / "RTE" / "dev.tsv").is_file(), reason="needs the GLUE dev sets for chance levels")
def test_report_checks_targets_lists_ablations_and_draws_expert_usage(tmp_path):
    pytest.importorskip("matplotlib")
    results = []
    for task in glue.TASKS:
        results += [_record("lora", task, 0, 0.80, memory=400 * 2**20), _record("lst", task, 0, 0.78)]
        results += [_record("mpismoe_8bit", task, 0, 0.795, memory=90 * 2**20)]
    usage = {"side.blocks.0": [10, 0, 5, 5, 0, 0, 0, 0], "side.blocks.1": [1, 1, 1, 1, 1, 1, 1, 1]}
    results[-1]["expert_usage"] = usage  # the MP-ISMoE run on STS-B, an ablation task
    results += [_record("ablation_no_balance", "sst2", 0, 0.70)]
    report, figure = tmp_path / "results.md", tmp_path / "figures" / "plot.png"

    text = glue.write_report(results, GLUE_DIR, report, figure, planner_check=False)

    assert "| within 0.3 points of LoRA | -0.5 points | **no** |" in text
    assert "| at least 1.0 point above LST-like | +1.5 points | yes |" in text
    assert "| at most 0.25x LoRA's training memory | 0.225x | yes |" in text
    row = next(line for line in text.splitlines() if line.startswith("| balancing loss off"))
    assert "| 70.0 | 79.5 | -9.5 |" in row and "| — | 79.5 | — |" in row
    assert "ablation" not in next(line for line in text.splitlines() if line.startswith("| method"))
    assert (figure.parent / "glue_expert_usage.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(not (GLUE_DIR / "RTE" / "dev.tsv").is_file(), reason="needs the GLUE dev sets for chance levels")
def test_report_lists_learning_rate_probes_beside_the_table_rate(tmp_path):
    pytest.importorskip("matplotlib")
    results_dir = tmp_path / "glue"
    probe = _record("lora", "cola", 0, 0.30) | {"learning_rate": 3e-4}
    glue.write_json(results_dir.with_name("glue_probes") / "lora_3e-4" / "lora-cola-seed0.json", probe)
    results = [_record("lora", "cola", 0, 0.05)]

    text = glue.write_report(
        results, GLUE_DIR, tmp_path / "r.md", tmp_path / "p.png", results_dir, planner_check=False
    )

    assert "| LoRA (r=8) | cola | 0 | 0.0003 | 30.0 | 5.0 (0.001) |" in text
    assert "- LoRA (r=8): 0.001 (stsb: 0.0003)" in text


def test_the_per_task_learning_rate_applies_to_its_task_only():
    assert glue.learning_rate_for("lora", "stsb") == 3e-4
    assert glue.learning_rate_for("lora", "sst2") == glue.LEARNING_RATES["lora"] == 1e-3
    assert glue.learning_rate_for("mpismoe_8bit", "stsb") == 2e-3
