"""GNP-IQ inside transformers: registration, from_pretrained / save_pretrained round trips, Trainer acceptance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils import logging as hf_logging

import peft_ismoe.quantization.model as model_module
from peft_ismoe import GNPIQConfig, GNPIQLinear, quantize_model
from peft_ismoe.quantization import GNPIQHfQuantizer, GNPIQWarning, register_with_transformers

VOCAB = 50


def tiny_bert() -> BertModel:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80
    )
    return BertModel(config)


def tiny_bert_classifier() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=80,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def tiny_llama() -> LlamaForCausalLM:
    # Width 96 of the MLP is not a multiple of the group size 64: the last group of down_proj is padded.
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    # GPT-2's Conv1D layers store their weights as [in_features, out_features].
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


# (id, model factory, auto class, output field, quantization config)
CASES = [
    ("bert-4bit", tiny_bert, AutoModel, "last_hidden_state", GNPIQConfig(bits=4, group_size=32, num_iterations=2)),
    ("bert-8bit", tiny_bert, AutoModel, "last_hidden_state", GNPIQConfig(bits=8, group_size=16, num_iterations=1)),
    ("llama-3bit", tiny_llama, AutoModelForCausalLM, "logits", GNPIQConfig(bits=3, num_iterations=2)),
    ("llama-2bit", tiny_llama, AutoModelForCausalLM, "logits", GNPIQConfig(bits=2, group_size=32, num_iterations=2)),
    ("gpt2-4bit", tiny_gpt2, AutoModelForCausalLM, "logits", GNPIQConfig(bits=4, group_size=16, num_iterations=2)),
]


def save_float(factory, path: Path) -> Path:
    torch.manual_seed(0)
    factory().save_pretrained(path)
    return path


def forbid_solver(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the GNP-IQ solver ran while loading a GNP-IQ checkpoint")

    monkeypatch.setattr(model_module, "gnpiq_quantize", fail)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_gnpiq_is_registered_with_transformers():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["gnpiq"] is GNPIQConfig
    assert AUTO_QUANTIZER_MAPPING["gnpiq"] is GNPIQHfQuantizer

    register_with_transformers()  # a second registration by this package is harmless

    assert AUTO_QUANTIZER_MAPPING["gnpiq"] is GNPIQHfQuantizer


def test_a_foreign_registration_of_the_name_is_left_alone_with_a_warning(monkeypatch):
    class OtherQuantizer(GNPIQHfQuantizer):
        pass

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "gnpiq", OtherQuantizer)

    with pytest.warns(GNPIQWarning, match="already maps quant method 'gnpiq'"):
        register_with_transformers()

    assert AUTO_QUANTIZER_MAPPING["gnpiq"] is OtherQuantizer


@pytest.mark.parametrize(
    ("factory", "auto_class", "output", "config"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_save_then_load_round_trips_bit_exactly_without_the_solver(
    tmp_path, monkeypatch, factory, auto_class, output, config
):
    float_dir = save_float(factory, tmp_path / "float")
    quantized = auto_class.from_pretrained(float_dir, quantization_config=config)
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, GNPIQLinear)}
    assert layers and all(m.bits == config.bits and m.group_size == config.group_size for m in layers.values())

    quantized.save_pretrained(tmp_path / "quantized")

    saved_config = json.loads((tmp_path / "quantized" / "config.json").read_text())
    assert saved_config["quantization_config"] == config.to_dict()
    with safe_open(tmp_path / "quantized" / "model.safetensors", framework="pt") as handle:
        name = next(iter(layers))
        assert handle.get_slice(f"{name}.qweight").get_dtype() == "U8"
        assert handle.get_slice(f"{name}.scales").get_dtype() == "F16"
        assert handle.get_slice(f"{name}.zeros").get_dtype() == "F16"
        assert f"{name}.weight" not in handle.keys()

    forbid_solver(monkeypatch)
    reloaded = auto_class.from_pretrained(tmp_path / "quantized")

    assert reloaded.hf_quantizer.pre_quantized
    assert isinstance(reloaded.config.quantization_config, GNPIQConfig)
    assert reloaded.config.quantization_config.to_dict() == config.to_dict()
    assert_same_state(quantized, reloaded)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(getattr(quantized(input_ids), output), getattr(reloaded(input_ids), output))


def test_sharded_checkpoints_round_trip_and_are_checked(tmp_path, monkeypatch):
    float_dir = save_float(tiny_bert, tmp_path / "float")
    quantized = AutoModel.from_pretrained(float_dir, quantization_config=GNPIQConfig(bits=4, num_iterations=1))
    quantized.save_pretrained(tmp_path / "quantized", max_shard_size="20KB")
    assert len(list((tmp_path / "quantized").glob("*.safetensors"))) > 1

    forbid_solver(monkeypatch)
    assert_same_state(quantized, AutoModel.from_pretrained(tmp_path / "quantized"))

    edit_quantization_config(tmp_path / "quantized", bits=2)
    with pytest.raises(ValueError, match=r"query.qweight` has shape \(1536,\).*2 bits.*needs \(768,\)"):
        AutoModel.from_pretrained(tmp_path / "quantized")


def test_llama_checkpoint_keeps_its_tied_head_in_float_and_pads_partial_groups(tmp_path):
    float_dir = save_float(tiny_llama, tmp_path / "float")
    AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=GNPIQConfig(bits=4, num_iterations=1)
    ).save_pretrained(tmp_path / "quantized")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")

    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives
    assert isinstance(model.model.layers[0].mlp.down_proj, GNPIQLinear)
    assert model.model.layers[0].mlp.down_proj.padded_in_features == 128


def test_a_tied_output_head_stays_in_float_even_when_not_skipped_by_name(tmp_path, monkeypatch):
    float_dir = save_float(tiny_llama, tmp_path / "float")
    config = GNPIQConfig(bits=8, num_iterations=0, modules_to_not_convert=[])
    quantized = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    quantized.save_pretrained(tmp_path / "quantized")

    forbid_solver(monkeypatch)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")

    for model in (quantized, reloaded):
        assert type(model.lm_head) is nn.Linear
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_state(quantized, reloaded)


def test_a_new_config_does_not_requantize_a_gnpiq_checkpoint(tmp_path, monkeypatch):
    float_dir = save_float(tiny_bert, tmp_path / "float")
    AutoModel.from_pretrained(float_dir, quantization_config=GNPIQConfig(bits=8, num_iterations=0)).save_pretrained(
        tmp_path / "quantized"
    )
    forbid_solver(monkeypatch)

    with pytest.warns(UserWarning, match="already has a `quantization_config`"):
        model = AutoModel.from_pretrained(tmp_path / "quantized", quantization_config=GNPIQConfig(bits=4))

    assert model.config.quantization_config.bits == 8
    assert model.encoder.layer[0].attention.self.query.bits == 8


def test_frozen_biases_after_loading_a_checkpoint(tmp_path):
    float_dir = save_float(tiny_bert, tmp_path / "float")
    AutoModel.from_pretrained(float_dir, quantization_config=GNPIQConfig(bits=8, num_iterations=0)).save_pretrained(
        tmp_path / "quantized"
    )

    model = AutoModel.from_pretrained(tmp_path / "quantized")

    query = model.encoder.layer[0].attention.self.query
    assert isinstance(query, GNPIQLinear) and query.bias is not None
    assert not query.bias.requires_grad
    assert model.embeddings.LayerNorm.weight.requires_grad


def test_from_pretrained_quantizes_like_quantize_model(tmp_path):
    config = GNPIQConfig(bits=4, group_size=32, num_iterations=3, seed=5)
    float_dir = save_float(tiny_bert, tmp_path / "float")

    on_load = AutoModel.from_pretrained(float_dir, quantization_config=config)
    after_load = quantize_model(AutoModel.from_pretrained(float_dir), config)

    assert_same_state(on_load, after_load)


def test_quantize_model_output_round_trips_through_save_pretrained(tmp_path, monkeypatch):
    float_dir = save_float(tiny_llama, tmp_path / "float")
    model = quantize_model(
        AutoModelForCausalLM.from_pretrained(float_dir), GNPIQConfig(bits=4, group_size=32, num_iterations=2)
    )
    assert isinstance(model.hf_quantizer, GNPIQHfQuantizer) and model.hf_quantizer.is_serializable()

    model.save_pretrained(tmp_path / "quantized")
    forbid_solver(monkeypatch)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")

    assert_same_state(model, reloaded)
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_quantizing_a_loaded_gnpiq_model_again_is_refused(tmp_path):
    float_dir = save_float(tiny_bert, tmp_path / "float")
    AutoModel.from_pretrained(float_dir, quantization_config=GNPIQConfig(bits=8, num_iterations=0)).save_pretrained(
        tmp_path / "quantized"
    )
    model = AutoModel.from_pretrained(tmp_path / "quantized")

    with pytest.raises(ValueError, match="already quantized with GNP-IQ"):
        quantize_model(model, GNPIQConfig(bits=4))


def edit_quantization_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


# (id, bits saved, config edits, message)
MISMATCHES = [
    ("8bit-tensors-4bit-config", 8, {"bits": 4}, r"query.qweight` has shape \(1024,\).*4 bits.*needs \(512,\)"),
    ("2bit-tensors-3bit-config", 2, {"bits": 3}, r"query.qweight` has shape \(256,\).*3 bits.*needs \(384,\)"),
    ("group-size", 8, {"group_size": 16}, r"query.scales` has shape \(32, 1\).*group size 16\) needs \(32, 2\)"),
    ("float-layer", 8, {"modules_to_not_convert": []}, r"stores layer `pooler.dense` as a float weight"),
]


@pytest.mark.parametrize(("bits", "changes", "message"), [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_checkpoint_whose_packed_shapes_disagree_with_its_config_is_refused(tmp_path, bits, changes, message):
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "float")
    skip = ["pooler"] if "modules_to_not_convert" in changes else None
    AutoModel.from_pretrained(
        tmp_path / "float",
        quantization_config=GNPIQConfig(bits=bits, group_size=32, num_iterations=0, modules_to_not_convert=skip),
    ).save_pretrained(tmp_path / "quantized")
    edit_quantization_config(tmp_path / "quantized", **changes)

    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(tmp_path / "quantized")


def test_dequantize_returns_float_linears_with_the_dequantized_weights(tmp_path):
    float_dir = save_float(tiny_bert, tmp_path / "float")
    model = AutoModel.from_pretrained(float_dir, quantization_config=GNPIQConfig(bits=4, num_iterations=1))
    query = model.encoder.layer[0].attention.self.query
    expected_weight, expected_bias = query.dequantize(), query.bias.detach().clone()

    model.dequantize()

    query = model.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear
    assert torch.equal(query.weight, expected_weight) and torch.equal(query.bias, expected_bias)
    assert not any(isinstance(m, GNPIQLinear) for m in model.modules())
    assert getattr(model, "hf_quantizer", None) is None


def test_progress_bar_follows_the_transformers_setting(tmp_path, monkeypatch):
    float_dir = save_float(tiny_bert, tmp_path / "float")
    seen = []
    real_tqdm = model_module.tqdm

    def recording_tqdm(*args, **kwargs):
        seen.append(kwargs.get("disable"))
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(model_module, "tqdm", recording_tqdm)
    config = GNPIQConfig(bits=8, num_iterations=0)

    AutoModel.from_pretrained(float_dir, quantization_config=config)
    hf_logging.enable_progress_bar()
    AutoModel.from_pretrained(float_dir, quantization_config=config)

    assert seen == [True, False]


def test_quantizer_reports_itself_trainable():
    quantizer = GNPIQHfQuantizer(GNPIQConfig(), pre_quantized=False)

    assert quantizer.is_trainable and quantizer.is_serializable()


def test_quantizer_refuses_another_config_type():
    with pytest.raises(TypeError, match="must be a GNPIQConfig, got dict"):
        GNPIQHfQuantizer({"quant_method": "gnpiq"})


def tiny_dataset(n: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, VOCAB, (8,), generator=generator), "labels": torch.tensor(i % 2)}
        for i in range(n)
    ]


def training_args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )


@pytest.mark.parametrize("route", ["from_pretrained", "quantize_model"])
def test_trainer_accepts_a_quantized_model_with_a_lora_adapter_and_trains_it(tmp_path, route):
    torch.manual_seed(0)
    tiny_bert_classifier().save_pretrained(tmp_path / "float")
    config = GNPIQConfig(bits=4, group_size=16, num_iterations=1)
    if route == "from_pretrained":
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "float", quantization_config=config)
    else:
        model = quantize_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "float"), config)
    packed_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scales", "zeros"))}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["classifier"]))
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}

    trainer = Trainer(model=peft_model, args=training_args(tmp_path), train_dataset=tiny_dataset())
    trainer.train()

    assert any(not torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if n in lora_before)
    packed_after = dict(model.named_buffers())
    assert all(torch.equal(packed_after[n], b) for n, b in packed_before.items())


def test_trainer_still_requires_an_adapter_on_a_bare_quantized_model(tmp_path):
    torch.manual_seed(0)
    tiny_bert_classifier().save_pretrained(tmp_path / "float")
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "float", quantization_config=GNPIQConfig(bits=8, num_iterations=0)
    )

    with pytest.raises(ValueError, match="attach trainable adapters"):
        Trainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset())
