"""`GNPIQLinear`: a frozen linear layer whose weight is stored as packed low-bit codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int
from .packing import SUPPORTED_BITS, pack_codes, packed_numel, unpack_codes
from .solver import QuantizedWeight, dequantize_groups

__all__ = ["GNPIQLinear"]


class GNPIQLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` whose weight ``W`` is held as GNP-IQ codes, frozen.

    Stored tensors (all buffers, so they move with ``.to()`` and are saved in the state dict, but are never
    returned by ``parameters()`` and never trained):

    * ``qweight``: ``uint8 [packed_numel(out_features * padded_in_features, bits)]``, the codes of the
      ``[out_features, padded_in_features]`` code matrix flattened row-major and packed by
      :func:`~peft_ismoe.quantization.packing.pack_codes`; ``padded_in_features`` is ``in_features`` rounded up to
      a multiple of ``group_size``.
    * ``scales``: ``float16 [out_features, num_groups]``.
    * ``zeros``: ``float16 [out_features, num_groups]``, real-valued zero points in code units.

    ``bias`` stays a float parameter with ``requires_grad=False``. The forward pass dequantizes the weight to the
    input's dtype and calls ``F.linear``: that works the same on every device, at the cost of materialising one
    float weight per call (freed right after).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        check_int("group_size", group_size, minimum=1)
        if bits not in SUPPORTED_BITS or isinstance(bits, bool):
            raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}.")
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        num_groups = -(-in_features // group_size)
        self.padded_in_features = num_groups * group_size

        numel = packed_numel(out_features * self.padded_in_features, bits)
        self.register_buffer("qweight", torch.zeros(numel, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, num_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, num_groups, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, quantized: QuantizedWeight, bits: int, bias: torch.Tensor | None = None) -> GNPIQLinear:
        """Build the layer from the solver's output (and an optional float bias, copied)."""
        out_features = quantized.codes.shape[0]
        layer = cls(
            quantized.in_features,
            out_features,
            bits=bits,
            group_size=quantized.group_size,
            bias=bias is not None,
            device=quantized.codes.device,
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        layer.qweight.copy_(pack_codes(quantized.codes, bits))
        layer.scales.copy_(quantized.scale)
        layer.zeros.copy_(quantized.zero)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weight is dequantized to when no input tells: the bias's, else float32."""
        return self.bias.dtype if self.bias is not None else torch.float32

    def codes(self) -> torch.Tensor:
        """The unpacked codes, ``uint8 [out_features, padded_in_features]``."""
        numel = self.out_features * self.padded_in_features
        return unpack_codes(self.qweight, self.bits, numel).view(self.out_features, self.padded_in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, ``[out_features, in_features]`` in `dtype` (default: `weight_dtype`)."""
        dtype = dtype or self.weight_dtype
        return dequantize_groups(self.codes(), self.scales, self.zeros, self.in_features, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``layer.weight`` (shape, dtype or device checks)."""
        return self.dequantize()

    def quantized_nbytes(self) -> int:
        """Bytes of the stored weight: packed codes, scales and zero points (the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.weight_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantize(dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )
