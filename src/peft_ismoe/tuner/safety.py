"""Loading an ISMoE adapter without trusting the files: safetensors only, readable, and fitting the base model.

PEFT reads an adapter in two moves: it builds the adapter from ``adapter_config.json`` (attaching hooks and modules
to the user's model), then reads the weights with `peft.utils.load_peft_weights`, which falls back to ``torch.load``
of ``adapter_model.bin`` when no ``adapter_model.safetensors`` is there. Every check here runs before the first
move, from `ISMoEConfig.from_pretrained` and at the start of `ISMoEModel.inject_adapter`, so a refused adapter
leaves the model in memory as it was:

* `check_adapter_folder`: the folder holds ``adapter_model.safetensors`` (a pickle ``adapter_model.bin`` in its
  place is refused, never opened), and that file is a complete safetensors file with finite float tensors; a
  truncated or corrupted file is named in the error.
* `guard_peft_weight_loading`: the same folder check on PEFT's weight reading itself, for the routes that skip the
  config (``load_adapter`` of an adapter name the model already has, as the Trainer does when it resumes).
* `check_base_fits`: the backbone the adapter was saved from (its `base_model_fingerprint`: model type, hidden
  size, block stacks and their lengths) is the backbone it is being attached to.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "base_fingerprint",
    "check_adapter_folder",
    "check_base_fits",
    "guard_peft_weight_loading",
]

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
LOADED_FROM_ATTRIBUTE = "_ismoe_loaded_from"


def check_adapter_folder(folder: str | os.PathLike, subfolder: str | None = None) -> str | None:
    """Refuse a local adapter folder PEFT would read pickle from, or whose safetensors file is unreadable.

    Returns the weights file checked, or None for a name that is not a local folder (a Hub id: PEFT downloads the
    safetensors file when the repository has one).
    """
    path = os.path.join(folder, subfolder) if subfolder else os.fspath(folder)
    if not os.path.isdir(path):
        return None
    weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    pickled = os.path.join(path, PICKLE_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.exists(pickled):
            raise ValueError(
                f"The adapter folder {path!r} holds {PICKLE_WEIGHTS_NAME!r} (a pickle file) and no "
                f"{ADAPTER_WEIGHTS_NAME!r}; peft_ismoe reads adapter weights from safetensors only and never unpickles "
                "a checkpoint. Convert it where you trust its origin (`safetensors.torch.save_file(torch.load(...))`)."
            )
        return None  # PEFT itself reports the missing weights file
    if os.path.exists(pickled):
        logger.info("Ignoring %s next to %s: only the safetensors file is read.", pickled, weights)
    _check_safetensors_file(weights)
    return weights


def _check_safetensors_file(path: str) -> None:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"The adapter weights file {path!r} is not a readable safetensors file (truncated or corrupted?): "
            f"{error}. Save the adapter again with `save_pretrained`."
        ) from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"The adapter weights file {path!r} holds non-finite values (NaN or Inf) in {name!r}: the file is "
                "corrupted or was saved from a diverged run."
            )


def base_fingerprint(model: nn.Module, stacks: list[Any], hidden_size: int) -> dict[str, Any]:
    """What an ISMoE adapter depends on in its backbone: model type, hidden size, and each block stack's length."""
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None) or type(model).__name__,
        "hidden_size": hidden_size,
        "block_stacks": {stack.path: len(stack.blocks) for stack in stacks},
    }


def check_base_fits(config: Any, model: nn.Module, stacks: list[Any], hidden_size: int) -> None:
    """Compare a loaded adapter's `base_model_fingerprint` with `model`; on a fresh adapter, record it.

    Raised before anything is attached, so the user's model is unchanged when the adapter does not fit.
    """
    current = base_fingerprint(model, stacks, hidden_size)
    saved = getattr(config, "base_model_fingerprint", None)
    loaded_from = getattr(config, LOADED_FROM_ATTRIBUTE, None)
    if saved is not None and loaded_from is not None:
        differences = [
            f"{key}: adapter {saved.get(key)!r}, model {value!r}"
            for key, value in current.items()
            if saved.get(key) != value
        ]
        if differences:
            raise ValueError(
                f"The ISMoE adapter from {loaded_from!r} was trained on another backbone than this "
                f"{type(model).__name__} ({'; '.join(differences)}); load it onto the model it was saved from."
            )
    config.base_model_fingerprint = current


def _is_ismoe_folder(path: str) -> bool:
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return False
    try:
        with open(config_file, encoding="utf-8") as handle:
            return json.load(handle).get("peft_type") == "ISMOE"
    except (OSError, ValueError):
        return False


def guard_peft_weight_loading() -> None:
    """Make PEFT's weight reading refuse pickle files for ISMoE adapters on every route, not only the first load.

    `ISMoEConfig.from_pretrained` checks a folder before PEFT builds the adapter, but ``PeftModel.load_adapter`` for
    an adapter name the model already has (the route the Trainer takes when it resumes from a checkpoint) skips
    the config and goes straight to `peft.peft_model.load_peft_weights`, which would ``torch.load`` an
    ``adapter_model.bin``. This wraps that function so that a local ISMoE folder passes `check_adapter_folder`
    first; other adapters are read as PEFT always reads them. Calling it again does nothing.
    """
    import peft.peft_model

    original = peft.peft_model.load_peft_weights
    if getattr(original, "_ismoe_guarded", False):
        return

    @functools.wraps(original)
    def load_peft_weights(model_id, *args, **kwargs):
        subfolder = kwargs.get("subfolder")
        path = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
        if os.path.isdir(path) and _is_ismoe_folder(path):
            check_adapter_folder(path)
        return original(model_id, *args, **kwargs)

    load_peft_weights._ismoe_guarded = True
    peft.peft_model.load_peft_weights = load_peft_weights
