"""A memory planner: the GNP-IQ and ISMoE settings with the most side capacity that fit a training budget.

The prediction uses the accounting of `peft_ismoe.memory` (weights + gradients + AdamW state + bytes saved for
backward), computed for each candidate without training and without quantizing:

* weights: the float model with the candidate adapter attached, where every layer GNP-IQ would convert is counted at
  its packed size (codes, float16 scales and zero points, the float bias);
* gradients and optimizer state: one float32 gradient and two float32 AdamW moments (plus a step counter) per
  trainable tensor;
* saved for backward: measured on the float model with the adapter attached, for one and two sequences of
  ``seq_len`` tokens, and extrapolated linearly to ``batch_size`` (every saved activation is per sequence). The
  backbone saves nothing, so its storage changes only one thing: a GNP-IQ layer that runs with a graph (after the
  last block, like BERT's pooler) keeps the float weight it dequantized, which is added.

"Side capacity" is the number of trainable side-network parameters; between equal capacities the higher bit width
wins. The candidates cover bits in ``bits_choices``, expert counts in ``experts_choices`` and reduction factors in
``reduction_choices`` (those that divide the hidden size).
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import get_peft_model
from torch import nn

from .memory import TrainingMemory, saved_for_backward_bytes
from .quantization import GNPIQConfig, is_gnpiq_quantized, packed_numel
from .quantization.model import find_linear_layers, layers_to_quantize
from .tuner import ISMoEConfig
from .tuner.backbone import hidden_size_of

__all__ = ["MemoryPlan", "plan", "predict_training_memory"]

logger = logging.getLogger(__name__)

_FLOAT32 = 4
# AdamW keeps two moments per trainable tensor and a float32 step counter.
_ADAMW_MOMENTS = 2
_ADAMW_STEP_BYTES = 4


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen settings, their predicted training memory, and every candidate that was weighed."""

    gnpiq_config: GNPIQConfig | None
    ismoe_config: ISMoEConfig
    predicted: TrainingMemory
    side_parameters: int
    candidates: tuple[tuple[int | None, int, int, int, int], ...]  # (bits, experts, reduction, side params, bytes)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _packed_layer_bytes(module: nn.Module, bits: int, group_size: int) -> int:
    out_features, in_features = (
        (module.weight.shape[::-1]) if type(module).__name__ == "Conv1D" else module.weight.shape
    )
    num_groups = -(-in_features // group_size)
    codes = packed_numel(out_features * num_groups * group_size, bits)
    bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
    return codes + 2 * 2 * out_features * num_groups + bias


def _probe(model: nn.Module, batch_size: int, seq_len: int, task_type: str | None) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    device = next(model.parameters()).device
    batch = {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(
            device
        ),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
    }
    if task_type == "SEQ_CLS":
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    elif task_type in ("CAUSAL_LM", "TOKEN_CLS"):
        batch["labels"] = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return batch


@dataclass(frozen=True)
class _AdapterAccount:
    """What one ISMoE config costs on the float model, whatever the backbone's bit width."""

    float_weight_bytes: int
    trainable_numels: tuple[int, ...]
    side_parameters: int
    saved_one: int  # bytes saved for backward with one sequence
    saved_two: int  # ... and with two
    layers_with_grad_input: frozenset[str]  # linear layers that run with a graph (after the last block)


def _account_adapter(model: nn.Module, ismoe_config: ISMoEConfig, seq_len: int) -> _AdapterAccount:
    """Attach `ismoe_config` to `model`, measure, and detach again, leaving `model` as it was."""
    task_type = ismoe_config.task_type
    task_type = None if task_type is None else str(getattr(task_type, "value", task_type))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    # A float linear layer saves no weight for backward (it is a parameter), but a GNP-IQ layer that runs with a
    # graph (BERT's pooler, after the last block) saves the float weight it dequantized: find those layers.
    with_grad_input: set[str] = set()
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: with_grad_input.add(name) if args and args[0].requires_grad else None
        )
        for name, module in find_linear_layers(model).items()
    ]
    # get_peft_model fills in fields of the config it is given; the caller's config must stay as it was.
    wrapped = get_peft_model(model, copy.deepcopy(ismoe_config))
    try:
        trainable = tuple(p.numel() for p in wrapped.parameters() if p.requires_grad)
        return _AdapterAccount(
            float_weight_bytes=_tensor_bytes(list(wrapped.parameters()) + list(wrapped.buffers())),
            trainable_numels=trainable,
            side_parameters=sum(p.numel() for n, p in wrapped.named_parameters() if "ismoe_side" in n),
            saved_one=saved_for_backward_bytes(wrapped, _probe(model, 1, seq_len, task_type)),
            saved_two=saved_for_backward_bytes(wrapped, _probe(model, 2, seq_len, task_type)),
            layers_with_grad_input=frozenset(with_grad_input),
        )
    finally:
        for handle in handles:
            handle.remove()
        wrapped.base_model.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))


def _predict(
    model: nn.Module, account: _AdapterAccount, gnpiq_config: GNPIQConfig | None, batch_size: int
) -> TrainingMemory:
    quantized = layers_to_quantize(model, gnpiq_config) if gnpiq_config is not None else {}
    float_bytes = sum(_tensor_bytes(m.parameters()) for m in quantized.values())
    packed = sum(_packed_layer_bytes(m, gnpiq_config.bits, gnpiq_config.group_size) for m in quantized.values())
    dequantized = sum(
        m.weight.numel() * m.weight.element_size() for n, m in quantized.items() if n in account.layers_with_grad_input
    )
    gradients = _FLOAT32 * sum(account.trainable_numels)
    return TrainingMemory(
        weights=account.float_weight_bytes - float_bytes + packed,
        gradients=gradients,
        optimizer_state=_ADAMW_MOMENTS * gradients + _ADAMW_STEP_BYTES * len(account.trainable_numels),
        saved_for_backward=account.saved_one
        + (account.saved_two - account.saved_one) * (batch_size - 1)
        + dequantized,
    )


def predict_training_memory(
    model: nn.Module,
    gnpiq_config: GNPIQConfig | None,
    ismoe_config: ISMoEConfig,
    batch_size: int,
    seq_len: int,
) -> tuple[TrainingMemory, int]:
    """Predicted training memory of one AdamW step, and the side network's parameter count.

    `model` is the float backbone, not yet wrapped; it is wrapped for the measurement and unwrapped again, so it
    comes back unchanged. `gnpiq_config` None predicts a float backbone.
    """
    if is_gnpiq_quantized(model):
        raise ValueError("`model` must be the float backbone; the planner counts the quantized sizes itself.")
    account = _account_adapter(model, ismoe_config, seq_len)
    return _predict(model, account, gnpiq_config, batch_size), account.side_parameters


def plan(
    model: nn.Module,
    memory_budget: int,
    batch_size: int,
    seq_len: int,
    *,
    task_type: str = "SEQ_CLS",
    bits_choices: Sequence[int] = (8, 4, 3, 2),
    experts_choices: Sequence[int] = (16, 8, 4, 2, 1),
    reduction_choices: Sequence[int] = (4, 8, 16),
    **ismoe_kwargs,
) -> MemoryPlan:
    """The `GNPIQConfig` and `ISMoEConfig` with the most side parameters whose training fits `memory_budget` bytes.

    Args:
        model: the float backbone (unwrapped, unquantized); it comes back unchanged.
        memory_budget: bytes for weights, gradients, optimizer state and saved activations together.
        batch_size, seq_len: the training batch.
        task_type: the PEFT task type of the adapter.
        ismoe_kwargs: further `ISMoEConfig` fields, fixed for every candidate (``top_k`` is capped by the experts).

    Raises:
        ValueError: if no candidate fits; the message gives the smallest prediction.
    """
    for name, value in (("memory_budget", memory_budget), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be a positive number, got {value!r} ({type(value).__name__}).")
    for name, choices in (
        ("bits_choices", bits_choices), ("experts_choices", experts_choices), ("reduction_choices", reduction_choices)
    ):  # fmt: skip
        if len(choices) == 0:
            raise ValueError(f"`{name}` must name at least one value, got {choices!r}.")
    if memory_budget <= 0 or batch_size <= 0 or seq_len <= 0:
        raise ValueError(
            f"`memory_budget`, `batch_size` and `seq_len` must be positive, got {memory_budget!r}, {batch_size!r}, "
            f"{seq_len!r}."
        )
    hidden = hidden_size_of(model)
    top_k = ismoe_kwargs.pop("top_k", 2)
    if is_gnpiq_quantized(model):
        raise ValueError("`model` must be the float backbone; the planner counts the quantized sizes itself.")
    # Side attention splits the side width into heads, so a reduction whose width the heads do not divide is not
    # a candidate (unless side attention is switched off).
    heads = ismoe_kwargs.get("side_attention_heads", 4) if ismoe_kwargs.get("side_attention") is not False else 1
    reductions = [r for r in reduction_choices if hidden % r == 0 and (hidden // r) % heads == 0]
    if not reductions:
        raise ValueError(
            f"No entry of `reduction_choices`={tuple(reduction_choices)!r} gives a side width that divides the hidden "
            f"size {hidden} into {heads} attention heads; pass reductions that do."
        )
    candidates = []
    best = None
    for experts in experts_choices:
        for reduction in reductions:
            ismoe = ISMoEConfig(
                task_type=task_type,
                num_experts=experts,
                top_k=min(top_k, experts),
                reduction_factor=reduction,
                **ismoe_kwargs,
            )
            # The adapter is measured once; the bit width only changes the backbone's weight bytes.
            account = _account_adapter(model, ismoe, seq_len)
            for bits in bits_choices:
                gnpiq = GNPIQConfig(bits=bits)
                predicted = _predict(model, account, gnpiq, batch_size)
                side = account.side_parameters
                candidates.append((bits, experts, reduction, side, predicted.total))
                if predicted.total <= memory_budget and (best is None or (side, bits) > (best[3], best[0].bits)):
                    best = (gnpiq, ismoe, predicted, side)
    if best is None:
        smallest = min(candidates, key=lambda c: c[4])
        raise ValueError(
            f"No configuration fits `memory_budget`={memory_budget:,} bytes at batch {batch_size} x {seq_len} tokens; "
            f"the smallest needs {smallest[4]:,} bytes ({smallest[0]} bits, {smallest[1]} experts, reduction "
            f"{smallest[2]}). Lower the batch or the sequence length."
        )
    gnpiq, ismoe, predicted, side = best
    logger.info(
        "Memory plan: %d bits, %d experts, reduction %d: %d bytes",
        gnpiq.bits,
        ismoe.num_experts,
        ismoe.reduction_factor,
        predicted.total,
    )
    return MemoryPlan(gnpiq, ismoe, predicted, side, tuple(candidates))
