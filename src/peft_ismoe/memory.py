"""Accounting of training memory: what one optimisation step keeps alive, counted in bytes.

Training memory is split the way the peak of a step is made:

* ``weights``: every parameter and buffer of the model (quantized codes included), resident all along;
* ``gradients``: one gradient per trainable parameter;
* ``optimizer_state``: what the optimizer keeps per trainable parameter (AdamW: two moments);
* ``saved_for_backward``: activations autograd keeps from the forward pass until the backward pass frees them.

The last is measured with ``torch.autograd.graph.saved_tensors_hooks``: each tensor autograd saves is counted
once per storage, and tensors that are the model's own parameters or buffers are left out, because saving them
costs nothing that ``weights`` does not already count.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = [
    "SavedTensorCounter",
    "TrainingMemory",
    "optimizer_state_bytes",
    "peak_rss_bytes",
    "saved_for_backward_bytes",
    "trained_model_memory",
    "training_memory",
]


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward while the context is active.

    ``exclude`` lists tensors whose storages are not counted (a model's parameters and buffers).

    Example::

        with SavedTensorCounter(exclude=model.parameters()) as counter:
            loss = model(**batch).loss
        counter.nbytes
    """

    def __init__(self, exclude: Iterator[torch.Tensor] | list[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks: contextlib.AbstractContextManager | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._excluded and key not in self._seen:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (exists after its first step)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one training step, by kind (see the module docstring)."""

    weights: int
    gradients: int
    optimizer_state: int
    saved_for_backward: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.saved_for_backward

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _tensor_bytes(tensors) -> int:
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        seen.setdefault(_storage_key(tensor), tensor.untyped_storage().nbytes())
    return sum(seen.values())


def saved_for_backward_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes autograd saves in one training-mode forward of `model` on `batch`; the graph is dropped, not run."""
    resident = list(model.parameters()) + list(model.buffers())
    was_training = model.training
    model.train()
    try:
        with SavedTensorCounter(exclude=resident) as counter:
            model(**batch)
    finally:
        model.train(was_training)
    return counter.nbytes


def trained_model_memory(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> TrainingMemory:
    """The memory of a training step of `model` after training with `optimizer` (whose state exists by now).

    Gradients are counted as one per trainable parameter (they are freed between steps, so they cannot be read
    back); the saved activations come from one extra forward on `batch`.
    """
    return TrainingMemory(
        weights=_tensor_bytes(list(model.parameters()) + list(model.buffers())),
        gradients=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        optimizer_state=optimizer_state_bytes(optimizer),
        saved_for_backward=saved_for_backward_bytes(model, batch),
    )


def training_memory(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> TrainingMemory:
    """Run one full training step on `batch` (forward, backward, optimizer step) and account its memory.

    The model must return an output with a ``loss`` (pass labels in `batch`). The step really updates the model.
    """
    weights = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    resident = list(model.parameters()) + list(model.buffers())

    model.train()
    optimizer.zero_grad(set_to_none=True)
    with SavedTensorCounter(exclude=resident) as counter:
        loss = model(**batch).loss
    loss.backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return TrainingMemory(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_state_bytes(optimizer),
        saved_for_backward=counter.nbytes,
    )
