"""ISMoEConfig validation and the registration of ISMoE as a PEFT method."""

from __future__ import annotations

import importlib
import json

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_ismoe
from peft_ismoe import ISMoEConfig, ISMoEModel
from peft_ismoe.tuner import registration

BAD_VALUES = [
    pytest.param({"num_experts": 0}, ValueError, r"`num_experts` must be an int >= 1, got 0", id="no-experts"),
    pytest.param({"num_experts": 2.0}, TypeError, r"`num_experts` must be an int", id="float-experts"),
    pytest.param({"top_k": 0}, ValueError, r"`top_k` must be an int >= 1, got 0", id="top-k-zero"),
    pytest.param({"num_experts": 4, "top_k": 5}, ValueError, r"`top_k` must be in 1..num_experts", id="top-k-big"),
    pytest.param({"salient_feature": "pooler"}, ValueError, r"`salient_feature` must be one of .*'pooler'", id="sal"),
    pytest.param(
        {"side_attention": "yes"}, TypeError, r"`side_attention` must be a bool or None, got 'yes'", id="attn"
    ),
    pytest.param({"side_attention_heads": 0}, ValueError, r"`side_attention_heads` must be an int >= 1", id="heads"),
    pytest.param({"router": "hash"}, ValueError, r"`router` must be one of .*'hash'", id="router"),
    pytest.param({"activation": "tanh"}, ValueError, r"`activation` must be one of", id="activation"),
    pytest.param({"reduction_factor": 0}, ValueError, r"`reduction_factor` must be an int >= 1", id="reduction"),
    pytest.param({"aux_loss_coef": -1.0}, ValueError, r"`aux_loss_coef` must be a finite number >= 0", id="aux"),
    pytest.param({"ladder_temperature": 0}, ValueError, r"`ladder_temperature` must be a finite number > 0", id="T"),
    pytest.param({"expert_ratio": float("nan")}, ValueError, r"`expert_ratio` must be a finite number", id="ratio"),
    pytest.param({"layers_to_tap": "0"}, TypeError, r"`layers_to_tap` must be a list of ints", id="taps-str"),
    pytest.param({"layers_to_tap": []}, ValueError, r"`layers_to_tap` must name at least one", id="taps-empty"),
    pytest.param({"block_stack": "model.layers"}, TypeError, r"`block_stack` must be a list of strings", id="stack"),
    pytest.param({"train_layernorm": 1}, TypeError, r"`train_layernorm` must be a bool", id="ln"),
    pytest.param({"init_from_backbone": "yes"}, TypeError, r"`init_from_backbone` must be a bool", id="init"),
    pytest.param({"init_seed": -1}, ValueError, r"`init_seed` must be an int >= 0", id="seed"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_VALUES)
def test_bad_values_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ISMoEConfig(**kwargs)


def test_defaults_and_peft_type():
    config = ISMoEConfig(task_type="SEQ_CLS")
    assert config.peft_type == PeftType.ISMOE == "ISMOE"
    assert (config.num_experts, config.top_k, config.reduction_factor) == (8, 2, 8)
    assert ISMoEConfig(num_experts=1).top_k == 1  # the default top-2 shrinks to what one expert allows
    assert config.resolved_salient_feature(causal=False) == "cls"
    assert config.resolved_salient_feature(causal=True) == "token"
    assert ISMoEConfig(salient_feature="mean").resolved_salient_feature(causal=True) == "mean"
    assert config.resolved_side_attention(causal=False) and not config.resolved_side_attention(causal=True)
    assert not ISMoEConfig(side_attention=False).resolved_side_attention(causal=False)


def test_peft_type_member_behaves_like_the_builtin_ones():
    member = PeftType.ISMOE
    assert PeftType("ISMOE") is member and PeftType["ISMOE"] is member
    assert member in list(PeftType) and member.value == "ISMOE" and isinstance(member, str)


def test_registered_in_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ISMOE] is ISMoEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ISMOE"] is ISMoEModel


def test_importing_again_does_not_fail():
    importlib.reload(registration)
    importlib.reload(importlib.import_module("peft_ismoe.tuner"))
    importlib.reload(peft_ismoe)
    assert registration.extend_peft_type("ISMOE") is PeftType.ISMOE
    assert list(PeftType).count(PeftType.ISMOE) == 1


def test_extending_with_a_name_taken_by_another_value_raises():
    # Hide LORA's value so that only its name is taken, as another plugin's member with a different value would be.
    original = PeftType._value2member_map_.pop("LORA")
    try:
        with pytest.raises(ValueError, match="already has a member named 'LORA' with another value"):
            registration.extend_peft_type("LORA")
    finally:
        PeftType._value2member_map_["LORA"] = original


def test_config_round_trips_through_adapter_config_json(tmp_path):
    config = ISMoEConfig(task_type="CAUSAL_LM", num_experts=3, top_k=1, layers_to_tap=[0, -1], aux_loss_coef=0.0)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ISMOE"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ISMoEConfig)
    assert (loaded.num_experts, loaded.top_k, loaded.layers_to_tap, loaded.aux_loss_coef) == (3, 1, [0, -1], 0.0)
