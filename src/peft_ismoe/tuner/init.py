"""Initialising a side network from the backbone: each block's feed-forward pruned to side width and split into experts.

Ladder Side-Tuning initialises its side network with backbone weights pruned to the side width. For a mixture of
experts we go one step further, in the spirit of MoEfication: the ``d`` backbone dimensions that matter most to a
block's FFN become the side coordinates (the ladder's down-projection of that block starts as the selection of
those dimensions), and the FFN's hidden units, ranked by importance, are dealt round-robin to the experts, so each
expert starts as a distinct slice of the backbone's own FFN restricted to the side coordinates.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .side import SideNetwork

__all__ = ["feed_forward_weights", "init_side_from_backbone"]

logger = logging.getLogger(__name__)


def _weight_out_in(module: nn.Module) -> torch.Tensor | None:
    """The float weight of a linear-like layer as ``[out, in]`` (GNP-IQ dequantized), or None if not readable."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t().float()
    if isinstance(module, nn.Linear) or type(module).__name__ == "GNPIQLinear":
        weight = module.weight
        if type(weight).__name__ == "Params4bit" or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return None
        return weight.detach().float()
    return None


def feed_forward_weights(block: nn.Module, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(W_in [F, D], b_in [F], W_out [D, F])`` of `block`'s two-layer FFN, or None when there is no single one.

    The FFN is the one pair of layers ``D -> F`` and ``F -> D`` with ``F > D``. Gated FFNs (Llama, T5 v1.1) have two
    ``D -> F`` layers and are not initialised from.
    """
    weights = {}
    for name, module in block.named_modules():
        weight = _weight_out_in(module)
        if weight is not None:
            weights[name] = (weight, getattr(module, "bias", None))
    ups = {n: w for n, w in weights.items() if w[0].shape[1] == hidden_size and w[0].shape[0] > hidden_size}
    downs = {n: w for n, w in weights.items() if w[0].shape[0] == hidden_size and w[0].shape[1] > hidden_size}
    pairs = [(u, d) for u in ups for d in downs if ups[u][0].shape[0] == downs[d][0].shape[1]]
    if len(pairs) != 1:
        return None
    (w_in, b_in), (w_out, _) = ups[pairs[0][0]], downs[pairs[0][1]]
    b_in = torch.zeros(w_in.shape[0]) if b_in is None else b_in.detach().float()
    return w_in, b_in.to(w_in.device), w_out


@torch.no_grad()
def init_side_from_backbone(side: SideNetwork, blocks: list[nn.Module], hidden_size: int) -> int:
    """Initialise `side`'s ladder projections and experts from the FFNs of `blocks` (one per tap).

    Returns how many taps were initialised; taps whose block has no plain two-layer FFN keep their random weights.
    """
    initialised = 0
    for tap, block in enumerate(blocks):
        ffn = feed_forward_weights(block, hidden_size)
        if ffn is None:
            continue
        w_in, b_in, w_out = ffn  # [F, D], [F], [D, F]
        experts = side.blocks[tap].moe.experts
        num_experts, width, hidden = experts.w_in.shape
        if num_experts * hidden > w_in.shape[0]:
            continue

        # Importance of a backbone dimension: how strongly the FFN reads and writes it; of a hidden unit: its
        # fan-in times fan-out over the kept dimensions.
        dim_score = w_in.norm(dim=0) * w_out.norm(dim=1)  # [D]
        dims = torch.topk(dim_score, width).indices.sort().values  # [d]
        unit_score = w_in[:, dims].norm(dim=1) * w_out[dims].norm(dim=0)  # [F]
        ranked = torch.argsort(unit_score, descending=True)[: num_experts * hidden]
        units = ranked.view(hidden, num_experts).t()  # [E, h], expert e takes ranks e, e + E, e + 2E, ...

        down = side.down[tap]
        down.weight.zero_()
        down.weight[torch.arange(width), dims.to(down.weight.device)] = 1.0
        down.bias.zero_()
        device = experts.w_in.device
        for e in range(num_experts):
            unit = units[e]
            experts.w_in[e] = w_in[unit][:, dims].t().to(device)  # [d, h]
            experts.b_in[e] = b_in[unit].to(device)
            experts.w_out[e] = w_out[dims][:, unit].t().to(device)  # [h, d]
            experts.b_out[e].zero_()
        initialised += 1
    logger.info("Initialised %d of %d side blocks from the backbone's feed-forward layers", initialised, len(blocks))
    return initialised
