"""Shared pieces of the ISMoE tuner tests: a tiny training loop and a save-and-reload check."""

from __future__ import annotations

import torch


def train_steps(model, batch: dict, steps: int = 2, lr: float = 1e-2, loss_fn=None) -> None:
    """A few AdamW steps on the trainable parameters of `model`; `loss_fn(output)` when the output has no loss."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(**batch)
        loss = output.loss if loss_fn is None else loss_fn(output)
        loss.backward()
        optimizer.step()
    model.eval()


def assert_round_trip(model, loaded, output, loaded_output) -> None:
    """Every adapter tensor of `model` is restored bit for bit in `loaded`, and the outputs agree.

    A freshly built model places its tensors at other addresses, where the CPU kernels may vectorise a reduction
    differently and round the last bit otherwise, so the outputs are compared to within float32 rounding.
    """
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    restored = dict(loaded.named_parameters())
    assert expected and all(torch.equal(restored[name], value) for name, value in expected.items())
    torch.testing.assert_close(loaded_output, output, rtol=0, atol=1e-6)
