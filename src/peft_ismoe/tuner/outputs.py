"""Model outputs that carry ISMoE's balancing loss as a declared field.

A transformers `ModelOutput` is a dataclass, and torch's pytree rebuilds it from its declared fields only.
DistributedDataParallel does exactly that to every output when ``find_unused_parameters=True`` (and on the first
step with ``static_graph=True``): an ``aux_loss`` key written into, say, a `SequenceClassifierOutput` that does not
declare it makes the rebuild fail with ``unexpected keyword argument 'aux_loss'``. So the output is re-issued as
an instance of a subclass of its own type that declares ``aux_loss``; ``isinstance`` checks, attribute and key
access, and ``to_tuple`` (``aux_loss`` last) all keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

__all__ = ["with_aux_loss"]

_WITH_AUX: dict[type, type] = {}


def _subclass_with_aux(output_type: type) -> type:
    """``output_type`` extended by an ``aux_loss`` field (one class per output type, built once)."""
    cached = _WITH_AUX.get(output_type)
    if cached is not None:
        return cached
    namespace = {
        "__annotations__": {"aux_loss": torch.FloatTensor | None},
        "aux_loss": None,
        "__module__": __name__,
        "__qualname__": f"{output_type.__name__}WithAuxLoss",
        "__doc__": f"`{output_type.__name__}` with ``aux_loss``, ISMoE's balancing loss (a scalar).",
    }
    # Defining the subclass runs ModelOutput.__init_subclass__, which registers it with torch's pytree.
    subclass = dataclass(type(f"{output_type.__name__}WithAuxLoss", (output_type,), namespace))
    _WITH_AUX[output_type] = subclass
    return subclass


def with_aux_loss(output: Any, aux_loss: torch.Tensor) -> Any:
    """`output` with ``aux_loss`` set; a `ModelOutput` that does not declare the field comes back as a subclass."""
    if not isinstance(output, ModelOutput) or not is_dataclass(output):
        output["aux_loss"] = aux_loss
        return output
    if any(f.name == "aux_loss" for f in fields(output)):
        output["aux_loss"] = aux_loss
        return output
    values = {f.name: getattr(output, f.name) for f in fields(output)}
    return _subclass_with_aux(type(output))(**values, aux_loss=aux_loss)
