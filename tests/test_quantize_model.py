"""quantize_model on whole transformers models: which layers convert, what the outputs become, and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from peft_ismoe import GNPIQConfig, GNPIQLinear, quantize_model


def tiny_bert(**overrides):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, **overrides
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=64, n_layer=2, n_head=4)).eval()


def test_bert_linear_layers_convert_and_heads_layernorms_embeddings_stay():
    model = tiny_bert()
    quantize_model(model, GNPIQConfig(bits=4, num_iterations=2), progress_bar=False)

    quantized = [n for n, m in model.named_modules() if isinstance(m, GNPIQLinear)]
    float_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # 6 linear layers per block (q, k, v, attention output, intermediate, output) and the pooler.
    assert len(quantized) == 2 * 6 + 1
    assert float_linear == ["classifier"]
    assert isinstance(model.bert.embeddings.word_embeddings, nn.Embedding)
    assert isinstance(model.bert.encoder.layer[0].output.LayerNorm, nn.LayerNorm)
    assert model.config.quantization_config.bits == 4


def test_quantized_model_outputs_stay_close_at_8_bits():
    model = tiny_bert()
    input_ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        reference = model(input_ids).logits
        quantize_model(model, GNPIQConfig(bits=8, num_iterations=2), progress_bar=False)
        logits = model(input_ids).logits
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_gpt2_conv1d_layers_are_converted_with_their_transposed_weight():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64)
    reference = c_attn(x)
    quantize_model(model, GNPIQConfig(bits=8, num_iterations=2), progress_bar=False)

    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, GNPIQLinear) and (layer.in_features, layer.out_features) == (64, 192)
    assert (layer(x) - reference).abs().max() < 0.02
    assert isinstance(model.lm_head, nn.Linear)


def test_modules_to_not_convert_is_honoured():
    model = tiny_bert()
    quantize_model(
        model, GNPIQConfig(bits=8, num_iterations=0, modules_to_not_convert=["pooler", "query"]), progress_bar=False
    )
    assert isinstance(model.bert.pooler.dense, nn.Linear)
    assert isinstance(model.bert.encoder.layer[1].attention.self.query, nn.Linear)
    assert isinstance(model.bert.encoder.layer[1].attention.self.key, GNPIQLinear)
    # An explicit list replaces the default heads.
    assert isinstance(model.classifier, GNPIQLinear)


def test_same_seed_gives_identical_codes_and_another_seed_differs():
    def codes(seed):
        model = quantize_model(tiny_bert(), GNPIQConfig(bits=3, num_iterations=4, seed=seed), progress_bar=False)
        return model.bert.encoder.layer[0].intermediate.dense.qweight

    assert torch.equal(codes(1), codes(1))
    assert not torch.equal(codes(1), codes(2))


def test_calibration_data_changes_the_fit():
    calibration = [{"input_ids": torch.randint(0, 99, (2, 7))} for _ in range(2)]
    plain = quantize_model(tiny_bert(), GNPIQConfig(bits=2, num_iterations=2), progress_bar=False)
    weighted = quantize_model(
        tiny_bert(), GNPIQConfig(bits=2, num_iterations=2), calibration_data=calibration, progress_bar=False
    )
    layer = "bert.encoder.layer.0.intermediate.dense"
    assert not torch.equal(plain.get_submodule(layer).scales, weighted.get_submodule(layer).scales)


def test_empty_calibration_data_is_refused_and_the_model_is_untouched():
    model = tiny_bert()
    with pytest.raises(ValueError, match="`calibration_data` must yield at least one batch"):
        quantize_model(model, GNPIQConfig(), calibration_data=[], progress_bar=False)
    assert not any(isinstance(m, GNPIQLinear) for m in model.modules())


def test_quantizing_twice_is_refused():
    model = quantize_model(tiny_bert(), GNPIQConfig(num_iterations=0), progress_bar=False)
    with pytest.raises(ValueError, match="already quantized with GNP-IQ"):
        quantize_model(model, GNPIQConfig(), progress_bar=False)


def test_nan_weight_is_refused_naming_the_layer_and_nothing_changes():
    model = tiny_bert()
    model.bert.encoder.layer[1].output.dense.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer `bert.encoder.layer.1.output.dense` contains NaN or Inf"):
        quantize_model(model, GNPIQConfig(), progress_bar=False)
    assert not any(isinstance(m, GNPIQLinear) for m in model.modules())


def test_inf_weight_is_refused():
    model = tiny_bert()
    model.bert.pooler.dense.weight.data[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"`bert.pooler.dense` contains NaN or Inf"):
        quantize_model(model, GNPIQConfig(), progress_bar=False)


def test_wrong_config_type_is_refused():
    with pytest.raises(TypeError, match="`config` must be a GNPIQConfig, got dict"):
        quantize_model(tiny_bert(), {"bits": 4})


def test_group_size_that_does_not_divide_the_width_pads_the_last_group():
    # Width 64 and group size 48: each row has one full group and one of 16 real columns plus 32 padded ones.
    model = tiny_bert()
    dense = model.bert.encoder.layer[0].attention.self.query
    reference = dense.weight.detach().clone()
    quantize_model(model, GNPIQConfig(bits=8, group_size=48, num_iterations=2), progress_bar=False)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.scales.shape == (64, 2) and layer.padded_in_features == 96
    assert (layer.dequantize() - reference).norm() / reference.norm() < 0.01
