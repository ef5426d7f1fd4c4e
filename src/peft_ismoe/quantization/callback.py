"""Re-running the GNP-IQ search during fine-tuning, as a transformers ``TrainerCallback``.

MP-ISMoE (arXiv 2605.04058) repeats its noise-perturbed search from time to time while the side network trains:
on a random small fraction of the frozen weights, with fresh noise. The backbone's float weights never change
during that training, so a later search can only help where the load-time search stopped in a poor local minimum
of the storage error; whether it helps the fine-tuned model is for the GLUE benchmark to measure. It is off unless
the user adds `GNPIQRequantizeCallback` to the ``Trainer``.

The float weights are read back from the float checkpoint on disk through a safetensors memory map, one layer at a
time, and released before the next layer: training holds no second copy of the backbone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .config import GNPIQConfig
from .linear import GNPIQLinear
from .packing import pack_codes
from .solver import group_error, grouped_weight, round_to_grid, search_grid

__all__ = ["GNPIQRequantizeCallback", "RefinedGrid", "RequantizeRound", "refine_grid"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefinedGrid:
    """The output of `refine_grid` for one layer.

    Attributes:
        codes: ``uint8 [out_features, padded_in_features]``, the unpacked codes after the search.
        scale, zero: ``float16 [out_features, num_groups]``.
        improved: ``bool [out_features, num_groups]``, the groups whose grid was replaced.
        error_before, error_after: squared error of the stored weight against the float weight, summed over all
            groups of the layer, before and after; ``error_after <= error_before`` always.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    improved: torch.Tensor
    error_before: float
    error_after: float


# Objective, per group g of the searched groups: minimise E_g = sum_j (W_j - scale * (q_j - zero))**2 over the
# stored float16 scale and zero (q rounded to the nearest code), starting from the layer's current grid and codes,
# and accept a new grid only where E_g drops strictly below the error of what the layer stores now. The search is
# the solver's own `search_grid`, on the chosen groups only.
@torch.no_grad()
def refine_grid(
    W: torch.Tensor,
    layer: GNPIQLinear,
    *,
    groups: torch.Tensor | None = None,
    num_iterations: int = 10,
    noise_std: float = 0.5,
    noise_decay: float = 0.9,
    refine_steps: int = 2,
    generator: torch.Generator,
) -> RefinedGrid:
    """Continue the GNP-IQ search of `layer` from its current grid, on the float weight `W`; `layer` is not modified.

    Runs `~peft_ismoe.quantization.solver.search_grid` on the chosen groups from the grid the layer stores: iteration
    ``t`` rounds ``W`` plus Gaussian noise of ``noise_in_steps(noise_std, bits) * noise_decay**t`` quantization
    steps on the incumbent grid, refits scale and zero by least squares on those codes, polishes with
    ``refine_steps`` "round, refit" steps, and keeps the proposal per group where it lowers the error. The final
    grid is rounded to float16, the codes re-rounded against it, and only then compared with the error of the
    layer's stored codes, so the error of what is served never rises.

    Args:
        W: ``[out_features, in_features]`` float weight the layer was quantized from.
        layer: the quantized layer.
        groups: optional ``bool [out_features, num_groups]`` mask of the groups to search; None searches all.
        num_iterations, noise_std, noise_decay, refine_steps: the search, as above; `noise_std` is in steps at 4
            bits, widened for finer grids as at load time (`noise_in_steps`).
        generator: seeds the noise; on `W`'s device.
    """
    out_features, num_groups = layer.scales.shape
    if tuple(W.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"`W` must have the layer's shape ({layer.out_features}, {layer.in_features}), got {tuple(W.shape)}."
        )
    if groups is None:
        groups = torch.ones(out_features, num_groups, dtype=torch.bool, device=W.device)

    # Padded columns repeat the row's last weight, as the layer's own codes were padded, and weigh 0 in the error.
    Wg, hg = grouped_weight(W.detach().float(), layer.group_size)  # [out * groups, group_size]
    codes = layer.codes().reshape(-1, layer.group_size).float()
    scale, zero = layer.scales.reshape(-1), layer.zeros.reshape(-1)
    current_err = group_error(Wg, hg, codes, scale, zero)  # of the stored codes, as served

    # Search the selected groups from the current grid.
    rows = groups.reshape(-1).nonzero().squeeze(1)
    Wr, hr = Wg[rows], None if hg is None else hg[rows]
    search = search_grid(
        Wr, hr, scale[rows], zero[rows],
        bits=layer.bits, num_iterations=num_iterations, noise_std=noise_std, noise_decay=noise_decay,
        refine_steps=refine_steps, generator=generator,
    )  # fmt: skip

    # Store in float16, round against what is stored, and keep only strict improvements over the served grid.
    s16, z16 = search.scale.half(), search.zero.half()
    q, final_err = round_to_grid(Wr, hr, s16, z16, bits=layer.bits)
    accept = final_err < current_err[rows]
    accepted = rows[accept]

    new_codes = codes.clone()
    new_codes[accepted] = q[accept]
    new_scale, new_zero = scale.clone(), zero.clone()
    new_scale[accepted], new_zero[accepted] = s16[accept], z16[accept]
    new_err = current_err.clone()
    new_err[accepted] = final_err[accept]
    improved = torch.zeros(out_features * num_groups, dtype=torch.bool, device=W.device)
    improved[accepted] = True
    return RefinedGrid(
        codes=new_codes.to(torch.uint8).view(out_features, -1),
        scale=new_scale.view(out_features, num_groups),
        zero=new_zero.view(out_features, num_groups),
        improved=improved.view(out_features, num_groups),
        error_before=float(current_err.sum()),
        error_after=float(new_err.sum()),
    )


@dataclass(frozen=True)
class RequantizeRound:
    """What one re-quantization round did.

    Attributes:
        round_index: the epoch (or global step) that triggered it; it seeds the round.
        layers: qualified names of the layers searched.
        groups_searched, groups_improved: counts over those layers.
        error_before, error_after: squared weight error summed over the searched layers, against the float
            checkpoint, before and after the round.
    """

    round_index: int
    layers: tuple[str, ...]
    groups_searched: int
    groups_improved: int
    error_before: float
    error_after: float


class GNPIQRequantizeCallback(TrainerCallback):
    """Re-run the GNP-IQ search on a random fraction of a model's quantized layers every few epochs (or steps).

    Every ``every_n_epochs`` epochs (or ``every_n_steps`` optimizer steps, if given instead), the callback picks
    a random ``fraction`` of the `GNPIQLinear` layers (``granularity="layer"``) or of the groups of every layer
    (``granularity="group"``), reads those layers' original float weights from `float_checkpoint` through a
    safetensors memory map, continues their search from the current grid with fresh noise seeded by ``seed`` and
    the epoch (or step), and writes a group's new codes, scale and zero point only where they lower that group's
    weight error (see `refine_grid`). The stored weight error therefore never rises. Each round is logged and kept
    in `history` (a list of `RequantizeRound`).

    Nothing is held between rounds but layer names and checkpoint keys; one layer's float weight is in memory at
    a time, during its search.

    The error is the unweighted one: a model quantized with calibration data is refined data-free. The search is the
    load-time one (`~peft_ismoe.quantization.solver.search_grid`), started from the layer's stored grid; its settings
    are the callback's own: that grid is already a converged one, so it takes fewer iterations than the load-time
    search. ``noise_std`` is in quantization steps at 4 bits and widened for finer grids as at load time
    (`~peft_ismoe.quantization.solver.noise_in_steps`).

    Checkpoint keys are matched to layer names by their longest common dotted suffix, so a PEFT wrapper or a
    task head's prefix (``base_model.model.``, ``bert.``) does not matter. GPT-2 style checkpoints store their
    weights as ``[in_features, out_features]``: a non-square layer says so by its shape, and square layers follow
    the layout of the checkpoint's non-square ones.

    Args:
        float_checkpoint: a folder saved by ``save_pretrained`` (single or sharded safetensors) or one
            ``.safetensors`` file, holding the float weights the model was quantized from. A model loaded from
            GGUF has no such file: save the float model once before quantizing it (transformers saves a GGUF-loaded
            model only after ``model.hf_quantizer.remove_quantization_config(model)``).
        every_n_epochs: run at the end of every n-th epoch; ignored when `every_n_steps` is given.
        every_n_steps: run after every n-th optimizer step instead.
        fraction: share of the layers (or groups) searched per round, in (0, 1]; at least one is searched.
        granularity: ``"layer"`` or ``"group"``, what `fraction` is drawn over.
        num_iterations, noise_std, noise_decay, refine_steps: the search of each round (see `refine_grid`).
        seed: seeds which layers are chosen and their noise, together with the round's epoch or step.
    """

    def __init__(
        self,
        float_checkpoint: str | os.PathLike,
        *,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        fraction: float = 0.1,
        granularity: Literal["layer", "group"] = "layer",
        num_iterations: int = 10,
        noise_std: float = 0.5,
        noise_decay: float = 0.9,
        refine_steps: int = 2,
        seed: int = 0,
    ) -> None:
        _check_positive_int("every_n_epochs", every_n_epochs)
        if every_n_steps is not None:
            _check_positive_int("every_n_steps", every_n_steps)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"`fraction` must be a number in (0, 1], got {fraction!r}.")
        if granularity not in ("layer", "group"):
            raise ValueError(f"`granularity` must be 'layer' or 'group', got {granularity!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
        self.search_settings = {
            "num_iterations": num_iterations,
            "noise_std": noise_std,
            "noise_decay": noise_decay,
            "refine_steps": refine_steps,
        }
        GNPIQConfig(**self.search_settings)  # the same checks as the load-time search's settings

        self.checkpoint_files = _safetensors_files(float_checkpoint)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.fraction = float(fraction)
        self.granularity = granularity
        self.seed = seed
        self.history: list[RequantizeRound] = []
        # layer name -> (checkpoint file, key, stored transposed); names and strings only, never tensors.
        self._sources: dict[str, tuple[str, str, bool]] | None = None

    # Trainer events.

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        # Resolve every layer's float weight now, so a wrong checkpoint fails before any training.
        self._sources = self._resolve_sources(model)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        if self.every_n_steps is not None or state.epoch is None:
            return
        epoch = math.ceil(round(state.epoch, 6))  # a run cut short by max_steps ends its last epoch early
        if epoch % self.every_n_epochs == 0:
            self.requantize(model, round_index=epoch)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self.requantize(model, round_index=state.global_step)

    # The round itself.

    @torch.no_grad()
    def requantize(self, model: nn.Module, *, round_index: int) -> RequantizeRound:
        """Run one round on `model` in place, seeded by `round_index`, and return (and record) what it did."""
        layers = _quantized_layers(model)
        if self._sources is None:
            self._sources = self._resolve_sources(model)

        names = sorted(layers)
        chosen, group_masks = self._choose(layers, names, round_index)
        searched = improved = 0
        before = after = 0.0
        for file, file_layers in _by_file(chosen, self._sources).items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in file_layers:
                    layer = layers[name]
                    _, key, transposed = self._sources[name]
                    W = handle.get_tensor(key)
                    W = (W.t() if transposed else W).to(layer.qweight.device, torch.float32)
                    index = names.index(name)
                    generator = torch.Generator(device=W.device).manual_seed(
                        _mixed_seed(self.seed, round_index, index)
                    )
                    groups = None if group_masks is None else group_masks[name].to(W.device)
                    result = refine_grid(W, layer, groups=groups, generator=generator, **self.search_settings)
                    del W

                    layer.qweight.copy_(pack_codes(result.codes, layer.bits))
                    layer.scales.copy_(result.scale)
                    layer.zeros.copy_(result.zero)
                    searched += layer.scales.numel() if groups is None else int(groups.sum())
                    improved += int(result.improved.sum())
                    before += result.error_before
                    after += result.error_after

        record = RequantizeRound(
            round_index=round_index,
            layers=tuple(chosen),
            groups_searched=searched,
            groups_improved=improved,
            error_before=before,
            error_after=after,
        )
        self.history.append(record)
        logger.info(
            "GNP-IQ re-quantization round %d: %d layers, %d of %d groups improved, error %.6g -> %.6g",
            round_index,
            len(chosen),
            improved,
            searched,
            before,
            after,
        )
        return record

    def _choose(
        self, layers: Mapping[str, GNPIQLinear], names: list[str], round_index: int
    ) -> tuple[list[str], dict[str, torch.Tensor] | None]:
        """The layers to search and, at group granularity, a ``bool [out_features, num_groups]`` mask per layer."""
        generator = torch.Generator().manual_seed(_mixed_seed(self.seed, round_index, -1))
        if self.granularity == "layer":
            count = max(1, round(self.fraction * len(names)))
            picked = torch.randperm(len(names), generator=generator)[:count].sort().values
            return [names[i] for i in picked.tolist()], None

        masks = {}
        for name in names:
            shape = layers[name].scales.shape
            total = shape[0] * shape[1]
            mask = torch.zeros(total, dtype=torch.bool)
            mask[torch.randperm(total, generator=generator)[: max(1, round(self.fraction * total))]] = True
            masks[name] = mask.view(shape)
        return names, masks

    def _resolve_sources(self, model: nn.Module) -> dict[str, tuple[str, str, bool]]:
        """Map each quantized layer to the file, key and layout of its float weight in the checkpoint."""
        layers = _quantized_layers(model)
        if not layers:
            raise ValueError("`model` holds no GNPIQLinear layer; there is nothing to re-quantize.")
        shapes, files = {}, {}
        for file in self.checkpoint_files:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
                    files[key] = file

        keys = {name: _checkpoint_key(name, shapes) for name, layer in layers.items()}
        for name, key in keys.items():
            if key is None:
                raise ValueError(
                    f"No float weight for layer `{name}` in `float_checkpoint` {self.checkpoint_files!r}: expected a "
                    f"key ending in `{name.rsplit('.', 1)[-1]}.weight` whose prefix matches the layer's name."
                )

        # Non-square layers reveal the checkpoint's layout; square ones follow it.
        layouts = set()
        for name, layer in layers.items():
            linear, conv1d = (layer.out_features, layer.in_features), (layer.in_features, layer.out_features)
            if linear != conv1d and shapes[keys[name]] in (linear, conv1d):
                layouts.add(shapes[keys[name]] == conv1d)
        transposed_default = layouts == {True}

        sources = {}
        for name, layer in layers.items():
            key, shape = keys[name], shapes[keys[name]]
            linear, conv1d = (layer.out_features, layer.in_features), (layer.in_features, layer.out_features)
            if shape not in (linear, conv1d):
                raise ValueError(
                    f"Float weight `{key}` for layer `{name}` has shape {shape}, expected {linear} "
                    f"(or {conv1d} for a GPT-2 style checkpoint); is `float_checkpoint` the model's own?"
                )
            transposed = transposed_default if linear == conv1d else shape == conv1d
            sources[name] = (files[key], key, transposed)
        return sources


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")


def _mixed_seed(seed: int, round_index: int, layer_index: int) -> int:
    # Neighbouring rounds and layers must not get correlated noise streams: hash the triple into one seed.
    entropy = [seed, round_index, layer_index + 1]  # SeedSequence needs non-negative entries
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _quantized_layers(model: nn.Module) -> dict[str, GNPIQLinear]:
    if model is None:
        raise ValueError("`model` must be the model being trained, got None.")
    return {name: m for name, m in model.named_modules() if isinstance(m, GNPIQLinear)}


def _checkpoint_key(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The key of layer `name`'s weight: the longest dotted suffix of ``name + '.weight'`` that names one key."""
    parts = f"{name}.weight".split(".")
    for start in range(len(parts) - 1):
        suffix = ".".join(parts[start:])
        if suffix in shapes:
            return suffix
        matches = [key for key in shapes if key.endswith("." + suffix)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            return None  # ambiguous: a shorter suffix would only be more so
    return None


def _by_file(chosen: list[str], sources: Mapping[str, tuple[str, str, bool]]) -> dict[str, list[str]]:
    """The chosen layers grouped by checkpoint file, so each file is mapped once per round."""
    grouped: dict[str, list[str]] = {}
    for name in chosen:
        if name not in sources:
            raise ValueError(f"Layer `{name}` appeared after training began; its float weight was never located.")
        grouped.setdefault(sources[name][0], []).append(name)
    return grouped


def _safetensors_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a saved model folder (sharded or not) or a single file."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return [path]
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            return [os.path.join(path, shard) for shard in shards]
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            return [single]
    raise ValueError(
        "`float_checkpoint` must be a folder saved with safetensors (model.safetensors or its sharded index) or a "
        f".safetensors file, got {path!r}."
    )
