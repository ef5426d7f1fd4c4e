"""Clear errors for batches the backbone cannot run, raised before the backbone fails deep inside with a shape error.

Checked on every call of a model with an ISMoE adapter (from the tuner's pre-forward hook), for token inputs
(``input_ids``, or ``inputs_embeds``):

* an empty batch (no sequence) or empty sequences (no token);
* sequences longer than a learned position table (BERT, RoBERTa, GPT-2, ... have one row per position, so a longer
  sequence has no position embedding; rotary models such as Llama have no such table and are not limited here).

Padding-only rows are not refused: the backbone runs them, the side network excludes their tokens from routing
statistics and the balancing loss, and the other rows' results do not depend on them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["check_model_inputs", "position_limit"]

_LIMITS: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def position_limit(model: nn.Module) -> int | None:
    """The number of rows of the model's learned absolute position table, or None when it has none."""
    if model in _LIMITS:
        return _LIMITS[model]
    config = getattr(model, "config", None)
    limit = None
    if getattr(config, "position_embedding_type", "absolute") == "absolute":
        sizes = [
            module.num_embeddings
            for name, module in model.named_modules()
            if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in ("position_embeddings", "wpe")
        ]
        limit = min(sizes) if sizes else None
        # RoBERTa-style tables start counting after the padding index, so fewer positions than rows are usable.
        offset = getattr(config, "pad_token_id", None) if getattr(config, "model_type", "") in ("roberta",) else None
        if limit is not None and isinstance(offset, int):
            limit -= offset + 1
    _LIMITS[model] = limit
    return limit


def check_model_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise `ValueError` naming the input when its batch is empty or its sequences cannot be embedded."""
    name, tokens = "input_ids", kwargs.get("input_ids")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    if tokens is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
        name, tokens = "inputs_embeds", kwargs["inputs_embeds"][..., 0]
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        return

    batch, length = tokens.shape
    if batch == 0:
        raise ValueError(
            f"`{name}` holds an empty batch (shape {tuple(tokens.shape)}); skip empty batches before calling the "
            "model (e.g. `drop_last=True` in the DataLoader)."
        )
    if length == 0:
        raise ValueError(f"`{name}` holds sequences with no token (shape {tuple(tokens.shape)}).")
    if kwargs.get("past_key_values") is not None:
        return  # generation: the cache holds the earlier positions, the backbone checks the total itself
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(
            f"`{name}` has sequences of {length} tokens, but {type(model).__name__} has learned position embeddings "
            f"for {limit} positions only; truncate to at most {limit} tokens (e.g. `truncation=True, "
            f"max_length={limit}` in the tokenizer)."
        )
