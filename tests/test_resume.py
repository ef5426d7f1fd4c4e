"""A Trainer run stopped at a checkpoint and resumed ends bit for bit where the uninterrupted run ends.

`test_tuner_training.py` resumes a finished run and compares within float tolerance; this file stops a run for
real (the process state is gone: a fresh model, scrambled random state) with dropout on, shuffled data, gradient
accumulation and a decaying learning rate, so the optimizer, scheduler, data order and random state must all come
back from the checkpoint for the adapter to match exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from peft_ismoe import ISMoEConfig

BERT = BertConfig(
    vocab_size=80,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=2,
    hidden_dropout_prob=0.2,  # dropout draws random numbers every step: the random state must be restored too
)
MAX_STEPS = 6
STOP_AT = 3


class _Examples(torch.utils.data.Dataset):
    def __init__(self, size: int = 24, seq: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, BERT.vocab_size, (size, seq), generator=generator)
        self.labels = (self.ids[:, 0] > BERT.vocab_size // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class _StopAt(TrainerCallback):
    """Ends training after step `step`, as a killed job would, once that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


@pytest.fixture(autouse=True)
def restore_determinism():
    # `full_determinism=True` switches torch to deterministic algorithms for the whole process; undo it afterwards.
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def _model(init_seed: int = 0):
    torch.manual_seed(0)
    base = BertForSequenceClassification(copy.deepcopy(BERT))
    config = ISMoEConfig(
        task_type="SEQ_CLS", num_experts=4, top_k=2, init_seed=init_seed, modules_to_save=["classifier"]
    )
    return get_peft_model(base, config)


def _trainer(model, output_dir, callbacks=()) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=MAX_STEPS,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        save_steps=STOP_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        full_determinism=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_Examples(), callbacks=list(callbacks))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = _model()
    reference = _trainer(uninterrupted, tmp_path / "once")
    reference.train()
    expected = _trainable(uninterrupted)

    stopped_model = _model()
    stopped = _trainer(stopped_model, tmp_path / "twice", callbacks=[_StopAt(STOP_AT)])
    assert stopped.train().global_step == STOP_AT
    checkpoint = tmp_path / "twice" / f"checkpoint-{STOP_AT}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    halfway = _trainable(stopped_model)
    assert any(not torch.equal(halfway[name], expected[name]) for name in expected)

    # A new process: the model is rebuilt (from another side-network seed, so only the checkpoint can make the
    # weights match) and the global random state is anything.
    resumed_model = _model(init_seed=7)
    torch.manual_seed(12345)
    resumed = _trainer(resumed_model, tmp_path / "twice")
    assert resumed.train(resume_from_checkpoint=str(checkpoint)).global_step == MAX_STEPS

    final = _trainable(resumed_model)
    assert sorted(final) == sorted(expected)
    for name, value in final.items():
        assert torch.equal(value, expected[name]), name
    # The steps after the checkpoint saw the same batches, dropout masks and learning rates.
    reference_losses, resumed_losses = _losses(reference), _losses(resumed)
    after = [step for step in reference_losses if step > STOP_AT]
    assert after and all(math.isfinite(reference_losses[step]) for step in after)
    assert [resumed_losses[step] for step in after] == [reference_losses[step] for step in after]
