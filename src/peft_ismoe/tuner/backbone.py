"""Finding a backbone's stacks of blocks, and tapping their hidden states with forward hooks.

The side network is not a wrapper around target modules: it reads the output of every tapped block and writes
one correction into the output of the last block. Both happen in forward hooks on the blocks, so any model whose
blocks sit in an ``nn.ModuleList`` and return their hidden state (alone or first in a tuple) works unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["BlockStack", "StackTap", "find_block_stacks", "find_output_norm", "hidden_size_of"]

logger = logging.getLogger(__name__)


@dataclass
class BlockStack:
    """One stack of backbone blocks: its dotted path, the list itself, its role and whether it must stay causal."""

    path: str
    blocks: nn.ModuleList
    role: str  # "backbone", "encoder" or "decoder"
    causal: bool


def _identical_blocks(module: nn.Module) -> bool:
    """True for a non-empty ModuleList of same-class children that each hold parameters in submodules."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    return all(type(child) is first and any(True for _ in child.children()) for child in module)


def _longest_stack(root: nn.Module, prefix: str) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in root.named_modules():
        if _identical_blocks(module) and (best is None or len(module) > len(best[1])):
            best = (f"{prefix}{name}" if name else prefix.rstrip("."), module)
    return best


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"Module {type(target).__name__} is not part of {type(model).__name__}.")


def find_block_stacks(model: nn.Module, paths: list[str] | None = None, causal: bool = False) -> list[BlockStack]:
    """The stacks the side networks attach to: one for encoder-only and decoder-only models, two for encoder-decoder.

    With `paths`, each names an ``nn.ModuleList`` of `model`; otherwise the longest ``nn.ModuleList`` of identical
    blocks is taken, in the encoder and in the decoder for encoder-decoder models. `causal` marks a decoder-only
    stack as causal (the decoder of an encoder-decoder model always is).
    """
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))

    if paths is not None:
        stacks = []
        for i, path in enumerate(paths):
            try:
                blocks = model.get_submodule(path)
            except AttributeError as error:
                raise ValueError(
                    f"`block_stack` entry {path!r} is not a submodule of {type(model).__name__}."
                ) from error
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                raise ValueError(
                    f"`block_stack` entry {path!r} must name a non-empty nn.ModuleList, got {type(blocks).__name__}."
                )
            role = ("encoder" if i == 0 else "decoder") if encoder_decoder else "backbone"
            stacks.append(BlockStack(path, blocks, role, causal=role == "decoder" or (role == "backbone" and causal)))
        return stacks

    if encoder_decoder and hasattr(model, "get_encoder") and hasattr(model, "get_decoder"):
        found = []
        for role, part in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            stack = _longest_stack(part, _path_of(model, part) + ".")
            if stack is not None:
                found.append(BlockStack(stack[0], stack[1], role, causal=role == "decoder"))
        if len(found) == 2:
            return found
    else:
        stack = _longest_stack(model, "")
        if stack is not None:
            return [BlockStack(stack[0], stack[1], "backbone", causal=causal)]

    raise ValueError(
        f"Could not find the stack of blocks of {type(model).__name__}: no nn.ModuleList of identical blocks. "
        "Set `block_stack` in the ISMoEConfig to the dotted path of the block list, e.g. ['model.layers']."
    )


def hidden_size_of(model: nn.Module) -> int:
    """The backbone width, from the model config (``hidden_size``, ``d_model`` or ``n_embd``)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"Could not read the hidden size of {type(model).__name__} from its config (`hidden_size`, `d_model` or "
        "`n_embd`); ISMoE needs it to size the side network."
    )


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))


def find_output_norm(block: nn.Module) -> nn.Module | None:
    """The last norm layer registered in `block`: in a post-LN block, the one whose output is the block output."""
    norms = [module for module in block.modules() if _is_norm(module) and module is not block]
    return norms[-1] if norms else None


def _hidden_of(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@dataclass
class _CallState:
    """What one forward pass of a stack has collected so far."""

    started: bool = False
    taps: list[torch.Tensor] = field(default_factory=list)
    norm_outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class StackTap:
    """The forward hooks on one stack: record the tapped outputs, correct the last block's output.

    `runner` is called in the last block's hook with ``(stack, taps)`` and returns the correction to
    add to the last block output, or None to leave it unchanged (adapter disabled). `norm_params` returns, for a tap
    index, the trainable LayerNorm parameters to use for it (empty when LayerNorms are not trained).
    """

    def __init__(
        self,
        stack: BlockStack,
        tapped: list[int],
        runner: Callable[[BlockStack, list[torch.Tensor]], torch.Tensor | None],
        norm_params: Callable[[BlockStack, int], dict[str, torch.Tensor]],
        is_active: Callable[[], bool],
    ) -> None:
        self.stack = stack
        self.tapped = tapped
        self.runner = runner
        self.norm_params = norm_params
        self.is_active = is_active
        self.state = _CallState()
        self._recomputing = False
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        blocks = stack.blocks
        self.handles.append(blocks[0].register_forward_pre_hook(self._start))
        tap_of_block = {block_index: tap for tap, block_index in enumerate(tapped)}
        for block_index, block in enumerate(blocks):
            tap = tap_of_block.get(block_index)
            last = block_index == len(blocks) - 1
            if tap is None and not last:
                continue
            self.handles.append(block.register_forward_hook(self._make_block_hook(tap, last)))
        self.output_norms = {tap: find_output_norm(blocks[i]) for tap, i in enumerate(tapped)}

    def hook_norms(self) -> None:
        """Route the tapped blocks' output norms through the adapter's trainable copies (for `train_layernorm`)."""
        for tap, norm in self.output_norms.items():
            if norm is not None:
                self.handles.append(norm.register_forward_hook(self._make_norm_hook(tap)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.state = _CallState()

    def _start(self, _module, _args):
        # A new pass over the stack begins: forget whatever an interrupted pass left behind.
        self.state = _CallState(started=self.is_active())
        return None

    def _make_norm_hook(self, tap: int):
        def hook(module, args, output):
            if self._recomputing or not self.is_active() or not args:
                return None
            params = self.norm_params(self.stack, tap)
            if not params:
                return None
            # The side network's copy sees a detached input, so its gradient never reaches the backbone; the
            # backbone continues with the same values, detached, so it records nothing for backward.
            self._recomputing = True  # functional_call runs the module's hooks, this one included
            try:
                x = args[0].detach()
                params = {name: value.to(x.dtype) for name, value in params.items()}
                live = functional_call(module, params, (x,), strict=False)
            finally:
                self._recomputing = False
            frozen = live.detach()
            self.state.norm_outputs[tap] = (frozen, live)
            return frozen

        return hook

    def _make_block_hook(self, tap: int | None, last: bool):
        def hook(_module, _args, output):
            if not self.is_active() or not self.state.started:
                return None
            hidden = _hidden_of(output)
            if tap is not None:
                self.state.taps.append(self._tapped_state(tap, hidden))
            if not last:
                return None
            taps = self.state.taps
            self.state = _CallState()
            delta = self.runner(self.stack, taps)
            if delta is None:
                return None
            return _replace_hidden(output, hidden.detach() + delta)

        return hook

    def _tapped_state(self, tap: int, hidden: torch.Tensor) -> torch.Tensor:
        norm_output = self.state.norm_outputs.pop(tap, None)
        if norm_output is not None:
            frozen, live = norm_output
            if frozen is hidden:
                return live
            raise ValueError(
                f"`train_layernorm=True` needs blocks that end in a LayerNorm (post-LN, as BERT), but the output of "
                f"block {self.tapped[tap]} of `{self.stack.path}` is not the output of its last norm layer "
                f"({type(self.output_norms[tap]).__name__}): this is a pre-LN backbone. Set `train_layernorm=False`."
            )
        if self.norm_params(self.stack, tap):
            raise ValueError(
                f"`train_layernorm=True` but block {self.tapped[tap]} of `{self.stack.path}` ran no norm layer "
                "before returning; set `train_layernorm=False` for this backbone."
            )
        return hidden.detach()
