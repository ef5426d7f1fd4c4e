"""GNPIQLinear: its forward equals the dequantized matrix product, on every bit width and dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_ismoe import GNPIQLinear, gnpiq_quantize
from peft_ismoe.quantization.packing import packed_numel

CASES = [
    # in, out, group size, bias
    (64, 16, 64, True),
    (128, 24, 32, False),
    (100, 12, 64, True),  # the last group is padded
]


def _layer(in_features, out_features, group_size, bias, bits):
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=bias)
    quantized = gnpiq_quantize(dense.weight.data, bits=bits, group_size=group_size, num_iterations=3)
    return dense, GNPIQLinear.from_quantized(quantized, bits=bits, bias=dense.bias), quantized


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize(("in_features", "out_features", "group_size", "bias"), CASES, ids=str)
def test_forward_equals_dequantized_matmul(bits, in_features, out_features, group_size, bias):
    dense, layer, quantized = _layer(in_features, out_features, group_size, bias, bits)
    x = torch.randn(3, 5, in_features)

    W = layer.dequantize()
    expected = x @ W.T + (dense.bias if bias else 0)

    assert W.shape == (out_features, in_features)
    assert torch.equal(W, quantized.dequantize())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_dequantized_weight_is_close_to_the_original_at_8_bits():
    dense, layer, _ = _layer(128, 32, 64, True, 8)
    error = (layer.dequantize() - dense.weight).norm() / dense.weight.norm()
    assert error < 0.01


def test_forward_follows_the_input_dtype():
    _, layer, _ = _layer(64, 16, 64, True, 4)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x.float()), rtol=0.02, atol=0.02)


def test_stored_tensors_and_their_sizes():
    _, layer, _ = _layer(100, 12, 64, True, 4)
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"qweight", "scales", "zeros"}
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == packed_numel(12 * 128, 4)
    assert layer.scales.dtype == layer.zeros.dtype == torch.float16
    assert layer.scales.shape == layer.zeros.shape == (12, 2)
    # The codes take half a byte per (padded) weight at 4 bits.
    assert layer.quantized_nbytes() == 12 * 128 // 2 + 2 * 12 * 2 * 2


def test_nothing_is_trainable():
    _, layer, _ = _layer(64, 16, 64, True, 8)
    assert all(not p.requires_grad for p in layer.parameters())


def test_input_gradient_flows_but_weights_get_none():
    _, layer, _ = _layer(64, 16, 64, True, 8)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.bias.grad is None


def test_repr_shows_bits_and_group_size():
    _, layer, _ = _layer(64, 16, 32, True, 3)
    assert repr(layer) == "GNPIQLinear(in_features=64, out_features=16, bias=True, bits=3, group_size=32)"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"group_size": 0}, ValueError, r"`group_size` must be an int >= 1, got 0"),
        ({"group_size": 8.0}, TypeError, r"`group_size` must be an int >= 1, got float 8.0"),
        ({"bits": 5}, ValueError, r"`bits` must be one of \(2, 3, 4, 8\), got 5"),
        ({"in_features": 0}, ValueError, r"`in_features` must be an int >= 1, got 0"),
    ],
)
def test_an_empty_layer_with_bad_shapes_is_refused_naming_the_argument(kwargs, error, message):
    arguments = {"in_features": 16, "out_features": 4, "bits": 4, "group_size": 8} | kwargs
    with pytest.raises(error, match=message):
        GNPIQLinear(arguments.pop("in_features"), arguments.pop("out_features"), **arguments)
