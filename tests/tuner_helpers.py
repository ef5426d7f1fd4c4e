"""Shared pieces of the ISMoE tuner tests: a single-thread fixture and a tiny training loop."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread; on a shared, loaded machine several threads per process spin against
    # each other and make these tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
