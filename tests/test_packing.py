"""Bit-packing of codes: exact round trips, the documented byte layout, and refusals."""

from __future__ import annotations

import pytest
import torch

from peft_ismoe.quantization.packing import (
    SUPPORTED_BITS,
    pack_2bit_u8,
    pack_3bit_u8,
    pack_4bit_u8,
    pack_codes,
    packed_numel,
    unpack_codes,
)

SHAPES = [(1,), (7,), (8,), (3, 5), (4, 64), (2, 3, 17)]


@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_then_unpack_is_identity(bits, shape):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=generator, dtype=torch.uint8)

    packed = pack_codes(codes, bits)
    restored = unpack_codes(packed, bits, codes.numel()).view(shape)

    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(codes.numel(), bits)
    assert torch.equal(restored, codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"{b}bit")
def test_extreme_codes_survive(bits):
    codes = torch.tensor([0, 2**bits - 1] * 12, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)


def test_packed_size_per_bit_width():
    # 1024 codes: a quarter, three eighths, a half and one byte per code.
    assert [packed_numel(1024, b) for b in (2, 3, 4, 8)] == [256, 384, 512, 1024]
    # Partial chunks are padded to whole ones.
    assert [packed_numel(5, b) for b in (2, 3, 4, 8)] == [2, 3, 3, 5]


def test_three_bit_byte_example_from_the_docstring():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_3bit_u8(codes).tolist() == [0xD1, 0x58, 0x1F]


def test_two_and_four_bit_put_the_first_code_in_the_low_bits():
    assert pack_2bit_u8(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).tolist() == [0b00111001]
    assert pack_4bit_u8(torch.tensor([0x3, 0xA], dtype=torch.uint8)).tolist() == [0xA3]


@pytest.mark.parametrize("bits", [1, 5, 16], ids=lambda b: f"{b}bit")
def test_unsupported_bit_width_is_refused(bits):
    with pytest.raises(ValueError, match=r"`bits` must be one of \(2, 3, 4, 8\), got " + str(bits)):
        pack_codes(torch.zeros(8, dtype=torch.uint8), bits)


def test_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"`codes` must lie in \[0, 15\] for 4-bit packing, got values in \[0, 16\]"):
        pack_codes(torch.tensor([0, 16]), 4)


def test_unpacking_a_buffer_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="must be a uint8 tensor of 3 bytes for 8 codes of 3 bits, got torch.uint8 "):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 3, 8)
