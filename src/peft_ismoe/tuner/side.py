"""The ladder side network of ISMoE: what runs beside one stack of backbone blocks.

Shapes: ``B`` batch, ``S`` sequence, ``D`` backbone width, ``d = D // reduction_factor`` side width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ISMoEConfig
from .experts import MoEFeedForward

__all__ = ["SideAttention", "SideBlock", "SideNetwork", "salient_features"]


def salient_features(hidden: torch.Tensor, kind: str, mask: torch.Tensor | None) -> torch.Tensor:
    """The backbone feature the router compares with the experts: ``[B, S, D]`` per token or ``[B, 1, D]``.

    ``"token"``: each token's own state (causal). ``"cls"``: the first token's state. ``"mean"``: the mean of the
    non-padding tokens (``mask`` ``[B, S]``, true where real). The last two are one vector per sequence.
    """
    if kind == "token":
        return hidden
    if kind == "cls":
        # A copy, not a view: a view kept for backward would keep the whole [B, S, D] state alive.
        return hidden[:, :1].clone()
    if kind == "mean":
        if mask is None:
            return hidden.mean(dim=1, keepdim=True)
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, S, 1]
        return (hidden * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1)
    raise ValueError(f"`salient_feature` must be one of ('cls', 'mean', 'token'), got {kind!r}.")


class _LinearKeepingInputIn16Bit(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` that keeps ``x`` for backward in bfloat16 instead of its own dtype.

    The ladder projections read the tapped backbone states, ``[B, S, D]`` each: those are most of what the side
    network keeps for backward. Their only use there is the projection's weight gradient, ``grad_y^T x``, which
    a bfloat16 copy of ``x`` rounds by about 0.4%, as mixed-precision training does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x.to(torch.bfloat16), weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x16, weight = ctx.saved_tensors
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_flat = grad_y.reshape(-1, grad_y.shape[-1])  # [B * S, d]
        grad_weight = grad_flat.T @ x16.reshape(-1, x16.shape[-1]).to(grad_y.dtype)  # [d, D]
        grad_bias = grad_flat.sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class SideAttention(nn.Module):
    """Pre-norm multi-head self-attention over the side tokens: ``x + out(attention(LayerNorm(x)))``.

    Bidirectional, with padding keys masked out. It lets the side state of one token (the ``[CLS]`` a
    classification head reads, say) gather what the side network computed for the others; without it the side
    network could only transform each token's own backbone states.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(
                f"`side_attention_heads` must divide the side width ({width}), got {num_heads!r}; lower it or "
                "change `reduction_factor`."
            )
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[B, S, d]``, bool ``mask`` ``[B, S]`` (true for real tokens) or None."""
        batch, seq, width = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, seq, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, S, d / heads]
        attn_mask = None
        if mask is not None:
            # A row of padding only would have no key to attend to (NaN); let it attend to everything instead.
            keys = mask | ~mask.any(dim=1, keepdim=True)  # [B, S]
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, S]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, S, d / heads]
        return x + self.out(mixed.transpose(1, 2).reshape(batch, seq, width))


class SideBlock(nn.Module):
    """A pre-norm residual block: optional side attention, then a mixture-of-experts FFN, ``x + MoE(LayerNorm(x))``.

    Without attention it is purely per-token, so a side network made of these blocks is causal for free and needs
    no cache of its own during generation; that is how causal stacks run.
    """

    def __init__(self, width: int, backbone_width: int, config: ISMoEConfig, attention: bool = False) -> None:
        super().__init__()
        self.attention = SideAttention(width, config.side_attention_heads) if attention else None
        self.norm = nn.LayerNorm(width)
        self.moe = MoEFeedForward(
            width,
            backbone_width,
            num_experts=config.num_experts,
            top_k=config.top_k,
            hidden=max(1, round(width * config.expert_ratio)),
            activation=config.activation,
            use_prior=config.router == "interactive",
        )

    def forward(
        self, x: torch.Tensor, salient: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, S, d]``, ``salient`` ``[B, S, D]`` or ``[B, 1, D]``, bool ``mask`` ``[B, S]``.

        Returns ``[B, S, d]`` and the balancing loss.
        """
        if self.attention is not None:
            x = self.attention(x, mask)
        batch, seq, width = x.shape
        prior = None
        if salient is not None:
            prior = self.moe.router.prior(salient).expand(batch, seq, -1).reshape(batch * seq, -1)  # [T, E]
        flat_mask = None if mask is None else mask.reshape(-1)  # [T]
        mixed, aux_loss = self.moe(self.norm(x).reshape(-1, width), prior, flat_mask)  # [T, d]
        return x + mixed.view(batch, seq, width), aux_loss


class SideNetwork(nn.Module):
    """The side network of one backbone stack (Ladder Side-Tuning with expert blocks).

    With ``h_i`` the output of the i-th tapped block::

        s = 0
        for each tap i:  g_i = sigmoid(alpha_i / T);  s = g_i * s + (1 - g_i) * down_i(h_i);  s = block_i(s)
        delta = output_gate * up(norm(s))            # added to the stack's last block output

    ``alpha`` starts at 0 (equal mixing) and ``output_gate`` (``[D]``) at 0, so a fresh side network adds nothing.
    The side network keeps its own dtype (float32 unless cast); inputs are cast to it and ``delta`` back.

    With ``train_layernorm``, ``norm_params`` holds a trainable copy of the parameters of the LayerNorm that
    produces each tapped block output, keyed ``"{tap}_{name}"``.
    """

    def __init__(
        self,
        backbone_width: int,
        num_taps: int,
        config: ISMoEConfig,
        salient_feature: str,
        norm_params: dict[str, torch.Tensor] | None = None,
        attention: bool = False,
    ) -> None:
        super().__init__()
        self.taps_in_bfloat16 = config.tap_storage == "bfloat16"
        width = backbone_width // config.reduction_factor
        self.width = width
        self.salient_feature = salient_feature
        self.temperature = config.ladder_temperature
        self.use_salient = config.router == "interactive"
        self.down = nn.ModuleList(nn.Linear(backbone_width, width) for _ in range(num_taps))
        self.ladder_alpha = nn.Parameter(torch.zeros(num_taps))
        self.blocks = nn.ModuleList(SideBlock(width, backbone_width, config, attention) for _ in range(num_taps))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, backbone_width)
        self.output_gate = nn.Parameter(torch.zeros(backbone_width))
        self.norm_params = nn.ParameterDict(
            {key: nn.Parameter(value.detach().clone().float()) for key, value in (norm_params or {}).items()}
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.up.weight.dtype

    def tap_norm_params(self, tap: int) -> dict[str, torch.Tensor]:
        """The trainable LayerNorm parameters of tap `tap`, by parameter name (empty when not trained)."""
        prefix = f"{tap}_"
        return {key[len(prefix) :]: value for key, value in self.norm_params.items() if key.startswith(prefix)}

    def forward(self, taps: list[torch.Tensor], mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of ``taps`` ``[B, S, D]``, bool ``mask`` ``[B, S]``.

        Returns ``delta`` ``[B, S, D]`` in the dtype of the taps and the mean balancing loss over blocks.
        """
        if len(taps) != len(self.blocks):
            raise ValueError(f"The side network has {len(self.blocks)} blocks but got {len(taps)} tapped states.")
        s = 0
        aux_losses = []
        for i, hidden in enumerate(taps):
            hidden = hidden.to(self.dtype)
            gate = torch.sigmoid(self.ladder_alpha[i] / self.temperature)
            s = gate * s + (1 - gate) * self._down(i, hidden)
            salient = salient_features(hidden, self.salient_feature, mask) if self.use_salient else None
            s, aux_loss = self.blocks[i](s, salient, mask)
            aux_losses.append(aux_loss)
        # output_gate * up(x), with the gate folded into the projection: autograd then keeps the small side state
        # for backward instead of the [B, S, D] projection.
        gate = self.output_gate
        delta = F.linear(self.norm(s), self.up.weight * gate[:, None], self.up.bias * gate)  # [B, S, D]
        return delta.to(taps[0].dtype), torch.stack(aux_losses).mean()

    def _down(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        down = self.down[i]
        if self.taps_in_bfloat16 and torch.is_grad_enabled() and down.weight.requires_grad:
            return _LinearKeepingInputIn16Bit.apply(hidden, down.weight, down.bias)
        return down(hidden)

    def expert_usage(self) -> list[torch.Tensor]:
        """The routing-slot counts of each block's experts since the last reset, ``int64 [E]`` per block."""
        return [block.moe.usage.clone() for block in self.blocks]

    def reset_usage(self) -> None:
        for block in self.blocks:
            block.moe.reset_usage()
