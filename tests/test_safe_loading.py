"""Safe loading: adapters and GNP-IQ checkpoints are written and read as safetensors only, nothing is unpickled,
and nothing needs ``trust_remote_code``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertForSequenceClassification, BertModel
from tuner_helpers import train_steps

from peft_ismoe import GNPIQConfig, ISMoEConfig

BERT = BertConfig(
    vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every way of unpickling fail loudly, so a test passes only if nothing was unpickled."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(copy.deepcopy(BERT)).eval()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(1, BERT.vocab_size, (3, 7), generator=generator),
        "labels": torch.tensor([0, 1, 1]),
    }


def _trained_adapter(path):
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, init_seed=0))
    train_steps(model, _batch(), steps=2)
    model.save_pretrained(path)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_save_writes_safetensors_and_json_only(tmp_path):
    _trained_adapter(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in written and "adapter_config.json" in written
    assert not [name for name in written if name.endswith(PICKLE_SUFFIXES)]
    assert load_file(str(tmp_path / "adapter_model.safetensors"))


def test_adapter_loads_without_unpickling_or_remote_code(tmp_path, no_unpickling):
    model = _trained_adapter(tmp_path)
    batch = {"input_ids": _batch()["input_ids"]}
    loaded = PeftModel.from_pretrained(_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=1e-6)


def test_pickle_file_in_place_of_the_adapter_is_refused_unopened(tmp_path, no_unpickling):
    model = _trained_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with open(tmp_path / "adapter_model.bin", "wb") as handle:
        pickle.dump({name: p.detach() for name, p in model.named_parameters() if p.requires_grad}, handle)
    weights.unlink()

    base = _bert()
    before = _state(base)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*pickle.*safetensors only"):
        PeftModel.from_pretrained(base, tmp_path)
    after = _state(base)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_reloading_an_existing_adapter_name_from_a_pickle_is_refused_too(tmp_path, no_unpickling):
    # The route the Trainer takes when it resumes: load_adapter for a name the model already has skips the config.
    model = _trained_adapter(tmp_path)
    with open(tmp_path / "adapter_model.bin", "wb") as handle:
        pickle.dump({name: p.detach() for name, p in model.named_parameters() if p.requires_grad}, handle)
    (tmp_path / "adapter_model.safetensors").unlink()

    before = _state(model)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*pickle.*safetensors only"):
        model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_pickle_file_next_to_the_safetensors_file_is_never_read(tmp_path, no_unpickling):
    _trained_adapter(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 not even a valid pickle")
    loaded = PeftModel.from_pretrained(_bert(), tmp_path)
    assert any("ismoe_side" in name for name, _ in loaded.named_parameters())


def test_gnpiq_checkpoint_round_trips_through_safetensors_without_unpickling(tmp_path, monkeypatch):
    torch.manual_seed(0)
    BertModel(copy.deepcopy(BERT)).save_pretrained(tmp_path / "float")
    quantized = AutoModel.from_pretrained(
        tmp_path / "float", quantization_config=GNPIQConfig(bits=4, num_iterations=0)
    )
    quantized.save_pretrained(tmp_path / "quantized")
    written = sorted(p.name for p in (tmp_path / "quantized").iterdir())
    assert written == ["config.json", "model.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    reloaded = AutoModel.from_pretrained(tmp_path / "quantized", trust_remote_code=False)
    expected, restored = quantized.state_dict(), reloaded.state_dict()
    assert expected.keys() == restored.keys() and all(torch.equal(expected[k], restored[k]) for k in expected)
