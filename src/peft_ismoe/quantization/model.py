"""Converting a whole model's linear layers to `GNPIQLinear`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from .config import GNPIQConfig
from .linear import GNPIQLinear
from .solver import gnpiq_quantize

__all__ = [
    "collect_input_importance",
    "find_linear_layers",
    "is_gnpiq_quantized",
    "layers_to_quantize",
    "quantize_linear_layers",
    "quantize_model",
]

logger = logging.getLogger(__name__)


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 family layers store their weight transposed, [in_features, out_features].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]``, whatever the layer's own storage convention."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern equals `name`, one of its dotted components, or a dotted suffix of it."""
    parts = name.split(".")
    return any(name == p or name.endswith("." + p) or p in parts for p in patterns)


def find_linear_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and GPT-2 ``Conv1D`` of `model` by qualified name, except those matching `skip`."""
    skip = tuple(skip)
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or _is_conv1d(module)) and not _matches(name, skip)
    }


def _tied_modules(model: nn.Module) -> set[str]:
    """Names of the modules whose weight is tied to (is the same tensor as) another module's parameter.

    transformers lists its tied weights in ``all_tied_weights_keys`` ({target: source}); that list is also right
    before loading, when the tensors are not shared yet. Any other module counts as tied when its weight object
    is registered under two names.
    """
    tied = set()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.update(key.removesuffix(".weight") for key in (target, source))
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for names in owners.values():
        if len(names) > 1:
            tied.update(name.removesuffix(".weight") for name in names)
    return tied


def layers_to_quantize(model: nn.Module, config: GNPIQConfig) -> dict[str, nn.Module]:
    """The layers GNP-IQ converts: linear layers not in ``config.skipped_modules`` and not tied to another module.

    A tied weight (an output head sharing the input embedding, say) stays in float: quantizing one of the two
    would untie them. Quantizing and loading a GNP-IQ checkpoint both select layers with this rule.
    """
    tied = _tied_modules(model)
    layers = find_linear_layers(model, config.skipped_modules)
    kept_tied = sorted(name for name in layers if name in tied)
    if kept_tied:
        logger.info("GNP-IQ keeps tied layers in float: %s", ", ".join(kept_tied))
    return {name: module for name, module in layers.items() if name not in tied}


def is_gnpiq_quantized(model: nn.Module) -> bool:
    """True when `model` already holds GNP-IQ layers or says in its config that it was quantized with GNP-IQ."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, Mapping) else getattr(quant, "quant_method", None)
    return method == "gnpiq" or any(isinstance(m, GNPIQLinear) for m in model.modules())


@torch.no_grad()
def collect_input_importance(
    model: nn.Module, calibration_data: Iterable, layers: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input channel of each layer in `layers`, over `calibration_data`.

    Each element of `calibration_data` is one batch: a mapping of keyword arguments for ``model(**batch)``
    (a tokenizer's output, say) or a tensor passed positionally. Returns ``{name: float32 [in_features]}``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, in_features]
            sums[name] = sums.get(name, 0) + x.square().sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in calibration_data:
            model(**batch) if isinstance(batch, Mapping) else model(batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("`calibration_data` must yield at least one batch, got an empty iterable.")
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: GNPIQConfig | None = None,
    *,
    calibration_data: Iterable | None = None,
    progress_bar: bool | None = None,
) -> nn.Module:
    """Replace the linear layers of `model` by `GNPIQLinear`, in place, and return `model`.

    LayerNorms, embeddings, the modules named by ``config.skipped_modules`` and layers whose weight is tied to
    another module's (see `layers_to_quantize`) are left as they are. Each layer
    is quantized on its own device with seed ``config.seed + index`` (index in module order), so a run is
    reproducible and layers do not share noise. The config is recorded as ``model.config.quantization_config``,
    and a transformers model also gets the GNP-IQ ``hf_quantizer``, so its ``save_pretrained`` writes the packed
    weights and ``from_pretrained`` reads them back without quantizing again.

    Args:
        model: any ``nn.Module``; a transformers model gets its config updated.
        config: the GNP-IQ settings (default ``GNPIQConfig()``: 8 bits, groups of 64).
        calibration_data: optional iterable of batches; when given, each layer's error is weighted by the mean
            squared activation of its input channels over these batches (see `collect_input_importance`).
        progress_bar: show a tqdm bar over layers; None follows transformers' progress-bar setting
            (``transformers.utils.logging.disable_progress_bar()`` turns it off).

    Raises:
        ValueError: if `model` is already GNP-IQ quantized, or a weight holds NaN or Inf.
        TypeError: if `config` is not a `GNPIQConfig`.
    """
    config = GNPIQConfig() if config is None else config
    if not isinstance(config, GNPIQConfig):
        raise TypeError(f"`config` must be a GNPIQConfig, got {type(config).__name__}.")
    if is_gnpiq_quantized(model):
        raise ValueError(
            "`model` is already quantized with GNP-IQ; quantizing it again would compound the error. "
            "Load the float checkpoint and quantize that instead."
        )

    quantize_linear_layers(model, config, calibration_data=calibration_data, progress_bar=progress_bar)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config

    # Imported here: the transformers integration builds on this module.
    from .hf_quantizer import attach_hf_quantizer

    attach_hf_quantizer(model, config)
    return model


@torch.no_grad()
def quantize_linear_layers(
    model: nn.Module,
    config: GNPIQConfig,
    *,
    calibration_data: Iterable | None = None,
    progress_bar: bool | None = None,
) -> dict[str, GNPIQLinear]:
    """The conversion step of `quantize_model`, without its checks on the model's config or its bookkeeping.

    transformers' loader records the quantization config before the float weights arrive, so it calls this
    directly once they have. Returns the new layers by qualified name.
    """
    layers = layers_to_quantize(model, config)
    # Check every weight before touching any, so a bad layer leaves the model as it was.
    for name, module in layers.items():
        if not torch.isfinite(module.weight).all():
            raise ValueError(f"The weight of layer `{name}` contains NaN or Inf; GNP-IQ cannot quantize it.")

    importance = collect_input_importance(model, calibration_data, layers) if calibration_data is not None else {}
    skipped = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in layers]
    if skipped:
        logger.info("GNP-IQ keeps %d linear layers in float: %s", len(skipped), ", ".join(skipped))

    if progress_bar is None:
        progress_bar = hf_logging.is_progress_bar_enabled()
    converted = {}
    for index, (name, module) in enumerate(
        tqdm(layers.items(), desc="GNP-IQ", unit="layer", disable=not progress_bar)
    ):
        quantized = gnpiq_quantize(
            _weight_of(module), seed=config.seed + index, importance=importance.get(name), **config.solver_kwargs()
        )
        converted[name] = GNPIQLinear.from_quantized(quantized, bits=config.bits, bias=module.bias)
        model.set_submodule(name, converted[name])
    logger.info("GNP-IQ quantized %d linear layers to %d bits", len(layers), config.bits)
    return converted
