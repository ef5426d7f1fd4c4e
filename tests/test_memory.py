"""Training-memory accounting: saved-for-backward bytes, gradients and optimizer state of known small cases."""

from __future__ import annotations

import torch
from torch import nn

from peft_ismoe.memory import (
    SavedTensorCounter,
    TrainingMemory,
    optimizer_state_bytes,
    saved_for_backward_bytes,
    trained_model_memory,
    training_memory,
)


class Regressor(nn.Module):
    def __init__(self, trainable_first: bool = True):
        super().__init__()
        self.first = nn.Linear(16, 32)
        self.second = nn.Linear(32, 1)
        self.first.requires_grad_(trainable_first)

    def forward(self, x, labels):
        hidden = torch.relu(self.first(x))
        return type("Output", (), {"loss": ((self.second(hidden).squeeze(-1) - labels) ** 2).mean()})()


def test_saved_bytes_count_activations_but_not_parameters():
    model = Regressor()
    x = torch.randn(8, 16)
    with SavedTensorCounter(exclude=list(model.parameters())) as counter:
        model.second(torch.relu(model.first(x)))
    # first saves its input x (8x16), relu its output, second its input (the same 8x32 tensor): 128 + 256 floats.
    assert counter.nbytes == (8 * 16 + 8 * 32) * 4


def test_a_frozen_input_layer_saves_nothing_for_its_weight():
    model = Regressor(trainable_first=False)
    x = torch.randn(8, 16)
    with SavedTensorCounter(exclude=list(model.parameters())) as counter:
        model.second(torch.relu(model.first(x)))
    # No gradient is needed for `first`, so its input is not saved: only relu's output (read by `second`).
    assert counter.nbytes == 8 * 32 * 4


def test_training_memory_of_adamw_counts_two_moments_per_trainable_parameter():
    model = Regressor(trainable_first=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    memory = training_memory(model, {"x": torch.randn(8, 16), "labels": torch.randn(8)}, optimizer)

    trainable_bytes = sum(p.numel() * 4 for p in trainable)
    assert isinstance(memory, TrainingMemory)
    assert memory.weights == sum(p.numel() * 4 for p in model.parameters())
    assert memory.gradients == trainable_bytes
    # AdamW keeps exp_avg and exp_avg_sq per parameter, plus a scalar step counter.
    assert memory.optimizer_state - 2 * trainable_bytes in (0, 4 * len(trainable), 8 * len(trainable))
    assert memory.total == memory.weights + memory.gradients + memory.optimizer_state + memory.saved_for_backward
    assert optimizer_state_bytes(optimizer) == memory.optimizer_state


def test_memory_after_training_agrees_with_the_measured_step():
    model = Regressor(trainable_first=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"x": torch.randn(8, 16), "labels": torch.randn(8)}
    measured = training_memory(model, batch, optimizer)
    assert trained_model_memory(model, batch, optimizer) == measured
    # relu's output (8 x 32 floats) and the 8 residuals the squared loss keeps.
    assert saved_for_backward_bytes(model, batch) == measured.saved_for_backward == (8 * 32 + 8) * 4
