"""The model card `save_pretrained` writes beside an ISMoE adapter."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, TrainerControl, TrainerState, TrainingArguments

import peft_ismoe
from peft_ismoe.tuner.card import END, START


def _bert(name: str = "tiny/bert") -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = BertForSequenceClassification(config)
    model.config._name_or_path = name
    return model


def _ismoe(model=None):
    return get_peft_model(model or _bert(), peft_ismoe.ISMoEConfig(task_type="SEQ_CLS", num_experts=2))


def test_card_names_method_base_model_config_and_metrics_and_keeps_peft_tags(tmp_path):
    base = peft_ismoe.quantize_model(_bert(), peft_ismoe.GNPIQConfig(bits=4), progress_bar=False)
    model = _ismoe(base)
    peft_ismoe.record_metrics(model, {"accuracy": 0.8394}, dataset="GLUE SST-2 dev")

    model.save_pretrained(tmp_path)

    card = ModelCard.load(tmp_path / "README.md")
    assert "MP-ISMoE" in card.text and "`tiny/bert`" in card.text
    assert "### Metrics on GLUE SST-2 dev" in card.text and "| accuracy | 0.8394 |" in card.text
    assert "| num_experts | `2` |" in card.text and "| bits | `4` |" in card.text
    assert 'from_pretrained("tiny/bert", quantization_config=peft_ismoe.GNPIQConfig(bits=4))' in card.text
    assert {"peft_ismoe", "ismoe", "transformers"} <= set(card.data.tags)
    assert card.data.library_name == "peft" and card.data.base_model == "tiny/bert"
    assert "PEFT" in card.text  # PEFT's own framework-version block is still added


def test_saving_twice_replaces_the_section_and_keeps_what_the_user_wrote(tmp_path):
    model = _ismoe()
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nHand-written notes.\n")

    model.save_pretrained(tmp_path)
    peft_ismoe.record_metrics(model, {"f1": 0.9})
    model.save_pretrained(tmp_path)

    text = (tmp_path / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    assert "Hand-written notes." in text and "| f1 | 0.9 |" in text
    assert "which stays frozen, in floating point" in text and "Backbone quantization" not in text
    assert ModelCard.load(tmp_path / "README.md").data.license == "mit"


def test_metrics_reach_the_card_from_the_trainer_callback_without_timings(tmp_path):
    model = _ismoe()
    callback = peft_ismoe.ModelCardMetricsCallback(dataset="dev")
    metrics = {"eval_loss": 0.41, "eval_accuracy": 0.8, "eval_runtime": 3.2, "eval_samples_per_second": 9.0}

    callback.on_evaluate(
        TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl(),
        model=model, metrics=metrics,
    )  # fmt: skip
    model.save_pretrained(tmp_path)

    text = (tmp_path / "README.md").read_text()
    assert "| eval_accuracy | 0.8 |" in text and "| eval_loss | 0.41 |" in text
    assert "runtime" not in text and "samples_per_second" not in text


def test_reloaded_adapter_still_loads_and_other_methods_keep_peft_card(tmp_path):
    model = _ismoe()
    model.save_pretrained(tmp_path / "ismoe")
    loaded = PeftModel.from_pretrained(_bert(), tmp_path / "ismoe")
    assert isinstance(loaded.base_model, peft_ismoe.ISMoEModel)

    lora = get_peft_model(_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")
    assert START not in (tmp_path / "lora" / "README.md").read_text()


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({}, "non-empty dict"),
        ({"accuracy": float("nan")}, "'accuracy' must be a finite number, got nan"),
        ({"accuracy": "high"}, "'accuracy' must be a finite number, got 'high'"),
        ({"": 1.0}, "non-empty strings"),
    ],
)
def test_bad_metrics_are_refused_and_earlier_ones_kept(metrics, message, tmp_path):
    model = _ismoe()
    peft_ismoe.record_metrics(model, {"accuracy": 0.5})

    with pytest.raises(ValueError, match=message):
        peft_ismoe.record_metrics(model, metrics)

    assert model.base_model.card_metrics["default"]["metrics"] == {"accuracy": 0.5}


def test_record_metrics_refuses_other_models():
    lora = get_peft_model(_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(TypeError, match="PeftModel with an ISMoE adapter, got PeftModelForSequenceClassification"):
        peft_ismoe.record_metrics(lora, {"accuracy": 0.5})
