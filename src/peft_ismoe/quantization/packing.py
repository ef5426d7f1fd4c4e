"""Bit-packing of 2-, 3-, 4- and 8-bit integer codes into bytes.

Codes are packed along their flattened, row-major order, least significant bits first, into one flat ``uint8``
tensor. Each bit width packs a fixed chunk of codes into a fixed number of bytes:

========  ==============  ==============
bits      codes per chunk  bytes per chunk
========  ==============  ==============
2         4                1
3         8                3
4         2                1
8         1                1
========  ==============  ==============

The code count is padded with zeros up to a whole chunk, so a tensor of ``n`` codes takes
``ceil(n / codes_per_chunk) * bytes_per_chunk`` bytes; unpacking needs ``n`` to drop the padding again.

Worked example, 3 bits: the codes ``[1, 2, 3, 4, 5, 6, 7, 0]`` form the 24-bit number
``1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1``, stored little-endian as the bytes
``[0xD1, 0x58, 0x1F]``.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "pack_codes", "packed_numel", "unpack_codes"]

SUPPORTED_BITS = (2, 3, 4, 8)

# bits -> (codes per chunk, bytes per chunk)
_CHUNKS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def _check_bits(bits: int) -> tuple[int, int]:
    if bits not in _CHUNKS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}.")
    return _CHUNKS[bits]


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that `numel` codes of `bits` bits take once packed."""
    codes_per_chunk, bytes_per_chunk = _check_bits(bits)
    return -(-numel // codes_per_chunk) * bytes_per_chunk


def pack_2bit_u8(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 3], length a multiple of 4, four to a byte: ``c0 | c1<<2 | c2<<4 | c3<<6``."""
    c = codes.view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_2bit_u8(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 0b11).view(-1)


def pack_4bit_u8(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15], length a multiple of 2, two to a byte: ``c0 | c1<<4``."""
    c = codes.view(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def unpack_4bit_u8(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)


def pack_3bit_u8(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 7], length a multiple of 8, eight codes into three bytes (a 24-bit word)."""
    c = codes.view(-1, 8).to(torch.int32)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)
    word = (c << shifts).sum(dim=1)  # [chunks], bits 0..23 used
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).to(torch.uint8).view(-1)


def unpack_3bit_u8(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(-1, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)  # [chunks]
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    return ((word[:, None] >> shifts) & 0b111).to(torch.uint8).view(-1)


_PACK = {2: pack_2bit_u8, 3: pack_3bit_u8, 4: pack_4bit_u8}
_UNPACK = {2: unpack_2bit_u8, 3: unpack_3bit_u8, 4: unpack_4bit_u8}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of any shape into a flat uint8 tensor of ``packed_numel(codes.numel(), bits)`` bytes.

    Raises:
        ValueError: if `bits` is unsupported or a code does not fit in `bits` bits.
    """
    codes_per_chunk, _ = _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"`codes` must lie in [0, {2**bits - 1}] for {bits}-bit packing, got values in "
            f"[{int(flat.min())}, {int(flat.max())}]."
        )
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()

    padding = (-flat.numel()) % codes_per_chunk
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return _PACK[bits](flat)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes, as a flat uint8 tensor.

    Raises:
        ValueError: if `packed` does not hold exactly ``packed_numel(numel, bits)`` bytes.
    """
    expected = packed_numel(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"`packed` must be a uint8 tensor of {expected} bytes for {numel} codes of {bits} bits, got "
            f"{packed.dtype} with {packed.numel()} elements."
        )
    flat = packed.reshape(-1)
    if bits == 8:
        return flat
    return _UNPACK[bits](flat)[:numel]
