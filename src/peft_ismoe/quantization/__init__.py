"""GNP-IQ: low-bit, group-wise storage of a frozen backbone's linear weights."""

from .callback import GNPIQRequantizeCallback, RefinedGrid, RequantizeRound, refine_grid
from .config import DEFAULT_MODULES_TO_NOT_CONVERT, GNPIQConfig
from .hf_quantizer import GNPIQHfQuantizer, GNPIQWarning, register_with_transformers
from .linear import GNPIQLinear
from .model import (
    collect_input_importance,
    find_linear_layers,
    is_gnpiq_quantized,
    quantize_linear_layers,
    quantize_model,
)
from .packing import pack_codes, packed_numel, unpack_codes
from .solver import QuantizedWeight, gnpiq_quantize, minmax_quantize, noise_in_steps

__all__ = [
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "GNPIQConfig",
    "GNPIQHfQuantizer",
    "GNPIQLinear",
    "GNPIQRequantizeCallback",
    "GNPIQWarning",
    "QuantizedWeight",
    "RefinedGrid",
    "RequantizeRound",
    "collect_input_importance",
    "find_linear_layers",
    "gnpiq_quantize",
    "is_gnpiq_quantized",
    "minmax_quantize",
    "noise_in_steps",
    "pack_codes",
    "packed_numel",
    "quantize_linear_layers",
    "quantize_model",
    "refine_grid",
    "register_with_transformers",
    "unpack_codes",
]
