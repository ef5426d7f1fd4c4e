"""Initialising ISMoE side blocks from the backbone's feed-forward layers."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

from peft_ismoe import ISMoEConfig
from peft_ismoe.tuner import ISMoEWarning
from peft_ismoe.tuner.init import feed_forward_weights


def _bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96
    )
    return BertModel(config).eval()


def test_finds_the_two_layer_ffn_of_bert_and_gpt2_but_not_a_gated_one():
    bert = _bert()
    w_in, b_in, w_out = feed_forward_weights(bert.encoder.layer[0], 32)
    assert torch.equal(w_in, bert.encoder.layer[0].intermediate.dense.weight)
    assert torch.equal(b_in, bert.encoder.layer[0].intermediate.dense.bias)
    assert torch.equal(w_out, bert.encoder.layer[0].output.dense.weight)

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    w_in, _, w_out = feed_forward_weights(gpt2.h[0], 32)
    assert torch.equal(w_in, gpt2.h[0].mlp.c_fc.weight.t()) and torch.equal(w_out, gpt2.h[0].mlp.c_proj.weight.t())

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    assert feed_forward_weights(llama.model.layers[0], 32) is None


def test_experts_start_as_distinct_slices_of_the_backbone_ffn():
    base = _bert()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        expected = base(input_ids=ids).last_hidden_state
    config = ISMoEConfig(
        task_type="FEATURE_EXTRACTION", num_experts=3, top_k=1, reduction_factor=4, init_from_backbone=True
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, expected)

    side = model.base_model.ismoe_layer.ismoe_side["default"]["backbone"]
    down = side.down[1].weight  # [8, 32], a selection of 8 backbone dimensions
    assert torch.equal(down.sum(dim=1), torch.ones(8)) and set(down.unique().tolist()) == {0.0, 1.0}
    dims = down.argmax(dim=1)
    experts = side.blocks[1].moe.experts
    w_in = base.encoder.layer[1].intermediate.dense.weight
    used_units = []
    for e in range(3):
        # each column of w_in[e] is one backbone hidden unit restricted to the selected dimensions
        for column in experts.w_in[e].t():
            matches = [u for u in range(w_in.shape[0]) if torch.equal(w_in[u, dims], column)]
            assert len(matches) == 1
            used_units.append(matches[0])
    assert len(set(used_units)) == len(used_units) == 3 * experts.w_in.shape[2]


def test_gated_backbones_keep_the_random_start_with_a_warning():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    with pytest.warns(ISMoEWarning, match="2 of 2 side blocks of `model.layers` keep their random start"):
        get_peft_model(llama, ISMoEConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, init_from_backbone=True))
