"""Experts and routing of ISMoE: the interactive router, stacked expert FFNs and the balancing loss.

Shapes use ``T`` for tokens (batch and sequence flattened), ``d`` for the side width, ``D`` for the backbone width,
``E`` for the number of experts, ``k`` for ``top_k`` and ``h`` for the hidden width of one expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InteractiveRouter", "MoEFeedForward", "RouterOutput", "StackedExperts", "load_balancing_loss"]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class RouterOutput:
    """What the router decides for ``T`` tokens.

    * ``logits``: ``[T, E]``, the side router's logits g(x).
    * ``probs``: ``[T, E]``, the routing distribution the top-k is taken from (rows sum to 1).
    * ``weights``: ``[T, k]``, the mixing weights of the selected experts (rows sum to 1).
    * ``indices``: ``int64 [T, k]``, the selected experts, best first.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class InteractiveRouter(nn.Module):
    """Top-k router over side tokens, optionally anchored by a prior from the backbone's salient feature.

    The side router scores each token: ``g(x) = x W_g``, ``[T, E]``. With ``use_prior``, each expert owns a
    representative vector ``r_e`` of backbone width and the prior is ``c = softmax_e(s_hat . r_e / sqrt(D))``, where
    ``s_hat`` is the salient feature rescaled to unit root-mean-square (so backbones whose residual stream grows large
    do not saturate the prior); `prior` computes it, once per sequence when the feature is per sequence. Routing uses ``p = (softmax(g(x)) + c) / 2``; without the prior ``p = softmax(g(x))``.
    The top-k entries of ``p`` are kept and renormalised to sum to one, so ``top_k == num_experts`` is the soft
    mixture with weights ``p`` and ``num_experts == 1`` gives weight one.
    """

    def __init__(self, side_width: int, backbone_width: int, num_experts: int, top_k: int, use_prior: bool) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.use_prior = use_prior
        self.gate = nn.Linear(side_width, num_experts, bias=False)
        if use_prior:
            self.representatives = nn.Parameter(torch.randn(num_experts, backbone_width))
        else:
            self.register_parameter("representatives", None)

    def prior(self, salient: torch.Tensor) -> torch.Tensor:
        """The correlation prior ``c``, ``[..., E]``, from salient features ``[..., D]``."""
        # The rescaling is applied to the scores rather than to the features: the matmul then saves only `salient`
        # (a tapped backbone state the side network keeps anyway) and not a rescaled copy of it for backward.
        scale = torch.rsqrt(salient.square().mean(dim=-1, keepdim=True) + 1e-6) / math.sqrt(salient.shape[-1])
        return torch.softmax((salient @ self.representatives.t()) * scale, dim=-1)  # [..., E]

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> RouterOutput:
        """Route ``x`` ``[T, d]``; `prior` ``[T, E]`` (from `prior`) is required with ``use_prior`` and unused without."""
        logits = self.gate(x)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        if self.use_prior:
            if prior is None:
                raise ValueError(
                    "The interactive router needs `prior`, the backbone-feature prior per token; got None."
                )
            probs = (probs + prior.float()) / 2
        top_probs, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, k], [T, k]
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, weights=weights.to(x.dtype), indices=indices)


class StackedExperts(nn.Module):
    """``E`` two-layer FFNs ``W_out act(W_in x + b_in) + b_out`` whose weights are stacked along a first axis.

    * ``w_in``: ``[E, d, h]``, ``b_in``: ``[E, h]``
    * ``w_out``: ``[E, h, d]``, ``b_out``: ``[E, d]``

    `forward` runs only the experts that received tokens: tokens are grouped by expert with one sort, each used
    expert runs on its group, and the weighted results are summed back with ``index_add_``.
    """

    def __init__(self, num_experts: int, width: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {tuple(_ACTIVATIONS)}, got {activation!r}.")
        self.num_experts = num_experts
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, width, hidden))
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.b_out = nn.Parameter(torch.zeros(num_experts, width))
        nn.init.normal_(self.w_in, std=1 / math.sqrt(width))
        nn.init.normal_(self.w_out, std=1 / math.sqrt(hidden))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` applied to ``x`` ``[n, d]``, ``[n, d]``."""
        act = _ACTIVATIONS[self.activation]
        return act(x @ self.w_in[e] + self.b_in[e]) @ self.w_out[e] + self.b_out[e]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_j weights[t, j] * expert_{indices[t, j]}(x[t])`` for every token, ``[T, d]``."""
        top_k = indices.shape[-1]
        flat_experts = indices.reshape(-1)  # [T * k]
        order = torch.argsort(flat_experts, stable=True)  # [T * k], grouped by expert
        token_of = order // top_k  # [T * k], the token each sorted slot belongs to
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        flat_weights = weights.reshape(-1)[order]  # [T * k]

        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]  # [count]
            y = self.expert(e, x.index_select(0, tokens)) * flat_weights[start : start + count, None]  # [count, d]
            # Under autocast the expert's matmuls run in bf16/fp16 while the routing weights stay float32.
            out = out.index_add(0, tokens, y.to(out.dtype))
            start += count
        return out


# Switch Transformer balancing loss (Fedus et al. 2021, eq. 4-6), extended to top-k routing:
#   loss = E * sum_e f_e * P_e,
# f_e = share of the T * k routing slots that went to expert e, P_e = mean routing probability of expert e.
# Its minimum, 1, is reached when both are uniform; only P_e carries gradient.
def load_balancing_loss(
    probs: torch.Tensor, indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The balancing loss of one routing decision (``probs`` ``[T, E]``, ``indices`` ``[T, k]``, bool ``mask`` ``[T]``)."""
    if mask is not None:
        probs, indices = probs[mask], indices[mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype)  # [E]
    fraction = counts / indices.numel()
    return num_experts * torch.sum(fraction * probs.mean(dim=0))


class MoEFeedForward(nn.Module):
    """A mixture-of-experts FFN: router plus stacked experts, with usage counts kept for logging.

    ``usage`` (``int64 [E]``, a non-persistent buffer) counts the routing slots each expert received since the last
    `reset_usage`; it has a fixed size, so logging never grows memory.
    """

    def __init__(
        self,
        width: int,
        backbone_width: int,
        *,
        num_experts: int,
        top_k: int,
        hidden: int,
        activation: str,
        use_prior: bool,
    ) -> None:
        super().__init__()
        self.router = InteractiveRouter(width, backbone_width, num_experts, top_k, use_prior)
        self.experts = StackedExperts(num_experts, width, hidden, activation)
        self.register_buffer("usage", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def reset_usage(self) -> None:
        self.usage.zero_()

    def forward(
        self, x: torch.Tensor, prior: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``x`` ``[T, d]`` given the router `prior` ``[T, E]`` and bool `mask` ``[T]`` (true for real tokens).

        Returns the output ``[T, d]`` and the balancing loss (a scalar).
        """
        routing = self.router(x, prior)
        with torch.no_grad():
            used = routing.indices if mask is None else routing.indices[mask]
            self.usage += torch.bincount(used.reshape(-1), minlength=self.usage.numel())
        out = self.experts(x, routing.weights, routing.indices)
        return out, load_balancing_loss(routing.probs, routing.indices, self.usage.numel(), mask)
