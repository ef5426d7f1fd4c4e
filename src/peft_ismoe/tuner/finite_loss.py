"""Warn, naming the step, when a training loss is NaN or Inf, instead of letting a run diverge in silence.

The HF Trainer hides such losses by default (``logging_nan_inf_filter=True`` logs the mean of the finite ones), and
an optimizer step on a NaN loss writes NaN into every trained weight. `NonFiniteLossCallback` watches each training
forward of the model the Trainer trains and warns once per optimizer step that saw a non-finite loss; custom loops
call `check_finite_loss` themselves. Both read the loss once per step (one device sync), nothing more.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .config import ISMoEWarning

__all__ = ["NonFiniteLossCallback", "NonFiniteLossWarning", "check_finite_loss"]


class NonFiniteLossWarning(ISMoEWarning):
    """A training loss was NaN or Inf: the weights the next optimizer step writes are no longer meaningful."""


def check_finite_loss(loss: torch.Tensor, step: int) -> bool:
    """Warn with `NonFiniteLossWarning` when `loss` holds NaN or Inf at training step `step`; True when finite."""
    if torch.isfinite(loss.detach()).all():
        return True
    warnings.warn(
        f"Non-finite training loss ({loss.detach().float().flatten()[:4].tolist()}) at step {step}; the optimizer "
        "step will write NaN into the trained weights. Lower the learning rate, check the inputs of this step, or "
        "train the side network in float32.",
        NonFiniteLossWarning,
        stacklevel=2,
    )
    return False


class NonFiniteLossCallback(TrainerCallback):
    """A Trainer callback: `NonFiniteLossWarning` naming the step whenever a training forward returned a bad loss.

    ``Trainer(..., callbacks=[NonFiniteLossCallback()])``. Steps count as the Trainer counts them (``global_step``
    after the optimizer step, so the first step is 1); with gradient accumulation every micro-batch is checked.
    """

    def __init__(self) -> None:
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._losses: list[torch.Tensor] = []
        self.bad_steps: list[int] = []

    def _record(self, module: nn.Module, _args: Any, output: Any) -> None:
        loss = output.get("loss") if module.training and hasattr(output, "get") else None
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._record)

    def on_step_end(self, args, state, control, **kwargs):
        losses, self._losses = self._losses, []
        if losses and not torch.isfinite(torch.stack([loss.float().sum() for loss in losses])).all():
            self.bad_steps.append(state.global_step)
            bad = next(loss for loss in losses if not torch.isfinite(loss).all())
            check_finite_loss(bad, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._losses = []
