"""GNP-IQ as a transformers quantization method: ``from_pretrained(..., quantization_config=GNPIQConfig(...))``.

Importing this module (which ``import peft_ismoe`` does) registers `GNPIQConfig` and `GNPIQHfQuantizer` with
transformers under the quant method ``"gnpiq"``. Two loading routes follow:

* A float checkpoint with ``quantization_config=GNPIQConfig(...)``: transformers loads the float weights as usual,
  then `GNPIQHfQuantizer` runs the GNP-IQ solver on every eligible linear layer, exactly as
  :func:`~peft_ismoe.quantize_model` does on the loaded model (same layer order, same seeds, same codes).
* A GNP-IQ checkpoint (its ``config.json`` holds ``quantization_config`` with ``quant_method: "gnpiq"``): before
  any weight is read, the quantizer replaces each linear layer the config names by an empty `GNPIQLinear` of the
  packed shapes the config implies, checks those shapes against the checkpoint's headers, and transformers then
  copies ``qweight``, ``scales`` and ``zeros`` in verbatim. The solver does not run again.

``save_pretrained`` writes the packed buffers to safetensors as they are (``<layer>.qweight`` uint8,
``<layer>.scales`` and ``<layer>.zeros`` float16; see `GNPIQLinear` for their shapes) and the config to
``config.json``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from .config import GNPIQConfig
from .linear import GNPIQLinear
from .model import _is_conv1d, layers_to_quantize, quantize_linear_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["GNPIQHfQuantizer", "GNPIQWarning", "QUANT_METHOD", "attach_hf_quantizer", "register_with_transformers"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "gnpiq"


class GNPIQWarning(UserWarning):
    """A GNP-IQ situation the user can act on, such as another library holding the quant method name "gnpiq"."""


class GNPIQHfQuantizer(HfQuantizer):
    """transformers' hook into GNP-IQ: builds `GNPIQLinear` layers around a model's loading.

    * ``pre_quantized=False`` (a float checkpoint): the float weights load untouched, then every linear layer that
      `~peft_ismoe.quantization.model.layers_to_quantize` selects (not in ``quantization_config.skipped_modules``,
      not tied to another module) is quantized in `_process_model_after_weight_loading`, with a
      progress bar that follows ``transformers.utils.logging.disable_progress_bar()``. Peak memory is that of the
      float model.
    * ``pre_quantized=True`` (a GNP-IQ checkpoint): `_process_model_before_weight_loading` swaps those layers for
      empty `GNPIQLinear` modules on the meta device, after checking their packed shapes against the checkpoint.

    The model reports itself trainable: the quantized layers are frozen buffers, and everything else (LayerNorms,
    heads, adapters, a side network) trains in float. transformers' ``Trainer`` still asks for an adapter (a PEFT
    model) on top of a quantized model, as it does for every method that is not quantization-aware training.

    Not supported: offloading weights to disk (``device_map`` with ``"disk"``) while quantizing on load, since the
    solver needs the float weights in memory; and a GGUF file with ``quantization_config`` (transformers refuses
    to combine them): load the GGUF model, then call :func:`~peft_ismoe.quantize_model`, whose result saves and
    reloads like any GNP-IQ checkpoint.
    """

    requires_calibration = False
    quantization_config: GNPIQConfig

    def __init__(self, quantization_config: GNPIQConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, GNPIQConfig):
            raise TypeError(f"`quantization_config` must be a GNPIQConfig, got {type(quantization_config).__name__}.")
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "GNP-IQ quantizes on load from the float weights in memory, so `device_map` cannot offload to "
                f"'disk', got {device_map!r}. Quantize with enough memory, save, then load the GNP-IQ checkpoint."
            )

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        # Float weights load as plain tensors and are quantized layer by layer after loading; packed ones are
        # copied verbatim. No tensor is transformed on its way in.
        return False

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> PreTrainedModel:
        if not self.pre_quantized:
            return model

        config = self.quantization_config
        headers = _read_safetensors_headers(checkpoint_files)
        layers = layers_to_quantize(model, config)
        for name, module in layers.items():
            in_features, out_features = _linear_shape(module)
            empty = GNPIQLinear(
                in_features,
                out_features,
                bits=config.bits,
                group_size=config.group_size,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=module.bias.dtype if module.bias is not None else torch.float32,
            )
            if headers is not None:
                _check_against_checkpoint(name, empty, headers, model.base_model_prefix)
            model.set_submodule(name, empty)
        logger.info("GNP-IQ prepared %d packed linear layers for loading", len(layers))
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if not self.pre_quantized:
            quantize_linear_layers(model, self.quantization_config, progress_bar=None)
        # The loader wraps every floating tensor it loads in a trainable Parameter, the biases of frozen layers too.
        for module in model.modules():
            if isinstance(module, GNPIQLinear) and module.bias is not None:
                module.bias.requires_grad_(False)
        return model

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """Replace every `GNPIQLinear` by an ``nn.Linear`` holding its dequantized weight (in `dtype`)."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, GNPIQLinear):
                continue
            weight = module.dequantize(dtype or module.weight_dtype)
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            linear.weight.data.copy_(weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.to(weight.dtype))
            model.set_submodule(name, linear)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def attach_hf_quantizer(model: nn.Module, config: GNPIQConfig) -> None:
    """Give a transformers model quantized outside ``from_pretrained`` what ``from_pretrained`` would have given it.

    ``save_pretrained`` consults ``model.hf_quantizer`` (serializable?), the ``Trainer`` consults it too
    (trainable?), and ``model.is_quantized`` guards ``.half()``/``.float()`` against silently casting the packed
    buffers. A plain ``nn.Module`` is left alone.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    model.hf_quantizer = GNPIQHfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.quantization_config = config
            module.config._is_quantized = True


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if _is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def _read_safetensors_headers(checkpoint_files: Iterable[str] | None) -> dict[str, tuple[int, ...]] | None:
    """Shapes of every tensor in the checkpoint, read from the safetensors headers only (no data is loaded).

    None when the checkpoint is not in safetensors (transformers then reports shape mismatches itself).
    """
    if not checkpoint_files:
        return None
    checkpoint_files = list(checkpoint_files)
    if not all(str(path).endswith(".safetensors") for path in checkpoint_files):
        logger.info("GNP-IQ checks packed shapes only in safetensors checkpoints; skipping the check")
        return None
    shapes = {}
    for path in checkpoint_files:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except SafetensorError as error:
            raise ValueError(
                f"The checkpoint file {str(path)!r} is not a readable safetensors file (truncated or corrupted?): "
                f"{error}. Save or download the quantized checkpoint again."
            ) from error
    return shapes


def _check_against_checkpoint(
    name: str, layer: GNPIQLinear, shapes: dict[str, tuple[int, ...]], base_model_prefix: str
) -> None:
    """Raise a ValueError when the checkpoint's tensors for layer `name` do not have the packed shapes of `layer`."""

    def lookup(tensor_name: str) -> str | None:
        key = f"{name}.{tensor_name}"
        candidates = [key]
        if base_model_prefix:
            candidates += [f"{base_model_prefix}.{key}", key.removeprefix(f"{base_model_prefix}.")]
        return next((candidate for candidate in candidates if candidate in shapes), None)

    if lookup("qweight") is None and (float_key := lookup("weight")) is not None:
        raise ValueError(
            f"The checkpoint stores layer `{name}` as a float weight `{float_key}` of shape {shapes[float_key]}, "
            f"but its quantization_config ({layer.bits} bits) says it is GNP-IQ quantized. Check "
            "`modules_to_not_convert` in the checkpoint's config.json."
        )
    for tensor_name in ("qweight", "scales", "zeros"):
        key = lookup(tensor_name)
        if key is None:
            continue  # transformers reports missing tensors itself
        expected = tuple(getattr(layer, tensor_name).shape)
        if shapes[key] != expected:
            raise ValueError(
                f"Checkpoint tensor `{key}` has shape {shapes[key]}, but layer `{name}` "
                f"([{layer.out_features}, {layer.in_features}] weight, {layer.bits} bits, group size "
                f"{layer.group_size}) needs {expected} as its quantization_config says; the checkpoint's "
                "packed tensors and its config.json disagree."
            )


def _same_class(registered: type, ours: type) -> bool:
    # A reloaded module defines a new class object under the same qualified name: that is still ours.
    return registered is ours or (
        registered.__module__ == ours.__module__ and registered.__qualname__ == ours.__qualname__
    )


def register_with_transformers() -> None:
    """Register `GNPIQConfig` and `GNPIQHfQuantizer` with transformers under ``"gnpiq"``; safe to call again.

    A previous registration by this package (a second call, a reloaded module) is replaced; a registration of the
    same name by someone else is left in place, with a `GNPIQWarning`.
    """
    for mapping, ours, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, GNPIQConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, GNPIQHfQuantizer, register_quantizer),
    ):
        registered = mapping.get(QUANT_METHOD)
        if registered is None:
            register(QUANT_METHOD)(ours)
        elif _same_class(registered, ours):
            mapping[QUANT_METHOD] = ours
        else:
            warnings.warn(
                f"transformers already maps quant method {QUANT_METHOD!r} to {registered.__module__}."
                f"{registered.__qualname__}; peft_ismoe leaves it in place, so from_pretrained will not use GNP-IQ.",
                GNPIQWarning,
                stacklevel=2,
            )


register_with_transformers()
