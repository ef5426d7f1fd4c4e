"""`ISMoEModel`: the PEFT tuner that attaches ISMoE side networks to a frozen backbone."""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import set_additional_trainable_modules
from peft.utils.other import AuxiliaryTrainingWrapper, _set_adapter
from torch import nn

from .backbone import BlockStack, StackTap, find_block_stacks, hidden_size_of
from .config import SUPPORTED_TASK_TYPES, ISMoEConfig, ISMoEWarning
from .init import init_side_from_backbone
from .inputs import check_model_inputs
from .outputs import with_aux_loss
from .safety import check_base_fits
from .side import SideNetwork

__all__ = ["ISMoEModel", "SideNetworkLayer"]

logger = logging.getLogger(__name__)

_SIDE_KEY = "ismoe_side"


class SideNetworkLayer(nn.Module, BaseTunerLayer):
    """The holder of every adapter's side networks: ``ismoe_side[adapter][role]`` is a `SideNetwork`.

    It is a PEFT tuner layer (so PEFT's adapter switching, enabling and status reporting see it), but it wraps no
    base layer: the backbone is driven through forward hooks instead (see `StackTap`).
    """

    adapter_layer_names = (_SIDE_KEY,)

    def __init__(self) -> None:
        super().__init__()
        self.ismoe_side = nn.ModuleDict()
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []
        self.backbone_device: torch.device | None = None

    def get_base_layer(self) -> nn.Module:
        return self

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT calls this after assigning loaded tensors (`low_cpu_mem_usage`); the "base layer" here is the
        # backbone, whose device was recorded when the adapter was attached.
        device = device or self.backbone_device
        sides = self.ismoe_side[adapter_name] if adapter_name in self.ismoe_side else None
        if sides is not None and device is not None and not any(p.is_meta for p in sides.parameters()):
            sides.to(device)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "An ISMoE side network cannot be merged into the backbone's weights: it is a separate network with its "
            "own non-linear layers, run beside the backbone. Keep the PeftModel, or use `unload()` for the base model."
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SideNetworkLayer is driven by hooks on the backbone; it has no forward of its own.")


class ISMoEModel(BaseTuner):
    """Interactive side mixture-of-experts on a frozen backbone (MP-ISMoE, arXiv 2605.04058), as a PEFT tuner.

    Forward hooks on the backbone's block stack(s) feed each tapped block output, detached, to a side network
    (`SideNetwork`) of the active adapter; the side network's correction is added to the stack's last block output
    before the final norm, pooler and head. Backbone parameters never require grad, so autograd records nothing
    inside the backbone: only the side network, the tapped states it reads, and the layers after the last block
    (final norm, head) hold activations for backward.

    Several adapters can be added; one is active at a time. ``model(**batch)`` returns the backbone's output with
    ``aux_loss`` (the balancing loss of the active adapter) added; when labels are given, ``aux_loss_coef *
    aux_loss`` is also added to ``loss``. `expert_usage` returns the experts' routing counts.

    Known limits: `merge_and_unload` raises `NotImplementedError` (a side network is not a weight delta); only one
    adapter can be active at a time.
    """

    prefix: str = "ismoe_"
    tuner_layer_cls = SideNetworkLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    def __init__(
        self,
        model: nn.Module,
        config: ISMoEConfig | dict[str, ISMoEConfig],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._stacks: list[BlockStack] | None = None
        self._taps: list[StackTap] = []
        self._top_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._call_masks: dict[str, torch.Tensor | None] = {}
        self._call_aux: list[torch.Tensor] = []
        # Metrics for the model card, per adapter (`peft_ismoe.record_metrics`); not saved with the weights.
        self.card_metrics: dict[str, dict] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ injection

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("ISMoE replaces no module; the side network is attached by `inject_adapter`.")

    @staticmethod
    def _check_target_module_exists(peft_config: ISMoEConfig, key: str) -> bool:
        return False

    def _check_config(self, config: ISMoEConfig, model: nn.Module) -> None:
        if not isinstance(config, ISMoEConfig):
            raise TypeError(f"ISMoEModel needs an ISMoEConfig, got {type(config).__name__}.")
        task_type = None if config.task_type is None else str(getattr(config.task_type, "value", config.task_type))
        if task_type not in SUPPORTED_TASK_TYPES:
            raise ValueError(
                f"`task_type` must be one of {SUPPORTED_TASK_TYPES[:-1]} or None for ISMoE, got {config.task_type!r}."
            )
        if config.is_causal_lm and config.salient_feature in ("cls", "mean"):
            raise ValueError(
                f"`salient_feature={config.salient_feature!r}` would let each generated token's routing depend on "
                "tokens the KV cache no longer recomputes (and, for 'mean', on future tokens); CAUSAL_LM needs "
                "`salient_feature='token'` (or None)."
            )
        if config.is_causal_lm and config.side_attention:
            raise ValueError(
                "`side_attention=True` is not supported for CAUSAL_LM: the side attention has no key-value cache, so "
                "generation would not match a full forward. Leave `side_attention=None` (off for causal stacks)."
            )
        hidden = hidden_size_of(model)
        if hidden % config.reduction_factor != 0:
            raise ValueError(
                f"`reduction_factor` must divide the hidden size of {type(model).__name__} ({hidden}), got "
                f"{config.reduction_factor!r}; its divisors up to 32 are "
                f"{[r for r in range(2, 33) if hidden % r == 0]}."
            )

    def _tapped_indices(self, config: ISMoEConfig, stack: BlockStack) -> list[int]:
        num_blocks = len(stack.blocks)
        if config.layers_to_tap is None:
            return list(range(num_blocks))
        indices = []
        for index in config.layers_to_tap:
            if not -num_blocks <= index < num_blocks:
                raise ValueError(
                    f"`layers_to_tap` entry {index!r} is out of range for `{stack.path}` with {num_blocks} blocks."
                )
            indices.append(index % num_blocks)
        return sorted(set(indices))

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Build the side network(s) of `adapter_name` and, on the first adapter, hook the backbone."""
        config = self.peft_config[adapter_name]
        self._check_config(config, model)
        stacks = find_block_stacks(model, config.block_stack, causal=config.is_causal_lm)
        check_base_fits(config, model, stacks, hidden_size_of(model))
        if self._stacks is not None and [s.path for s in stacks] != [s.path for s in self._stacks]:
            raise ValueError(
                f"Adapter {adapter_name!r} attaches to {[s.path for s in stacks]}, but the existing adapters attach "
                f"to {[s.path for s in self._stacks]}; all adapters of one model must share `block_stack`."
            )
        if self._stacks is not None:
            for stack, tap in zip(stacks, self._taps, strict=True):
                if self._tapped_indices(config, stack) != tap.tapped:
                    raise ValueError("All adapters of one model must tap the same blocks (`layers_to_tap`).")

        hidden = hidden_size_of(model)
        rng = torch.random.fork_rng(devices=[]) if config.init_seed is not None else nullcontext()
        with rng:
            if config.init_seed is not None:
                torch.manual_seed(config.init_seed)
            sides = nn.ModuleDict()
            for stack in stacks:
                tapped = self._tapped_indices(config, stack)
                norm_params = self._initial_norm_params(stack, tapped) if config.train_layernorm else None
                salient = "token" if stack.role == "decoder" else config.resolved_salient_feature(stack.causal)
                attention = config.resolved_side_attention(stack.causal)
                side = SideNetwork(hidden, len(tapped), config, salient, norm_params, attention)
                if config.init_from_backbone:
                    initialised = init_side_from_backbone(side, [stack.blocks[i] for i in tapped], hidden)
                    if initialised < len(tapped):
                        warnings.warn(
                            f"`init_from_backbone=True`: {len(tapped) - initialised} of {len(tapped)} side blocks of "
                            f"`{stack.path}` keep their random start, because their backbone block has no plain "
                            "two-layer feed-forward with enough hidden units (gated FFNs, quantized 4-bit weights, or "
                            "num_experts * expert width larger than the FFN).",
                            ISMoEWarning,
                            stacklevel=2,
                        )
                sides[stack.role] = side
        device = _device_of(model)
        # Under `low_cpu_mem_usage` the parameters are created on the meta device and the loaded tensors are
        # assigned in their place later; there is nothing to move yet.
        if device is not None and not any(p.is_meta for p in sides.parameters()):
            sides.to(device)

        first = self._stacks is None
        if first:
            self.ismoe_layer = SideNetworkLayer()
            self._stacks = stacks
            self._hook(model, config, stacks)
        elif config.train_layernorm and not any(self.peft_config[n].train_layernorm for n in self._adapter_names()):
            for tap in self._taps:
                tap.hook_norms()
        self.ismoe_layer.backbone_device = device
        self.ismoe_layer.ismoe_side[adapter_name] = sides
        self.targeted_module_names = [s.path for s in stacks]

        if first:
            for parameter in model.parameters():
                parameter.requires_grad = False
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        trainable = sum(p.numel() for p in sides.parameters())
        logger.info(
            "ISMoE adapter %r: side networks on %s, %d parameters", adapter_name, self.targeted_module_names, trainable
        )

    def _adapter_names(self) -> list[str]:
        return list(self.ismoe_layer.ismoe_side.keys()) if hasattr(self, "ismoe_layer") else []

    @staticmethod
    def _initial_norm_params(stack: BlockStack, tapped: list[int]) -> dict[str, torch.Tensor]:
        from .backbone import find_output_norm

        params = {}
        for tap, block_index in enumerate(tapped):
            norm = find_output_norm(stack.blocks[block_index])
            if norm is None:
                raise ValueError(
                    f"`train_layernorm=True` but block {block_index} of `{stack.path}` has no norm layer; set "
                    "`train_layernorm=False`."
                )
            for name, value in norm.named_parameters(recurse=False):
                params[f"{tap}_{name}"] = value
        return params

    def _hook(self, model: nn.Module, config: ISMoEConfig, stacks: list[BlockStack]) -> None:
        for stack in stacks:
            tap = StackTap(
                stack,
                self._tapped_indices(config, stack),
                runner=self._run_side,
                norm_params=self._norm_params,
                is_active=self._is_active,
            )
            if config.train_layernorm:
                tap.hook_norms()
            self._taps.append(tap)
            owner = model.get_submodule(stack.path.rpartition(".")[0]) if "." in stack.path else model
            self._top_handles.append(
                owner.register_forward_pre_hook(self._make_mask_hook(stack.role), with_kwargs=True)
            )
        self._top_handles.append(model.register_forward_pre_hook(self._record_top_masks, with_kwargs=True))
        # A hook rather than `forward`: PEFT's generic PeftModel (task_type None) and generation call the model
        # directly, not through this tuner.
        self._top_handles.append(model.register_forward_hook(self._attach_aux_loss, with_kwargs=True))

    # ------------------------------------------------------------------ hooks

    def _is_active(self) -> bool:
        layer = self.__dict__["_modules"].get("ismoe_layer")
        if layer is None or layer.disable_adapters or not layer.active_adapters:
            return False
        return layer.active_adapters[0] in layer.ismoe_side

    def _active_sides(self) -> nn.ModuleDict:
        return self.ismoe_layer.ismoe_side[self.ismoe_layer.active_adapters[0]]

    def _norm_params(self, stack: BlockStack, tap: int) -> dict[str, torch.Tensor]:
        return self._active_sides()[stack.role].tap_norm_params(tap)

    def _record_top_masks(self, _module, args, kwargs):
        check_model_inputs(_module, args, kwargs)
        self._call_aux = []
        self._call_masks = {
            "backbone": kwargs.get("attention_mask"),
            "encoder": kwargs.get("attention_mask"),
            "decoder": kwargs.get("decoder_attention_mask"),
        }
        return None

    def _make_mask_hook(self, role: str):
        def hook(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self._call_masks[role] = mask
            return None

        return hook

    def _token_mask(self, role: str, hidden: torch.Tensor) -> torch.Tensor | None:
        """The bool padding mask ``[B, S]`` of the current call, aligned with `hidden` ``[B, S, D]``, if known."""
        mask = self._call_masks.get(role)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != hidden.shape[0]:
            return None
        if mask.shape[1] < hidden.shape[1]:
            return None
        # With a KV cache the mask also covers past tokens; the current tokens are the last ones.
        return mask[:, -hidden.shape[1] :].to(device=hidden.device, dtype=torch.bool)

    def _run_side(self, stack: BlockStack, taps: list[torch.Tensor]) -> torch.Tensor:
        side = self._active_sides()[stack.role]
        delta, aux_loss = side(taps, self._token_mask(stack.role, taps[0]))
        self._call_aux.append(aux_loss)
        return delta

    # ------------------------------------------------------------------ forward

    def _attach_aux_loss(self, _module, _args, kwargs, output):
        """Return the model's output with ``aux_loss``, and ``aux_loss_coef * aux_loss`` added to a labelled loss."""
        aux_losses, self._call_aux, self._call_masks = self._call_aux, [], {}
        if not self._is_active() or not aux_losses or not hasattr(output, "keys"):
            return None
        aux_loss = torch.stack([loss.float() for loss in aux_losses]).mean()
        coef = self.peft_config[self.ismoe_layer.active_adapters[0]].aux_loss_coef
        if kwargs.get("labels") is not None and output.get("loss") is not None and coef > 0:
            output["loss"] = output["loss"] + coef * aux_loss.to(output["loss"].dtype)
        return with_aux_loss(output, aux_loss)

    def forward(self, *args: Any, **kwargs: Any):
        try:
            return self.model(*args, **kwargs)
        finally:
            self._call_aux = []
            self._call_masks = {}

    # ------------------------------------------------------------------ adapters

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze every backbone parameter; the side networks live outside `model` and `modules_to_save` copies
        manage their own flags."""
        for name, parameter in model.named_parameters():
            if ".modules_to_save." not in f".{name}" and not name.startswith("modules_to_save."):
                parameter.requires_grad = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"ISMoE runs one side network at a time; `adapter_name` must name one adapter, got {names!r}."
            )
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name!r} not found; available: {sorted(self.peft_config)}.")
        _set_adapter(self.model, names, inference_mode=inference_mode)
        self.ismoe_layer.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names[0] if names else names

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self.ismoe_layer.enable_adapters(enabled)
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}.")
        del self.peft_config[adapter_name]
        self.ismoe_layer.delete_adapter(adapter_name)
        new_active = self.ismoe_layer.active_adapters[:]
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, new_active_adapters=new_active)
        self.active_adapter = new_active[0] if new_active else []

    def expert_usage(self, reset: bool = False) -> dict[str, torch.Tensor]:
        """Routing-slot counts per expert of the active adapter, ``{"{role}.blocks.{i}": int64 [E]}``.

        Counts accumulate over forward passes (padding excluded where the mask is known) until `reset` is passed
        or `reset_expert_usage` is called; they occupy a fixed buffer per block.
        """
        if not self._is_active():
            return {}
        usage = {}
        for role, side in self._active_sides().items():
            for i, counts in enumerate(side.expert_usage()):
                usage[f"{role}.blocks.{i}"] = counts
            if reset:
                side.reset_usage()
        return usage

    def reset_expert_usage(self) -> None:
        for sides in self.ismoe_layer.ismoe_side.values():
            for side in sides.values():
                side.reset_usage()

    # ------------------------------------------------------------------ unloading

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.ismoe_layer.merge()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.ismoe_layer.merge()

    def unload(self) -> nn.Module:
        """The backbone without any side network or hook (its weights untouched)."""
        for tap in self._taps:
            tap.remove()
        for handle in self._top_handles:
            handle.remove()
        self._taps, self._top_handles = [], []
        self._stacks = None
        if "ismoe_layer" in self._modules:
            del self._modules["ismoe_layer"]
        # PEFT's generic unloading copies `.weight` onto the module it puts back, which fails for a trained module
        # that has none (a container such as BERT's pooler in `modules_to_save`); put those back here instead.
        for name, module in list(self.model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper) and not hasattr(module.original_module, "weight"):
                parent_name, _, child_name = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                setattr(parent, child_name, module.unload_and_optionally_merge_module(False, False, None))
        return self._unload_and_optionally_merge(merge=False)

    # ------------------------------------------------------------------ state dict keys

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f".{_SIDE_KEY}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{_SIDE_KEY}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return None
